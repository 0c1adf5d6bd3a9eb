"""The ledger's use cases, each given the session of its unit of work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.errors import FailedPrecondition, NotFound
from loyalty.runtime.outbox import add_event
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from services.accounts.domain import (
    Accrual,
    Balance,
    EntryKind,
    Hold,
    HoldStatus,
    allocate,
    balance_at,
    check_hold,
    ensure_available,
    held_total,
    repayment,
    restore,
    reversible_amount,
    take_back,
)


@dataclass(frozen=True)
class AccrualResult:
    entry: store.EntryRow
    balance: Balance


async def accrue_points(session: AsyncSession, accrual: Accrual) -> AccrualResult:
    """Credits a new lot and its entry, and emits points.accrued in the same transaction."""
    now = utcnow()
    await store.open_account(session, accrual.holder_id, accrual.currency, now)
    account = await _locked_account(session, accrual.holder_id, accrual.currency)
    entry = await store.add_accrual(session, account, accrual, now, repayment(account.debt, accrual.amount))
    await add_event(
        session,
        store.outbox,
        "points.accrued",
        key=accrual.holder_id,
        payload={
            "holder_id": accrual.holder_id,
            "currency": accrual.currency,
            "amount": accrual.amount,
            "entry_id": entry.entry_id,
            "source": accrual.source.value,
            "source_ref": accrual.source_ref,
            "activate_at": accrual.activate_at.isoformat(),
        },
    )
    return AccrualResult(entry, await get_balance(session, accrual.holder_id, accrual.currency))


async def get_balance(session: AsyncSession, holder_id: str, currency: str) -> Balance:
    account = await store.find_account(session, holder_id, currency)
    if account is None:
        return Balance(holder_id, currency, active=0, pending=0, held=0)
    return await _balance_of(session, account, utcnow())


async def _balance_of(session: AsyncSession, account: store.AccountRow, now: datetime) -> Balance:
    lots = await store.open_lots(session, account.account_id, now)
    holds = await store.live_holds(session, account.account_id, now)
    return balance_at(account.holder_id, account.currency, lots, held_total(holds, now), now, account.debt)


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
    session: AsyncSession, holder_id: str, currency: str, amount: int, ttl: timedelta, source_ref: str
) -> HoldResult:
    """Reserves points for a calculated receipt; they count against the available balance
    at once, and come back by themselves when the hold expires."""
    now = utcnow()
    account = await _locked_account(session, holder_id, currency)
    ensure_available(await _balance_of(session, account, now), amount)
    hold = await store.add_hold(session, account, amount, now + ttl, source_ref, now)
    return HoldResult(hold, await _balance_of(session, account, now))


@dataclass(frozen=True)
class RedemptionResult:
    entry: store.EntryRow
    balance: Balance


async def _redeem(
    session: AsyncSession, account: store.AccountRow, amount: int, source_ref: str, reason: str, now: datetime
) -> RedemptionResult:
    lots = await store.open_lots(session, account.account_id, now, for_update=True)
    entry = await store.add_redemption(session, account, allocate(lots, amount, now), source_ref, reason, now)
    await add_event(
        session,
        store.outbox,
        "points.redeemed",
        key=account.holder_id,
        payload={
            "holder_id": account.holder_id,
            "currency": account.currency,
            "amount": amount,
            "entry_id": entry.entry_id,
            "source_ref": source_ref,
        },
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


async def capture_hold(session: AsyncSession, hold_id: str, amount: int) -> RedemptionResult:
    """Spends a hold's points, all of them or part (amount 0 means all); the rest is freed."""
    now = utcnow()
    hold, account = await _locked_hold(session, hold_id, now)
    spend = amount or hold.amount
    if spend > hold.amount:
        raise FailedPrecondition("CAPTURE_EXCEEDS_HOLD", f"{spend} requested, the hold is {hold.amount}")
    await store.settle_hold(session, hold_id, HoldStatus.CAPTURED, spend, now)
    return await _redeem(session, account, spend, f"hold:{hold_id}", "points paid on a receipt", now)


async def release_hold(session: AsyncSession, hold_id: str) -> HoldResult:
    now = utcnow()
    _hold, account = await _locked_hold(session, hold_id, now)
    hold = await store.settle_hold(session, hold_id, HoldStatus.RELEASED, 0, now)
    return HoldResult(hold, await _balance_of(session, account, now))


async def redeem_points(
    session: AsyncSession, holder_id: str, currency: str, amount: int, source_ref: str, reason: str
) -> RedemptionResult:
    """Spends points at once, without a hold."""
    now = utcnow()
    account = await _locked_account(session, holder_id, currency)
    ensure_available(await _balance_of(session, account, now), amount)
    return await _redeem(session, account, amount, source_ref, reason, now)


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
