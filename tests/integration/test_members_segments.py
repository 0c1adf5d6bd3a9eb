"""Dynamic segments (a CEL expression over the member, recomputed by the job) and RFM scores,
over real gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.members import jobs
from tests.integration.test_members_api import members_service, refusal
from tests.integration.test_members_tiers import receipt, wait_for_purchases

BIG_SPENDERS = "member.total_spend_minor >= 100000 && member.days_since_last_purchase <= 30"


async def test_a_dynamic_segment_follows_its_expression_and_announces_each_change(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        big = await members.register("+79161111111")
        small = await members.register("+79162222222", birth_date="1990-05-17")
        idle = await members.register("+79163333333")
        now = utcnow()
        await members.publish_gateway(
            "cheque.committed", receipt(big.member_id, "1", 2_000_00, now - timedelta(days=2))
        )
        await members.publish_gateway(
            "cheque.committed", receipt(small.member_id, "2", 500_00, now - timedelta(days=9))
        )
        await members.publish_gateway(
            "cheque.committed", receipt(small.member_id, "3", 100_00, now - timedelta(days=40))
        )
        await wait_for_purchases(members, big.member_id, 1, 2_000_00)
        await wait_for_purchases(members, small.member_id, 2, 600_00)
        for index, (code, expression) in enumerate((("big", BIG_SPENDERS), ("adults", "member.age >= 18"))):
            created = await members.stub.CreateSegment(
                pb.CreateSegmentRequest(request_id=f"s-{index}", code=code, name=code, expression=expression)
            )
            assert created.segment.expression == expression

        sessions = db.create_session_factory(members.engine)
        assert await jobs.recompute_profiles(sessions) == 2 + 2, "two joins, two members scored"
        big_segment = (await members.stub.GetSegment(pb.GetSegmentRequest(code="big"))).segment
        assert big_segment.size == 1
        context = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone="+79161111111"))
        assert list(context.context.segments) == ["big"]
        context = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone="+79162222222"))
        assert list(context.context.segments) == ["adults"]
        assert context.context.birth_date == "1990-05-17", "the promotions' birthday offers read it"
        assert await members.events("segment.joined") == [
            {"segment_code": "adults", "member_id": small.member_id},
            {"segment_code": "big", "member_id": big.member_id},
        ]
        assert await jobs.recompute_profiles(sessions) == 2, "nothing changes: only the scores are rewritten"

        fixed = await refusal(
            members.stub.AddSegmentMembers(
                pb.AddSegmentMembersRequest(request_id="a-1", code="big", member_ids=[idle.member_id])
            )
        )
        assert (fixed.code, fixed.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SEGMENT_IS_DYNAMIC")

        await members.publish_gateway(
            "cheque.returned",
            {
                "terminal_id": "pos-1",
                "receipt_number": "1",
                "return_id": "r-1",
                "store_id": "store-1",
                "member_id": big.member_id,
                "holder_id": big.member_id,
                "returned_minor": 1_500_00,
                "points_taken_back": 0,
                "points_refunded": 0,
                "return_time": now.isoformat(),
            },
        )
        await wait_for_purchases(members, big.member_id, 1, 500_00)
        assert await jobs.recompute_profiles(sessions) == 1 + 2
        assert await members.events("segment.left") == [{"segment_code": "big", "member_id": big.member_id}]
        assert (await members.stub.GetSegment(pb.GetSegmentRequest(code="big"))).segment.size == 0


async def test_rfm_scores_are_readable_on_the_member(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        recent_big = await members.register("+79161111111")
        old_small = await members.register("+79162222222")
        never = await members.register("+79163333333")
        now = utcnow()
        for number in ("1", "2"):
            await members.publish_gateway(
                "cheque.committed", receipt(recent_big.member_id, number, 900_00, now - timedelta(days=1))
            )
        await members.publish_gateway(
            "cheque.committed", receipt(old_small.member_id, "3", 100_00, now - timedelta(days=100))
        )
        await wait_for_purchases(members, recent_big.member_id, 2, 1_800_00)
        await wait_for_purchases(members, old_small.member_id, 1, 100_00)

        assert await jobs.recompute_profiles(db.create_session_factory(members.engine)) == 2

        async def member(member_id: str) -> pb.Member:
            return (await members.stub.GetMember(pb.GetMemberRequest(member_id=member_id))).member

        best, worst = await member(recent_big.member_id), await member(old_small.member_id)
        # Two buyers: the lower of them sits in the first quintile, the higher in the third.
        assert (best.rfm.recency, best.rfm.frequency, best.rfm.monetary) == (3, 3, 3)
        assert (worst.rfm.recency, worst.rfm.frequency, worst.rfm.monetary) == (1, 1, 1)
        assert not (await member(never.member_id)).HasField("rfm")


async def test_bad_segment_expressions_are_refused(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        for index, expression in enumerate(("member.total_spend_minor >", "member.purchase_count", "x > 1")):
            refused = await refusal(
                members.stub.CreateSegment(
                    pb.CreateSegmentRequest(request_id=f"s-{index}", code="bad", name="Bad", expression=expression)
                )
            )
            assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in refused.violations] == ["expression"], expression


async def test_concurrent_recomputations_announce_each_change_once(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        registered = [await members.register(f"+7916111110{index}") for index in range(6)]
        await members.stub.CreateSegment(
            pb.CreateSegmentRequest(request_id="s-1", code="everyone", name="All", expression="member.age == -1")
        )
        sessions = db.create_session_factory(members.engine)
        # Two replicas' jobs at once: the segment's row lock lets one write the joins, and the
        # other then finds them and announces nothing again.
        await asyncio.gather(jobs.recompute_profiles(sessions), jobs.recompute_profiles(sessions))
        joined = await members.events("segment.joined")
        assert sorted(event["member_id"] for event in joined) == sorted(member.member_id for member in registered)
        assert (await members.stub.GetSegment(pb.GetSegmentRequest(code="everyone"))).segment.size == 6
