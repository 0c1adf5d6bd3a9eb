"""The ledger's rules: lots, what a balance is at an instant, what an accrual may be. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

from loyalty.runtime.errors import FailedPrecondition, NotFound, Violations

MAX_POINTS_PER_OPERATION = 10**12
MAX_HOLDER_ID_LENGTH = 64
MAX_SOURCE_REF_LENGTH = 200
MAX_REASON_LENGTH = 500
MAX_ACTOR_LENGTH = 64
MAX_LIFETIME_DAYS = 100 * 366
_CURRENCY = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


class EntryKind(StrEnum):
    ACCRUAL = "accrual"
    REDEMPTION = "redemption"
    EXPIRY = "expiry"
    REVERSAL = "reversal"
    ADJUSTMENT = "adjustment"
    TRANSFER = "transfer"


class AccrualSource(StrEnum):
    RECEIPT = "receipt"
    CAMPAIGN = "campaign"
    STAFF = "staff"
    MASS_JOB = "mass_job"
    # Points moved in from another holder's account (TransferPoints, MergeAccounts).
    TRANSFER = "transfer"


MAX_RESTRICTED_STORES = 100
BASIS_POINTS = 10_000


@dataclass(frozen=True)
class LotRestriction:
    """Where and how far promo points may be spent: only in the given stores (none: any),
    and at most `max_receipt_share_bp` basis points of a receipt's amount (0: no cap).
    The share cap is per lot: two lots capped at 30% may together pay 60% of a receipt."""

    store_ids: frozenset[str] = frozenset()
    max_receipt_share_bp: int = 0

    def __bool__(self) -> bool:
        return bool(self.store_ids or self.max_receipt_share_bp)


def check_restriction(restriction: LotRestriction, violations: Violations) -> None:
    violations.check(
        len(restriction.store_ids) <= MAX_RESTRICTED_STORES, "store_ids", f"at most {MAX_RESTRICTED_STORES} stores"
    )
    violations.check(
        all(0 < len(store) <= MAX_HOLDER_ID_LENGTH for store in restriction.store_ids),
        "store_ids",
        f"each 1..{MAX_HOLDER_ID_LENGTH} characters",
    )
    violations.check(
        0 <= restriction.max_receipt_share_bp <= BASIS_POINTS,
        "max_receipt_share_bp",
        f"between 0 and {BASIS_POINTS} basis points",
    )


@dataclass(frozen=True)
class Lot:
    """Points from one accrual: spendable from activate_at until expire_at (exclusive)."""

    lot_id: str
    remaining: int
    activate_at: datetime
    expire_at: datetime | None
    restriction: LotRestriction | None = None
    partner_id: str = ""

    def is_active(self, now: datetime) -> bool:
        return self.activate_at <= now and (self.expire_at is None or now < self.expire_at)

    def is_pending(self, now: datetime) -> bool:
        return now < self.activate_at


@dataclass(frozen=True)
class Expiry:
    """Points that expire on one (UTC) day, summed over the lots expiring that day."""

    day: date
    amount: int


MAX_NEXT_EXPIRIES = 5


def next_expiries(due: list[tuple[datetime, int]], limit: int = MAX_NEXT_EXPIRIES) -> list[Expiry]:
    """The first `limit` days on which points expire, with how many, from (expiry instant,
    points) pairs in expiry order; a day is complete only when an instant of a later day
    follows it, so the caller reads until it sees `limit` + 1 days or runs out."""
    days: dict[date, int] = {}
    for expire_at, amount in due:
        day = expire_at.astimezone(UTC).date()
        days[day] = days.get(day, 0) + amount
    return [Expiry(day, amount) for day, amount in sorted(days.items())[:limit]]


@dataclass(frozen=True)
class Balance:
    holder_id: str
    currency: str
    active: int
    pending: int
    held: int
    negative: int = 0
    # Blocked accounts refuse accruals, holds, redemptions and transfers; returns still work.
    blocked: bool = False
    # Filled by GetBalance only: the soonest days on which points expire.
    next_expiries: tuple[Expiry, ...] = ()

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
    # The member whose purchase or action earned the points, when known (for a household
    # account, one of its members); events carry it so notifications reach that member.
    member_id: str = ""
    restriction: LotRestriction = LotRestriction()
    # The coalition partner that issued the points (its store, its campaign); empty: the program.
    partner_id: str = ""


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
    violations.check_length(accrual.member_id, "member_id", MAX_HOLDER_ID_LENGTH)
    check_restriction(accrual.restriction, violations)
    violations.check_length(accrual.partner_id, "partner_id", MAX_HOLDER_ID_LENGTH)
    if accrual.expire_at is not None:
        violations.check(accrual.expire_at > accrual.activate_at, "expire_time", "must be after activation")
    if accrual.source is AccrualSource.STAFF:
        violations.check(bool(accrual.reason.strip()), "reason", "a staff accrual needs a reason")


@dataclass(frozen=True)
class Adjustment:
    """Points credited (positive amount, as a new lot) or debited (negative, soonest-expiring
    first) by a member of staff: who did it and why are required and kept for audit."""

    holder_id: str
    currency: str
    amount: int
    actor: str
    reason: str
    member_id: str = ""
    source_ref: str = ""
    expire_at: datetime | None = None


def check_adjustment(adjustment: Adjustment, now: datetime, violations: Violations) -> None:
    """Adds a violation for each way the adjustment is not acceptable."""
    check_holder(adjustment.holder_id, violations)
    check_currency(adjustment.currency, violations)
    violations.check(adjustment.amount != 0, "amount", "positive to credit, negative to debit; not zero")
    violations.check(
        abs(adjustment.amount) <= MAX_POINTS_PER_OPERATION, "amount", f"at most {MAX_POINTS_PER_OPERATION} either way"
    )
    violations.check(bool(adjustment.actor.strip()), "actor", "required: who makes the adjustment")
    violations.check_length(adjustment.actor, "actor", MAX_ACTOR_LENGTH)
    violations.check(bool(adjustment.reason.strip()), "reason", "required: why the points are adjusted")
    violations.check_length(adjustment.member_id, "member_id", MAX_HOLDER_ID_LENGTH)
    check_references(adjustment.source_ref, adjustment.reason, violations)
    if adjustment.expire_at is not None:
        violations.check(adjustment.amount > 0, "expire_time", "only a credit has an expiry")
        violations.check(adjustment.expire_at > now, "expire_time", "must be in the future")


class ExpiryRounding(StrEnum):
    """Where an expiry computed from a lifetime is moved: to the end of its month or year."""

    NONE = "none"
    MONTH_END = "month_end"
    YEAR_END = "year_end"


class MoneyRounding(StrEnum):
    FLOOR = "floor"
    HALF_UP = "half_up"
    CEILING = "ceiling"


class LimitPolicy(StrEnum):
    REFUSE = "refuse"
    CLIP = "clip"


# Staff adjustments are deliberate acts of one person, checked by the audit trail; what
# receipts, campaigns and mass jobs credit (the latter two reach many accounts at once) is
# limited.
LIMITED_SOURCES = frozenset({AccrualSource.RECEIPT, AccrualSource.CAMPAIGN, AccrualSource.MASS_JOB})


@dataclass(frozen=True)
class AccrualLimits:
    """Limits against fraud: the most one receipt may earn, and the most receipts and
    campaigns together may credit one account in a UTC day; over a limit an accrual is
    refused, or (CLIP) credited up to it with the excess recorded."""

    per_receipt: int | None = None
    per_day: int | None = None
    policy: LimitPolicy = LimitPolicy.REFUSE

    def allowed(self, amount: int, source: AccrualSource, accrued_today: int) -> int:
        """How much of `amount` may be credited; refuses with ACCRUAL_LIMIT_REACHED when the
        policy says so or nothing at all may be."""
        if source not in LIMITED_SOURCES:
            return amount
        allowance = amount
        if self.per_receipt is not None and source is AccrualSource.RECEIPT:
            allowance = min(allowance, self.per_receipt)
        if self.per_day is not None:
            allowance = min(allowance, max(self.per_day - accrued_today, 0))
        if allowance < amount and (self.policy is LimitPolicy.REFUSE or allowance == 0):
            raise FailedPrecondition(
                "ACCRUAL_LIMIT_REACHED", f"{amount} requested, at most {allowance} may be credited now"
            )
        return allowance


@dataclass(frozen=True)
class PointCurrency:
    """A point currency: how its units convert to money (a rational number of minor money
    units per point unit, so no float ever touches a value) and how long its points live."""

    code: str
    name: str
    scale: int = 0
    money_numerator: int = 1
    money_denominator: int = 1
    lifetime_days: int | None = None
    expiry_rounding: ExpiryRounding = ExpiryRounding.NONE
    rounding: MoneyRounding = MoneyRounding.FLOOR
    # The return window: an accrual without its own activation time is pending this long.
    activation_delay_days: int = 0
    limits: AccrualLimits = AccrualLimits()

    def activation(self, now: datetime) -> datetime:
        return now + timedelta(days=self.activation_delay_days)

    def to_money(self, points: int) -> int:
        """What `points` units are worth in minor money units, rounded by the currency's mode
        (symmetrically for a negative amount)."""
        whole, fraction = divmod(abs(points) * self.money_numerator, self.money_denominator)
        if (self.rounding is MoneyRounding.CEILING and fraction) or (
            self.rounding is MoneyRounding.HALF_UP and 2 * fraction >= self.money_denominator
        ):
            whole += 1
        return whole if points >= 0 else -whole

    def points_worth_at_most(self, money: int) -> int:
        """The most point units worth no more than `money` minor units (exactly, no rounding)."""
        if self.money_numerator == 0:
            return MAX_POINTS_PER_OPERATION
        return money * self.money_denominator // self.money_numerator


@dataclass(frozen=True)
class CurrencyRegistry:
    """The configured point currencies; one not configured converts 1:1 and never expires."""

    currencies: dict[str, PointCurrency]

    def get(self, code: str) -> PointCurrency:
        return self.currencies.get(code) or PointCurrency(code=code, name=code)


def end_of_period(moment: datetime, rounding: ExpiryRounding) -> datetime:
    """The first instant (UTC) after the month or year `moment` falls in: points that expire
    "at the end of March" are spendable through 31 March and gone at 1 April 00:00. A moment
    already on such a boundary stays."""
    if rounding is ExpiryRounding.NONE:
        return moment
    utc = moment.astimezone(UTC)
    if rounding is ExpiryRounding.MONTH_END:
        start = utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
    else:
        start = utc.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        following = start.replace(year=start.year + 1)
    return utc if utc == start else following


def expiry_of(
    activate_at: datetime,
    currency: PointCurrency,
    fixed: datetime | None = None,
    lifetime_days: int = 0,
    rounding: ExpiryRounding | None = None,
) -> datetime | None:
    """When an accrual's points expire: a fixed date as given; else a lifetime (the request's,
    else the currency's) counted from activation, moved to the end of the month or year by
    the request's rounding, else the currency's; None when neither gives a lifetime."""
    if fixed is not None:
        return fixed
    days = lifetime_days or currency.lifetime_days
    if not days:
        return None
    return end_of_period(activate_at + timedelta(days=days), rounding or currency.expiry_rounding)


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
    # The member the receipt is for, when known; carried to points.redeemed on capture.
    member_id: str = ""
    # The receipt's store and amount, so the capture honours promo lots' restrictions.
    store_id: str = ""
    receipt_amount: int = 0
    # The coalition partner the points are spent at.
    partner_id: str = ""

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


def ensure_not_blocked(blocked: bool) -> None:
    """A blocked account (fraud suspicion, dispute) takes no new points and pays nothing;
    only reversals and staff adjustments still touch it."""
    if blocked:
        raise FailedPrecondition("ACCOUNT_BLOCKED", "the account is blocked")


def check_block(holder_id: str, currency: str, actor: str, reason: str, violations: Violations) -> None:
    """Adds a violation for each way a block or unblock request is not acceptable."""
    check_holder(holder_id, violations)
    check_currency(currency, violations)
    check_staff(actor, reason, violations)


def check_staff(actor: str, reason: str, violations: Violations) -> None:
    """Who does a staff action and why: both required, kept for audit."""
    violations.check(bool(actor.strip()), "actor", "required: who does it")
    violations.check_length(actor, "actor", MAX_ACTOR_LENGTH)
    violations.check(bool(reason.strip()), "reason", "required: why")
    violations.check_length(reason, "reason", MAX_REASON_LENGTH)


def ensure_available(balance: Balance, amount: int) -> None:
    if amount > balance.available:
        raise FailedPrecondition("INSUFFICIENT_POINTS", f"{amount} requested, {balance.available} available")


@dataclass(frozen=True)
class Allocation:
    """The part of one lot that paid for a redemption, kept so a reversal restores it."""

    lot_id: str
    amount: int


@dataclass(frozen=True)
class SpendContext:
    """The receipt points are spent on, for restricted lots: its store and its amount in minor
    money units (0 when not given), and the currency that says what a point is worth."""

    currency: PointCurrency
    store_id: str = ""
    receipt_amount: int = 0
    # The coalition partner the points are spent at (recorded for settlements).
    partner_id: str = ""

    def lot_cap(self, lot: Lot) -> int:
        """How many of the lot's points this receipt may take. A restriction the request
        cannot be checked against (no store, no receipt amount) keeps the lot closed."""
        restriction = lot.restriction
        if not restriction:
            return lot.remaining
        if restriction.store_ids and self.store_id not in restriction.store_ids:
            return 0
        if restriction.max_receipt_share_bp:
            money = self.receipt_amount * restriction.max_receipt_share_bp // BASIS_POINTS
            return min(lot.remaining, self.currency.points_worth_at_most(money))
        return lot.remaining


def spendable_on(lots: list[Lot], now: datetime, context: SpendContext | None) -> int:
    """Points the active lots may pay on this receipt, restrictions honoured (before holds)."""
    return sum(_cap(lot, context) for lot in lots if lot.is_active(now))


def _cap(lot: Lot, context: SpendContext | None) -> int:
    if context is None:
        return 0 if lot.restriction else lot.remaining
    return context.lot_cap(lot)


def allocate(lots: list[Lot], amount: int, now: datetime, context: SpendContext | None = None) -> list[Allocation]:
    """Takes `amount` from the active lots, soonest-expiring first (lots that never expire
    last, older activation first among equals), each lot no more than the receipt may take
    of it. The caller has checked availability."""
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
        taken = min(_cap(lot, context), left)
        if taken == 0:
            continue
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


@dataclass(frozen=True)
class Move:
    """Points leaving one lot of the source account for a new lot of the destination with
    the same activation, expiry and restriction: a transfer never extends a point's life."""

    lot: Lot
    amount: int


def moves_for_transfer(lots: list[Lot], amount: int, now: datetime) -> list[Move]:
    """What a transfer takes: soonest-expiring active, unrestricted points first (promo
    points stay with the holder they were given to)."""
    by_id = {lot.lot_id: lot for lot in lots}
    return [Move(by_id[allocation.lot_id], allocation.amount) for allocation in allocate(lots, amount, now)]


def moves_for_merge(lots: list[Lot], now: datetime) -> list[Move]:
    """What a merge takes: every point not expired, pending and restricted ones included."""
    never = datetime.max.replace(tzinfo=now.tzinfo)
    open_lots = [lot for lot in lots if lot.remaining > 0 and (lot.expire_at is None or now < lot.expire_at)]
    return [Move(lot, lot.remaining) for lot in sorted(open_lots, key=lambda lot: (lot.expire_at or never, lot.lot_id))]


def check_transfer_parties(from_holder_id: str, to_holder_id: str, violations: Violations) -> None:
    for holder, field in ((from_holder_id, "from_holder_id"), (to_holder_id, "to_holder_id")):
        violations.check(bool(holder), field, "required")
        violations.check_length(holder, field, MAX_HOLDER_ID_LENGTH)
    violations.check(from_holder_id != to_holder_id, "to_holder_id", "must differ from from_holder_id")


def repayment(owed: int, accrued: int) -> int:
    """The part of a new accrual that first repays a negative balance."""
    return min(max(owed, 0), accrued)


class MassOperationKind(StrEnum):
    ACCRUAL = "accrual"
    DEDUCTION = "deduction"


class MassOperationStatus(StrEnum):
    # Items are still being uploaded; nothing is applied.
    DRAFT = "draft"
    # The background job applies the items.
    RUNNING = "running"
    # Every item is applied or failed.
    DONE = "done"
    # Stopped by CancelMassOperation: the items applied before stay applied, the rest never are.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (MassOperationStatus.DONE, MassOperationStatus.CANCELLED)


MAX_MASS_ITEMS_PER_CALL = 10_000


def mass_item_ref(operation_id: str, index: int) -> str:
    """The source reference, and the idempotency of an item: one entry per operation and index."""
    return f"mass:{operation_id}:{index}"


def check_mass_items(items: list[tuple[str, int]], violations: Violations) -> None:
    """Adds a violation for the first bad item (a chunk may hold 10,000 of them)."""
    violations.check(len(items) <= MAX_MASS_ITEMS_PER_CALL, "items", f"at most {MAX_MASS_ITEMS_PER_CALL} per call")
    for index, (holder_id, amount) in enumerate(items):
        if not holder_id or len(holder_id) > MAX_HOLDER_ID_LENGTH:
            violations.add(f"items[{index}].holder_id", f"required, at most {MAX_HOLDER_ID_LENGTH} characters")
            return
        if not 0 < amount <= MAX_POINTS_PER_OPERATION:
            violations.add(f"items[{index}].amount", f"between 1 and {MAX_POINTS_PER_OPERATION}")
            return


def capped_reason(reason: str, requested: int, allowed: int) -> str:
    """An entry's reason with the part an accrual limit clipped recorded in it."""
    note = f"{requested - allowed} of {requested} points over the accrual limit not credited"
    return f"{reason}; {note}" if reason else note


@dataclass(frozen=True)
class MassItem:
    index: int
    holder_id: str
    amount: int


@dataclass(frozen=True)
class MassTarget:
    """An account a mass accrual credits, as read under its lock."""

    account_id: str
    debt: int
    blocked: bool


@dataclass(frozen=True)
class MassCredit:
    """What one item of a mass accrual credits: `amount` (after the accrual limits), of which
    `repaid` goes to the account's negative balance; `capped` points were clipped."""

    index: int
    account_id: str
    amount: int
    repaid: int
    capped: int


@dataclass(frozen=True)
class MassAccrualPlan:
    credits: list[MassCredit]
    # Item index -> the stable reason it is not applied.
    failures: dict[int, str]
    # Account id -> points of its negative balance the chunk repays.
    repaid: dict[str, int]


def plan_mass_accrual(
    items: list[MassItem],
    accounts: dict[str, MassTarget],
    limits: AccrualLimits,
    accrued_today: dict[str, int],
) -> MassAccrualPlan:
    """Decides each item of a chunk as AccruePoints would decide it alone, in holder then
    index order: a blocked account fails it (ACCOUNT_BLOCKED), the daily limit clips or
    refuses it (ACCRUAL_LIMIT_REACHED) counting what earlier items of the chunk credited,
    and a negative balance is repaid first."""
    credits: list[MassCredit] = []
    failures: dict[int, str] = {}
    debt = {target.account_id: target.debt for target in accounts.values()}
    today = dict(accrued_today)
    for item in sorted(items, key=lambda item: (item.holder_id, item.index)):
        target = accounts[item.holder_id]
        if target.blocked:
            failures[item.index] = "ACCOUNT_BLOCKED"
            continue
        try:
            allowed = limits.allowed(item.amount, AccrualSource.MASS_JOB, today.get(target.account_id, 0))
        except FailedPrecondition as refused:
            failures[item.index] = refused.reason
            continue
        today[target.account_id] = today.get(target.account_id, 0) + allowed
        repaid = repayment(debt[target.account_id], allowed)
        debt[target.account_id] -= repaid
        credits.append(MassCredit(item.index, target.account_id, allowed, repaid, item.amount - allowed))
    repaid_by_account = {
        target.account_id: target.debt - debt[target.account_id]
        for target in accounts.values()
        if debt[target.account_id] != target.debt
    }
    return MassAccrualPlan(credits, failures, repaid_by_account)


@dataclass(frozen=True)
class MonthForecast:
    """Points of outstanding lots that expire in one calendar month (UTC)."""

    month: date
    currency: str
    partner_id: str
    points: int


MAX_FORECAST_MONTHS = 120


def month_starts(first: date, months: int) -> list[datetime]:
    """The UTC starts of `months` consecutive calendar months from `first`'s month, and of
    the month after them (so month i is [starts[i], starts[i + 1]))."""
    starts = []
    year, month = first.year, first.month
    for _ in range(months + 1):
        starts.append(datetime(year, month, 1, tzinfo=UTC))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return starts


_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
DEFAULT_FORECAST_MONTHS = 12


def forecast_range(first_month: str, months: int, now: datetime, violations: Violations) -> tuple[date, int]:
    """The first month ("YYYY-MM", empty: the current one) and the number of months (0: 12)
    of an expiry forecast."""
    first = date(now.year, now.month, 1)
    if first_month:
        matched = _MONTH.match(first_month)
        if matched is None or not 1 <= int(matched.group(2)) <= 12 or int(matched.group(1)) < 1:
            violations.add("first_month", "a month as YYYY-MM")
        else:
            first = date(int(matched.group(1)), int(matched.group(2)), 1)
    count = months or DEFAULT_FORECAST_MONTHS
    violations.check(0 < count <= MAX_FORECAST_MONTHS, "months", f"between 1 and {MAX_FORECAST_MONTHS}")
    if first.year + (first.month - 1 + count) // 12 > 9999:
        violations.add("months", "the range must end before the year 10000")
    return first, count
