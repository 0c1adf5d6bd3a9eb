"""The members service's periodic work, safe with several replicas running: a card batch is
claimed with SKIP LOCKED (PostgreSQL) or under SQLite's single writer, and a tier is
re-evaluated under the member's row lock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.timeutil import utcnow
from services.members import service, store
from services.members.domain import DEFAULT_TIER

log = logging.getLogger(__name__)

# Numbers written per transaction: large enough that 1,000,000 cards take a few hundred
# commits, small enough that a crash loses little and progress shows.
EMISSION_CHUNK = 20_000
TIER_REVIEW_BATCH = 500


async def emit_card_batches(sessions: async_sessionmaker[AsyncSession], chunk: int = EMISSION_CHUNK) -> int:
    """Writes every ordered batch to the end; returns how many numbers were handled."""
    handled = 0
    while True:
        async with sessions() as session, session.begin():
            progress = await service.emit_next_chunk(session, chunk)
        if progress is None:
            return handled
        batch, size = progress
        handled += size
        if batch.status == service.BATCH_DONE:
            log.info("card batch %s done: %d emitted, %d skipped", batch.batch_id, batch.emitted, batch.skipped)


async def review_tiers(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Re-evaluates every member above the basic tier (lapsed durations, inactivity, spend
    leaving the window); returns how many tiers changed."""
    changed, after = 0, ""
    while True:
        async with sessions() as session:
            member_ids = await store.members_above_tier(session, DEFAULT_TIER, after, TIER_REVIEW_BATCH)
        for member_id in member_ids:
            async with sessions() as session, session.begin():
                before = await store.find_member(session, member_id)
                after_review = await service.evaluate_member_tier(session, member_id, utcnow())
            if before is not None and before.tier != after_review.tier:
                changed += 1
        if len(member_ids) < TIER_REVIEW_BATCH:
            return changed
        after = member_ids[-1]


async def run_periodically(
    name: str,
    work: Callable[[], Awaitable[int]],
    job_runs: Counter,
    changed: Callable[[], None],
    interval_seconds: float,
) -> None:
    """Runs `work` every `interval_seconds`; `changed` is called after a run that did
    something (it wakes the outbox relay)."""
    while True:
        try:
            done = await work()
        except Exception:
            log.exception("%s failed; will retry", name)
            job_runs.labels(name, "failed").inc()
        else:
            job_runs.labels(name, "ok").inc()
            if done:
                changed()
        await asyncio.sleep(interval_seconds)
