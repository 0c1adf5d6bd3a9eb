"""The expiry job against real SQLite and PostgreSQL: written once, never lost, never twice."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.accounts import jobs, service, store
from services.accounts.domain import Accrual, AccrualSource
from services.accounts.metrics import LedgerMetrics
from tests import infra


async def credit(
    sessions: async_sessionmaker[AsyncSession], amount: int, expires_in: timedelta | None, holder: str = "m-1"
) -> None:
    """A lot activated 30 days ago that expires `expires_in` from now (in the past when negative)."""
    now = utcnow()
    accrual = Accrual(
        holder_id=holder,
        currency="BONUS",
        amount=amount,
        source=AccrualSource.RECEIPT,
        source_ref=f"test:{amount}:{expires_in}",
        reason="",
        activate_at=now - timedelta(days=30),
        expire_at=now + expires_in if expires_in is not None else None,
    )
    async with sessions() as session, session.begin():
        await service.accrue_points(session, accrual)


async def entries_total(sessions: async_sessionmaker[AsyncSession], holder: str = "m-1") -> int:
    async with sessions() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(store.EntryRow.amount), 0))
            .join(store.AccountRow, store.AccountRow.account_id == store.EntryRow.account_id)
            .where(store.AccountRow.holder_id == holder)
        )
    return int(total or 0)


async def events(sessions: async_sessionmaker[AsyncSession], event_type: str) -> list[dict[str, object]]:
    async with sessions() as session:
        rows = await session.execute(select(store.outbox.c.payload).where(store.outbox.c.event_type == event_type))
    return [row[0] for row in rows]


async def test_expired_lots_get_their_entry_once_and_the_balance_never_waited(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        metrics = LedgerMetrics.create(CollectorRegistry())
        await credit(sessions, 300, timedelta(days=-1))
        await credit(sessions, 200, timedelta(seconds=1.5))
        await credit(sessions, 500, timedelta(days=100))
        await credit(sessions, 50, None)
        async with sessions() as session, session.begin():
            await service.redeem_points(session, "m-1", "BONUS", 120, "receipt:T1:1", "")  # the soonest: the 200 lot
        await asyncio.sleep(1.6)
        async with sessions() as session:
            before = await service.get_balance(session, "m-1", "BONUS")
        assert before.active == 550, "expired points stopped counting at their expiry, before any job"

        assert await jobs.expire_lots(sessions, metrics) == 300 + 80
        assert await jobs.expire_lots(sessions, metrics) == 0, "a lot expires once"
        async with sessions() as session:
            after = await service.get_balance(session, "m-1", "BONUS")
        assert after == before
        assert await entries_total(sessions) == after.active + after.pending, "entries sum to the balance"
        assert sorted(e["amount"] for e in await events(sessions, "points.expired")) == [80, 300]  # type: ignore[type-var]
        assert metrics.points_expired.labels("BONUS")._value.get() == 380


async def test_concurrent_job_runs_never_expire_a_lot_twice(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        metrics = LedgerMetrics.create(CollectorRegistry())
        for index in range(30):
            await credit(sessions, 10 + index, timedelta(days=-1), holder=f"m-{index % 3}")
        runs = await asyncio.gather(*(jobs.expire_lots(sessions, metrics) for _ in range(4)))
        assert sum(runs) == sum(10 + index for index in range(30))
        async with sessions() as session:
            expiries = await session.scalar(
                select(func.count()).select_from(store.EntryRow).where(store.EntryRow.kind == "expiry")
            )
        assert expiries == 30
        for holder in ("m-0", "m-1", "m-2"):
            assert await entries_total(sessions, holder) == 0


async def test_points_about_to_expire_are_announced_once(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        await credit(sessions, 70, timedelta(days=3))
        await credit(sessions, 80, timedelta(days=30))
        await credit(sessions, 90, None)
        assert await jobs.announce_expiring(sessions, timedelta(days=7)) == 1
        assert await jobs.announce_expiring(sessions, timedelta(days=7)) == 0
        [announced] = await events(sessions, "points.expiring")
        assert (announced["amount"], announced["holder_id"]) == (70, "m-1")
