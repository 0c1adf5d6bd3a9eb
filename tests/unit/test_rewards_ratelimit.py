"""The in-memory rate limiter the embedded suite uses for wrong codes and PINs (and the gateway for API keys)."""

from __future__ import annotations

from loyalty.runtime.ratelimit import InMemoryRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_is_refused_after_its_limit_until_its_window_closes() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    for _ in range(3):
        assert await limiter.retry_after("pos-1", 3, 60) == 0.0
        assert await limiter.hit("pos-1", 3, 60) == 0.0
        clock.now += 10
    assert await limiter.retry_after("pos-1", 3, 60) == 30.0, "the window opened at the first event, 30 s left"
    assert await limiter.hit("pos-1", 3, 60) == 30.0, "a fourth event is over the limit"
    assert await limiter.retry_after("pos-2", 3, 60) == 0.0, "another key is not affected"

    clock.now = 1000.0 + 60 - 0.5
    assert await limiter.retry_after("pos-1", 3, 60) == 0.5
    clock.now = 1000.0 + 60
    assert await limiter.retry_after("pos-1", 3, 60) == 0.0, "a new window"
    assert await limiter.hit("pos-1", 3, 60) == 0.0


async def test_events_spread_wider_than_the_window_never_trip_the_limit() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock)
    for _ in range(20):
        assert await limiter.hit("pos-1", 2, 60) == 0.0
        clock.now += 30.001
        assert await limiter.hit("pos-1", 2, 60) == 0.0
        clock.now += 30.001


async def test_keys_whose_window_closed_are_forgotten() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock, max_keys=4)
    for index in range(4):
        await limiter.hit(f"pos-{index}", 3, 60)
    assert limiter.keys == 4
    clock.now += 61
    await limiter.hit("pos-new", 3, 60)
    assert limiter.keys == 1
