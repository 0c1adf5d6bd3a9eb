"""Rewards' rules: coupon codes, coupon terms and whether a coupon applies. No I/O here."""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import grpc

from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound

# Digits and capitals without the look-alikes 0/O, 1/I/L, so a code read aloud or
# typed from paper comes out right.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 10
# Events and logs name a coupon by this many trailing characters, never by its code:
# the code is a bearer secret.
CODE_SUFFIX_LENGTH = 4
MIN_DISCOUNT_BASIS_POINTS = 1
MAX_DISCOUNT_BASIS_POINTS = 10_000
MAX_TERMINAL_ID_LENGTH = 64

# How long a reservation holds a coupon when the register does not say, and at most.
DEFAULT_RESERVATION_SECONDS = 15 * 60
MAX_RESERVATION_SECONDS = 24 * 3600
# Guessing codes: a terminal that presents this many unknown codes within the window
# is refused every lookup until the oldest of them leaves the window.
WRONG_CODE_LIMIT = 10
WRONG_CODE_WINDOW_SECONDS = 60.0

_CODE_SEPARATORS = re.compile(r"[\s\-]")


class CouponStatus(StrEnum):
    ACTIVE = "active"
    REDEEMED = "redeemed"


class Rejection(StrEnum):
    """Why a presented coupon cannot be applied."""

    NOT_FOUND = "not_found"
    OTHER_MEMBER = "other_member"
    ALREADY_USED = "already_used"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    RESERVED = "reserved"
    """Held by a live reservation for another receipt."""


class ReservationStatus(StrEnum):
    """A reservation's stored state; whether an ACTIVE one still holds depends on the clock."""

    ACTIVE = "active"
    REDEEMED = "redeemed"
    RELEASED = "released"
    RETURNED = "returned"
    """Redeemed, then its receipt was returned and the coupon reinstated."""


class TooManyWrongCodes(DomainError):
    """A terminal presented too many unknown codes. Belongs in loyalty.runtime.errors as
    a general ResourceExhausted once a second service needs it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(
            "TOO_MANY_WRONG_CODES",
            "too many unknown coupon codes from this terminal; try again later",
            {"retry_after_seconds": str(max(1, round(retry_after_seconds)))},
        )


@dataclass(frozen=True)
class Coupon:
    code: str
    member_id: str | None
    """The owner of a personal coupon; None for a bearer coupon anyone may present."""
    discount_basis_points: int
    status: CouponStatus
    valid_from: datetime
    valid_until: datetime | None
    """End of validity, exclusive; None means no end."""
    created_at: datetime

    @property
    def code_suffix(self) -> str:
        return code_suffix(self.code)


@dataclass(frozen=True)
class Reservation:
    """A coupon held for one receipt until it is redeemed, released or lapses."""

    reservation_id: str
    code: str
    member_id: str | None
    receipt_ref: str
    status: ReservationStatus
    expires_at: datetime
    """The reservation stops holding the coupon at this moment (exclusive)."""
    created_at: datetime

    def is_live(self, now: datetime) -> bool:
        """Whether it still holds its coupon: active and not yet lapsed."""
        return self.status is ReservationStatus.ACTIVE and now < self.expires_at


def new_coupon_code() -> str:
    """A random code of CODE_LENGTH characters from CODE_ALPHABET (about 49 bits)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(raw: str) -> str:
    """A code as a customer or cashier typed it, in the form it is stored: no spaces or dashes, upper case."""
    return _CODE_SEPARATORS.sub("", raw).upper()


def code_suffix(code: str) -> str:
    """The part of a code that may appear in events and logs."""
    return code[-CODE_SUFFIX_LENGTH:]


def is_valid_discount(basis_points: int) -> bool:
    return MIN_DISCOUNT_BASIS_POINTS <= basis_points <= MAX_DISCOUNT_BASIS_POINTS


def is_valid_window(valid_from: datetime, valid_until: datetime | None) -> bool:
    """A validity window must not be empty: its end, when it has one, comes after its start."""
    return valid_until is None or valid_until > valid_from


def validate(coupon: Coupon | None, member_id: str, now: datetime) -> Rejection | None:
    """Why ``coupon`` cannot be applied now on a receipt of ``member_id`` ("" when anonymous), or None.

    Ownership is decided before state, so presenting someone else's personal coupon
    tells nothing about whether it is used or expired.
    """
    if coupon is None:
        return Rejection.NOT_FOUND
    if coupon.member_id is not None and coupon.member_id != member_id:
        return Rejection.OTHER_MEMBER
    if coupon.status is CouponStatus.REDEEMED:
        return Rejection.ALREADY_USED
    if now < coupon.valid_from:
        return Rejection.NOT_YET_VALID
    if coupon.valid_until is not None and now >= coupon.valid_until:
        return Rejection.EXPIRED
    return None


def validate_for_receipt(
    coupon: Coupon | None, member_id: str, receipt_ref: str, holders: list[Reservation], now: datetime
) -> Rejection | None:
    """``validate``, and then whether a live reservation for another receipt holds it.

    ``holders`` are the coupon's reservations that may hold it; a reservation for
    ``receipt_ref`` itself does not block ("" matches no receipt).
    """
    rejection = validate(coupon, member_id, now)
    if rejection is not None:
        return rejection
    if any(held.is_live(now) and (not receipt_ref or held.receipt_ref != receipt_ref) for held in holders):
        return Rejection.RESERVED
    return None


def refusal(rejection: Rejection) -> DomainError:
    """The error a mutation raises for a coupon that cannot be used: COUPON_<REJECTION>."""
    reason = f"COUPON_{rejection.name}"
    if rejection is Rejection.NOT_FOUND:
        return NotFound(reason, "no coupon has this code")
    messages = {
        Rejection.OTHER_MEMBER: "the coupon is another member's",
        Rejection.ALREADY_USED: "the coupon was already redeemed",
        Rejection.NOT_YET_VALID: "the coupon is not valid yet",
        Rejection.EXPIRED: "the coupon's validity has ended",
        Rejection.RESERVED: "the coupon is reserved for another receipt",
    }
    return FailedPrecondition(reason, messages[rejection])


def check_reservation(reservation: Reservation | None, now: datetime) -> Reservation:
    """The reservation, if it still holds its coupon; otherwise the refusal why not."""
    if reservation is None:
        raise NotFound("RESERVATION_NOT_FOUND", "no such reservation")
    if reservation.status in (ReservationStatus.REDEEMED, ReservationStatus.RETURNED):
        raise FailedPrecondition("COUPON_ALREADY_USED", "the coupon was already redeemed through this reservation")
    if reservation.status is ReservationStatus.RELEASED:
        raise FailedPrecondition("RESERVATION_RELEASED", "the reservation was released")
    if not reservation.is_live(now):
        raise FailedPrecondition("RESERVATION_EXPIRED", "the reservation lapsed; reserve the coupon again")
    return reservation


def check_reinstatable(
    coupon: Coupon | None, redeemed_on: Reservation | None, receipt_ref: str, now: datetime
) -> Reservation:
    """The reservation to mark returned, if the return of ``receipt_ref`` can give the coupon
    back; otherwise the refusal why not.

    ``redeemed_on`` is the reservation through which the coupon was redeemed.
    """
    if coupon is None:
        raise NotFound("COUPON_NOT_FOUND", "no coupon has this code")
    if coupon.status is not CouponStatus.REDEEMED or redeemed_on is None:
        raise FailedPrecondition("COUPON_NOT_REDEEMED", "the coupon is not redeemed")
    if redeemed_on.receipt_ref != receipt_ref:
        raise FailedPrecondition("COUPON_REDEEMED_ON_OTHER_RECEIPT", "the coupon was redeemed on another receipt")
    if coupon.valid_until is not None and now >= coupon.valid_until:
        raise FailedPrecondition("COUPON_EXPIRED", "the coupon's validity has ended; it stays used")
    return redeemed_on


def reservation_ttl(ttl_seconds: int) -> timedelta:
    """How long a reservation lasts; 0 means DEFAULT_RESERVATION_SECONDS."""
    return timedelta(seconds=ttl_seconds or DEFAULT_RESERVATION_SECONDS)


class WrongCodeLimiter:
    """Counts unknown codes per terminal in a sliding window and refuses lookups past the limit.

    In-process: each replica counts on its own, so a cluster of N replicas lets a
    terminal try up to N times the limit. A cluster should keep these counts in Redis.
    """

    def __init__(
        self,
        limit: int = WRONG_CODE_LIMIT,
        window_seconds: float = WRONG_CODE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_terminals: int = 4096,
    ) -> None:
        """``max_terminals``: past this many terminals on record, those with only stale misses are forgotten."""
        self._limit = limit
        self._window = window_seconds
        self._clock = clock
        self._max_terminals = max_terminals
        self._misses: dict[str, deque[float]] = {}

    def _recent(self, terminal_id: str, now: float) -> deque[float]:
        misses = self._misses.get(terminal_id, deque())
        while misses and misses[0] <= now - self._window:
            misses.popleft()
        if misses:
            self._misses[terminal_id] = misses
        else:
            self._misses.pop(terminal_id, None)
        return misses

    def check(self, terminal_id: str) -> None:
        """Raises TooManyWrongCodes while the terminal is over the limit."""
        now = self._clock()
        misses = self._recent(terminal_id, now)
        if len(misses) >= self._limit:
            raise TooManyWrongCodes(misses[0] + self._window - now)

    def record_miss(self, terminal_id: str) -> None:
        """Counts one unknown code presented by the terminal."""
        now = self._clock()
        misses = self._recent(terminal_id, now)
        misses.append(now)
        self._misses[terminal_id] = misses
        if len(self._misses) > self._max_terminals:
            for stale in [t for t, times in self._misses.items() if times[-1] <= now - self._window]:
                del self._misses[stale]

    @property
    def terminals(self) -> int:
        """How many terminals have misses on record (memory stays bounded by the active ones)."""
        return len(self._misses)
