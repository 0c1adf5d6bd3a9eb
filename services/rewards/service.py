"""Rewards' use cases, each given the session of its unit of work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.errors import FailedPrecondition, Violations
from loyalty.runtime.outbox import add_event
from services.rewards import store
from services.rewards.domain import (
    MAX_DISCOUNT_BASIS_POINTS,
    MAX_RESERVATION_SECONDS,
    MAX_TERMINAL_ID_LENGTH,
    MIN_DISCOUNT_BASIS_POINTS,
    Coupon,
    CouponStatus,
    Rejection,
    Reservation,
    ReservationStatus,
    check_reinstatable,
    check_reservation,
    is_valid_discount,
    is_valid_window,
    new_coupon_code,
    normalize_code,
    refusal,
    reservation_ttl,
    validate_for_receipt,
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


def parse_lookup(code: str, terminal_id: str) -> str:
    """The stored form of a code presented to ValidateCoupon, checked with the terminal asking."""
    violations = Violations()
    normalized = _check_code(code, violations)
    violations.check_length(terminal_id, "terminal_id", MAX_TERMINAL_ID_LENGTH)
    violations.raise_if_any()
    return normalized


def _check_code(raw: str, violations: Violations) -> str:
    """The presented code in its stored form; an empty or overlong one is a violation of ``code``."""
    code = normalize_code(raw)
    violations.check(bool(code), "code", "required")
    violations.check_length(code, "code", store.MAX_CODE_LENGTH)
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


async def validate_coupon(
    session: AsyncSession, code: str, member_id: str, now: datetime, receipt_ref: str = ""
) -> CouponCheck:
    """Decides whether the coupon applies to the receipt ``receipt_ref``; changes nothing.

    A coupon held by a live reservation for another receipt does not apply. Someone
    else's personal coupon is answered without the coupon, so its owner and terms are
    not disclosed to whoever holds the code.
    """
    coupon = await store.find_coupon(session, code)
    holders = await store.holding_reservations(session, code) if coupon else []
    rejection = validate_for_receipt(coupon, member_id, receipt_ref, holders, now)
    if rejection is Rejection.OTHER_MEMBER:
        return CouponCheck(None, rejection)
    return CouponCheck(coupon, rejection)


def parse_receipt_ref(receipt_ref: str, violations: Violations, field: str = "receipt_ref") -> None:
    violations.check(bool(receipt_ref), field, "required: the receipt the coupon is applied to")
    violations.check_length(receipt_ref, field, store.MAX_RECEIPT_REF_LENGTH)


def parse_reservation_request(
    code: str, member_id: str, receipt_ref: str, ttl_seconds: int, terminal_id: str
) -> tuple[str, str | None, timedelta]:
    """The stored code, member (None when anonymous) and lifetime of a reservation request."""
    violations = Violations()
    normalized = _check_code(code, violations)
    violations.check_length(member_id, "member_id", store.MAX_MEMBER_ID_LENGTH)
    parse_receipt_ref(receipt_ref, violations)
    violations.check(
        0 <= ttl_seconds <= MAX_RESERVATION_SECONDS,
        "ttl_seconds",
        f"from 0 to {MAX_RESERVATION_SECONDS} (0 means the default)",
    )
    violations.check_length(terminal_id, "terminal_id", MAX_TERMINAL_ID_LENGTH)
    violations.raise_if_any()
    return normalized, member_id or None, reservation_ttl(ttl_seconds)


def parse_reinstatement(code: str, receipt_ref: str) -> tuple[str, str]:
    """The stored code and the returned receipt of a reinstatement request."""
    violations = Violations()
    normalized = _check_code(code, violations)
    parse_receipt_ref(receipt_ref, violations)
    violations.raise_if_any()
    return normalized, receipt_ref


def parse_reservation_id(reservation_id: str) -> str:
    violations = Violations()
    violations.check(bool(reservation_id), "reservation_id", "required")
    violations.check_length(reservation_id, "reservation_id", store.RESERVATION_ID_LENGTH)
    violations.raise_if_any()
    return reservation_id


@dataclass(frozen=True)
class ReservedCoupon:
    """A reservation and its coupon, as a reserve or a redeem leaves them."""

    reservation: Reservation
    coupon: Coupon


async def reserve_coupon(
    session: AsyncSession, code: str, member_id: str | None, receipt_ref: str, ttl: timedelta, now: datetime
) -> ReservedCoupon:
    """Holds the coupon for the receipt until ``now + ttl``.

    The coupon row is locked before its reservations are read, so of two registers
    reserving one coupon at once the second sees the first's reservation.
    """
    coupon = await store.lock_coupon(session, code)
    holders = await store.holding_reservations(session, code) if coupon else []
    # Reserving for the receipt that already holds it is refused too: one receipt, one reservation.
    rejection = validate_for_receipt(coupon, member_id or "", "", holders, now)
    if rejection is not None or coupon is None:
        raise refusal(rejection or Rejection.NOT_FOUND)
    reservation = await store.add_reservation(session, code, member_id, receipt_ref, now + ttl, now)
    return ReservedCoupon(reservation, coupon)


async def _locked_reservation(
    session: AsyncSession, reservation_id: str, now: datetime
) -> tuple[Reservation, Coupon | None]:
    """A reservation that still holds its coupon, and the coupon, locked. The reservation is
    read again under the lock: a concurrent redeem or release may have settled it meanwhile."""
    found = await store.find_reservation(session, reservation_id)
    if found is None:
        return check_reservation(None, now), None
    coupon = await store.lock_coupon(session, found.code)
    return check_reservation(await store.find_reservation(session, reservation_id), now), coupon


def _event_payload(coupon: Coupon, reservation: Reservation) -> dict[str, object]:
    return {
        "code_suffix": coupon.code_suffix,
        "member_id": coupon.member_id,
        "reservation_id": reservation.reservation_id,
        "receipt_ref": reservation.receipt_ref,
    }


async def redeem_coupon(session: AsyncSession, reservation_id: str, now: datetime) -> ReservedCoupon:
    """Uses up the coupon held by the reservation, and writes its ``coupon.redeemed`` event."""
    _reservation, coupon = await _locked_reservation(session, reservation_id, now)
    if coupon is None or coupon.status is CouponStatus.REDEEMED:
        raise refusal(Rejection.ALREADY_USED)
    redeemed = await store.settle_reservation(session, reservation_id, ReservationStatus.REDEEMED, now)
    used = await store.set_coupon_status(session, coupon.code, CouponStatus.REDEEMED)
    await add_event(
        session,
        store.outbox,
        "coupon.redeemed",
        key=used.member_id or BEARER_EVENT_KEY,
        payload=_event_payload(used, redeemed),
    )
    return ReservedCoupon(redeemed, used)


async def release_reservation(session: AsyncSession, reservation_id: str, now: datetime) -> Reservation:
    """Frees the coupon held by the reservation (its receipt was cancelled)."""
    await _locked_reservation(session, reservation_id, now)
    return await store.settle_reservation(session, reservation_id, ReservationStatus.RELEASED, now)


async def reinstate_coupon(session: AsyncSession, code: str, receipt_ref: str, now: datetime) -> Coupon:
    """Gives a redeemed coupon back because the receipt it was redeemed on was returned,
    and writes its ``coupon.reinstated`` event."""
    coupon = await store.lock_coupon(session, code)
    redeemed_on = await store.redeemed_reservation(session, code) if coupon else None
    redeemed_on = check_reinstatable(coupon, redeemed_on, receipt_ref, now)
    returned = await store.settle_reservation(session, redeemed_on.reservation_id, ReservationStatus.RETURNED, now)
    active = await store.set_coupon_status(session, code, CouponStatus.ACTIVE)
    await add_event(
        session,
        store.outbox,
        "coupon.reinstated",
        key=active.member_id or BEARER_EVENT_KEY,
        payload=_event_payload(active, returned),
    )
    return active
