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

RETRY_DELAY_SECONDS = 0.2
MAX_RETRY_DELAY_SECONDS = 10.0
MAX_DELIVERY_ATTEMPTS = 8


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

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        on_dead_letter: Callable[[Event], None] | None = None,
    ) -> None:
        """Delivers every event of the stream to the group, forever; run it as a task. An
        event whose handler never succeeds is set aside and reported to ``on_dead_letter``."""
        ...

    async def close(self) -> None: ...


class InProcessBus:
    """An in-memory log per stream with an offset per consumer group: the consumers of
    one group share the events (each goes to one of them), every group gets them all."""

    def __init__(self) -> None:
        self._logs: dict[str, list[Event]] = defaultdict(list)
        self._offsets: dict[tuple[str, str], int] = defaultdict(int)
        self._appended = asyncio.Condition()
        self.dead_letters: dict[str, list[Event]] = defaultdict(list)

    async def publish(self, stream: str, event: Event) -> None:
        async with self._appended:
            self._logs[stream].append(event)
            self._appended.notify_all()

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        on_dead_letter: Callable[[Event], None] | None = None,
    ) -> None:
        log_of_stream, position = self._logs[stream], (stream, group)
        while True:
            async with self._appended:
                while len(log_of_stream) <= self._offsets[position]:
                    await self._appended.wait()
                event = log_of_stream[self._offsets[position]]
                self._offsets[position] += 1
            if not await deliver(handler, event, f"{stream}/{group}"):
                self.dead_letters[f"{stream}/{group}"].append(event)
                if on_dead_letter is not None:
                    on_dead_letter(event)

    async def close(self) -> None:
        return None


class RedisStreamsBus:
    """Redis Streams with consumer groups.

    A consumer first re-reads its own unacknowledged entries (a restart after a crash),
    then new ones; entries left pending by a consumer that died are claimed after
    ``claim_idle_ms``. An event its handler keeps failing is moved to
    ``<stream>:dead:<group>`` and acknowledged, so one poison event can't stall a group.
    """

    def __init__(self, url: str, prefix: str, max_length: int = 1_000_000, claim_idle_ms: int = 30_000) -> None:
        self._redis = aioredis.from_url(url, decode_responses=True)
        self._prefix = prefix
        self._max_length = max_length
        self._claim_idle_ms = claim_idle_ms

    def key(self, stream: str) -> str:
        return f"{self._prefix}:{stream}"

    async def publish(self, stream: str, event: Event) -> None:
        await self._redis.xadd(
            self.key(stream),
            event.to_fields(),  # type: ignore[arg-type]
            maxlen=self._max_length,
            approximate=True,
        )

    async def _ensure_group(self, key: str, group: str) -> None:
        try:
            await self._redis.xgroup_create(key, group, id="0", mkstream=True)
        except aioredis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _claim_abandoned(
        self, key: str, group: str, consumer: str, start_id: str
    ) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        """Entries idle in other consumers' hands; returns where the next scan starts."""
        claimed = await self._redis.xautoclaim(
            key, group, consumer, min_idle_time=self._claim_idle_ms, start_id=start_id, count=100
        )
        return claimed[0], list(claimed[1])

    async def _read(self, key: str, group: str, consumer: str, cursor: str) -> list[tuple[str, dict[str, str]]]:
        response = await self._redis.xreadgroup(group, consumer, {key: cursor}, count=100, block=1000)
        return [entry for _stream, entries in response or [] for entry in entries]

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        on_dead_letter: Callable[[Event], None] | None = None,
    ) -> None:
        key = self.key(stream)
        await self._ensure_group(key, group)
        cursor, claim_from = "0", "0-0"
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while True:
            entries = await self._read(key, group, consumer, cursor)
            if cursor == "0" and not entries:
                cursor = ">"
            if loop.time() >= next_claim:
                claim_from, claimed = await self._claim_abandoned(key, group, consumer, claim_from)
                entries += claimed
                if claim_from == "0-0":
                    next_claim = loop.time() + self._claim_idle_ms / 2000
            for entry_id, fields in entries:
                # An entry trimmed from the stream while pending comes back without fields.
                if fields:
                    event = Event.from_fields(fields)
                    if not await deliver(handler, event, f"{stream}/{group}"):
                        await self._redis.xadd(
                            f"{key}:dead:{group}",
                            fields,  # type: ignore[arg-type]
                            maxlen=self._max_length,
                            approximate=True,
                        )
                        if on_dead_letter is not None:
                            on_dead_letter(event)
                await self._redis.xack(key, group, entry_id)

    async def close(self) -> None:
        await self._redis.aclose()


async def deliver(handler: Handler, event: Event, where: str) -> bool:
    """Runs the handler until it succeeds, with growing pauses; False when it never did."""
    for attempt in range(1, MAX_DELIVERY_ATTEMPTS + 1):
        try:
            await handler(event)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler for %s failed on event %s (attempt %d)", where, event.event_id, attempt)
            if attempt < MAX_DELIVERY_ATTEMPTS:
                await asyncio.sleep(min(RETRY_DELAY_SECONDS * 2 ** (attempt - 1), MAX_RETRY_DELAY_SECONDS))
    log.error("event %s moved to the dead letters of %s", event.event_id, where)
    return False
