"""The ledger's periodic work."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.timeutil import utcnow
from services.accounts import store
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
