"""RewardsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1 import rewards_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import NotFound, Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.rewards import service, store
from services.rewards.domain import (
    Coupon,
    CouponStatus,
    Rejection,
    Reservation,
    ReservationStatus,
    WrongCodeLimiter,
)

_COUPON_STATUS = {
    CouponStatus.ACTIVE: pb.COUPON_STATUS_ACTIVE,
    CouponStatus.REDEEMED: pb.COUPON_STATUS_REDEEMED,
}
_REJECTION = {
    Rejection.NOT_FOUND: pb.COUPON_REJECTION_NOT_FOUND,
    Rejection.OTHER_MEMBER: pb.COUPON_REJECTION_OTHER_MEMBER,
    Rejection.ALREADY_USED: pb.COUPON_REJECTION_ALREADY_USED,
    Rejection.NOT_YET_VALID: pb.COUPON_REJECTION_NOT_YET_VALID,
    Rejection.EXPIRED: pb.COUPON_REJECTION_EXPIRED,
    Rejection.RESERVED: pb.COUPON_REJECTION_RESERVED,
}
_RESERVATION_STATUS = {
    ReservationStatus.ACTIVE: pb.RESERVATION_STATUS_ACTIVE,
    ReservationStatus.REDEEMED: pb.RESERVATION_STATUS_REDEEMED,
    ReservationStatus.RELEASED: pb.RESERVATION_STATUS_RELEASED,
    ReservationStatus.RETURNED: pb.RESERVATION_STATUS_RETURNED,
}

Context = grpc.aio.ServicerContext[Any, Any]


def coupon_to_proto(coupon: Coupon) -> pb.Coupon:
    return pb.Coupon(
        code=coupon.code,
        member_id=coupon.member_id or "",
        discount_basis_points=coupon.discount_basis_points,
        status=_COUPON_STATUS[coupon.status],
        valid_from=to_timestamp(coupon.valid_from),
        valid_until=to_timestamp(coupon.valid_until),
    )


def reservation_to_proto(reservation: Reservation, now: datetime) -> pb.CouponReservation:
    """The reservation as of ``now``: an active one past its end is answered EXPIRED."""
    lapsed = reservation.status is ReservationStatus.ACTIVE and not reservation.is_live(now)
    return pb.CouponReservation(
        reservation_id=reservation.reservation_id,
        code=reservation.code,
        member_id=reservation.member_id or "",
        receipt_ref=reservation.receipt_ref,
        expire_time=to_timestamp(reservation.expires_at),
        status=pb.RESERVATION_STATUS_EXPIRED if lapsed else _RESERVATION_STATUS[reservation.status],
    )


class RewardsApi(pb_grpc.RewardsServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        wrong_codes: WrongCodeLimiter | None = None,
    ) -> None:
        self._sessions = sessions
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, relay.notify)
        self._wrong_codes = wrong_codes or WrongCodeLimiter()

    async def IssueCoupon(self, request: pb.IssueCouponRequest, context: Context) -> pb.IssueCouponResponse:
        violations = Violations()
        valid_from = timestamp_field(request, "valid_from", violations)
        valid_until = timestamp_field(request, "valid_until", violations)
        violations.raise_if_any()
        terms = service.parse_terms(request.member_id, request.discount_basis_points, valid_from, valid_until)

        async def work(session: AsyncSession) -> pb.IssueCouponResponse:
            coupon = await service.issue_coupon(session, terms, utcnow())
            return pb.IssueCouponResponse(coupon=coupon_to_proto(coupon))

        return await self._idempotent.run("IssueCoupon", request, pb.IssueCouponResponse, work)

    async def ValidateCoupon(self, request: pb.ValidateCouponRequest, context: Context) -> pb.ValidateCouponResponse:
        code = service.parse_lookup(request.code, request.terminal_id)
        self._wrong_codes.check(request.terminal_id)
        async with self._sessions() as session:
            check = await service.validate_coupon(session, code, request.member_id, utcnow(), request.receipt_ref)
        if check.rejection is Rejection.NOT_FOUND:
            self._wrong_codes.record_miss(request.terminal_id)
        rejection = pb.COUPON_REJECTION_UNSPECIFIED if check.rejection is None else _REJECTION[check.rejection]
        return pb.ValidateCouponResponse(
            valid=check.valid,
            rejection=rejection,
            coupon=coupon_to_proto(check.coupon) if check.coupon else None,
        )

    async def ReserveCoupon(self, request: pb.ReserveCouponRequest, context: Context) -> pb.ReserveCouponResponse:
        code, member_id, ttl = service.parse_reservation_request(
            request.code, request.member_id, request.receipt_ref, request.ttl_seconds, request.terminal_id
        )
        self._wrong_codes.check(request.terminal_id)

        async def work(session: AsyncSession) -> pb.ReserveCouponResponse:
            now = utcnow()
            reserved = await service.reserve_coupon(session, code, member_id, request.receipt_ref, ttl, now)
            return pb.ReserveCouponResponse(
                reservation=reservation_to_proto(reserved.reservation, now), coupon=coupon_to_proto(reserved.coupon)
            )

        try:
            return await self._idempotent.run("ReserveCoupon", request, pb.ReserveCouponResponse, work)
        except NotFound as missing:
            if missing.reason == "COUPON_NOT_FOUND":
                self._wrong_codes.record_miss(request.terminal_id)
            raise

    async def RedeemCoupon(self, request: pb.RedeemCouponRequest, context: Context) -> pb.RedeemCouponResponse:
        reservation_id = service.parse_reservation_id(request.reservation_id)

        async def work(session: AsyncSession) -> pb.RedeemCouponResponse:
            now = utcnow()
            redeemed = await service.redeem_coupon(session, reservation_id, now)
            return pb.RedeemCouponResponse(
                coupon=coupon_to_proto(redeemed.coupon), reservation=reservation_to_proto(redeemed.reservation, now)
            )

        return await self._idempotent.run("RedeemCoupon", request, pb.RedeemCouponResponse, work)

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Context
    ) -> pb.ReleaseReservationResponse:
        reservation_id = service.parse_reservation_id(request.reservation_id)

        async def work(session: AsyncSession) -> pb.ReleaseReservationResponse:
            now = utcnow()
            released = await service.release_reservation(session, reservation_id, now)
            return pb.ReleaseReservationResponse(reservation=reservation_to_proto(released, now))

        return await self._idempotent.run("ReleaseReservation", request, pb.ReleaseReservationResponse, work)

    async def ReinstateCoupon(self, request: pb.ReinstateCouponRequest, context: Context) -> pb.ReinstateCouponResponse:
        code, receipt_ref = service.parse_reinstatement(request.code, request.receipt_ref)

        async def work(session: AsyncSession) -> pb.ReinstateCouponResponse:
            coupon = await service.reinstate_coupon(session, code, receipt_ref, utcnow())
            return pb.ReinstateCouponResponse(coupon=coupon_to_proto(coupon))

        return await self._idempotent.run("ReinstateCoupon", request, pb.ReinstateCouponResponse, work)
