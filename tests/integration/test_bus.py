"""The event bus contract, on the in-process bus and on the real Redis Streams.

Consumers run as tasks, exactly as services run them; every test cancels its
consumers before it ends. Crashes are real cancellations of a consumer whose
handler is still working, so its entry is never acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis.asyncio as aioredis

from loyalty.runtime import bus as bus_module
from loyalty.runtime.bus import Event, EventBus, Handler, InProcessBus, RedisStreamsBus
from tests import infra

STREAM = "members"
Bus = InProcessBus | RedisStreamsBus


def make_event(number: int, **changes: object) -> Event:
    fields: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "member.registered",
        "source": "members",
        "key": f"member-{number}",
        "occurred_at": datetime.now(UTC),
        "payload": {"number": number},
        "trace_context": {},
    }
    fields.update(changes)
    return Event(**fields)  # type: ignore[arg-type]


class Recorder:
    """A handler that keeps what it was given, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    def ids(self) -> list[str]:
        return [event.event_id for event in self.events]


async def stop(task: asyncio.Task[None]) -> None:
    """Cancels a consumer; an error it died of (anything but the cancellation) fails the test."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def consuming(
    bus: EventBus, group: str, consumer: str, handler: Handler, stream: str = STREAM
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(bus.consume(stream, group, consumer, handler))
    try:
        yield task
    finally:
        await stop(task)


async def wait_for(condition: Callable[[], bool], task: asyncio.Task[None], what: str) -> None:
    """Waits for `condition`, failing at once if the consumer task died meanwhile."""

    async def holds() -> bool:
        if task.done():
            task.result()
            raise AssertionError(f"the consumer stopped while waiting for {what}")
        return condition()

    await infra.wait_until(holds, what)


def blocking_handler(started: asyncio.Event) -> Handler:
    """A handler that never finishes: the consumer holding it can only be cancelled (crash)."""

    async def handle(_event: Event) -> None:
        started.set()
        await asyncio.Future()

    return handle


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Bus]:
    created: Bus = InProcessBus() if request.param == "memory" else RedisStreamsBus(infra.REDIS_URL, redis_prefix)
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(infra.REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_bus(prefix: str, claim_idle_ms: int = 30_000) -> AsyncIterator[RedisStreamsBus]:
    created = RedisStreamsBus(infra.REDIS_URL, prefix, claim_idle_ms=claim_idle_ms)
    try:
        yield created
    finally:
        await created.close()


async def pending_count(client: aioredis.Redis, key: str, group: str) -> int:
    summary = await client.xpending(key, group)
    return int(summary["pending"])


async def test_each_group_receives_every_event_once_in_publish_order(bus: Bus) -> None:
    events = [make_event(number) for number in range(6)]
    early, late = Recorder(), Recorder()
    async with consuming(bus, "notifications", "replica-1", early) as early_task:
        for event in events[:3]:
            await bus.publish(STREAM, event)
        # A group that subscribes after some events were published still gets all of them.
        async with consuming(bus, "accounts", "replica-1", late) as late_task:
            for event in events[3:]:
                await bus.publish(STREAM, event)
            last = events[-1].event_id
            await wait_for(lambda: last in early.ids(), early_task, "the first group to see the last event")
            await wait_for(lambda: last in late.ids(), late_task, "the second group to see the last event")
    expected = [event.event_id for event in events]
    assert early.ids() == expected
    assert late.ids() == expected


async def test_an_event_round_trips_every_field(bus: Bus) -> None:
    event = make_event(
        1,
        occurred_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=3))),
        payload={
            "points": 150,
            "ratio": 0.25,
            "name": "Анна ✓",
            "tags": ["gold", "early"],
            "nested": {"ok": True, "missing": None},
        },
        trace_context={
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=value",
        },
    )
    assert all(isinstance(value, str) for value in event.to_fields().values())
    assert Event.from_fields(event.to_fields()) == event

    received = Recorder()
    async with consuming(bus, "notifications", "replica-1", received) as task:
        await bus.publish(STREAM, event)
        await wait_for(lambda: bool(received.events), task, "the event")
    [got] = received.events
    assert got == event
    assert got.occurred_at.tzinfo is not None
    assert got.occurred_at.utcoffset() == timedelta(hours=3)
    assert got.payload["name"] == "Анна ✓"
    assert got.payload["nested"] == {"ok": True, "missing": None}


async def test_poison_event_goes_to_dead_letters_and_the_next_event_is_delivered(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, redis_prefix: str
) -> None:
    monkeypatch.setattr(bus_module, "MAX_DELIVERY_ATTEMPTS", 2)
    monkeypatch.setattr(bus_module, "RETRY_DELAY_SECONDS", 0.01)
    poison, healthy = make_event(1, event_type="member.poisoned"), make_event(2)
    attempts: Counter[str] = Counter()
    handled = Recorder()

    async def handler(event: Event) -> None:
        attempts[event.event_id] += 1
        if event.event_id == poison.event_id:
            raise RuntimeError("this handler can never process the event")
        await handled(event)

    await bus.publish(STREAM, poison)
    await bus.publish(STREAM, healthy)
    async with consuming(bus, "notifications", "replica-1", handler) as task:
        await wait_for(lambda: bool(handled.events), task, "the event after the poison one")
    assert handled.ids() == [healthy.event_id]
    assert attempts == {poison.event_id: 2, healthy.event_id: 1}

    if isinstance(bus, InProcessBus):
        assert bus.dead_letters[f"{STREAM}/notifications"] == [poison]
        return
    client = aioredis.from_url(infra.REDIS_URL, decode_responses=True)
    try:
        dead = await client.xrange(f"{redis_prefix}:{STREAM}:dead:notifications")
        assert [Event.from_fields(fields) for _entry_id, fields in dead] == [poison]
        # Dead-lettered means acknowledged: the poison entry no longer blocks the group.
        assert await pending_count(client, bus.key(STREAM), "notifications") == 0
    finally:
        await client.aclose()


async def test_redis_consumer_restarted_under_its_name_gets_its_unacknowledged_event_first(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    # The default claim_idle_ms (30 s) rules out XAUTOCLAIM: this is the re-read of the
    # consumer's own pending entries on start.
    async with redis_bus(redis_prefix) as bus:
        interrupted, later = make_event(1), make_event(2)
        handling = asyncio.Event()
        crashed = asyncio.create_task(bus.consume(STREAM, "accounts", "accounts-0", blocking_handler(handling)))
        try:
            await bus.publish(STREAM, interrupted)
            await wait_for(handling.is_set, crashed, "the handler to start")
        finally:
            await stop(crashed)
        assert await pending_count(redis_client, bus.key(STREAM), "accounts") == 1

        await bus.publish(STREAM, later)
        restarted = Recorder()
        async with consuming(bus, "accounts", "accounts-0", restarted) as task:
            await wait_for(lambda: len(restarted.events) >= 2, task, "the redelivery and the next event")
            await infra.wait_until(
                lambda: _no_pending(redis_client, bus.key(STREAM), "accounts"), "the redelivered entry to be acked"
            )
        assert restarted.ids() == [interrupted.event_id, later.event_id]


async def _no_pending(client: aioredis.Redis, key: str, group: str) -> bool:
    return await pending_count(client, key, group) == 0


async def test_redis_entry_abandoned_by_a_dead_consumer_is_claimed_by_another(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    async with redis_bus(redis_prefix, claim_idle_ms=200) as bus:
        abandoned, later = make_event(1), make_event(2)
        handling = asyncio.Event()
        dead = asyncio.create_task(bus.consume(STREAM, "accounts", "accounts-dead", blocking_handler(handling)))
        try:
            await bus.publish(STREAM, abandoned)
            await wait_for(handling.is_set, dead, "the doomed handler to start")
        finally:
            await stop(dead)

        survivor = Recorder()
        async with consuming(bus, "accounts", "accounts-alive", survivor) as task:
            await wait_for(lambda: bool(survivor.events), task, "the abandoned entry to be claimed")
            await bus.publish(STREAM, later)
            await wait_for(lambda: len(survivor.events) >= 2, task, "the event after the claimed one")
            await infra.wait_until(
                lambda: _no_pending(redis_client, bus.key(STREAM), "accounts"), "the claimed entry to be acked"
            )
        assert survivor.ids() == [abandoned.event_id, later.event_id]
        pending = await redis_client.xpending_range(bus.key(STREAM), "accounts", "-", "+", 10)
        assert pending == []
