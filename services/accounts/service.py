"""The ledger's use cases, each given the session of its unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound
from loyalty.runtime.outbox import add_event
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from services.accounts.domain import (
    LIMITED_SOURCES,
    MAX_NEXT_EXPIRIES,
    Accrual,
    AccrualLimits,
    AccrualSource,
    Adjustment,
    Allocation,
    Balance,
    CurrencyRegistry,
    EntryKind,
    Expiry,
    Hold,
    HoldStatus,
    Lot,
    LotRestriction,
    MassItem,
    MassOperationKind,
    MassOperationStatus,
    MonthForecast,
    Move,
    SpendContext,
    allocate,
    capped_reason,
    check_hold,
    ensure_available,
    ensure_not_blocked,
    mass_item_ref,
    month_starts,
    moves_for_merge,
    moves_for_transfer,
    next_expiries,
    plan_mass_accrual,
    repayment,
    restore,
    reversible_amount,
    spendable_on,
    take_back,
)


def _with_member(payload: dict[str, object], member_id: str) -> dict[str, object]:
    """An event payload that names the member when the request did: for a household
    account the holder is the household, and the member is who should hear about it."""
    return {**payload, "member_id": member_id} if member_id else payload


@dataclass(frozen=True)
class AccrualResult:
    entry: store.EntryRow
    balance: Balance
    # Points not credited because an accrual limit clipped the accrual.
    capped: int = 0


async def accrue_points(session: AsyncSession, accrual: Accrual, limits: AccrualLimits | None = None) -> AccrualResult:
    """Credits a new lot and its entry, and emits points.accrued in the same transaction.
    Over a fraud limit the accrual is refused, or clipped with the excess recorded in the
    entry's reason, the event and the result."""
    now = utcnow()
    await store.open_account(session, accrual.holder_id, accrual.currency, now)
    account = await _locked_account(session, accrual.holder_id, accrual.currency)
    ensure_not_blocked(account.blocked)
    requested = accrual.amount
    if limits is not None and (limits.per_receipt is not None or limits.per_day is not None):
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        sources = frozenset(source.value for source in LIMITED_SOURCES)
        today = await store.accrued_since(session, account.account_id, day_start, sources)
        allowed = limits.allowed(requested, accrual.source, today)
        if allowed < requested:
            accrual = replace(accrual, amount=allowed, reason=capped_reason(accrual.reason, requested, allowed))
    entry = await store.add_accrual(session, account, accrual, now, repayment(account.debt, accrual.amount))
    await add_event(
        session,
        store.outbox,
        "points.accrued",
        key=accrual.holder_id,
        payload=_with_member(
            {
                "holder_id": accrual.holder_id,
                "currency": accrual.currency,
                "amount": accrual.amount,
                "entry_id": entry.entry_id,
                "source": accrual.source.value,
                "source_ref": accrual.source_ref,
                "activate_at": accrual.activate_at.isoformat(),
                **({"capped": requested - accrual.amount} if requested > accrual.amount else {}),
            },
            accrual.member_id,
        ),
    )
    return AccrualResult(entry, await _balance_of(session, account, now), requested - accrual.amount)


async def get_balance(session: AsyncSession, holder_id: str, currency: str) -> Balance:
    """The balance as of now, with the soonest days on which points expire: read from the
    lots' dates, so it never waits for the expiry job."""
    account = await store.find_account(session, holder_id, currency)
    if account is None:
        return Balance(holder_id, currency, active=0, pending=0, held=0)
    now = utcnow()
    balance = await _balance_of(session, account, now)
    return replace(balance, next_expiries=tuple(await _next_expiries(session, account.account_id, now)))


EXPIRY_INSTANTS_BATCH = 100


async def _next_expiries(session: AsyncSession, account_id: str, now: datetime) -> list[Expiry]:
    """Reads expiry instants batch by batch until a day past the last reported one shows
    up, so the last reported day is complete however many lots expire on it."""
    due: list[tuple[datetime, int]] = []
    while True:
        batch = await store.expiring_points(
            session, account_id, now, due[-1][0] if due else None, EXPIRY_INSTANTS_BATCH
        )
        due.extend(batch)
        if len(batch) < EXPIRY_INSTANTS_BATCH or len(next_expiries(due, MAX_NEXT_EXPIRIES + 1)) > MAX_NEXT_EXPIRIES:
            return next_expiries(due)


async def _balance_of(session: AsyncSession, account: store.AccountRow, now: datetime) -> Balance:
    figures = await store.balance_figures(session, account.account_id, now)
    return Balance(
        account.holder_id,
        account.currency,
        figures.active,
        figures.pending,
        figures.held,
        account.debt,
        account.blocked,
    )


async def _locked_account(session: AsyncSession, holder_id: str, currency: str) -> store.AccountRow:
    account = await store.lock_account(session, holder_id, currency)
    if account is None:
        raise FailedPrecondition("INSUFFICIENT_POINTS", "the holder has no points in this currency")
    return account


@dataclass(frozen=True)
class HoldResult:
    hold: Hold
    balance: Balance


async def place_hold(
    session: AsyncSession,
    holder_id: str,
    currency: str,
    amount: int,
    ttl: timedelta,
    source_ref: str,
    member_id: str = "",
    context: SpendContext | None = None,
) -> HoldResult:
    """Reserves points for a calculated receipt; they count against the available balance
    at once, and come back by themselves when the hold expires. Restricted promo lots count
    only as far as the receipt (`context`) may spend them."""
    now = utcnow()
    account = await _locked_account(session, holder_id, currency)
    ensure_not_blocked(account.blocked)
    ensure_available(await _balance_of(session, account, now), amount)
    allocate(await _lots_to_spend(session, account, amount, now, context), amount, now, context)
    hold = await store.add_hold(
        session,
        account,
        amount,
        now + ttl,
        source_ref,
        now,
        member_id,
        context.store_id if context else "",
        context.receipt_amount if context else 0,
        context.partner_id if context else "",
    )
    return HoldResult(hold, await _balance_of(session, account, now))


SPENDING_BATCH = 50


async def _lots_to_spend(
    session: AsyncSession, account: store.AccountRow, amount: int, now: datetime, context: SpendContext | None
) -> list[Lot]:
    """The account's active lots, locked in spending order, batch by batch until they can pay
    `amount` (or there are no more): the expiry job and another spend never take the same
    points, and an account with thousands of lots is not read whole for a small payment."""
    lots: list[Lot] = []
    while True:
        batch = await store.active_lots_in_spending_order(session, account.account_id, now, SPENDING_BATCH, len(lots))
        lots.extend(batch)
        if len(batch) < SPENDING_BATCH or spendable_on(lots, now, context) >= amount:
            return lots


@dataclass(frozen=True)
class RedemptionResult:
    entry: store.EntryRow
    balance: Balance


async def _redeem(
    session: AsyncSession,
    account: store.AccountRow,
    amount: int,
    source_ref: str,
    reason: str,
    now: datetime,
    member_id: str = "",
    context: SpendContext | None = None,
) -> RedemptionResult:
    allocations = allocate(await _lots_to_spend(session, account, amount, now, context), amount, now, context)
    partner_id = context.partner_id if context else ""
    entry = await store.add_redemption(
        session, account, allocations, source_ref, reason, now, EntryKind.REDEMPTION, partner_id
    )
    await add_event(
        session,
        store.outbox,
        "points.redeemed",
        key=account.holder_id,
        payload=_with_member(
            {
                "holder_id": account.holder_id,
                "currency": account.currency,
                "amount": amount,
                "entry_id": entry.entry_id,
                "source_ref": source_ref,
            },
            member_id,
        ),
    )
    return RedemptionResult(entry, await _balance_of(session, account, now))


async def _locked_hold(session: AsyncSession, hold_id: str, now: datetime) -> tuple[Hold, store.AccountRow]:
    """A hold that can still be settled, with its account locked. The hold is read again
    under the lock: a concurrent capture or release may have settled it meanwhile."""
    found = await store.find_hold(session, hold_id)
    if found is None:
        raise NotFound("HOLD_NOT_FOUND", "no such hold")
    account = await _locked_account(session, found[1].holder_id, found[1].currency)
    settled = await store.find_hold(session, hold_id)
    return check_hold(settled[0] if settled else None, now), account


async def capture_hold(
    session: AsyncSession, hold_id: str, amount: int, currencies: CurrencyRegistry | None = None
) -> RedemptionResult:
    """Spends a hold's points, all of them or part (amount 0 means all); the rest is freed.
    Restricted promo lots pay as far as the hold's receipt (store, amount) allows. A block
    does not stop it: a hold can only be placed on an open account, and by the time its
    receipt is committed the goods are gone, so refusing would give the points back to the
    very account under review."""
    now = utcnow()
    hold, account = await _locked_hold(session, hold_id, now)
    registry = currencies or CurrencyRegistry({})
    context = SpendContext(registry.get(account.currency), hold.store_id, hold.receipt_amount, hold.partner_id)
    spend = amount or hold.amount
    if spend > hold.amount:
        raise FailedPrecondition("CAPTURE_EXCEEDS_HOLD", f"{spend} requested, the hold is {hold.amount}")
    await store.settle_hold(session, hold_id, HoldStatus.CAPTURED, spend, now)
    return await _redeem(
        session, account, spend, f"hold:{hold_id}", "points paid on a receipt", now, hold.member_id, context
    )


async def release_hold(session: AsyncSession, hold_id: str) -> HoldResult:
    now = utcnow()
    _hold, account = await _locked_hold(session, hold_id, now)
    hold = await store.settle_hold(session, hold_id, HoldStatus.RELEASED, 0, now)
    return HoldResult(hold, await _balance_of(session, account, now))


async def redeem_points(
    session: AsyncSession,
    holder_id: str,
    currency: str,
    amount: int,
    source_ref: str,
    reason: str,
    member_id: str = "",
    context: SpendContext | None = None,
) -> RedemptionResult:
    """Spends points at once, without a hold; restricted promo lots only as far as the
    receipt (`context`) may spend them."""
    now = utcnow()
    account = await _locked_account(session, holder_id, currency)
    ensure_not_blocked(account.blocked)
    ensure_available(await _balance_of(session, account, now), amount)
    return await _redeem(session, account, amount, source_ref, reason, now, member_id, context)


@dataclass(frozen=True)
class EntriesPage:
    entries: list[store.EntryRow]
    next_cursor: Cursor | None


async def list_entries(
    session: AsyncSession, holder_id: str, currency: str, page_size: int, after: Cursor | None
) -> EntriesPage:
    account = await store.find_account(session, holder_id, currency)
    if account is None:
        return EntriesPage([], None)
    rows = await store.list_entries(session, account.account_id, page_size + 1, after)
    page, more = rows[:page_size], len(rows) > page_size
    scope = f"{holder_id}/{currency}"
    return EntriesPage(page, Cursor(scope, page[-1].created_at, page[-1].entry_id) if more else None)


async def reverse_entry(session: AsyncSession, entry_id: str, amount: int, source_ref: str) -> RedemptionResult:
    """Undoes an accrual or a redemption, wholly (amount 0) or in part (returned lines).

    Earned points come out of their lot; what was already spent or expired becomes a
    negative balance, repaid first by the next accruals. Spent points go back into the
    lots that paid for them; into a lot whose expiry was already written, they come back
    expired.
    """
    now = utcnow()
    original = await store.find_entry(session, entry_id)
    if original is None:
        raise NotFound("ENTRY_NOT_FOUND", "no such ledger entry")
    account = await store.lock_account_by_id(session, original.account_id)
    if original.kind not in (EntryKind.ACCRUAL.value, EntryKind.REDEMPTION.value):
        raise FailedPrecondition("ENTRY_NOT_REVERSIBLE", f"a {original.kind} entry cannot be reversed")
    taking = reversible_amount(original.amount, await store.reversed_so_far(session, entry_id), amount)
    if original.kind == EntryKind.ACCRUAL.value:
        assert original.lot_id is not None
        lot = await store.lock_lot(session, original.lot_id)
        plan = take_back(taking, 0 if lot.expired_at is not None else lot.remaining)
        lot.remaining -= plan.from_lot
        account.debt += plan.owed
        entry = await store.add_reversal(session, account, original, -taking, [], source_ref, now)
    else:
        restored = restore(await store.paid_by(session, entry_id), await store.restored_to(session, entry_id), taking)
        entry = await store.add_reversal(session, account, original, taking, restored, source_ref, now)
        for allocation in restored:
            lot = await store.lock_lot(session, allocation.lot_id)
            if lot.expired_at is None:
                lot.remaining += allocation.amount
            else:
                await store.write_off(session, account, allocation.lot_id, allocation.amount, now)
    await session.flush()
    await add_event(
        session,
        store.outbox,
        "points.reversed",
        key=account.holder_id,
        payload={
            "holder_id": account.holder_id,
            "currency": account.currency,
            "amount": entry.amount,
            "entry_id": entry.entry_id,
            "reverses_entry_id": entry_id,
            "source_ref": source_ref,
        },
    )
    return RedemptionResult(entry, await _balance_of(session, account, now))


async def adjust_points(session: AsyncSession, adjustment: Adjustment) -> RedemptionResult:
    """Credits (a new lot, repaying a negative balance first) or debits (soonest-expiring lots
    first, never beyond what is available) points by hand; the audit trail records who and
    why in the same transaction, and points.adjusted tells the member."""
    now = utcnow()
    source_ref = adjustment.source_ref or f"staff:{adjustment.actor}"
    if adjustment.amount > 0:
        await store.open_account(session, adjustment.holder_id, adjustment.currency, now)
        account = await _locked_account(session, adjustment.holder_id, adjustment.currency)
        credit = Accrual(
            holder_id=adjustment.holder_id,
            currency=adjustment.currency,
            amount=adjustment.amount,
            source=AccrualSource.STAFF,
            source_ref=source_ref,
            reason=adjustment.reason,
            activate_at=now,
            expire_at=adjustment.expire_at,
        )
        repaid = repayment(account.debt, adjustment.amount)
        entry = await store.add_accrual(session, account, credit, now, repaid, EntryKind.ADJUSTMENT)
    else:
        account = await _locked_account(session, adjustment.holder_id, adjustment.currency)
        debit = -adjustment.amount
        ensure_available(await _balance_of(session, account, now), debit)
        lots = await _lots_to_spend(session, account, debit, now, None)
        entry = await store.add_redemption(
            session, account, allocate(lots, debit, now), source_ref, adjustment.reason, now, EntryKind.ADJUSTMENT
        )
    await store.add_adjustment_record(session, entry, adjustment.actor, adjustment.reason, adjustment.member_id, now)
    await add_event(
        session,
        store.outbox,
        "points.adjusted",
        key=adjustment.holder_id,
        payload=_with_member(
            {
                "holder_id": adjustment.holder_id,
                "currency": adjustment.currency,
                "amount": adjustment.amount,
                "entry_id": entry.entry_id,
                "reason": adjustment.reason,
                "actor": adjustment.actor,
            },
            adjustment.member_id,
        ),
    )
    return RedemptionResult(entry, await _balance_of(session, account, now))


async def _lock_pair(
    session: AsyncSession, from_holder_id: str, to_holder_id: str, currency: str, now: datetime
) -> tuple[store.AccountRow | None, store.AccountRow]:
    """Both accounts locked, always in holder order, so two moves between the same pair in
    opposite directions cannot deadlock; the destination is opened when it is new."""
    await store.open_account(session, to_holder_id, currency, now)
    locked: dict[str, store.AccountRow | None] = {}
    for holder_id in sorted((from_holder_id, to_holder_id)):
        locked[holder_id] = await store.lock_account(session, holder_id, currency)
    destination = locked[to_holder_id]
    assert destination is not None
    return locked[from_holder_id], destination


async def _move(
    session: AsyncSession,
    source: store.AccountRow,
    destination: store.AccountRow,
    moves: list[Move],
    source_ref: str,
    reason: str,
    now: datetime,
) -> tuple[store.EntryRow | None, list[store.EntryRow]]:
    """Debits the source lots in one entry and credits a lot of the same dates and
    restriction per move to the destination, repaying its negative balance first."""
    if not moves:
        return None, []
    allocations = [Allocation(move.lot.lot_id, move.amount) for move in moves]
    debit = await store.add_redemption(session, source, allocations, source_ref, reason, now, EntryKind.TRANSFER)
    credits = []
    for move in moves:
        credit = Accrual(
            holder_id=destination.holder_id,
            currency=destination.currency,
            amount=move.amount,
            source=AccrualSource.TRANSFER,
            source_ref=source_ref,
            reason=reason,
            activate_at=move.lot.activate_at,
            expire_at=move.lot.expire_at,
            restriction=move.lot.restriction or LotRestriction(),
            partner_id=move.lot.partner_id,
        )
        repaid = repayment(destination.debt, move.amount)
        credits.append(await store.add_accrual(session, destination, credit, now, repaid, EntryKind.TRANSFER))
    return debit, credits


@dataclass(frozen=True)
class TransferResult:
    debit: store.EntryRow | None
    credits: list[store.EntryRow]
    from_balance: Balance
    to_balance: Balance


async def transfer_points(
    session: AsyncSession, from_holder_id: str, to_holder_id: str, currency: str, amount: int, reason: str
) -> TransferResult:
    """Moves available points to another holder (e.g. into the family pool), soonest-expiring
    first, each keeping its activation and expiry; promo points stay where they are."""
    now = utcnow()
    source, destination = await _lock_pair(session, from_holder_id, to_holder_id, currency, now)
    if source is None:
        raise FailedPrecondition("INSUFFICIENT_POINTS", "the holder has no points in this currency")
    ensure_not_blocked(source.blocked or destination.blocked)
    ensure_available(await _balance_of(session, source, now), amount)
    moves = moves_for_transfer(await _lots_to_spend(session, source, amount, now, None), amount, now)
    source_ref = f"transfer:{from_holder_id}:{to_holder_id}"
    debit, credits = await _move(session, source, destination, moves, source_ref, reason, now)
    await add_event(
        session,
        store.outbox,
        "points.transferred",
        key=from_holder_id,
        payload={
            "from_holder_id": from_holder_id,
            "to_holder_id": to_holder_id,
            "currency": currency,
            "amount": amount,
            "entry_id": debit.entry_id if debit else "",
            "reason": reason,
        },
    )
    return TransferResult(
        debit, credits, await _balance_of(session, source, now), await _balance_of(session, destination, now)
    )


async def merge_accounts(
    session: AsyncSession, from_holder_id: str, to_holder_id: str, reason: str
) -> list[TransferResult]:
    """Moves everything one holder has into another's accounts, currency by currency (a
    member merged into another, a card joined to a household): every unexpired point, pending
    and promo ones included, with their dates, and any negative balance. Refused with
    ACCOUNT_HAS_LIVE_HOLDS while a calculated receipt still holds points of the source."""
    now = utcnow()
    source_ref = f"merge:{from_holder_id}:{to_holder_id}"
    results = []
    for currency in sorted(account.currency for account in await store.accounts_of(session, from_holder_id)):
        source, destination = await _lock_pair(session, from_holder_id, to_holder_id, currency, now)
        assert source is not None
        ensure_not_blocked(source.blocked or destination.blocked)
        if await store.live_holds(session, source.account_id, now):
            raise FailedPrecondition("ACCOUNT_HAS_LIVE_HOLDS", f"{currency} points of the holder are held; retry later")
        if source.debt:
            # The debt travels as a pair of entries, so each account's entries still sum to its balance.
            owed, source.debt = source.debt, 0
            destination.debt += owed
            await store.add_entry(session, source, EntryKind.TRANSFER, owed, source_ref, reason, now)
            await store.add_entry(session, destination, EntryKind.TRANSFER, -owed, source_ref, reason, now)
        moves = moves_for_merge(await store.open_lots(session, source.account_id, now, for_update=True), now)
        debit, credits = await _move(session, source, destination, moves, source_ref, reason, now)
        results.append(
            TransferResult(
                debit, credits, await _balance_of(session, source, now), await _balance_of(session, destination, now)
            )
        )
    await add_event(
        session,
        store.outbox,
        "accounts.merged",
        key=to_holder_id,
        payload={
            "from_holder_id": from_holder_id,
            "to_holder_id": to_holder_id,
            "currencies": [result.to_balance.currency for result in results],
            "reason": reason,
        },
    )
    return results


@dataclass(frozen=True)
class Statement:
    """An account's movements in [start, end): the book balance (entries summed: active plus
    pending minus owed, expired points out once their expiry entry is written) before and
    after, the totals, and one page of the entries, oldest first."""

    opening: int
    credits: int
    debits: int
    entries: list[store.EntryRow]
    next_cursor: Cursor | None

    @property
    def closing(self) -> int:
        return self.opening + self.credits + self.debits


async def get_statement(
    session: AsyncSession,
    holder_id: str,
    currency: str,
    start: datetime,
    end: datetime,
    page_size: int,
    after: Cursor | None,
) -> Statement:
    account = await store.find_account(session, holder_id, currency)
    if account is None:
        return Statement(0, 0, 0, [], None)
    totals = await store.period_totals(session, account.account_id, start, end)
    rows = await store.entries_in_period(session, account.account_id, start, end, page_size + 1, after)
    page, more = rows[:page_size], len(rows) > page_size
    cursor = Cursor(statement_scope(holder_id, currency, start, end), page[-1].created_at, page[-1].entry_id)
    return Statement(totals.opening, totals.credits, totals.debits, page, cursor if more else None)


def statement_scope(holder_id: str, currency: str, start: datetime, end: datetime) -> str:
    return f"statement/{holder_id}/{currency}/{start.isoformat()}/{end.isoformat()}"


LIABILITY_HORIZONS = (timedelta(days=30), timedelta(days=90))


async def liability_report(session: AsyncSession) -> tuple[datetime, list[store.Liability]]:
    """The program's outstanding points by currency as of now, and what expires within 30
    and 90 days."""
    now = utcnow()
    soon, later = (now + horizon for horizon in LIABILITY_HORIZONS)
    return now, await store.liability(session, now, soon, later)


async def expiry_forecast(session: AsyncSession, first: date, months: int) -> tuple[datetime, list[MonthForecast]]:
    """Per calendar month from `first`, currency and issuing partner: the points of
    outstanding lots that expire in it, as of now."""
    now = utcnow()
    return now, await store.expiry_forecast(session, now, month_starts(first, months))


async def partner_settlements(session: AsyncSession, start: datetime, end: datetime) -> list[store.Settlement]:
    """What partners owe each other for a period: points one issued that were spent at another."""
    return await store.partner_settlements(session, start, end)


async def set_blocked(
    session: AsyncSession, holder_id: str, currency: str, blocked: bool, actor: str, reason: str
) -> Balance:
    """Blocks or unblocks the holder's account in a currency (opened if new, so a suspect
    holder can be blocked before the first accrual), audited, and announced with
    account.blocked or account.unblocked. Asking for the state the account is already in
    changes nothing and records nothing."""
    now = utcnow()
    await store.open_account(session, holder_id, currency, now)
    account = await _locked_account(session, holder_id, currency)
    if account.blocked != blocked:
        await store.set_blocked(session, account, blocked, actor, reason, now)
        await add_event(
            session,
            store.outbox,
            "account.blocked" if blocked else "account.unblocked",
            key=holder_id,
            payload={"holder_id": holder_id, "currency": currency, "actor": actor, "reason": reason},
        )
    return await _balance_of(session, account, now)


@dataclass(frozen=True)
class MassOperationView:
    operation: store.MassOperationRow
    applied: int
    failed: int
    # Items never applied because the operation was cancelled first.
    cancelled: int
    # Points accrual limits clipped from applied items.
    capped: int
    failures: list[store.MassItemRow]


MAX_LISTED_FAILURES = 100


async def mass_operation_view(session: AsyncSession, operation_id: str) -> MassOperationView:
    operation = await store.find_mass_operation(session, operation_id)
    if operation is None:
        raise NotFound("MASS_OPERATION_NOT_FOUND", "no such mass operation")
    progress = await store.mass_progress(session, operation_id)
    failures = await store.mass_failures(session, operation_id, MAX_LISTED_FAILURES)
    # A cancel leaves the items it stopped pending, under an operation no job claims from.
    left = operation.total - progress.applied - progress.failed
    stopped = left if operation.status == MassOperationStatus.CANCELLED else 0
    return MassOperationView(operation, progress.applied, progress.failed, stopped, progress.capped, failures)


async def create_mass_operation(
    session: AsyncSession,
    kind: MassOperationKind,
    currency: str,
    actor: str,
    reason: str,
    expire_at: datetime | None,
    items: list[tuple[str, int]],
    start: bool,
) -> MassOperationView:
    """A mass accrual or deduction with its first items; running at once when `start`,
    else a draft that takes more items until StartMassOperation."""
    operation = store.MassOperationRow(
        operation_id=str(uuid.uuid4()),
        kind=kind.value,
        currency=currency,
        actor=actor,
        reason=reason,
        expire_at=expire_at,
        status=(MassOperationStatus.RUNNING if start else MassOperationStatus.DRAFT).value,
        total=0,
        created_at=utcnow(),
    )
    session.add(operation)
    await session.flush()
    await store.add_mass_items(session, operation, items)
    return await mass_operation_view(session, operation.operation_id)


async def _locked_operation(session: AsyncSession, operation_id: str) -> store.MassOperationRow:
    operation = await store.find_mass_operation(session, operation_id, for_update=True)
    if operation is None:
        raise NotFound("MASS_OPERATION_NOT_FOUND", "no such mass operation")
    return operation


async def _draft(session: AsyncSession, operation_id: str) -> store.MassOperationRow:
    operation = await _locked_operation(session, operation_id)
    if operation.status != MassOperationStatus.DRAFT.value:
        raise FailedPrecondition("MASS_OPERATION_STARTED", "the operation has started; it takes no more items")
    return operation


async def add_mass_items(session: AsyncSession, operation_id: str, items: list[tuple[str, int]]) -> MassOperationView:
    await store.add_mass_items(session, await _draft(session, operation_id), items)
    return await mass_operation_view(session, operation_id)


async def start_mass_operation(session: AsyncSession, operation_id: str) -> MassOperationView:
    (await _draft(session, operation_id)).status = MassOperationStatus.RUNNING.value
    await session.flush()
    return await mass_operation_view(session, operation_id)


async def cancel_mass_operation(session: AsyncSession, operation_id: str) -> MassOperationView:
    """Stops a draft or running operation: what was applied stays applied, the items still
    pending are never applied. The operation's row lock waits for the chunks in flight
    (they hold it shared) and every later chunk finds the operation cancelled."""
    operation = await _locked_operation(session, operation_id)
    if MassOperationStatus(operation.status).finished:
        raise FailedPrecondition("MASS_OPERATION_FINISHED", f"the operation is already {operation.status}")
    operation.status, operation.finished_at = MassOperationStatus.CANCELLED.value, utcnow()
    await session.flush()
    return await mass_operation_view(session, operation_id)


async def apply_mass_chunk(
    session: AsyncSession, limit: int, currencies: CurrencyRegistry | None = None, after: dict[str, int] | None = None
) -> int:
    """Applies up to `limit` pending items of one running operation and marks them, all in
    the caller's transaction: a crash before the commit leaves them pending, after it they
    are never applied again. Returns how many items were handled (0: nothing to do).
    `after` is the caller's per-operation resume point (see store.claim_mass_chunk)."""
    now = utcnow()
    cursor = {} if after is None else after
    claimed = await store.claim_mass_chunk(session, MassOperationStatus.RUNNING.value, limit, cursor)
    if claimed is None:
        await store.finish_mass_operations(
            session, MassOperationStatus.RUNNING.value, MassOperationStatus.DONE.value, now
        )
        return 0
    operation, items = claimed
    cursor[operation.operation_id] = items[-1].index
    if operation.kind == MassOperationKind.ACCRUAL.value:
        await _apply_mass_accruals(session, operation, items, (currencies or CurrencyRegistry({})), now)
    else:
        await _apply_mass_deductions(session, operation, items, now)
    return len(items)


async def _apply_mass_accruals(
    session: AsyncSession,
    operation: store.MassOperationRow,
    items: list[MassItem],
    currencies: CurrencyRegistry,
    now: datetime,
) -> None:
    """A chunk of credits in a handful of statements whatever its size, and one
    points.mass_applied event for it (a million points.adjusted events would flood the bus
    and the members' inboxes)."""
    accounts = await store.lock_mass_targets(session, [item.holder_id for item in items], operation.currency, now)
    limits = currencies.get(operation.currency).limits
    today: dict[str, int] = {}
    if limits.per_day is not None:
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        sources = frozenset(source.value for source in LIMITED_SOURCES)
        ids = [target.account_id for target in accounts.values()]
        today = await store.accrued_since_by_account(session, ids, day_start, sources)
    plan = plan_mass_accrual(items, accounts, limits, today)
    await store.add_mass_credits(session, operation, plan, AccrualSource.MASS_JOB.value, now)
    capped = {credit.index: credit.capped for credit in plan.credits if credit.capped}
    applied = [credit.index for credit in plan.credits]
    points = sum(credit.amount for credit in plan.credits)
    chunk = store.MassChunk(
        operation.operation_id, items[0].index, items[-1].index, applied, plan.failures, capped, points
    )
    await store.settle_mass_items(session, chunk, now)
    await add_event(
        session,
        store.outbox,
        "points.mass_applied",
        key=operation.operation_id,
        payload={
            "operation_id": operation.operation_id,
            "kind": operation.kind,
            "currency": operation.currency,
            "actor": operation.actor,
            "reason": operation.reason,
            "first_index": items[0].index,
            "last_index": items[-1].index,
            "applied": len(applied),
            "failed": len(plan.failures),
            "points": points,
            "capped": sum(capped.values()),
        },
    )


async def _apply_mass_deductions(
    session: AsyncSession, operation: store.MassOperationRow, items: list[MassItem], now: datetime
) -> None:
    """Debits item by item, each an audited adjustment in its own savepoint: a debit spends
    lots soonest-expiring first, which depends on the account's lots one by one."""
    failures: dict[int, str] = {}
    # Holder order: accounts are locked in the same order as by every other multi-account operation.
    for item in sorted(items, key=lambda item: (item.holder_id, item.index)):
        debit = Adjustment(
            holder_id=item.holder_id,
            currency=operation.currency,
            amount=-item.amount,
            actor=operation.actor,
            reason=operation.reason,
            source_ref=mass_item_ref(operation.operation_id, item.index),
        )
        try:
            async with session.begin_nested():
                await adjust_points(session, debit)
        except DomainError as refused:
            failures[item.index] = refused.reason
    applied = [item for item in items if item.index not in failures]
    chunk = store.MassChunk(
        operation.operation_id,
        items[0].index,
        items[-1].index,
        [item.index for item in applied],
        failures,
        {},
        -sum(item.amount for item in applied),
    )
    await store.settle_mass_items(session, chunk, now)
