"""Members' purchase statistics fed by the gateway's events and read by conditions, through the
real rules service (SQLite and PostgreSQL) with events published on its bus."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from pydantic import SecretStr

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime.bus import Event
from loyalty.runtime.timeutil import to_timestamp
from tests import infra

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def committed(member_id: str, paid_minor: int, days_ago: int) -> Event:
    receipt_time = NOW - timedelta(days=days_ago)
    return Event(
        event_id=str(uuid.uuid4()),
        event_type="cheque.committed",
        source="gateway",
        key=f"pos-1:{days_ago}",
        occurred_at=receipt_time,
        payload={
            "terminal_id": "pos-1",
            "receipt_number": str(days_ago),
            "store_id": "store-1",
            "receipt_time": receipt_time.isoformat(),
            "currency_code": "RUB",
            "member_id": member_id,
            "holder_id": member_id,
            "total_minor": paid_minor,
            "discount_minor": 0,
            "paid_minor": paid_minor,
            "points": 0,
            "points_paid": 0,
        },
        trace_context={},
    )


async def test_conditions_read_purchase_statistics_from_gateway_events(tmp_path: Path, database_url: str) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rules",)) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        stub = RulesServiceStub(channel)
        bus = hosts["rules"].bus
        campaign = pb.Campaign(
            name="loyal customers",
            rules=[
                pb.Rule(
                    name="every 3rd purchase",
                    condition="(member.purchases.count + 1) % 3 == 0",
                    effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=100)),
                ),
                pb.Rule(
                    name="spent 1,000.00 in 30 days",
                    condition="member.purchases.spend_last_30_days_minor >= 100000",
                    effect=pb.Effect(discount_percent=pb.DiscountPercent(basis_points=500)),
                    priority=1,
                ),
            ],
        )
        created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=campaign))
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign.campaign_id))

        async def evaluate(member_id: str) -> pb.EvaluateReceiptResponse:
            the_receipt = receipt_pb2.Receipt(
                store_id="store-1",
                terminal_id="pos-1",
                receipt_number="new",
                currency_code="RUB",
                receipt_time=to_timestamp(NOW),
                lines=[receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=10_000, quantity_milli=1000)],
            )
            return await stub.EvaluateReceipt(
                pb.EvaluateReceiptRequest(receipt=the_receipt, subject=pb.Subject(member_id=member_id))
            )

        old = committed("m-1", 90_000, days_ago=40)
        recent = committed("m-1", 20_000, days_ago=5)
        for event in (old, recent, old, committed("m-2", 500_000, days_ago=1)):  # `old` delivered twice
            await bus.publish("gateway", event)

        async def third_purchase() -> bool:
            return (await evaluate("m-1")).points_total == 100

        await infra.wait_until(third_purchase, "m-1's two purchases counted once each")
        answer = await evaluate("m-1")
        assert answer.discount_total_minor == 0, "only 200.00 in the last 30 days"

        await bus.publish("gateway", committed("m-1", 80_000, days_ago=2))

        async def big_spender() -> bool:
            return (await evaluate("m-1")).discount_total_minor == 500

        await infra.wait_until(big_spender, "1,000.00 in the last 30 days")
        assert (await evaluate("m-1")).points_total == 0, "the fourth purchase is not a third"
        other = await evaluate("m-2")
        assert (other.points_total, other.discount_total_minor) == (0, 500), "statistics are per member"
        assert (await evaluate("")).discount_total_minor == 0
