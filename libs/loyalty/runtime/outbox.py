"""The transactional outbox: events are written with the change that caused them.

A use case calls ``add_event`` inside its transaction; ``OutboxRelay`` then
publishes committed rows to the bus and marks them. Publication is
at-least-once, which is why every consumer is idempotent by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from opentelemetry import propagate
from sqlalchemy import JSON, BigInteger, Column, Integer, MetaData, String, Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, EventBus
from loyalty.runtime.telemetry import PipelineMetrics
from loyalty.runtime.timeutil import UtcDateTime

log = logging.getLogger(__name__)

RELAY_BATCH = 100
# How often the relay counts its table for the backlog gauges. In between, a round that
# published less than a full batch left nothing it could see waiting, so the gauges read 0
# without a query: counting after every wake-up (every commit that wrote events) was a
# second session and an aggregate per commit in every service.
BACKLOG_COUNT_SECONDS = 10.0
EVENTS_WRITTEN = "outbox_events_written"


def define_outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("event_type", String(100), nullable=False),
        Column("key", String(100), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("trace_context", JSON, nullable=False),
        Column("occurred_at", UtcDateTime(), nullable=False),
        Column("published_at", UtcDateTime(), nullable=True, index=True),
    )


async def add_event(session: AsyncSession, outbox: Table, event_type: str, key: str, payload: dict[str, Any]) -> str:
    """Writes an event in the caller's transaction and returns its id."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    event_id = str(uuid.uuid4())
    await session.execute(
        outbox.insert().values(
            event_id=event_id,
            event_type=event_type,
            key=key,
            payload=payload,
            trace_context=carrier,
            occurred_at=datetime.now(UTC),
        )
    )
    session.info[EVENTS_WRITTEN] = True
    return event_id


class OutboxRelay:
    """Publishes committed outbox rows to one stream, oldest first."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        outbox: Table,
        bus: EventBus,
        stream: str,
        source: str,
        poll_seconds: float,
        metrics: PipelineMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._outbox = outbox
        self._bus = bus
        self._stream = stream
        self._source = source
        self._poll_seconds = poll_seconds
        self._metrics = metrics
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Wakes the relay at once after a commit that wrote events."""
        self._wake.set()

    async def publish_pending(self) -> int:
        table = self._outbox
        async with self._sessions() as session, session.begin():
            query = select(table).where(table.c.published_at.is_(None)).order_by(table.c.id).limit(RELAY_BATCH)
            if session.bind.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).mappings().all()
            for row in rows:
                await self._bus.publish(
                    self._stream,
                    Event(
                        event_id=row["event_id"],
                        event_type=row["event_type"],
                        source=self._source,
                        key=row["key"],
                        occurred_at=row["occurred_at"],
                        payload=row["payload"],
                        trace_context=row["trace_context"],
                    ),
                )
            if rows:
                await session.execute(
                    update(table)
                    .where(table.c.id.in_([row["id"] for row in rows]))
                    .values(published_at=datetime.now(UTC))
                )
        if rows and self._metrics is not None:
            self._metrics.events_published.labels(self._stream).inc(len(rows))
        return len(rows)

    async def observe_backlog(self) -> None:
        """Updates the pending-events gauges from the table."""
        if self._metrics is None:
            return
        table = self._outbox
        async with self._sessions() as session:
            pending, oldest = (
                await session.execute(
                    select(func.count(), func.min(table.c.occurred_at)).where(table.c.published_at.is_(None))
                )
            ).one()
        self._metrics.outbox_pending.set(pending)
        self._metrics.outbox_oldest_age.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0)

    def _observe_caught_up(self) -> None:
        if self._metrics is not None:
            self._metrics.outbox_pending.set(0)
            self._metrics.outbox_oldest_age.set(0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_count = loop.time()
        while True:
            try:
                while await self.publish_pending() == RELAY_BATCH:
                    pass
                if loop.time() >= next_count:
                    await self.observe_backlog()
                    next_count = loop.time() + BACKLOG_COUNT_SECONDS
                else:
                    self._observe_caught_up()
            except Exception:
                log.exception("outbox relay for %s failed; retrying", self._stream)
                # The gauges must show a backlog that grows while the bus is unreachable.
                with contextlib.suppress(Exception):
                    await self.observe_backlog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_seconds)
            self._wake.clear()
