"""Rewards' use cases against real SQLite and PostgreSQL, and the service over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from alembic import command
from sqlalchemy import Connection, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.common.v1 import coupon_pb2
from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, read_remote_error
from loyalty.runtime.idempotency import run_idempotent
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services import suite
from services.rewards import service, store
from services.rewards.api import coupon_to_proto
from services.rewards.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    Coupon,
    CouponStatus,
    Rejection,
    ReservationStatus,
    SeriesKind,
)
from tests import infra

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


BENEFIT = coupon_pb2.CouponBenefit(percent_off_basis_points=1500)


def series_terms(
    valid_from: datetime | None = NOW, valid_until: datetime | None = NOW + timedelta(days=30), **changes: object
) -> service.SeriesTerms:
    """A unique-code, single-use series: 15% off, for a month from NOW."""
    terms = service.SeriesTerms(
        name="Spring 15%",
        kind=SeriesKind.UNIQUE,
        campaign_id="campaign-1",
        benefit=BENEFIT.SerializeToString(),
        min_receipt_total_minor=0,
        uses_per_code=1,
        uses_per_member=0,
        valid_from=valid_from,
        valid_until=valid_until,
        validity_days=0,
        mass_code=None,
        code_alphabet=CODE_ALPHABET,
        code_length=CODE_LENGTH,
    )
    return replace(terms, **changes)  # type: ignore[arg-type]


async def issue(session: AsyncSession, member_id: str = "member-1", now: datetime = NOW, **terms: object) -> Coupon:
    """One coupon of a new series with the given terms."""
    series = await service.create_series(session, replace(series_terms(), **terms), now)  # type: ignore[arg-type]
    (coupon,) = await service.issue_coupons(session, series.series_id, [member_id or None], now)
    return coupon


async def issue_idempotently(
    sessions: async_sessionmaker[AsyncSession], request: pb.IssueCouponRequest, now: datetime = NOW
) -> pb.IssueCouponResponse:
    """What RewardsApi.IssueCoupon does, with the clock in the test's hands."""

    async def work(session: AsyncSession) -> pb.IssueCouponResponse:
        (coupon,) = await service.issue_coupons(session, request.series_id, [request.member_id or None], now)
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
            personal = await issue(session)
            bearer = await issue(session, member_id="", valid_until=None)
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
            coupon = await issue(session)
            row = await session.get(store.CouponRow, coupon.code)
            assert row is not None
            row.status = CouponStatus.REDEEMED.value
        async with sessions() as session:
            check = await service.validate_coupon(session, coupon.code, "member-1", NOW)
        assert (check.valid, check.rejection) == (False, Rejection.ALREADY_USED)


async def test_issue_coupon_is_idempotent_by_request_id(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            series = await service.create_series(session, series_terms(), NOW)
            other_series = await service.create_series(session, series_terms(), NOW)
        request = pb.IssueCouponRequest(request_id="issue-1", member_id="member-1", series_id=series.series_id)
        first = await issue_idempotently(sessions, request)
        again = await issue_idempotently(sessions, request, now=NOW + timedelta(hours=1))
        assert again == first, "a repeat answers the first coupon, even its first valid_from"
        assert first.coupon.valid_from == to_timestamp(NOW)

        changed = pb.IssueCouponRequest()
        changed.CopyFrom(request)
        changed.series_id = other_series.series_id
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
        async with sessions() as session, session.begin():
            series = await service.create_series(session, series_terms(), NOW)
        request = pb.IssueCouponRequest(request_id="issue-1", series_id=series.series_id)
        results = await asyncio.gather(*(issue_idempotently(sessions, request) for _ in range(8)))
        assert len({result.coupon.code for result in results}) == 1
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.CouponRow)) == 1


async def test_a_retry_after_the_series_ended_still_answers_the_issued_coupon(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            series = await service.create_series(session, series_terms(valid_until=NOW + timedelta(hours=1)), NOW)
        request = pb.IssueCouponRequest(request_id="short-lived", series_id=series.series_id)
        first = await issue_idempotently(sessions, request)
        later = NOW + timedelta(hours=2)
        assert await issue_idempotently(sessions, request, now=later) == first

        fresh = pb.IssueCouponRequest()
        fresh.CopyFrom(request)
        fresh.request_id = "short-lived-2"
        with pytest.raises(FailedPrecondition) as refused:
            await issue_idempotently(sessions, fresh, now=later)
        assert refused.value.reason == "COUPON_SERIES_ENDED"


async def test_the_issued_event_carries_only_the_code_suffix(database_url: str) -> None:
    async with infra.migrated_engine("rewards", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            coupon = await issue(session)
        async with sessions() as session:
            rows = (await session.execute(select(store.outbox))).mappings().all()
        assert [row["event_type"] for row in rows] == ["coupon.issued"]
        event = rows[0]
        assert event["payload"] == {
            "code_suffix": coupon.code[-4:],
            "member_id": "member-1",
            "series_id": coupon.series.series_id,
            "campaign_id": "campaign-1",
        }
        assert coupon.code not in json.dumps({key: str(value) for key, value in event.items()})


def test_invalid_lookups_are_refused_field_by_field_before_any_storage() -> None:
    with pytest.raises(InvalidArgument) as empty_code:
        service.parse_lookup(" - ", "t" * 65, -1)
    assert [v.field for v in empty_code.value.violations] == ["code", "terminal_id", "receipt_total_minor"]
    assert service.parse_lookup("abcde-fgh23", "pos-1", None) == "ABCDEFGH23"


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
                await stub.IssueCoupon(pb.IssueCouponRequest(request_id="bad", member_id="m" * 37))
            remote = read_remote_error(invalid.value)
            assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
            assert remote.reason == "INVALID_ARGUMENT"
            assert [v.field for v in remote.violations] == ["series_id", "member_id"]

            created = await stub.CreateCouponSeries(
                pb.CreateCouponSeriesRequest(
                    request_id="series",
                    name="25% off",
                    kind=pb.COUPON_SERIES_KIND_UNIQUE,
                    benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=2500),
                    uses_per_code=1,
                )
            )
            issue = pb.IssueCouponRequest(request_id="good", member_id="member-1", series_id=created.series.series_id)
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
            coupon = await issue(session)
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
            coupon = await issue(session, valid_until=valid_until)
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
            assert await store.redeemed_reservation(session, coupon.code, "pos-1:1") is None
            events = (await session.execute(select(store.outbox.c.event_type, store.outbox.c.payload))).all()
        assert [event_type for event_type, _payload in events] == [
            "coupon.issued",
            "coupon.redeemed",
            "coupon.reinstated",
        ]
        assert all(coupon.code not in json.dumps(payload) for _event_type, payload in events)


async def test_coupons_issued_before_series_keep_their_code_owner_state_and_discount(database_url: str) -> None:
    """The migration that introduced series moves every existing coupon into a series of its
    percentage: nothing issued before is lost."""
    config = db.alembic_config(suite.definition("rewards").migrations_dir)

    def upgrade_to(revision: str) -> Callable[[Connection], None]:
        def run(connection: Connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return run

    engine = db.create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to("2cd42f9f7762"))
            for code, member_id, basis_points, status in [
                ("OLDCODE222", "member-1", 1000, "active"),
                ("OLDCODE333", None, 1000, "redeemed"),
                ("OLDCODE444", "member-2", 2500, "active"),
            ]:
                await connection.execute(
                    text(
                        "INSERT INTO coupons (code, member_id, discount_basis_points, status, valid_from, created_at) "
                        "VALUES (:code, :member_id, :basis_points, :status, :now, :now)"
                    ),
                    {"code": code, "member_id": member_id, "basis_points": basis_points, "status": status, "now": NOW},
                )
            await connection.execute(
                text(
                    "INSERT INTO coupon_reservations (reservation_id, code, member_id, receipt_ref, status, expires_at,"
                    " created_at) VALUES ('r-1', 'OLDCODE333', NULL, 'pos-1:1', 'redeemed', :now, :now)"
                ),
                {"now": NOW},
            )
        await db.migrate(engine, suite.definition("rewards").migrations_dir)
        sessions = db.create_session_factory(engine)
        async with sessions() as session:
            coupons = {
                code: await store.find_coupon(session, code) for code in ("OLDCODE222", "OLDCODE333", "OLDCODE444")
            }
            reservation = await store.find_reservation(session, "r-1")
        moved = {
            code: (c.member_id, c.status, c.uses, coupon_pb2.CouponBenefit.FromString(c.series.benefit))
            for code, c in coupons.items()
            if c is not None
        }
        assert moved == {
            "OLDCODE222": ("member-1", CouponStatus.ACTIVE, 0, coupon_pb2.CouponBenefit(percent_off_basis_points=1000)),
            "OLDCODE333": (None, CouponStatus.REDEEMED, 1, coupon_pb2.CouponBenefit(percent_off_basis_points=1000)),
            "OLDCODE444": ("member-2", CouponStatus.ACTIVE, 0, coupon_pb2.CouponBenefit(percent_off_basis_points=2500)),
        }
        one, used, other = (c.series for c in coupons.values() if c is not None)
        assert one == used != other, "one series per percentage"
        assert reservation is not None and reservation.series_id == used.series_id
    finally:
        await engine.dispose()
