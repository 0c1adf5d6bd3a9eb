"""The ledger's rules: lots, what a balance is at an instant, what an accrual may be. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from loyalty.runtime.errors import FailedPrecondition, NotFound, Violations

MAX_POINTS_PER_OPERATION = 10**12
MAX_HOLDER_ID_LENGTH = 64
MAX_SOURCE_REF_LENGTH = 200
MAX_REASON_LENGTH = 500
_CURRENCY = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


class EntryKind(StrEnum):
    ACCRUAL = "accrual"
    REDEMPTION = "redemption"
    EXPIRY = "expiry"
    REVERSAL = "reversal"


class AccrualSource(StrEnum):
    RECEIPT = "receipt"
    CAMPAIGN = "campaign"
    STAFF = "staff"
    MASS_JOB = "mass_job"


@dataclass(frozen=True)
class Lot:
    """Points from one accrual: spendable from activate_at until expire_at (exclusive)."""

    lot_id: str
    remaining: int
    activate_at: datetime
    expire_at: datetime | None

    def is_active(self, now: datetime) -> bool:
        return self.activate_at <= now and (self.expire_at is None or now < self.expire_at)

    def is_pending(self, now: datetime) -> bool:
        return now < self.activate_at


@dataclass(frozen=True)
class Balance:
    holder_id: str
    currency: str
    active: int
    pending: int
    held: int
    negative: int = 0

    @property
    def available(self) -> int:
        return max(self.active - self.held - self.negative, 0)


def balance_at(holder_id: str, currency: str, lots: list[Lot], held: int, now: datetime, negative: int = 0) -> Balance:
    """The balance as of `now`, straight from the lots: no job has to run for points
    to activate or expire. `negative` is what a return took back beyond what was left."""
    return Balance(
        holder_id=holder_id,
        currency=currency,
        active=sum(lot.remaining for lot in lots if lot.is_active(now)),
        pending=sum(lot.remaining for lot in lots if lot.is_pending(now)),
        held=held,
        negative=negative,
    )


@dataclass(frozen=True)
class Accrual:
    holder_id: str
    currency: str
    amount: int
    source: AccrualSource
    source_ref: str
    reason: str
    activate_at: datetime
    expire_at: datetime | None


def check_currency(currency: str, violations: Violations, field: str = "currency") -> None:
    violations.check(bool(_CURRENCY.fullmatch(currency)), field, "upper-case letters, digits or _, e.g. BONUS")


def check_holder(holder_id: str, violations: Violations) -> None:
    violations.check(bool(holder_id), "holder_id", "required")
    violations.check_length(holder_id, "holder_id", MAX_HOLDER_ID_LENGTH)


def check_points(amount: int, violations: Violations, field: str = "amount") -> None:
    violations.check(amount > 0, field, "must be positive")
    violations.check(amount <= MAX_POINTS_PER_OPERATION, field, f"at most {MAX_POINTS_PER_OPERATION}")


def check_references(source_ref: str, reason: str, violations: Violations) -> None:
    violations.check_length(source_ref, "source_ref", MAX_SOURCE_REF_LENGTH)
    violations.check_length(reason, "reason", MAX_REASON_LENGTH)


def check_accrual(accrual: Accrual, violations: Violations) -> None:
    """Adds a violation for each way the accrual is not acceptable."""
    check_holder(accrual.holder_id, violations)
    check_currency(accrual.currency, violations)
    check_points(accrual.amount, violations)
    check_references(accrual.source_ref, accrual.reason, violations)
    if accrual.expire_at is not None:
        violations.check(accrual.expire_at > accrual.activate_at, "expire_time", "must be after activation")
    if accrual.source is AccrualSource.STAFF:
        violations.check(bool(accrual.reason.strip()), "reason", "a staff accrual needs a reason")


class HoldStatus(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"


MAX_HOLD_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Hold:
    """Points reserved for a calculated receipt until captured, released or expired."""

    hold_id: str
    amount: int
    status: HoldStatus
    expires_at: datetime
    captured: int

    def is_live(self, now: datetime) -> bool:
        """Counts against the available balance: placed, not settled, not expired."""
        return self.status is HoldStatus.ACTIVE and now < self.expires_at


def held_total(holds: list[Hold], now: datetime) -> int:
    return sum(hold.amount for hold in holds if hold.is_live(now))


def check_hold(hold: Hold | None, now: datetime) -> Hold:
    """The hold, if it can still be captured or released; otherwise the refusal why not."""
    if hold is None:
        raise NotFound("HOLD_NOT_FOUND", "no such hold")
    if hold.status is HoldStatus.CAPTURED:
        raise FailedPrecondition("HOLD_ALREADY_CAPTURED", "the hold was already captured")
    if hold.status is HoldStatus.RELEASED:
        raise FailedPrecondition("HOLD_RELEASED", "the hold was released")
    if not hold.is_live(now):
        raise FailedPrecondition("HOLD_EXPIRED", "the hold expired; its points are available again")
    return hold


def ensure_available(balance: Balance, amount: int) -> None:
    if amount > balance.available:
        raise FailedPrecondition("INSUFFICIENT_POINTS", f"{amount} requested, {balance.available} available")


@dataclass(frozen=True)
class Allocation:
    """The part of one lot that paid for a redemption, kept so a reversal restores it."""

    lot_id: str
    amount: int


def allocate(lots: list[Lot], amount: int, now: datetime) -> list[Allocation]:
    """Takes `amount` from the active lots, soonest-expiring first (lots that never expire
    last, older activation first among equals). The caller has checked availability."""
    never = datetime.max.replace(tzinfo=now.tzinfo)
    spendable = sorted(
        (lot for lot in lots if lot.is_active(now) and lot.remaining > 0),
        key=lambda lot: (lot.expire_at or never, lot.activate_at, lot.lot_id),
    )
    allocations: list[Allocation] = []
    left = amount
    for lot in spendable:
        if left == 0:
            break
        taken = min(lot.remaining, left)
        allocations.append(Allocation(lot.lot_id, taken))
        left -= taken
    if left:
        raise FailedPrecondition("INSUFFICIENT_POINTS", f"{amount} requested, {amount - left} spendable")
    return allocations


def reversible_amount(original: int, reversed_so_far: int, requested: int) -> int:
    """How much a reversal takes: all that is left of the operation when `requested` is 0,
    else `requested`, refused when nothing or less than that is left."""
    left = abs(original) - reversed_so_far
    if left <= 0:
        raise FailedPrecondition("ALREADY_REVERSED", "the operation was reversed in full")
    if requested > left:
        raise FailedPrecondition("REVERSAL_EXCEEDS_OPERATION", f"{requested} requested, {left} left to reverse")
    return requested or left


@dataclass(frozen=True)
class AccrualTakeBack:
    """Reversing earned points: what comes out of their lot, and what was already spent
    (or expired) and so becomes a negative balance the next accruals repay."""

    from_lot: int
    owed: int


def take_back(amount: int, left_in_lot: int) -> AccrualTakeBack:
    from_lot = min(amount, max(left_in_lot, 0))
    return AccrualTakeBack(from_lot, amount - from_lot)


def restore(paid: list[Allocation], restored: dict[str, int], amount: int) -> list[Allocation]:
    """Which lots get a reversed redemption's points back: the lots that paid, each up to
    what it paid and has not had back yet, the last one taken first (the longest-lived
    points come back first)."""
    back: list[Allocation] = []
    left = amount
    for allocation in reversed(paid):
        if left == 0:
            break
        room = allocation.amount - restored.get(allocation.lot_id, 0)
        given = min(room, left)
        if given > 0:
            back.append(Allocation(allocation.lot_id, given))
            left -= given
    if left:
        raise FailedPrecondition("REVERSAL_EXCEEDS_OPERATION", f"{left} more than the redemption took")
    return back


def repayment(owed: int, accrued: int) -> int:
    """The part of a new accrual that first repays a negative balance."""
    return min(max(owed, 0), accrued)
