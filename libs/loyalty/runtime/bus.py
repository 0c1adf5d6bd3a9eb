"""The event bus: one stream per publishing service, consumer groups per consumer.

Two implementations behind one interface: ``InProcessBus`` for the embedded run
and ``RedisStreamsBus`` (XADD / XREADGROUP / XACK / XAUTOCLAIM) for a cluster.
Delivery is at-least-once in both: a handler that raises is retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 0.5


@dataclass(frozen=True)
class Event:
    """One domain event as it travels on the bus."""

    event_id: str
    event_type: str
    source: str
    key: str
    occurred_at: datetime
    payload: dict[str, Any]
    trace_context: dict[str, str]

    def to_fields(self) -> dict[str, str]:
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "source": self.source,
            "key": self.key,
            "occurred_at": self.occurred_at.isoformat(),
            "payload": json.dumps(self.payload, separators=(",", ":")),
            "trace_context": json.dumps(self.trace_context, separators=(",", ":")),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Event:
        return cls(
            event_id=fields["event_id"],
            event_type=fields["event_type"],
            source=fields["source"],
            key=fields["key"],
            occurred_at=datetime.fromisoformat(fields["occurred_at"]),
            payload=json.loads(fields["payload"]),
            trace_context=json.loads(fields["trace_context"]),
        )


Handler = Callable[[Event], Awaitable[None]]


class EventBus(Protocol):
    async def publish(self, stream: str, event: Event) -> None: ...

    async def consume(self, stream: str, group: str, consumer: str, handler: Handler) -> None:
        """Delivers every event of the stream to the group, forever; run it as a task."""
        ...

    async def close(self) -> None: ...


class InProcessBus:
    """An in-memory log per stream with an offset per consumer group."""

    def __init__(self) -> None:
        self._logs: dict[str, list[Event]] = defaultdict(list)
        self._appended = asyncio.Condition()

    async def publish(self, stream: str, event: Event) -> None:
        async with self._appended:
            self._logs[stream].append(event)
            self._appended.notify_all()

    async def consume(self, stream: str, group: str, consumer: str, handler: Handler) -> None:
        offset = 0
        while True:
            log_of_stream = self._logs[stream]
            async with self._appended:
                while len(log_of_stream) <= offset:
                    await self._appended.wait()
                batch = log_of_stream[offset:]
            for event in batch:
                await _deliver(handler, event, f"{stream}/{group}")
                offset += 1

    async def close(self) -> None:
        return None


class RedisStreamsBus:
    """Redis Streams with consumer groups; unacknowledged events are reclaimed from dead consumers."""

    def __init__(self, url: str, prefix: str, claim_idle_ms: int = 30_000) -> None:
        self._redis = aioredis.from_url(url, decode_responses=True)
        self._prefix = prefix
        self._claim_idle_ms = claim_idle_ms

    def _key(self, stream: str) -> str:
        return f"{self._prefix}:{stream}"

    async def publish(self, stream: str, event: Event) -> None:
        await self._redis.xadd(self._key(stream), event.to_fields())  # type: ignore[arg-type]

    async def _ensure_group(self, key: str, group: str) -> None:
        try:
            await self._redis.xgroup_create(key, group, id="0", mkstream=True)
        except aioredis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def consume(self, stream: str, group: str, consumer: str, handler: Handler) -> None:
        key = self._key(stream)
        await self._ensure_group(key, group)
        # First our own pending entries (a restart after a crash), then new ones.
        cursor = "0"
        while True:
            reclaimed = await self._redis.xautoclaim(
                key, group, consumer, min_idle_time=self._claim_idle_ms, start_id="0-0", count=100
            )
            entries = list(reclaimed[1])
            response = await self._redis.xreadgroup(group, consumer, {key: cursor}, count=100, block=1000)
            for _stream, stream_entries in response or []:
                entries.extend(stream_entries)
            if cursor == "0" and not any(entries for _s, entries in response or []):
                cursor = ">"
            for entry_id, fields in entries:
                if not fields:
                    continue
                await _deliver(handler, Event.from_fields(fields), f"{stream}/{group}")
                await self._redis.xack(key, group, entry_id)

    async def close(self) -> None:
        await self._redis.aclose()


async def _deliver(handler: Handler, event: Event, where: str) -> None:
    attempt = 0
    while True:
        try:
            await handler(event)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            attempt += 1
            log.exception("handler for %s failed on event %s (attempt %d)", where, event.event_id, attempt)
            await asyncio.sleep(min(RETRY_DELAY_SECONDS * attempt, 10.0))
