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


# Items per transaction: large enough that the multi-row writes pay off, small enough that a
# crash redoes little and progress shows.
MASS_CHUNK = 1000


async def apply_mass_operations(sessions: async_sessionmaker[AsyncSession], chunk: int = MASS_CHUNK) -> int:
    """Applies every pending item of every running mass operation, a chunk per transaction;
    returns how many items were handled. Safe to run on every replica at once."""
    handled = 0
    while True:
        async with sessions() as session, session.begin():
            done = await service.apply_mass_chunk(session, chunk)
        if not done:
            return handled
        handled += done


async def run_mass_operations(
    sessions: async_sessionmaker[AsyncSession], job_runs: Counter, relay: OutboxRelay, interval_seconds: float
) -> None:
    while True:
        try:
            handled = await apply_mass_operations(sessions)
        except Exception:
            log.exception("applying mass operations failed; will retry")
            job_runs.labels("mass_operations", "failed").inc()
        else:
            job_runs.labels("mass_operations", "ok").inc()
            if handled:
                relay.notify()
        await asyncio.sleep(interval_seconds)
