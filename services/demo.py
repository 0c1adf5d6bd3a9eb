"""Demo data for the embedded run and the receipt that shows it working.

Everything goes through the public contracts with fixed request ids, so a
second start finds the same program, member and card instead of new ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from loyalty.client.pos import pos_channel
from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime import db
from loyalty.runtime.settings import Settings
from services.gateway import auth

DEMO_PHONE = "+79990000001"
DEMO_CARD = "7700000000016"
DEMO_PARTNER = "demo"
DEMO_KEY_FILE = "demo-api-key"


def demo_key_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / DEMO_KEY_FILE


async def ensure_demo_key(settings: Settings) -> str:
    """A terminal API key for the demo, kept in the data directory for `demo-receipt` and
    `buf curl`. Written straight into the gateway's database, as `loyalty api-key` would:
    the demo must work without an admin token configured."""
    path = demo_key_file(settings)
    kept = path.read_text().strip() if path.exists() else ""
    pepper = auth.pepper_of(settings)
    engine = db.create_engine(settings.database_url("gateway"))
    try:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            # A key left by an earlier run against another database is replaced.
            if kept and await auth.is_valid_api_key(session, kept, pepper):
                return kept
            created = await auth.create_api_key(session, DEMO_PARTNER, [], "demo terminal (loyalty seed-demo)", pepper)
    finally:
        await engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(created.secret + "\n")
    return created.secret


def demo_campaign() -> rules.Campaign:
    return rules.Campaign(
        name="Base program: 5% back as points",
        rules=[
            rules.Rule(
                name="5% of the receipt",
                condition="receipt.total_minor > 0",
                effect=rules.Effect(earn_points_percent=rules.EarnPointsPercent(basis_points=500)),
                receipt_text="5% of your purchase back as points",
                priority=100,
            )
        ],
    )


async def seed(settings: Settings) -> str:
    """Loads the demo program and a demo terminal key; returns the demo card number."""
    await ensure_demo_key(settings)
    async with (
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(settings.address("members")) as members_channel,
        grpc.aio.insecure_channel(settings.address("rewards")) as rewards_channel,
    ):
        rules_stub = rules_grpc.RulesServiceStub(rules_channel)
        created = await rules_stub.CreateCampaign(
            rules.CreateCampaignRequest(request_id="demo:campaign:base-5", campaign=demo_campaign())
        )
        await rules_stub.PublishCampaign(
            rules.PublishCampaignRequest(request_id="demo:publish:base-5", campaign_id=created.campaign.campaign_id)
        )
        members_stub = members_grpc.MembersServiceStub(members_channel)
        registered = await members_stub.RegisterMember(
            members.RegisterMemberRequest(
                request_id="demo:member:anna",
                phone=DEMO_PHONE,
                first_name="Anna",
                channel=members.REGISTRATION_CHANNEL_POS,
            )
        )
        await members_stub.IssueCard(
            members.IssueCardRequest(
                request_id="demo:card:anna", member_id=registered.member.member_id, card_number=DEMO_CARD
            )
        )
        rewards_stub = rewards_grpc.RewardsServiceStub(rewards_channel)
        series = await rewards_stub.CreateCouponSeries(
            rewards.CreateCouponSeriesRequest(
                request_id="demo:series:ten-off",
                name="10% off a receipt",
                kind=rewards.COUPON_SERIES_KIND_UNIQUE,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=1000),
                uses_per_code=1,
            )
        )
        await rewards_stub.IssueCoupon(
            rewards.IssueCouponRequest(
                request_id="demo:coupon:anna", member_id=registered.member.member_id, series_id=series.series.series_id
            )
        )
    return DEMO_CARD


def instructions(settings: Settings, card: str) -> str:
    gateway = settings.address("gateway")
    key_file = demo_key_file(settings)
    return (
        f"\nDemo program loaded: card {card}, phone {DEMO_PHONE}, a live rule '5% back as points'.\n"
        f"Run a demo receipt (calculate + commit) in another terminal:\n"
        f"  make demo-receipt            # or: .venv/bin/loyalty demo-receipt --card {card} --gateway {gateway}\n"
        f"Or call the gateway with any gRPC client, e.g. buf curl through reflection:\n"
        f"  node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge "
        f'-H "x-api-key: $(cat {key_file})" '
        f'-d \'{{"identifier":{{"cardNumber":"{card}"}}}}\' '
        f"http://{gateway}/loyalty.gateway.v1.PosService/Identify\n"
    )


def demo_receipt(receipt_number: str) -> receipt_pb2.Receipt:
    lines = [
        ("MILK-1L", 8990, 2000),
        ("BREAD-RYE", 5450, 1000),
        ("APPLES-KG", 14900, 1350),
    ]
    return receipt_pb2.Receipt(
        store_id="store-001",
        terminal_id="demo-pos-1",
        receipt_number=receipt_number,
        currency_code="RUB",
        channel=receipt_pb2.SALES_CHANNEL_POS,
        lines=[
            receipt_pb2.ReceiptLine(position=index, sku=sku, price_minor=price, quantity_milli=quantity)
            for index, (sku, price, quantity) in enumerate(lines, start=1)
        ],
    )


def _money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


async def print_demo_receipt(address: str, api_key: str, card: str | None, phone: str | None) -> int:
    identifier = pos.CustomerIdentifier(card_number=card) if card else pos.CustomerIdentifier(phone=phone or "")
    receipt = demo_receipt(receipt_number=str(time.time_ns()))
    async with pos_channel(address, api_key) as channel:
        stub = pos_grpc.PosServiceStub(channel)
        try:
            calculated = await stub.CalculateCheque(
                pos.CalculateChequeRequest(receipt=receipt, identifier=identifier), timeout=10
            )
            committed = await stub.CommitCheque(
                pos.CommitChequeRequest(
                    receipt=receipt, identifier=identifier, calculation_id=calculated.calculation_id
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            print(f"the gateway refused the receipt: {error.code().name}: {error.details()}")
            return 1
    print(f"Receipt {receipt.terminal_id}/{receipt.receipt_number} for member {calculated.customer.member_id}")
    for line, result in zip(receipt.lines, committed.lines, strict=True):
        print(
            f"  {line.position}. {line.sku:<10} {_money(result.final_amount_minor):>8}"
            f"   points +{_money(result.points_earned)}"
        )
    for promotion in calculated.applied_promotions:
        print(f"  * {promotion.receipt_text}")
    print(f"Points earned: {_money(committed.points_earned_total)}   state: {pos.ChequeState.Name(committed.state)}")
    print(f"Balance now:   {_money(committed.customer.available_points)} points available")
    return 0
