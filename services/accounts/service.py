"""The ledger's use cases, each given the session of its unit of work."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.outbox import add_event
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from services.accounts.domain import Accrual, Balance, balance_at


@dataclass(frozen=True)
class AccrualResult:
    entry: store.EntryRow
    balance: Balance


async def accrue_points(session: AsyncSession, accrual: Accrual) -> AccrualResult:
    """Credits a new lot and its entry, and emits points.accrued in the same transaction."""
    now = utcnow()
    account = await store.open_account(session, accrual.holder_id, accrual.currency, now)
    entry = await store.add_accrual(session, account, accrual, now)
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
    now = utcnow()
    account = await store.find_account(session, holder_id, currency)
    if account is None:
        return Balance(holder_id, currency, active=0, pending=0, held=0)
    lots = await store.open_lots(session, account.account_id, now)
    return balance_at(holder_id, currency, lots, held=0, now=now)


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
