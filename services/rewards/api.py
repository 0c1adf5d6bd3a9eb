"""RewardsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1 import rewards_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.rewards import service, store
from services.rewards.domain import Coupon, CouponStatus, Rejection

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


class RewardsApi(pb_grpc.RewardsServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession], relay: OutboxRelay) -> None:
        self._sessions = sessions
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, relay.notify)

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
        code = service.parse_code(request.code)
        async with self._sessions() as session:
            check = await service.validate_coupon(session, code, request.member_id, utcnow())
        rejection = pb.COUPON_REJECTION_UNSPECIFIED if check.rejection is None else _REJECTION[check.rejection]
        return pb.ValidateCouponResponse(
            valid=check.valid,
            rejection=rejection,
            coupon=coupon_to_proto(check.coupon) if check.coupon else None,
        )
