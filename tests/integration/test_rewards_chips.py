"""Badges and chips over real gRPC on SQLite and PostgreSQL; chips earned from cheque.committed
events published on the bus as the gateway publishes them."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from pydantic import SecretStr
from sqlalchemy import func, select

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.timeutil import utcnow
from services.rewards import store
from tests import infra
from tests.integration.test_rewards_lifecycle import Rewards, failed, refusal


def committed(receipt_number: str, paid_minor: int, member_id: str = "member-1", currency: str = "RUB") -> Event:
    """A cheque.committed event with the gateway's payload."""
    return Event(
        event_id=str(uuid.uuid4()),
        event_type="cheque.committed",
        source="gateway",
        key="pos-1",
        occurred_at=utcnow(),
        payload={
            "terminal_id": "pos-1",
            "receipt_number": receipt_number,
            "store_id": "store-1",
            "receipt_time": utcnow().isoformat(),
            "currency_code": currency,
            "member_id": member_id,
            "holder_id": member_id,
            "total_minor": paid_minor + 1000,
            "discount_minor": 1000,
            "paid_minor": paid_minor,
            "points": 10,
            "points_paid": 0,
        },
        trace_context={},
    )


async def test_a_badge_is_awarded_once_and_listed(tmp_path: Path, database_url: str) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rewards.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rewards",)),
        grpc.aio.insecure_channel(settings.address("rewards")) as channel,
    ):
        stub = RewardsServiceStub(channel)
        badge = (
            await stub.CreateBadge(
                pb.CreateBadgeRequest(request_id="b-1", name="First purchase", description="Bought for the first time")
            )
        ).badge
        first = await stub.AwardBadge(pb.AwardBadgeRequest(request_id="a-1", member_id="m-1", badge_id=badge.badge_id))
        again = await stub.AwardBadge(pb.AwardBadgeRequest(request_id="a-2", member_id="m-1", badge_id=badge.badge_id))
        assert (first.newly_awarded, again.newly_awarded) == (True, False)
        assert again.award == first.award, "the first award stands"
        listed = await stub.ListMemberBadges(pb.ListMemberBadgesRequest(member_id="m-1"))
        assert list(listed.awards) == [first.award]
        assert not (await stub.ListMemberBadges(pb.ListMemberBadgesRequest(member_id="m-2"))).awards
        missing = await refusal(stub.AwardBadge(pb.AwardBadgeRequest(request_id="a-3", member_id="m", badge_id="x")))
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "BADGE_NOT_FOUND")
        engine = db.create_engine(database_url)
        try:
            async with engine.connect() as connection:
                events = (
                    await connection.execute(
                        select(store.outbox.c.payload).where(store.outbox.c.event_type == "badge.awarded")
                    )
                ).all()
        finally:
            await engine.dispose()
        assert [row.payload for row in events] == [
            {"member_id": "m-1", "badge_id": badge.badge_id, "badge_name": "First purchase"}
        ], "one badge.awarded, for the award that changed something"


async def test_chips_are_earned_from_committed_receipts_once_and_exchanged_for_a_coupon(
    tmp_path: Path, database_url: str
) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rewards.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rewards",)) as hosts,
        grpc.aio.insecure_channel(settings.address("rewards")) as channel,
    ):
        engine = db.create_engine(database_url)
        rewards = Rewards(RewardsServiceStub(channel), engine)
        try:
            series = await rewards.create_series("gift-coupon")
            program = (
                await rewards.stub.CreateChipProgram(
                    pb.CreateChipProgramRequest(
                        request_id="p-1",
                        name="Summer stickers",
                        currency_code="RUB",
                        spend_per_chip_minor=50_000,
                        chips_per_exchange=3,
                        exchange_series_id=series.series_id,
                    )
                )
            ).program
            bus = hosts["rewards"].bus
            big = committed("0001", 160_000)
            for event in (big, big, committed("0002", 49_999), committed("0003", 90_000, member_id="")):
                await bus.publish("gateway", event)
            await bus.publish("gateway", committed("0004", 100_000, currency="EUR"))
            await bus.publish("gateway", committed("0005", 50_000, member_id="member-2"))

            async def member_2_credited() -> bool:
                balances = await rewards.stub.GetChipBalances(pb.GetChipBalancesRequest(member_id="member-2"))
                return [b.chips for b in balances.balances] == [1]

            await infra.wait_until(member_2_credited, what="the last event to be handled")
            balances = await rewards.stub.GetChipBalances(pb.GetChipBalancesRequest(member_id="member-1"))
            assert [(b.program, b.chips) for b in balances.balances] == [(program, 3)], (
                "1,600.00 paid earns 3 chips once, though delivered twice; 499.99 and EUR earn none"
            )

            exchange = pb.ExchangeChipsRequest(
                request_id="x-1", member_id="member-1", chip_program_id=program.chip_program_id
            )
            exchanged = await rewards.stub.ExchangeChips(exchange)
            assert exchanged.balance.chips == 0
            assert (exchanged.coupon.member_id, exchanged.coupon.series_id) == ("member-1", series.series_id)
            assert await rewards.stub.ExchangeChips(exchange) == exchanged, "a retry exchanges once"
            exchange.request_id = "x-2"
            short = await refusal(rewards.stub.ExchangeChips(exchange))
            assert (short.code, short.reason) == failed("CHIPS_INSUFFICIENT")
            assert (await rewards.validate(exchanged.coupon.code, member_id="member-1")).valid

            async with engine.connect() as connection:
                entries = (
                    await connection.execute(
                        select(store.ChipEntryRow.chips, store.ChipEntryRow.chips_after, store.ChipEntryRow.ref)
                        .where(store.ChipEntryRow.member_id == "member-1")
                        .order_by(store.ChipEntryRow.entry_id)
                    )
                ).all()
                total = await connection.scalar(
                    select(func.sum(store.ChipEntryRow.chips)).where(store.ChipEntryRow.member_id == "member-1")
                )
            assert [(chips, after) for chips, after, _ref in entries] == [(3, 3), (-3, 0)]
            assert entries[0].ref == "receipt:pos-1:0001"
            assert total == 0, "the balance is the sum of the entries"
        finally:
            await engine.dispose()
