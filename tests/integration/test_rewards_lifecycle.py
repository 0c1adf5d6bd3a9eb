"""A coupon's life at the register over real gRPC, on SQLite and PostgreSQL: reserve, redeem,
release, reinstate; each refusal; retries; lapsed reservations; many registers at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.message import Message
from pydantic import SecretStr
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.common.v1 import coupon_pb2
from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.runtime import db
from loyalty.runtime.errors import RemoteError, ResourceExhausted, read_remote_error, reraise_remote
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.rewards import store
from services.rewards.domain import WRONG_CODE_LIMIT, ReservationStatus
from tests import infra

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceAsyncStub


@dataclass
class Rewards:
    stub: RewardsServiceAsyncStub
    engine: AsyncEngine
    """The service's own database, to check what it wrote."""

    async def create_series(self, request_id: str, **terms: object) -> pb.CouponSeries:
        """A unique-code series, 10% off, single use unless ``terms`` say otherwise."""
        request = pb.CreateCouponSeriesRequest(
            request_id=request_id,
            name="10% off",
            kind=pb.COUPON_SERIES_KIND_UNIQUE,
            campaign_id="campaign-1",
            benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=1000),
            uses_per_code=1,
        )
        for name, value in terms.items():
            if isinstance(value, Message):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        return (await self.stub.CreateCouponSeries(request)).series

    async def issue(self, request_id: str, member_id: str = "member-1", **terms: object) -> pb.Coupon:
        """A coupon of a series of its own with the given terms."""
        series = await self.create_series(f"series-for-{request_id}", **terms)
        request = pb.IssueCouponRequest(request_id=request_id, member_id=member_id, series_id=series.series_id)
        return (await self.stub.IssueCoupon(request)).coupon

    async def backdate(self, code: str, valid_from: datetime, valid_until: datetime) -> None:
        """Moves a coupon's window into the past (a series cannot issue into an ended window)."""
        async with self.engine.begin() as connection:
            await connection.execute(
                update(store.CouponRow)
                .where(store.CouponRow.code == code)
                .values(valid_from=valid_from, valid_until=valid_until)
            )

    async def reserve(
        self, request_id: str, code: str, receipt_ref: str, member_id: str = "member-1", ttl_seconds: int = 0
    ) -> pb.ReserveCouponResponse:
        return await self.stub.ReserveCoupon(
            pb.ReserveCouponRequest(
                request_id=request_id,
                code=code,
                member_id=member_id,
                receipt_ref=receipt_ref,
                ttl_seconds=ttl_seconds,
                terminal_id="pos-1",
            )
        )

    async def redeem(self, request_id: str, reservation_id: str) -> pb.RedeemCouponResponse:
        return await self.stub.RedeemCoupon(
            pb.RedeemCouponRequest(request_id=request_id, reservation_id=reservation_id)
        )

    async def release(self, request_id: str, reservation_id: str) -> pb.ReleaseReservationResponse:
        return await self.stub.ReleaseReservation(
            pb.ReleaseReservationRequest(request_id=request_id, reservation_id=reservation_id)
        )

    async def reinstate(self, request_id: str, code: str, receipt_ref: str) -> pb.ReinstateCouponResponse:
        return await self.stub.ReinstateCoupon(
            pb.ReinstateCouponRequest(request_id=request_id, code=code, receipt_ref=receipt_ref)
        )

    async def validate(
        self, code: str, receipt_ref: str = "", member_id: str = "member-1"
    ) -> pb.ValidateCouponResponse:
        return await self.stub.ValidateCoupon(
            pb.ValidateCouponRequest(code=code, member_id=member_id, receipt_ref=receipt_ref, terminal_id="pos-1")
        )

    async def redeemed_events(self) -> list[dict[str, object]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(store.outbox.c.payload).where(store.outbox.c.event_type == "coupon.redeemed")
            )
            return [dict(row.payload) for row in rows]

    async def redeemed_reservations(self, code: str) -> int:
        async with self.engine.connect() as connection:
            count = await connection.scalar(
                select(func.count())
                .select_from(store.ReservationRow)
                .where(
                    store.ReservationRow.code == code,
                    store.ReservationRow.status == ReservationStatus.REDEEMED.value,
                )
            )
            return int(count or 0)


@asynccontextmanager
async def rewards_service(tmp_path: Path, database_url: str) -> AsyncIterator[Rewards]:
    settings = infra.suite_settings(tmp_path)
    settings.rewards.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rewards",)),
        grpc.aio.insecure_channel(settings.address("rewards")) as channel,
    ):
        engine = db.create_engine(database_url)
        try:
            yield Rewards(RewardsServiceStub(channel), engine)
        finally:
            await engine.dispose()


async def refusal(call: object) -> RemoteError:
    """What the service answered to a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return read_remote_error(refused.value)


def failed(reason: str) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.FAILED_PRECONDITION, reason


async def test_a_coupon_is_reserved_redeemed_reinstated_and_released(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        coupon = await rewards.issue("issue-1")
        reserved = await rewards.reserve("reserve-1", coupon.code.lower(), "pos-1:0001", ttl_seconds=120)
        reservation = reserved.reservation
        assert reserved.coupon == coupon
        assert (reservation.code, reservation.member_id, reservation.receipt_ref, reservation.status) == (
            coupon.code,
            "member-1",
            "pos-1:0001",
            pb.RESERVATION_STATUS_ACTIVE,
        )
        remaining = reservation.expire_time.ToDatetime(tzinfo=UTC) - utcnow()
        assert timedelta(seconds=110) < remaining <= timedelta(seconds=120)

        elsewhere = await rewards.validate(coupon.code, receipt_ref="pos-2:0009")
        assert (elsewhere.valid, elsewhere.rejection) == (False, pb.COUPON_REJECTION_RESERVED)
        here = await rewards.validate(coupon.code, receipt_ref="pos-1:0001")
        assert (here.valid, here.rejection) == (True, pb.COUPON_REJECTION_UNSPECIFIED), "its own receipt may use it"

        redeemed = await rewards.redeem("redeem-1", reservation.reservation_id)
        assert redeemed.coupon.status == pb.COUPON_STATUS_REDEEMED
        assert redeemed.reservation.status == pb.RESERVATION_STATUS_REDEEMED
        after = await rewards.validate(coupon.code, receipt_ref="pos-1:0001")
        assert after.rejection == pb.COUPON_REJECTION_ALREADY_USED
        assert await rewards.redeemed_events() == [
            {
                "code_suffix": coupon.code[-4:],
                "member_id": "member-1",
                "series_id": coupon.series_id,
                "campaign_id": "campaign-1",
                "partner_id": None,
                "reservation_id": reservation.reservation_id,
                "receipt_ref": "pos-1:0001",
            }
        ], "the event names the coupon by its last four characters only"

        reinstated = await rewards.reinstate("return-1", coupon.code, "pos-1:0001")
        assert reinstated.coupon == coupon, "usable again, with its terms unchanged"

        again = await rewards.reserve("reserve-2", coupon.code, "pos-1:0002")
        released = await rewards.release("release-1", again.reservation.reservation_id)
        assert released.reservation.status == pb.RESERVATION_STATUS_RELEASED
        free = await rewards.validate(coupon.code, receipt_ref="pos-3:0001")
        assert free.valid, "a released reservation no longer holds the coupon"
        last = await rewards.reserve("reserve-3", coupon.code, "pos-3:0001")
        assert (await rewards.redeem("redeem-2", last.reservation.reservation_id)).coupon.status == (
            pb.COUPON_STATUS_REDEEMED
        )
        assert len(await rewards.redeemed_events()) == 2


async def test_every_refusal_has_its_reason(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        now = utcnow()
        coupon = await rewards.issue("issue-1")
        expired = await rewards.issue("issue-2")
        await rewards.backdate(expired.code, now - timedelta(days=2), now - timedelta(days=1))
        future = await rewards.issue("issue-3", valid_from=to_timestamp(now + timedelta(days=1)))

        reserve_refusals = {
            "unknown": await refusal(rewards.reserve("r-1", "ZZZZZZZZZZ", "pos-1:1")),
            "expired": await refusal(rewards.reserve("r-2", expired.code, "pos-1:1")),
            "not yet": await refusal(rewards.reserve("r-3", future.code, "pos-1:1")),
            "stranger": await refusal(rewards.reserve("r-4", coupon.code, "pos-1:1", member_id="member-2")),
        }
        held = await rewards.reserve("r-5", coupon.code, "pos-1:1")
        reserve_refusals["held"] = await refusal(rewards.reserve("r-6", coupon.code, "pos-2:1"))
        reserve_refusals["held, same receipt"] = await refusal(rewards.reserve("r-7", coupon.code, "pos-1:1"))
        await rewards.redeem("redeem-1", held.reservation.reservation_id)
        reserve_refusals["used"] = await refusal(rewards.reserve("r-8", coupon.code, "pos-2:1"))
        assert {what: (error.code, error.reason) for what, error in reserve_refusals.items()} == {
            "unknown": (grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND"),
            "expired": failed("COUPON_EXPIRED"),
            "not yet": failed("COUPON_NOT_YET_VALID"),
            "stranger": failed("COUPON_OTHER_MEMBER"),
            "held": failed("COUPON_RESERVED"),
            "held, same receipt": failed("COUPON_RESERVED"),
            "used": failed("COUPON_ALREADY_USED"),
        }

        bearer = await rewards.issue("issue-4", member_id="")
        first = await rewards.reserve("r-9", bearer.code, "pos-1:2", member_id="")
        second = await rewards.release("release-1", first.reservation.reservation_id)
        assert second.reservation.status == pb.RESERVATION_STATUS_RELEASED
        settled = {
            "redeem unknown": await refusal(rewards.redeem("redeem-2", "no-such-reservation")),
            "redeem released": await refusal(rewards.redeem("redeem-3", first.reservation.reservation_id)),
            "redeem twice": await refusal(rewards.redeem("redeem-4", held.reservation.reservation_id)),
            "release released": await refusal(rewards.release("release-2", first.reservation.reservation_id)),
            "release redeemed": await refusal(rewards.release("release-3", held.reservation.reservation_id)),
            "release unknown": await refusal(rewards.release("release-4", "no-such-reservation")),
            "reinstate unknown": await refusal(rewards.reinstate("return-1", "ZZZZZZZZZZ", "pos-1:1")),
            "reinstate unused": await refusal(rewards.reinstate("return-2", bearer.code, "pos-1:2")),
            "reinstate elsewhere": await refusal(rewards.reinstate("return-3", coupon.code, "pos-9:9")),
        }
        assert {what: (error.code, error.reason) for what, error in settled.items()} == {
            "redeem unknown": (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
            "redeem released": failed("RESERVATION_RELEASED"),
            "redeem twice": failed("COUPON_ALREADY_USED"),
            "release released": failed("RESERVATION_RELEASED"),
            "release redeemed": failed("COUPON_ALREADY_USED"),
            "release unknown": (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
            "reinstate unknown": (grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND"),
            "reinstate unused": failed("COUPON_NOT_REDEEMED"),
            "reinstate elsewhere": failed("COUPON_REDEEMED_ON_OTHER_RECEIPT"),
        }
        assert len(await rewards.redeemed_events()) == 1, "no refusal wrote anything"


async def test_invalid_requests_name_every_field(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        reserve = await refusal(
            rewards.stub.ReserveCoupon(
                pb.ReserveCouponRequest(
                    request_id="r-1", code=" - ", member_id="m" * 37, ttl_seconds=86_401, terminal_id="t" * 65
                )
            )
        )
        assert reserve.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in reserve.violations] == [
            "code",
            "member_id",
            "receipt_ref",
            "ttl_seconds",
            "terminal_id",
        ]
        negative = await refusal(rewards.reserve("r-2", "ABCDEFGH23", "x" * 101, ttl_seconds=-1))
        assert [v.field for v in negative.violations] == ["receipt_ref", "ttl_seconds"]
        no_key = await refusal(rewards.reserve("", "ABCDEFGH23", "pos-1:1"))
        assert [v.field for v in no_key.violations] == ["request_id"]
        redeem = await refusal(rewards.redeem("x-1", ""))
        release = await refusal(rewards.release("x-2", "r" * 37))
        reinstate = await refusal(rewards.reinstate("x-3", "", ""))
        assert [
            [v.field for v in redeem.violations],
            [v.field for v in release.violations],
            [v.field for v in reinstate.violations],
        ] == [["reservation_id"], ["reservation_id"], ["code", "receipt_ref"]]
        terminal = await refusal(rewards.stub.ValidateCoupon(pb.ValidateCouponRequest(code="", terminal_id="t" * 65)))
        assert [v.field for v in terminal.violations] == ["code", "terminal_id"]


async def test_retries_answer_the_first_result(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        coupon = await rewards.issue("issue-1")
        reserved = await rewards.reserve("reserve-1", coupon.code, "pos-1:1")
        assert await rewards.reserve("reserve-1", coupon.code, "pos-1:1") == reserved, "not COUPON_RESERVED"
        changed = await refusal(rewards.reserve("reserve-1", coupon.code, "pos-1:2"))
        assert (changed.code, changed.reason) == failed("IDEMPOTENCY_KEY_REUSED")

        reservation_id = reserved.reservation.reservation_id
        redeemed = await rewards.redeem("redeem-1", reservation_id)
        assert await rewards.redeem("redeem-1", reservation_id) == redeemed, "not COUPON_ALREADY_USED"
        reinstated = await rewards.reinstate("return-1", coupon.code, "pos-1:1")
        assert await rewards.reinstate("return-1", coupon.code, "pos-1:1") == reinstated, "not COUPON_NOT_REDEEMED"

        later = await rewards.reserve("reserve-2", coupon.code, "pos-1:3")
        released = await rewards.release("release-1", later.reservation.reservation_id)
        assert await rewards.release("release-1", later.reservation.reservation_id) == released
        assert len(await rewards.redeemed_events()) == 1, "the retried redeem emitted nothing"
        assert await rewards.redeemed_reservations(coupon.code) == 0, "the redeemed one was returned"


async def test_a_lapsed_reservation_frees_the_coupon_and_cannot_be_redeemed(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        coupon = await rewards.issue("issue-1")
        short = await rewards.issue("issue-2", valid_until=to_timestamp(utcnow() + timedelta(seconds=1)))
        lapsing = await rewards.reserve("reserve-1", coupon.code, "pos-1:1", ttl_seconds=1)
        blocked = await refusal(rewards.reserve("reserve-2", coupon.code, "pos-2:1"))
        assert blocked.reason == "COUPON_RESERVED"
        used = await rewards.reserve("reserve-3", short.code, "pos-1:1", ttl_seconds=60)
        await rewards.redeem("redeem-0", used.reservation.reservation_id)

        await asyncio.sleep(1.1)
        assert (await rewards.validate(coupon.code, receipt_ref="pos-2:1")).valid
        taken = await rewards.reserve("reserve-4", coupon.code, "pos-2:1")
        assert taken.reservation.status == pb.RESERVATION_STATUS_ACTIVE
        late = await refusal(rewards.redeem("redeem-1", lapsing.reservation.reservation_id))
        assert (late.code, late.reason) == failed("RESERVATION_EXPIRED")
        late_release = await refusal(rewards.release("release-1", lapsing.reservation.reservation_id))
        assert late_release.reason == "RESERVATION_EXPIRED"
        await rewards.redeem("redeem-2", taken.reservation.reservation_id)

        too_late = await refusal(rewards.reinstate("return-1", short.code, "pos-1:1"))
        assert (too_late.code, too_late.reason) == failed("COUPON_EXPIRED")
        assert (await rewards.validate(short.code)).rejection == pb.COUPON_REJECTION_ALREADY_USED, "it stays used"


async def test_ten_registers_racing_for_one_coupon_redeem_it_once(tmp_path: Path, database_url: str) -> None:
    """Each register reserves, then redeems at once. The coupon row lock makes the
    reservation check and the redemption atomic: exactly one register wins each coupon."""
    async with rewards_service(tmp_path, database_url) as rewards:

        async def register(index: int, code: str) -> pb.RedeemCouponResponse | RemoteError:
            try:
                reserved = await rewards.reserve(f"{code}-reserve-{index}", code, f"pos-{index}:1", member_id="")
                return await rewards.redeem(f"{code}-redeem-{index}", reserved.reservation.reservation_id)
            except grpc.aio.AioRpcError as error:
                return read_remote_error(error)

        for round_ in range(5):
            coupon = await rewards.issue(f"issue-{round_}", member_id="")
            outcomes = await asyncio.gather(*(register(index, coupon.code) for index in range(10)))
            winners = [o for o in outcomes if isinstance(o, pb.RedeemCouponResponse)]
            losers = sorted({(o.code, o.reason) for o in outcomes if isinstance(o, RemoteError)})
            assert len(winners) == 1, f"round {round_}: {outcomes}"
            assert set(losers) <= {failed("COUPON_RESERVED"), failed("COUPON_ALREADY_USED")}, losers
            assert await rewards.redeemed_reservations(coupon.code) == 1
        events = await rewards.redeemed_events()
        assert len(events) == 5, "one coupon.redeemed per coupon"


async def test_a_terminal_guessing_codes_is_stopped(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with (
        infra.running_suite(settings, ("rewards",)),
        grpc.aio.insecure_channel(settings.address("rewards")) as channel,
    ):
        stub: RewardsServiceAsyncStub = RewardsServiceStub(channel)
        series = await stub.CreateCouponSeries(
            pb.CreateCouponSeriesRequest(
                request_id="series-1",
                name="1% off",
                kind=pb.COUPON_SERIES_KIND_UNIQUE,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=100),
            )
        )
        issued = await stub.IssueCoupon(pb.IssueCouponRequest(request_id="issue-1", series_id=series.series.series_id))
        code = issued.coupon.code
        for guess in range(WRONG_CODE_LIMIT - 1):
            answer = await stub.ValidateCoupon(pb.ValidateCouponRequest(code=f"WRONG{guess}", terminal_id="pos-9"))
            assert answer.rejection == pb.COUPON_REJECTION_NOT_FOUND
        assert (await stub.ValidateCoupon(pb.ValidateCouponRequest(code=code, terminal_id="pos-9"))).valid
        last_guess = pb.ReserveCouponRequest(
            request_id="guess", code="WRONG", receipt_ref="pos-9:1", terminal_id="pos-9"
        )
        assert (await refusal(stub.ReserveCoupon(last_guess))).reason == "COUPON_NOT_FOUND", "a reserve counts too"

        blocked = {
            "validate": await refusal(stub.ValidateCoupon(pb.ValidateCouponRequest(code=code, terminal_id="pos-9"))),
            "reserve": await refusal(
                stub.ReserveCoupon(
                    pb.ReserveCouponRequest(request_id="r-1", code=code, receipt_ref="pos-9:2", terminal_id="pos-9")
                )
            ),
        }
        assert {what: (e.code, e.reason) for what, e in blocked.items()} == {
            "validate": (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WRONG_CODES"),
            "reserve": (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WRONG_CODES"),
        }
        assert all(0 < e.retry_after_seconds <= 60 for e in blocked.values()), "a RetryInfo says when to retry"
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.ValidateCoupon(pb.ValidateCouponRequest(code=code, terminal_id="pos-9"))
        passed_on = reraise_remote(again.value)
        assert isinstance(passed_on, ResourceExhausted), "a caller hands the limit on with its delay"
        assert (passed_on.reason, 0 < passed_on.retry_after_seconds <= 60) == ("TOO_MANY_WRONG_CODES", True)
        other = await stub.ValidateCoupon(pb.ValidateCouponRequest(code=code, terminal_id="pos-1"))
        assert other.valid, "other terminals are not affected"
