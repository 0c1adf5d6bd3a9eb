"""The transactional outbox and its relay against real SQLite and PostgreSQL.

What reaches the bus is read back through a consumer of the in-process bus,
the way a subscribing service would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from loyalty.runtime import db
from loyalty.runtime.bus import Event, InProcessBus
from loyalty.runtime.outbox import RELAY_BATCH, OutboxRelay, add_event
from loyalty.runtime.telemetry import PipelineMetrics
from services.members import store
from tests import infra

STREAM = "members"
SENTINEL_TYPE = "test.sentinel"


async def published(bus: InProcessBus, stream: str = STREAM) -> list[Event]:
    """Every event on the stream so far, in order, as a new consumer group receives them."""
    seen: list[Event] = []
    sentinel = Event(
        event_id=str(uuid.uuid4()),
        event_type=SENTINEL_TYPE,
        source="test",
        key="sentinel",
        occurred_at=datetime.now(UTC),
        payload={},
        trace_context={},
    )
    await bus.publish(stream, sentinel)

    async def record(event: Event) -> None:
        seen.append(event)

    task = asyncio.create_task(bus.consume(stream, f"tap-{uuid.uuid4().hex}", "tap", record))
    try:

        async def reached_sentinel() -> bool:
            return any(event.event_id == sentinel.event_id for event in seen)

        await infra.wait_until(reached_sentinel, "the stream to be read to its end")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return [event for event in seen if event.event_type != SENTINEL_TYPE]


@dataclass
class Outbox:
    sessions: async_sessionmaker[AsyncSession]
    bus: InProcessBus
    relay: OutboxRelay

    def new_relay(self, sessions: async_sessionmaker[AsyncSession] | None = None) -> OutboxRelay:
        return OutboxRelay(sessions or self.sessions, store.outbox, self.bus, STREAM, "members", poll_seconds=60)

    async def commit_event(self, key: str, payload: dict[str, Any] | None = None) -> str:
        async with self.sessions() as session, session.begin():
            return await add_event(session, store.outbox, "member.registered", key, payload or {"member_id": key})

    async def unpublished(self) -> int:
        async with self.sessions() as session:
            query = select(func.count()).select_from(store.outbox).where(store.outbox.c.published_at.is_(None))
            return int(await session.scalar(query) or 0)


@asynccontextmanager
async def members_outbox(url: str) -> AsyncIterator[Outbox]:
    async with infra.migrated_engine("members", url) as engine:
        sessions = db.create_session_factory(engine)
        bus = InProcessBus()
        relay = OutboxRelay(sessions, store.outbox, bus, STREAM, "members", poll_seconds=60)
        yield Outbox(sessions, bus, relay)


class UseCaseFailed(Exception):
    pass


async def test_an_event_of_a_rolled_back_transaction_is_never_published(database_url: str) -> None:
    async with members_outbox(database_url) as outbox:
        with pytest.raises(UseCaseFailed):
            async with outbox.sessions() as session, session.begin():
                await add_event(session, store.outbox, "member.registered", "m-ghost", {"member_id": "m-ghost"})
                raise UseCaseFailed("the change failed after its event was written")
        kept = await outbox.commit_event("m-real")

        assert await outbox.relay.publish_pending() == 1
        assert await outbox.relay.publish_pending() == 0
        assert [event.event_id for event in await published(outbox.bus)] == [kept]
        async with outbox.sessions() as session:
            keys = (await session.execute(select(store.outbox.c.key))).scalars().all()
        assert keys == ["m-real"]


async def test_a_committed_event_is_published_exactly_once_with_its_fields(database_url: str) -> None:
    async with members_outbox(database_url) as outbox:
        before = datetime.now(UTC)
        payload = {"member_id": "m-1", "phone": "+79161234567", "tier": "base", "name": "Анна"}
        event_id = await outbox.commit_event("m-1", payload)
        after = datetime.now(UTC)

        assert await outbox.relay.publish_pending() == 1
        assert await outbox.relay.publish_pending() == 0
        # A relay of another replica (or after a restart) finds nothing left either.
        assert await outbox.new_relay().publish_pending() == 0

        [event] = await published(outbox.bus)
        assert event.event_id == event_id
        assert event.event_type == "member.registered"
        assert event.source == "members"
        assert event.key == "m-1"
        assert event.payload == payload
        assert event.occurred_at.tzinfo is not None
        assert before <= event.occurred_at <= after
        assert await outbox.unpublished() == 0


async def test_events_are_published_in_commit_order_across_batches(database_url: str) -> None:
    async with members_outbox(database_url) as outbox:
        committed: list[str] = []
        async with outbox.sessions() as session, session.begin():
            for key in ("first-a", "first-b"):
                committed.append(await add_event(session, store.outbox, "member.registered", key, {"k": key}))
        for number in range(2 * RELAY_BATCH + 3):
            committed.append(await outbox.commit_event(f"m-{number}"))

        counts = [await outbox.relay.publish_pending() for _ in range(4)]

        assert counts == [RELAY_BATCH, RELAY_BATCH, 5, 0]
        assert [event.event_id for event in await published(outbox.bus)] == committed


class CommitWatchingBus(InProcessBus):
    """Notes, for every event published, whether the test had committed its transaction yet."""

    def __init__(self) -> None:
        super().__init__()
        self.committed = False
        self.published_before_commit: list[str] = []

    async def publish(self, stream: str, event: Event) -> None:
        if not self.committed:
            self.published_before_commit.append(event.event_id)
        await super().publish(stream, event)

    def mark_committed(self, _session: Session) -> None:
        self.committed = True


async def test_a_relay_running_beside_an_open_transaction_publishes_its_event_only_after_commit(
    database_url: str,
) -> None:
    # PostgreSQL skips the uncommitted row; SQLite's relay waits for the writer's lock.
    # Either way the event must reach the bus once, and only after its commit.
    async with members_outbox(database_url) as outbox:
        bus = CommitWatchingBus()
        relay = OutboxRelay(outbox.sessions, store.outbox, bus, STREAM, "members", poll_seconds=60)
        async with outbox.sessions() as session:
            sa_event.listen(session.sync_session, "after_commit", bus.mark_committed)
            async with session.begin():
                pending = await add_event(session, store.outbox, "member.registered", "m-1", {})
                await session.flush()
                beside = asyncio.create_task(relay.publish_pending())
                await asyncio.sleep(0.2)  # lets the relay run while the transaction is open
        assert bus.committed
        total = await beside + await relay.publish_pending() + await relay.publish_pending()

        assert bus.published_before_commit == []
        assert total == 1
        assert [event.event_id for event in await published(bus)] == [pending]


@pytest.mark.postgres
async def test_postgres_events_of_overlapping_transactions_publish_in_commit_order() -> None:
    async with infra.scratch_postgres_database() as url, members_outbox(url) as outbox:
        async with outbox.sessions() as slow:
            async with slow.begin():
                # Written first (the lower id), committed last.
                slow_event = await add_event(slow, store.outbox, "member.registered", "slow", {})
                await slow.flush()
                fast_event = await outbox.commit_event("fast")
                assert await outbox.relay.publish_pending() == 1
            assert await outbox.relay.publish_pending() == 1
        assert [event.event_id for event in await published(outbox.bus)] == [fast_event, slow_event]


async def test_the_current_span_context_travels_with_the_event(database_url: str) -> None:
    tracer = TracerProvider().get_tracer("tests.outbox")
    async with members_outbox(database_url) as outbox:
        with tracer.start_as_current_span("RegisterMember") as span:
            traced = await outbox.commit_event("m-traced")
        untraced = await outbox.commit_event("m-untraced")
        await outbox.relay.publish_pending()

        by_id = {event.event_id: event for event in await published(outbox.bus)}
        context = span.get_span_context()
        traceparent = by_id[traced].trace_context["traceparent"]
        assert format(context.trace_id, "032x") in traceparent
        assert format(context.span_id, "016x") in traceparent
        assert "traceparent" not in by_id[untraced].trace_context, "no span, no trace context"


class OverlappingBus(InProcessBus):
    """Holds the first publish until a second relay publishes too, so both relays'
    transactions (and their row locks) are certainly open at the same moment."""

    def __init__(self, relays: int) -> None:
        super().__init__()
        self._barrier = asyncio.Barrier(relays)
        self._still_to_meet = relays

    async def publish(self, stream: str, event: Event) -> None:
        if self._still_to_meet > 0:
            self._still_to_meet -= 1
            async with asyncio.timeout(10):
                await self._barrier.wait()
        await super().publish(stream, event)


@pytest.mark.postgres
async def test_postgres_concurrent_relays_publish_each_row_exactly_once() -> None:
    relays = 2
    async with infra.scratch_postgres_database() as url, members_outbox(url) as outbox:
        written = [await outbox.commit_event(f"m-{number}") for number in range(2 * RELAY_BATCH + 50)]
        bus = OverlappingBus(relays)
        engines = [db.create_engine(url) for _ in range(relays)]
        try:
            replicas = [
                OutboxRelay(db.create_session_factory(engine), store.outbox, bus, STREAM, "members", 60)
                for engine in engines
            ]

            async def drain(relay: OutboxRelay) -> int:
                total = 0
                while published_now := await relay.publish_pending():
                    total += published_now
                return total

            totals = await asyncio.gather(*(drain(relay) for relay in replicas))
        finally:
            for engine in engines:
                await engine.dispose()

        ids = [event.event_id for event in await published(bus)]
        duplicates = {event_id: n for event_id, n in Counter(ids).items() if n > 1}
        assert duplicates == {}
        assert sorted(ids) == sorted(written)
        assert sum(totals) == len(written)
        assert all(total > 0 for total in totals), "both relays took part"
        assert await outbox.unpublished() == 0


class UnreachableBus(InProcessBus):
    async def publish(self, stream: str, event: Event) -> None:
        raise ConnectionError("the bus is down")


async def test_the_backlog_gauges_show_what_waits_while_the_bus_fails_and_zero_once_caught_up(
    database_url: str,
) -> None:
    async with members_outbox(database_url) as outbox:
        registry = CollectorRegistry()
        metrics = PipelineMetrics.create(registry)

        def pending() -> float:
            return registry.get_sample_value("loyalty_outbox_pending_events") or 0.0

        await outbox.commit_event("m-1")
        await outbox.commit_event("m-2")
        failing = OutboxRelay(
            outbox.sessions, store.outbox, UnreachableBus(), STREAM, "members", poll_seconds=0.05, metrics=metrics
        )
        task = asyncio.create_task(failing.run())
        try:

            async def backlog_shown() -> bool:
                return pending() == 2

            await infra.wait_until(backlog_shown, "the gauge to count the unpublished events")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        relay = OutboxRelay(outbox.sessions, store.outbox, outbox.bus, STREAM, "members", 0.05, metrics)
        task = asyncio.create_task(relay.run())
        try:

            async def caught_up() -> bool:
                return pending() == 0 and await outbox.unpublished() == 0

            await infra.wait_until(caught_up, "the relay to publish the backlog")
            await outbox.commit_event("m-3")
            relay.notify()
            await infra.wait_until(caught_up, "the relay to publish the new event")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert [event.key for event in await published(outbox.bus)] == ["m-1", "m-2", "m-3"]
