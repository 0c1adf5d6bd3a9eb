"""Rate limits: at most ``limit`` events per key in a window, answered with how long to wait.

A window opens at a key's first event and lasts ``window_seconds``; every event in it
counts, and once ``limit`` are counted the key is refused until the window closes (a
fixed window per key, so keys do not all reset at the same instant). Embedded, counts
live in this process; in a cluster they live in Redis so every replica sees the same
counts (``create_rate_limiter`` picks by ``settings.event_bus``). Callers choose keys
that say what is limited, e.g. ``wrong-code:<terminal>`` or ``api-key:<key id>``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from loyalty.runtime.settings import Settings

log = logging.getLogger(__name__)


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_seconds: float) -> float:
        """Counts one event under ``key``; answers 0.0 when it is within the limit, otherwise
        the seconds until the key's window closes (the event is refused)."""
        ...

    async def retry_after(self, key: str, limit: int, window_seconds: float) -> float:
        """Without counting: 0.0 when one more event would be within the limit, otherwise
        the seconds until the key's window closes."""
        ...

    async def close(self) -> None: ...


class InMemoryRateLimiter:
    """Counts in this process: right for the embedded run, where one process serves everything."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 65_536) -> None:
        """``max_keys``: past this many keys on record, those whose window closed are forgotten."""
        self._clock = clock
        self._max_keys = max_keys
        self._windows: dict[str, tuple[int, float]] = {}
        """key -> (events counted, when its window closes)."""

    def _current(self, key: str, now: float) -> tuple[int, float] | None:
        window = self._windows.get(key)
        if window is not None and window[1] <= now:
            del self._windows[key]
            return None
        return window

    async def hit(self, key: str, limit: int, window_seconds: float) -> float:
        now = self._clock()
        count, closes = self._current(key, now) or (0, now + window_seconds)
        self._windows[key] = (count + 1, closes)
        if len(self._windows) > self._max_keys:
            for stale in [k for k, (_, end) in self._windows.items() if end <= now]:
                del self._windows[stale]
        return 0.0 if count + 1 <= limit else closes - now

    async def retry_after(self, key: str, limit: int, window_seconds: float) -> float:
        now = self._clock()
        window = self._current(key, now)
        return 0.0 if window is None or window[0] < limit else window[1] - now

    async def close(self) -> None:
        return None

    @property
    def keys(self) -> int:
        """How many keys are on record (memory stays bounded by the active ones)."""
        return len(self._windows)


# INCR and the window's expiry in one step, so a crash cannot leave a counter that never expires.
_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {count, redis.call('PTTL', KEYS[1])}
"""


class RedisRateLimiter:
    """Counts in Redis, shared by every replica: one key per limited thing, expiring with its window.

    When Redis cannot be reached it lets events through (and logs it): a limit protects
    against abuse and must not stop checkout when its store is down.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self._redis = aioredis.from_url(url)
        self._prefix = prefix
        self._hit = self._redis.register_script(_HIT)

    def _key(self, key: str) -> str:
        return f"{self._prefix}:ratelimit:{key}"

    async def hit(self, key: str, limit: int, window_seconds: float) -> float:
        window_ms = max(1, math.ceil(window_seconds * 1000))
        try:
            count, ttl_ms = await self._hit(keys=[self._key(key)], args=[window_ms])
        except RedisError:
            log.warning("rate limiter cannot reach Redis; letting the event through", exc_info=True)
            return 0.0
        return 0.0 if int(count) <= limit else max(int(ttl_ms), 0) / 1000

    async def retry_after(self, key: str, limit: int, window_seconds: float) -> float:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._key(key))
                pipe.pttl(self._key(key))
                count, ttl_ms = await pipe.execute()
        except RedisError:
            log.warning("rate limiter cannot reach Redis; letting the event through", exc_info=True)
            return 0.0
        return 0.0 if count is None or int(count) < limit else max(int(ttl_ms), 0) / 1000

    async def close(self) -> None:
        await self._redis.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    """Redis when the suite runs on Redis (a cluster), otherwise in memory (embedded)."""
    if settings.event_bus == "redis":
        return RedisRateLimiter(settings.redis_url.get_secret_value(), settings.stream_prefix)
    return InMemoryRateLimiter()
