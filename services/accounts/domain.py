"""The ledger's rules: lots, what a balance is at an instant, what an accrual may be. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from loyalty.runtime.errors import Violations

MAX_POINTS_PER_OPERATION = 10**12
MAX_HOLDER_ID_LENGTH = 64
MAX_SOURCE_REF_LENGTH = 200
MAX_REASON_LENGTH = 500
_CURRENCY = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


class EntryKind(StrEnum):
    ACCRUAL = "accrual"
    REDEMPTION = "redemption"
    EXPIRY = "expiry"


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

    @property
    def available(self) -> int:
        return max(self.active - self.held, 0)


def balance_at(holder_id: str, currency: str, lots: list[Lot], held: int, now: datetime) -> Balance:
    """The balance as of `now`, straight from the lots: no job has to run for points
    to activate or expire."""
    return Balance(
        holder_id=holder_id,
        currency=currency,
        active=sum(lot.remaining for lot in lots if lot.is_active(now)),
        pending=sum(lot.remaining for lot in lots if lot.is_pending(now)),
        held=held,
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


def check_accrual(accrual: Accrual, violations: Violations) -> None:
    """Adds a violation for each way the accrual is not acceptable."""
    violations.check(bool(accrual.holder_id), "holder_id", "required")
    violations.check_length(accrual.holder_id, "holder_id", MAX_HOLDER_ID_LENGTH)
    violations.check_length(accrual.source_ref, "source_ref", MAX_SOURCE_REF_LENGTH)
    violations.check_length(accrual.reason, "reason", MAX_REASON_LENGTH)
    check_currency(accrual.currency, violations)
    violations.check(accrual.amount > 0, "amount", "must be positive")
    violations.check(accrual.amount <= MAX_POINTS_PER_OPERATION, "amount", f"at most {MAX_POINTS_PER_OPERATION}")
    if accrual.expire_at is not None:
        violations.check(accrual.expire_at > accrual.activate_at, "expire_time", "must be after activation")
    if accrual.source is AccrualSource.STAFF:
        violations.check(bool(accrual.reason.strip()), "reason", "a staff accrual needs a reason")
