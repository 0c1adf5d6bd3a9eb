"""Rewards' use cases, each given the session of its unit of work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.errors import FailedPrecondition, Violations
from loyalty.runtime.outbox import add_event
from services.rewards import store
from services.rewards.domain import (
    MAX_DISCOUNT_BASIS_POINTS,
    MIN_DISCOUNT_BASIS_POINTS,
    Coupon,
    CouponStatus,
    Rejection,
    is_valid_discount,
    is_valid_window,
    new_coupon_code,
    normalize_code,
    validate,
)

CODE_ATTEMPTS = 5
# The outbox key of an event about a bearer coupon, which has no owner to key it by.
BEARER_EVENT_KEY = "bearer"


@dataclass(frozen=True)
class CouponTerms:
    """What IssueCoupon was asked for, checked as far as it can be without a clock."""

    member_id: str | None
    discount_basis_points: int
    valid_from: datetime | None
    """None means from the moment of issue."""
    valid_until: datetime | None


def parse_terms(
    member_id: str, discount_basis_points: int, valid_from: datetime | None, valid_until: datetime | None
) -> CouponTerms:
    """Checks every field of an issue request that does not depend on when it is issued."""
    violations = Violations()
    violations.check(
        len(member_id) <= store.MAX_MEMBER_ID_LENGTH,
        "member_id",
        f"at most {store.MAX_MEMBER_ID_LENGTH} characters",
    )
    violations.check(
        is_valid_discount(discount_basis_points),
        "discount_basis_points",
        f"from {MIN_DISCOUNT_BASIS_POINTS} to {MAX_DISCOUNT_BASIS_POINTS} (10000 = 100%)",
    )
    if valid_from is not None:
        violations.check(is_valid_window(valid_from, valid_until), "valid_until", "must be after valid_from")
    violations.raise_if_any()
    return CouponTerms(member_id or None, discount_basis_points, valid_from, valid_until)


def parse_code(raw: str, field: str = "code") -> str:
    """The presented code in its stored form; rejects an empty or overlong one."""
    code = normalize_code(raw)
    violations = Violations()
    if not code:
        violations.add(field, "required")
    violations.check(len(code) <= store.MAX_CODE_LENGTH, field, f"at most {store.MAX_CODE_LENGTH} characters")
    violations.raise_if_any()
    return code


async def issue_coupon(session: AsyncSession, terms: CouponTerms, now: datetime) -> Coupon:
    """Writes a coupon valid from ``now`` unless the terms say otherwise, and its ``coupon.issued`` event."""
    valid_from = now if terms.valid_from is None else terms.valid_from
    # Checked here rather than in parse_terms: a retry of an issue that succeeded must
    # answer the recorded coupon even after valid_until has passed, and only the
    # idempotency record, read before this runs, can tell a retry from a new request.
    if not is_valid_window(valid_from, terms.valid_until):
        violations = Violations()
        violations.add("valid_until", "must be after the moment of issue when valid_from is empty")
        violations.raise_if_any()
    for _attempt in range(CODE_ATTEMPTS):
        code = new_coupon_code()
        if await store.find_coupon(session, code) is None:
            break
    else:
        raise FailedPrecondition("COUPON_CODES_EXHAUSTED", "could not find a free coupon code")
    coupon = Coupon(
        code=code,
        member_id=terms.member_id,
        discount_basis_points=terms.discount_basis_points,
        status=CouponStatus.ACTIVE,
        valid_from=valid_from,
        valid_until=terms.valid_until,
        created_at=now,
    )
    await store.add_coupon(session, coupon)
    await add_event(
        session,
        store.outbox,
        "coupon.issued",
        key=coupon.member_id or BEARER_EVENT_KEY,
        payload={
            "code_suffix": coupon.code_suffix,
            "member_id": coupon.member_id,
            "discount_basis_points": coupon.discount_basis_points,
        },
    )
    return coupon


@dataclass(frozen=True)
class CouponCheck:
    """The answer to "can this coupon be applied now?"."""

    coupon: Coupon | None
    rejection: Rejection | None

    @property
    def valid(self) -> bool:
        return self.rejection is None


async def validate_coupon(session: AsyncSession, code: str, member_id: str, now: datetime) -> CouponCheck:
    """Decides whether the coupon applies; changes nothing.

    Someone else's personal coupon is answered without the coupon, so its owner and
    terms are not disclosed to whoever holds the code.
    """
    coupon = await store.find_coupon(session, code)
    rejection = validate(coupon, member_id, now)
    if rejection is Rejection.OTHER_MEMBER:
        return CouponCheck(None, rejection)
    return CouponCheck(coupon, rejection)
