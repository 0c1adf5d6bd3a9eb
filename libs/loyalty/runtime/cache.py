"""A short-lived, size-bounded cache per replica. Made for identifications: a customer is
identified again and again while one receipt is scanned, calculated and committed, and each
lookup would otherwise be a database round trip (members) or a gRPC call (the gateway)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

ValueT = TypeVar("ValueT")


class TtlCache(Generic[ValueT]):
    """Entries live `ttl_seconds` (0 disables the cache); the oldest are dropped beyond
    `max_entries`. Each entry carries a tag (the member it is about) so that one member's
    entries can be forgotten: a replica that forgets after its own changes shows them at
    once; other changes show within the TTL."""

    def __init__(
        self, ttl_seconds: float, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, str, ValueT]] = OrderedDict()
        self._keys_by_tag: dict[str, set[Hashable]] = {}

    def get(self, key: Hashable) -> ValueT | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, _tag, value = entry
        if expires_at <= self._clock():
            self._drop(key)
            return None
        return value

    def put(self, key: Hashable, tag: str, value: ValueT) -> None:
        if self._ttl <= 0:
            return
        self._drop(key)
        self._entries[key] = (self._clock() + self._ttl, tag, value)
        self._keys_by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))

    def forget(self, tag: str) -> None:
        for key in self._keys_by_tag.pop(tag, set()):
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._keys_by_tag.clear()

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            keys = self._keys_by_tag.get(entry[1])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys_by_tag[entry[1]]
