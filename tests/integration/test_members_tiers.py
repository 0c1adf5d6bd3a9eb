"""Tiers and purchase statistics from the gateway's events, on SQLite and PostgreSQL: the
premium tier for 30 days once purchases exceed 180,000 over the last 6 months; redelivered
events counted once; returns; the periodic review."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.members import jobs, service, store
from services.members.domain import months_before
from tests import infra
from tests.integration.test_members_api import Members, members_service, refusal

PREMIUM = pb.TierDefinition(
    code="premium",
    name="Premium",
    rank=1,
    spend_threshold_minor=180_000_00,
    window_months=6,
    duration_days=30,
)


def receipt(member_id: str, number: str, paid_minor: int, at: datetime) -> dict[str, Any]:
    return {
        "terminal_id": "pos-1",
        "receipt_number": number,
        "store_id": "store-1",
        "receipt_time": at.isoformat(),
        "currency_code": "RUB",
        "member_id": member_id,
        "holder_id": member_id,
        "total_minor": paid_minor,
        "discount_minor": 0,
        "paid_minor": paid_minor,
        "points": 0,
        "points_paid": 0,
    }


async def statistics(members: Members, member_id: str) -> pb.GetMemberStatisticsResponse:
    return await members.stub.GetMemberStatistics(pb.GetMemberStatisticsRequest(member_id=member_id))


async def wait_for_purchases(members: Members, member_id: str, count: int, spend: int) -> None:
    async def counted() -> bool:
        stats = await statistics(members, member_id)
        return (stats.purchase_count, stats.total_spend_minor) == (count, spend)

    await infra.wait_until(counted, f"{count} purchases worth {spend}")


async def test_premium_for_30_days_once_purchases_exceed_180000_over_6_months(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-1", tier=PREMIUM))
        member = await members.register()
        member_id, now = member.member_id, utcnow()
        # Seven months ago: outside the window, so it never counts towards the tier.
        await members.publish_gateway("cheque.committed", receipt(member_id, "1", 100_000_00, months_before(now, 7)))
        await members.publish_gateway("cheque.committed", receipt(member_id, "2", 90_000_00, now - timedelta(days=60)))
        await wait_for_purchases(members, member_id, 2, 190_000_00)
        assert (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member.tier == "basic"

        third = receipt(member_id, "3", 90_000_01, now - timedelta(days=1))
        event_id = await members.publish_gateway("cheque.committed", third)
        await wait_for_purchases(members, member_id, 3, 280_000_01)
        premium = (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member
        assert premium.tier == "premium"
        lasts = premium.tier_expire_time.ToDatetime().timestamp() - utcnow().timestamp()
        assert 29 * 86400 < lasts <= 30 * 86400

        # The same event delivered again, and the same receipt under a new event id.
        await members.publish_gateway("cheque.committed", third, event_id=event_id)
        await members.publish_gateway("cheque.committed", third)
        await members.publish_gateway("cheque.committed", receipt(member_id, "4", 1_00, now))
        await wait_for_purchases(members, member_id, 4, 280_000_01 + 1_00)

        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=member.phone))).context
        assert context.tier == "premium"
        assert await members.events("tier.changed") == [
            {"member_id": member_id, "old_tier": "basic", "new_tier": "premium", "reason": "qualified"}
        ]
        stats = await statistics(members, member_id)
        assert stats.spend_last_30_days_minor == 90_000_01 + 1_00
        assert stats.first_purchase_time.ToDatetime().date() == months_before(now, 7).date()

        # A return takes the spend under the threshold; the tier still lasts its 30 days.
        await members.publish_gateway(
            "cheque.returned",
            {
                "terminal_id": "pos-1",
                "receipt_number": "3",
                "return_id": "r-1",
                "store_id": "store-1",
                "member_id": member_id,
                "holder_id": member_id,
                "returned_minor": 10_000_00,
                "points_taken_back": 0,
                "points_refunded": 0,
                "return_time": now.isoformat(),
            },
        )
        await wait_for_purchases(members, member_id, 4, 270_000_01 + 1_00)
        assert (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member.tier == "premium"

        # Thirty-one days on, the 6-month spend (170,000.02) no longer qualifies: back to basic.
        sessions = db.create_session_factory(members.engine)
        async with sessions() as session, session.begin():
            later = await service.evaluate_member_tier(session, member_id, now + timedelta(days=31))
        assert (later.tier, later.tier_expires_at) == ("basic", None)
        history = (await members.stub.ListTierHistory(pb.ListTierHistoryRequest(member_id=member_id))).changes
        assert [(c.old_tier, c.new_tier, c.reason) for c in history] == [
            ("premium", "basic", "expired"),
            ("basic", "premium", "qualified"),
        ]


async def test_the_periodic_review_drops_lapsed_tiers(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        gold = pb.TierDefinition(code="gold", name="Gold", rank=2, spend_threshold_minor=5_000_00, duration_days=1)
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-1", tier=gold))
        lapsing, keeping = await members.register(), await members.register("+79160000001")
        for index, member in enumerate((lapsing, keeping)):
            await members.publish_gateway(
                "cheque.committed", receipt(member.member_id, f"r-{index}", 6_000_00, utcnow())
            )
            await wait_for_purchases(members, member.member_id, 1, 6_000_00)
        gold.spend_threshold_minor = 7_000_00
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-2", tier=gold))
        async with members.engine.begin() as connection:
            await connection.execute(
                update(store.MemberRow)
                .where(store.MemberRow.member_id == lapsing.member_id)
                .values(tier_expires_at=utcnow() - timedelta(seconds=1))
            )
        assert await jobs.review_tiers(db.create_session_factory(members.engine)) == 1
        tiers = {
            member.member_id: (
                await members.stub.GetMember(pb.GetMemberRequest(member_id=member.member_id))
            ).member.tier
            for member in (lapsing, keeping)
        }
        assert tiers == {lapsing.member_id: "basic", keeping.member_id: "gold"}


async def test_tier_definitions_are_checked(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        bad = await refusal(
            members.stub.SetTierDefinition(
                pb.SetTierDefinitionRequest(
                    request_id="t-1",
                    tier=pb.TierDefinition(code="basic", rank=0, spend_threshold_minor=-1, window_months=-1),
                )
            )
        )
        assert {v.field for v in bad.violations} == {
            "tier.code",
            "tier.name",
            "tier.rank",
            "tier.spend_threshold_minor",
            "tier.window_months",
        }
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-2", tier=PREMIUM))
        clash = pb.TierDefinition(code="gold", name="Gold", rank=PREMIUM.rank)
        taken = await refusal(members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-3", tier=clash)))
        assert taken.reason == "TIER_RANK_TAKEN"
        listed = (await members.stub.ListTierDefinitions(pb.ListTierDefinitionsRequest())).tiers
        answered = pb.TierDefinition()
        answered.CopyFrom(PREMIUM)
        answered.metric = pb.TIER_METRIC_SPEND  # not given: spend, answered explicitly
        assert list(listed) == [answered]


async def test_a_points_tier_over_the_calendar_year_counts_points_net_of_returns(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        silver = pb.TierDefinition(
            code="silver",
            name="Silver",
            rank=1,
            metric=pb.TIER_METRIC_POINTS,
            points_threshold=500,
            # A spend threshold that would qualify at once: the metric decides what counts.
            spend_threshold_minor=0,
            calendar_period=pb.CALENDAR_PERIOD_YEAR,
        )
        stored = (await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-1", tier=silver))).tier
        assert stored == silver
        member = await members.register()
        member_id, now = member.member_id, utcnow()
        new_year = now.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        # Last year's points are outside the calendar window.
        await members.publish_gateway(
            "cheque.committed", receipt(member_id, "1", 10_00, new_year - timedelta(days=1)) | {"points": 1000}
        )
        await members.publish_gateway(
            "cheque.committed", receipt(member_id, "2", 10_00, new_year + timedelta(minutes=1)) | {"points": 300}
        )
        await wait_for_purchases(members, member_id, 2, 20_00)
        assert (await statistics(members, member_id)).points_earned == 1300
        assert (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member.tier == "basic"

        await members.publish_gateway("cheque.committed", receipt(member_id, "3", 10_00, now) | {"points": 250})
        await wait_for_purchases(members, member_id, 3, 30_00)
        assert (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member.tier == "silver"

        # A return takes back 100 of those points: 450 this year, under the threshold.
        await members.publish_gateway(
            "cheque.returned",
            {
                "terminal_id": "pos-1",
                "receipt_number": "3",
                "return_id": "r-1",
                "member_id": member_id,
                "holder_id": member_id,
                "returned_minor": 4_00,
                "points_taken_back": 100,
                "points_refunded": 0,
                "return_time": now.isoformat(),
            },
        )
        await wait_for_purchases(members, member_id, 3, 26_00)
        assert (await statistics(members, member_id)).points_earned == 1450
        assert (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member.tier == "basic"
        history = (await members.stub.ListTierHistory(pb.ListTierHistoryRequest(member_id=member_id))).changes
        assert [(c.old_tier, c.new_tier, c.reason) for c in history] == [
            ("silver", "basic", "not_qualified"),
            ("basic", "silver", "qualified"),
        ]

        both = await refusal(
            members.stub.SetTierDefinition(
                pb.SetTierDefinitionRequest(
                    request_id="t-2",
                    tier=pb.TierDefinition(
                        code="gold",
                        name="Gold",
                        rank=2,
                        window_months=6,
                        calendar_period=pb.CALENDAR_PERIOD_QUARTER,
                        points_threshold=-1,
                    ),
                )
            )
        )
        assert {v.field for v in both.violations} == {"tier.window_months", "tier.points_threshold"}
