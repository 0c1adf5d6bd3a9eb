"""The ledger's periodic work. Every job is safe with several replicas running: rows are
claimed with SKIP LOCKED (PostgreSQL) or under SQLite's single writer, and each lot is
expired or announced once, ever."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.outbox import OutboxRelay, add_event
from loyalty.runtime.timeutil import utcnow
from services.accounts import service, store
from services.accounts.domain import CurrencyRegistry
from services.accounts.metrics import LedgerMetrics

log = logging.getLogger(__name__)


async def observe_outstanding_points(
    sessions: async_sessionmaker[AsyncSession], metrics: LedgerMetrics, job_runs: Counter, interval_seconds: float
) -> None:
    """Publishes the outstanding points (the program's liability) per currency. Read-only,
    so every replica may run it."""
    while True:
        try:
            async with sessions() as session:
                outstanding = await store.outstanding_by_currency(session, utcnow())
            for currency, total in outstanding.items():
                metrics.points_outstanding.labels(currency).set(total)
        except Exception:
            log.exception("counting outstanding points failed; will retry")
            job_runs.labels("outstanding_points", "failed").inc()
        else:
            job_runs.labels("outstanding_points", "ok").inc()
        await asyncio.sleep(interval_seconds)


EXPIRY_BATCH = 500


async def _announce(session: AsyncSession, event_type: str, lot: store.DueLot) -> None:
    await add_event(
        session,
        store.outbox,
        event_type,
        key=lot.holder_id,
        payload={
            "holder_id": lot.holder_id,
            "currency": lot.currency,
            "amount": lot.remaining,
            "lot_id": lot.lot_id,
            "expire_at": lot.expire_at.isoformat(),
        },
    )


async def expire_lots(sessions: async_sessionmaker[AsyncSession], metrics: LedgerMetrics) -> int:
    """Writes the expiry of every lot past its date, a batch per transaction; returns how many
    points expired. Balances never wait for this: an expired lot stops counting at its
    expiry instant; the job records the entry that says so and emits points.expired."""
    expired = 0
    while True:
        now = utcnow()
        async with sessions() as session, session.begin():
            due = await store.lots_to_expire(session, now, EXPIRY_BATCH)
            for lot in due:
                await store.write_expiry(session, lot, now)
                if lot.remaining:
                    await _announce(session, "points.expired", lot)
        for lot in due:
            metrics.points_expired.labels(lot.currency).inc(lot.remaining)
            expired += lot.remaining
        if len(due) < EXPIRY_BATCH:
            return expired


async def announce_expiring(sessions: async_sessionmaker[AsyncSession], ahead: timedelta) -> int:
    """Emits points.expiring once per lot that expires within `ahead`; returns how many."""
    announced = 0
    while True:
        now = utcnow()
        async with sessions() as session, session.begin():
            due = await store.lots_to_warn(session, now, now + ahead, EXPIRY_BATCH)
            for lot in due:
                await _announce(session, "points.expiring", lot)
            await store.mark_warned(session, [lot.lot_id for lot in due], now)
        announced += len(due)
        if len(due) < EXPIRY_BATCH:
            return announced


async def run_expiry(
    sessions: async_sessionmaker[AsyncSession],
    metrics: LedgerMetrics,
    job_runs: Counter,
    relay: OutboxRelay,
    ahead: timedelta,
    interval_seconds: float,
) -> None:
    while True:
        try:
            written = await expire_lots(sessions, metrics) + await announce_expiring(sessions, ahead)
        except Exception:
            log.exception("expiring lots failed; will retry")
            job_runs.labels("expire_lots", "failed").inc()
        else:
            job_runs.labels("expire_lots", "ok").inc()
            if written:
                relay.notify()
        await asyncio.sleep(interval_seconds)


# Items per transaction: large enough that the few statements of a chunk pay off (on
# PostgreSQL each is one array-valued statement whatever the size), small enough that a crash
# redoes little, progress shows and a cancel waits at most one chunk. SQLite writes through
# executemany, where a bigger chunk gains little.
MASS_CHUNK = {"postgresql": 5000}
MASS_CHUNK_DEFAULT = 1000
# Chunks a replica applies at once, each in its own transaction: on PostgreSQL one chunk's
# statements run on the server while the next chunk is planned here, and the server uses a
# core per connection. SQLite has a single writer.
MASS_WORKERS = {"postgresql": 2}
# SQLite's single writer lock is not handed out in turn: a waiting writer polls with growing
# sleeps (up to 100 ms) and would lose to the job's next chunk every time. A pause after each
# chunk lets API writes and CancelMassOperation in.
MASS_PAUSE_SECONDS = {"sqlite": 0.1}


async def apply_mass_operations(
    sessions: async_sessionmaker[AsyncSession],
    chunk: int | None = None,
    currencies: CurrencyRegistry | None = None,
    workers: int | None = None,
) -> int:
    """Applies every pending item of every running mass operation, a chunk per transaction;
    returns how many items were handled. Safe to run on every replica at once: the workers
    of one replica claim chunks just as several replicas do."""
    dialect = sessions.kw["bind"].dialect.name
    size = chunk or MASS_CHUNK.get(dialect, MASS_CHUNK_DEFAULT)
    count = workers or MASS_WORKERS.get(dialect, 1)
    pause = MASS_PAUSE_SECONDS.get(dialect, 0.0)
    tasks = [asyncio.create_task(_apply_chunks(sessions, size, currencies, pause)) for _ in range(count)]
    try:
        return sum(await asyncio.gather(*tasks))
    finally:
        # One worker failed (or this job was cancelled): the others stop at once, their
        # chunks in flight rolled back, rather than run on unobserved.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _apply_chunks(
    sessions: async_sessionmaker[AsyncSession], size: int, currencies: CurrencyRegistry | None, pause: float
) -> int:
    handled = 0
    after: dict[str, int] = {}
    while True:
        async with sessions() as session, session.begin():
            done = await service.apply_mass_chunk(session, size, currencies, after)
        if not done:
            if after:
                # A last pass from the start: items a dead replica held below this one's
                # resume point are pending again.
                after.clear()
                continue
            return handled
        handled += done
        if pause:
            await asyncio.sleep(pause)


async def run_mass_operations(
    sessions: async_sessionmaker[AsyncSession],
    job_runs: Counter,
    relay: OutboxRelay,
    interval_seconds: float,
    currencies: CurrencyRegistry,
) -> None:
    while True:
        try:
            handled = await apply_mass_operations(sessions, currencies=currencies)
        except Exception:
            log.exception("applying mass operations failed; will retry")
            job_runs.labels("mass_operations", "failed").inc()
        else:
            job_runs.labels("mass_operations", "ok").inc()
            if handled:
                relay.notify()
        await asyncio.sleep(interval_seconds)
