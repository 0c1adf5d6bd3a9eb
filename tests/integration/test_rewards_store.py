"""Rewards' use cases against real SQLite and PostgreSQL, and the service over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, read_remote_error
from loyalty.runtime.idempotency import run_idempotent
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.rewards import service, store
from services.rewards.api import coupon_to_proto
from services.rewards.domain import CouponStatus, Rejection, ReservationStatus
from tests import infra

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def terms(
    member_id: str = "member-1",
    discount_basis_points: int = 1500,
    valid_from: datetime | None = NOW,
    valid_until: datetime | None = NOW + timedelta(days=30),
) -> service.CouponTerms:
    return service.parse_terms(member_id, discount_basis_points, valid_from, valid_until)


async def issue_idempotently(
    sessions: async_sessionmaker[AsyncSession], request: pb.IssueCouponRequest, now: datetime = NOW
) -> pb.IssueCouponResponse:
    """What RewardsApi.IssueCoupon does, with the clock in the test's hands."""
    valid_from = request.valid_from.ToDatetime(tzinfo=UTC) if request.HasField("valid_from") else None
    valid_until = request.valid_until.ToDatetime(tzinfo=UTC) if request.HasField("valid_until") else None
    parsed = service.parse_terms(request.member_id, request.discount_basis_points, valid_from, valid_until)

    async def work(session: AsyncSession) -> pb.IssueCouponResponse:
        coupon = await service.issue_coupon(session, parsed, now)
        return pb.IssueCouponResponse(coupon=coupon_to_proto(coupon))

    return await run_idempotent(
        sessions,
        store.idempotency_keys,
        "IssueCoupon",
        request.request_id,
        request,
        pb.IssueCouponResponse,
        work,
    )


async def test_an_issued_coupon_validates_for_its_member_and_in_its_window(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            personal = await service.issue_coupon(session, terms(), NOW)
            bearer = await service.issue_coupon(session, terms(member_id="", valid_until=None), NOW)
        assert personal.code != bearer.code
        async with sessions() as session:
            stored = await store.find_coupon(session, personal.code)
            assert stored == personal, "what was written reads back the same, timestamps in UTC"
            accepted = await service.validate_coupon(session, personal.code, "member-1", NOW)
            assert (accepted.valid, accepted.rejection, accepted.coupon) == (True, None, personal)
            answers = {
                "other member": await service.validate_coupon(session, personal.code, "member-2", NOW),
                "too early": await service.validate_coupon(
                    session, personal.code, "member-1", NOW - timedelta(seconds=1)
                ),
                "expired": await service.validate_coupon(session, personal.code, "member-1", NOW + timedelta(days=30)),
                "unknown": await service.validate_coupon(session, "ZZZZZZZZZZ", "member-1", NOW),
                "bearer": await service.validate_coupon(session, bearer.code, "", NOW + timedelta(days=999)),
            }
        assert {what: answer.rejection for what, answer in answers.items()} == {
            "other member": Rejection.OTHER_MEMBER,
            "too early": Rejection.NOT_YET_VALID,
            "expired": Rejection.EXPIRED,
            "unknown": Rejection.NOT_FOUND,
            "bearer": None,
        }
        assert answers["other member"].coupon is None, "another member's coupon is not disclosed"
        assert answers["expired"].coupon == personal
        assert answers["bearer"].coupon is not None and answers["bearer"].coupon.member_id is None


async def test_a_redeemed_coupon_is_already_used(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            coupon = await service.issue_coupon(session, terms(), NOW)
            row = await session.get(store.CouponRow, coupon.code)
            assert row is not None
            row.status = CouponStatus.REDEEMED.value
        async with sessions() as session:
            check = await service.validate_coupon(session, coupon.code, "member-1", NOW)
        assert (check.valid, check.rejection) == (False, Rejection.ALREADY_USED)


async def test_issue_coupon_is_idempotent_by_request_id(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        request = pb.IssueCouponRequest(request_id="issue-1", member_id="member-1", discount_basis_points=500)
        first = await issue_idempotently(sessions, request)
        again = await issue_idempotently(sessions, request, now=NOW + timedelta(hours=1))
        assert again == first, "a repeat answers the first coupon, even its first valid_from"
        assert first.coupon.valid_from == to_timestamp(NOW)

        changed = pb.IssueCouponRequest()
        changed.CopyFrom(request)
        changed.discount_basis_points = 600
        with pytest.raises(FailedPrecondition) as reused:
            await issue_idempotently(sessions, changed)
        assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"

        another = pb.IssueCouponRequest()
        another.CopyFrom(request)
        another.request_id = "issue-2"
        other = await issue_idempotently(sessions, another)
        assert other.coupon.code != first.coupon.code
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.CouponRow)) == 2
            assert await session.scalar(select(func.count()).select_from(store.outbox)) == 2


async def test_concurrent_repeats_of_one_issue_create_one_coupon(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        request = pb.IssueCouponRequest(request_id="issue-1", discount_basis_points=1000)
        results = await asyncio.gather(*(issue_idempotently(sessions, request) for _ in range(8)))
        assert len({result.coupon.code for result in results}) == 1
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.CouponRow)) == 1


async def test_a_retry_after_valid_until_passed_still_answers_the_issued_coupon(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        request = pb.IssueCouponRequest(
            request_id="short-lived",
            discount_basis_points=1000,
            valid_until=to_timestamp(NOW + timedelta(hours=1)),
        )
        first = await issue_idempotently(sessions, request)
        later = NOW + timedelta(hours=2)
        assert await issue_idempotently(sessions, request, now=later) == first

        fresh = pb.IssueCouponRequest()
        fresh.CopyFrom(request)
        fresh.request_id = "short-lived-2"
        with pytest.raises(InvalidArgument) as refused:
            await issue_idempotently(sessions, fresh, now=later)
        assert [v.field for v in refused.value.violations] == ["valid_until"]


async def test_the_issued_event_carries_only_the_code_suffix(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            coupon = await service.issue_coupon(session, terms(), NOW)
        async with sessions() as session:
            rows = (await session.execute(select(store.outbox))).mappings().all()
        assert [row["event_type"] for row in rows] == ["coupon.issued"]
        event = rows[0]
        assert event["payload"] == {
            "code_suffix": coupon.code[-4:],
            "member_id": "member-1",
            "discount_basis_points": 1500,
        }
        assert coupon.code not in json.dumps({key: str(value) for key, value in event.items()})


def test_invalid_terms_are_refused_field_by_field_before_any_storage() -> None:
    with pytest.raises(InvalidArgument) as refused:
        service.parse_terms("m" * 37, 0, NOW, NOW)
    assert refused.value.violations == [
        FieldViolation("member_id", "at most 36 characters"),
        FieldViolation("discount_basis_points", "from 1 to 10000 (10000 = 100%)"),
        FieldViolation("valid_until", "must be after valid_from"),
    ]
    with pytest.raises(InvalidArgument) as empty_code:
        service.parse_lookup(" - ", "")
    assert [v.field for v in empty_code.value.violations] == ["code"]
    assert service.parse_lookup("abcde-fgh23", "pos-1") == "ABCDEFGH23"


async def test_the_service_over_grpc(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings, ("rewards",)) as hosts:
        published: list[Event] = []

        async def collect(event: Event) -> None:
            published.append(event)

        consumer = asyncio.create_task(hosts["rewards"].bus.consume("rewards", "test", "test-1", collect))
        async with grpc.aio.insecure_channel(settings.address("rewards")) as channel:
            stub = RewardsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.IssueCoupon(
                    pb.IssueCouponRequest(
                        request_id="bad",
                        discount_basis_points=10_001,
                        valid_from=to_timestamp(NOW),
                        valid_until=to_timestamp(NOW - timedelta(days=1)),
                    )
                )
            remote = read_remote_error(invalid.value)
            assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
            assert remote.reason == "INVALID_ARGUMENT"
            assert [v.field for v in remote.violations] == ["discount_basis_points", "valid_until"]

            issue = pb.IssueCouponRequest(request_id="good", member_id="member-1", discount_basis_points=2500)
            issued = await stub.IssueCoupon(issue)
            assert await stub.IssueCoupon(issue) == issued, "a retry answers the first coupon"
            code = issued.coupon.code
            assert issued.coupon.status == pb.COUPON_STATUS_ACTIVE
            assert not issued.coupon.HasField("valid_until")
            assert issued.coupon.valid_from.ToDatetime(tzinfo=UTC) <= utcnow()

            typed = code.lower()
            valid = await stub.ValidateCoupon(pb.ValidateCouponRequest(code=typed, member_id="member-1"))
            assert valid == pb.ValidateCouponResponse(valid=True, coupon=issued.coupon)
            stranger = await stub.ValidateCoupon(pb.ValidateCouponRequest(code=code, member_id="member-2"))
            assert stranger == pb.ValidateCouponResponse(rejection=pb.COUPON_REJECTION_OTHER_MEMBER)
            missing = await stub.ValidateCoupon(pb.ValidateCouponRequest(code="ZZZZZZZZZZ"))
            assert (missing.valid, missing.rejection) == (False, pb.COUPON_REJECTION_NOT_FOUND)

            with pytest.raises(grpc.aio.AioRpcError) as no_code:
                await stub.ValidateCoupon(pb.ValidateCouponRequest(code=""))
            assert read_remote_error(no_code.value).violations == (FieldViolation("code", "required"),)

        async def relayed() -> bool:
            return bool(published)

        await infra.wait_until(relayed, what="coupon.issued on the rewards stream")
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        assert [(e.event_type, e.source, e.payload["code_suffix"]) for e in published] == [
            ("coupon.issued", "rewards", code[-4:])
        ]
        assert code not in json.dumps(published[0].to_fields())


async def test_a_reservation_holds_its_coupon_until_its_end_and_reads_back_the_same(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            coupon = await service.issue_coupon(session, terms(), NOW)
            reserved = await service.reserve_coupon(
                session, coupon.code, "member-1", "pos-1:0001", timedelta(minutes=15), NOW
            )
        end = NOW + timedelta(minutes=15)
        assert (reserved.coupon, reserved.reservation.expires_at) == (coupon, end)
        async with sessions() as session:
            assert await store.find_reservation(session, reserved.reservation.reservation_id) == reserved.reservation
            answers = {
                "other receipt": await service.validate_coupon(session, coupon.code, "member-1", NOW, "pos-2:0001"),
                "own receipt": await service.validate_coupon(session, coupon.code, "member-1", NOW, "pos-1:0001"),
                "at its end": await service.validate_coupon(session, coupon.code, "member-1", end, "pos-2:0001"),
            }
        assert {what: answer.rejection for what, answer in answers.items()} == {
            "other receipt": Rejection.RESERVED,
            "own receipt": None,
            "at its end": None,
        }
        async with sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as held:
                await service.reserve_coupon(session, coupon.code, "member-1", "pos-2:0001", timedelta(minutes=1), NOW)
            assert held.value.reason == "COUPON_RESERVED"
        async with sessions() as session, session.begin():
            await service.reserve_coupon(session, coupon.code, "member-1", "pos-2:0001", timedelta(minutes=1), end)
        async with sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as lapsed:
                await service.redeem_coupon(session, reserved.reservation.reservation_id, end)
            assert lapsed.value.reason == "RESERVATION_EXPIRED"


async def test_a_coupon_redeemed_then_returned_after_its_validity_stays_used(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        valid_until = NOW + timedelta(days=30)
        async with sessions() as session, session.begin():
            coupon = await service.issue_coupon(session, terms(valid_until=valid_until), NOW)
            reserved = await service.reserve_coupon(
                session, coupon.code, "member-1", "pos-1:1", timedelta(hours=1), NOW
            )
            redeemed = await service.redeem_coupon(session, reserved.reservation.reservation_id, NOW)
        assert redeemed.coupon.status is CouponStatus.REDEEMED
        async with sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as expired:
                await service.reinstate_coupon(session, coupon.code, "pos-1:1", valid_until)
            assert expired.value.reason == "COUPON_EXPIRED"
        async with sessions() as session, session.begin():
            reinstated = await service.reinstate_coupon(
                session, coupon.code, "pos-1:1", valid_until - timedelta(seconds=1)
            )
        assert reinstated == coupon
        async with sessions() as session:
            returned = await store.find_reservation(session, reserved.reservation.reservation_id)
            assert returned is not None and returned.status is ReservationStatus.RETURNED
            assert await store.redeemed_reservation(session, coupon.code) is None
            events = (await session.execute(select(store.outbox.c.event_type, store.outbox.c.payload))).all()
        assert [event_type for event_type, _payload in events] == [
            "coupon.issued",
            "coupon.redeemed",
            "coupon.reinstated",
        ]
        assert all(coupon.code not in json.dumps(payload) for _event_type, payload in events)
