"""The members service's periodic work, safe with several replicas running: a card batch is
claimed with SKIP LOCKED (PostgreSQL) or under SQLite's single writer, and a tier is
re-evaluated under the member's row lock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.timeutil import utcnow
from services.members import service, store
from services.members.domain import DEFAULT_TIER, MemberFacts, birthday_candidates

log = logging.getLogger(__name__)

# Numbers written per transaction: large enough that 1,000,000 cards take a few hundred
# commits, small enough that a crash loses little and progress shows.
EMISSION_CHUNK = 20_000
TIER_REVIEW_BATCH = 500
# Members read per query when recomputing segments and RFM scores.
FACTS_PAGE = 10_000
# Birthday candidates read per query; each is announced in its own transaction.
BIRTHDAY_PAGE = 1_000


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


async def announce_birthdays(
    sessions: async_sessionmaker[AsyncSession], now: datetime | None = None, page: int = BIRTHDAY_PAGE
) -> int:
    """Announces member.birthday for every active member whose birthday is today in their time
    zone and was not announced this year; returns how many were announced. Each claim and
    its event share one short transaction, so concurrent runs and re-runs announce once."""
    now = now or utcnow()
    month_days = birthday_candidates(now)
    announced, after = 0, ""
    while True:
        async with sessions() as session:
            candidates = await store.birthday_candidates(session, month_days, after, page)
        for candidate in candidates:
            async with sessions() as session, session.begin():
                announced += await service.announce_birthday(session, candidate, now)
        if len(candidates) < page:
            return announced
        after = candidates[-1].member_id


async def run_periodically(
    name: str,
    work: Callable[[], Awaitable[int]],
    job_runs: Counter,
    changed: Callable[[], None],
    interval_seconds: float,
) -> None:
    """Runs `work` every `interval_seconds`; `changed` is called after a run that did
    something (it wakes the outbox relay). The first run comes one interval after the start,
    so a replica that restarts does not redo what was just done, and a job started by hand
    (an operator, a test) never races a start-up run."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            done = await work()
        except Exception:
            log.exception("%s failed; will retry", name)
            job_runs.labels(name, "failed").inc()
        else:
            job_runs.labels(name, "ok").inc()
            if done:
                changed()


async def recompute_profiles(sessions: async_sessionmaker[AsyncSession], page: int = FACTS_PAGE) -> int:
    """Recomputes every dynamic segment and the RFM scores from one read of the members'
    facts; returns how many memberships changed plus how many members were scored."""
    facts: list[MemberFacts] = []
    async with sessions() as session:
        while True:
            chunk = await store.member_facts(session, service.SALE, facts[-1].member_id if facts else "", page)
            facts += chunk
            if len(chunk) < page:
                break
        segments = await store.dynamic_segments(session)
    done = 0
    for code, expression in segments:
        # One transaction per segment, so no lock is held across the whole recomputation.
        async with sessions() as session, session.begin():
            done += await service.recompute_segment(session, code, expression, facts)
    async with sessions() as session, session.begin():
        done += await service.recompute_rfm(session, facts)
    return done
