"""Terminal API keys: creation, revocation, and who a call comes from.

A key's secret is ``lk_<key id>_<random>``; only its HMAC-SHA-256 under the deployment's
pepper (plain SHA-256 without one) is stored. The secrets are 256-bit random strings, so
a fast hash is enough: there is nothing to brute-force that a slow password hash would
protect, and the pepper keeps a leaked table from being checked offline.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.gateway.v1 import api_key_service_pb2 as keys_pb
from loyalty.runtime.errors import NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Violations
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.ratelimit import RateLimiter
from loyalty.runtime.settings import Settings
from loyalty.runtime.timeutil import to_timestamp, utcnow
from loyalty.runtime.validation import MAX_ID_LENGTH
from services.gateway import store

KEY_PREFIX = "lk_"
API_KEY_HEADER = "x-api-key"


@dataclass(frozen=True)
class Terminal:
    """Who a POS call comes from: a key of one partner, limited to some of its stores."""

    key_id: str
    partner_id: str
    store_ids: frozenset[str]

    def check_store(self, store_id: str) -> None:
        if self.store_ids and store_id not in self.store_ids:
            raise PermissionDenied("STORE_NOT_IN_KEY_SCOPE", f"this API key may not act for store {store_id!r}")


def pepper_of(settings: Settings) -> bytes:
    return settings.api_key_pepper.get_secret_value().encode() if settings.api_key_pepper else b""


def _hash(secret: str, pepper: bytes) -> str:
    if pepper:
        return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(secret.encode()).hexdigest()


def _key_id(secret: str) -> str:
    """The key id a secret claims; the hash decides whether it is right."""
    if not secret.startswith(KEY_PREFIX):
        return ""
    return secret[len(KEY_PREFIX) :].split("_", 1)[0]


def to_proto(row: store.ApiKeyRow) -> keys_pb.ApiKey:
    key = keys_pb.ApiKey(
        key_id=row.key_id,
        partner_id=row.partner_id,
        store_ids=row.store_ids,
        description=row.description,
        create_time=to_timestamp(row.created_at),
    )
    if row.revoked_at is not None:
        key.revoke_time.FromDatetime(row.revoked_at)
    return key


async def create_api_key(
    session: AsyncSession, partner_id: str, store_ids: Sequence[str], description: str, pepper: bytes
) -> keys_pb.CreateApiKeyResponse:
    """Stores a new key and returns it with its secret, the only time the secret is seen."""
    ApiKeys.check_creation(partner_id, store_ids, description)
    key_id = secrets.token_hex(8)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    row = store.ApiKeyRow(
        key_id=key_id,
        partner_id=partner_id,
        store_ids=sorted(set(store_ids)),
        description=description,
        secret_hash=_hash(secret, pepper),
        created_at=utcnow(),
        revoked_at=None,
    )
    await store.add_api_key(session, row)
    return keys_pb.CreateApiKeyResponse(api_key=to_proto(row), secret=secret)


async def revoke_api_key(session: AsyncSession, key_id: str) -> keys_pb.ApiKey:
    """Revokes a key (again: a no-op); other replicas stop accepting it within their cache time."""
    row = await store.find_api_key(session, key_id)
    if row is None:
        raise NotFound("API_KEY_NOT_FOUND", f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return to_proto(row)


async def is_valid_api_key(session: AsyncSession, secret: str, pepper: bytes) -> bool:
    """Whether the secret is a live key of this database (for tools that keep one on disk)."""
    row = await store.find_api_key(session, _key_id(secret)) if _key_id(secret) else None
    return row is not None and row.revoked_at is None and hmac.compare_digest(row.secret_hash, _hash(secret, pepper))


@dataclass
class _Cached:
    key_id: str
    terminal: Terminal | None
    until: float


class ApiKeys:
    """Creates and revokes keys, and turns a call's key into a Terminal."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        limiter: RateLimiter,
        rate_limit: int,
        rate_window_seconds: float,
        cache_seconds: float,
        pepper: bytes = b"",
    ) -> None:
        self._sessions = sessions
        self._limiter = limiter
        self._rate_limit = rate_limit
        self._rate_window = rate_window_seconds
        self._cache_seconds = cache_seconds
        self._pepper = pepper
        self._cache: dict[str, _Cached] = {}

    @staticmethod
    def check_creation(partner_id: str, store_ids: Sequence[str], description: str) -> None:
        violations = Violations()
        violations.check(bool(partner_id), "partner_id", "required")
        violations.check_length(partner_id, "partner_id", MAX_ID_LENGTH)
        for index, store_id in enumerate(store_ids):
            violations.check(bool(store_id), f"store_ids[{index}]", "must not be empty")
            violations.check_length(store_id, f"store_ids[{index}]", MAX_ID_LENGTH)
        violations.check_length(description, "description", 200)
        violations.raise_if_any()

    async def create(
        self, session: AsyncSession, partner_id: str, store_ids: Sequence[str], description: str
    ) -> keys_pb.CreateApiKeyResponse:
        return await create_api_key(session, partner_id, store_ids, description, self._pepper)

    async def revoke(self, key_id: str) -> keys_pb.ApiKey:
        async with self._sessions() as session, session.begin():
            revoked = await revoke_api_key(session, key_id)
        self._cache = {digest: cached for digest, cached in self._cache.items() if cached.key_id != key_id}
        return revoked

    async def list(self, request: keys_pb.ListApiKeysRequest) -> keys_pb.ListApiKeysResponse:
        violations = Violations()
        size = page_size(request.page_size, violations)
        scope = f"api-keys:{request.partner_id}"
        after = Cursor.decode(request.page_token, scope, violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            rows = await store.list_api_keys(session, request.partner_id, after, size + 1)
        response = keys_pb.ListApiKeysResponse(api_keys=[to_proto(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = Cursor(scope, last.created_at, last.key_id).encode()
        return response

    async def authenticate(self, secret: str) -> Terminal:
        """The terminal a secret belongs to; refuses a missing, unknown or revoked key and a
        key past its rate limit."""
        if not secret:
            raise Unauthenticated("API_KEY_MISSING", f"send the terminal's API key in the {API_KEY_HEADER} header")
        terminal = await self._lookup(secret)
        if terminal is None:
            raise Unauthenticated("API_KEY_INVALID", "the API key is unknown or revoked")
        wait = await self._limiter.hit(f"api-key:{terminal.key_id}", self._rate_limit, self._rate_window)
        if wait:
            raise ResourceExhausted("RATE_LIMITED", "too many calls for this API key; retry later", wait)
        return terminal

    async def _lookup(self, secret: str) -> Terminal | None:
        now = time.monotonic()
        digest = _hash(secret, self._pepper)
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now:
            return cached.terminal
        key_id = _key_id(secret)
        row = None
        if key_id:
            async with self._sessions() as session:
                row = await store.find_api_key(session, key_id)
        valid = row is not None and row.revoked_at is None and hmac.compare_digest(row.secret_hash, digest)
        terminal = Terminal(row.key_id, row.partner_id, frozenset(row.store_ids)) if valid and row is not None else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = _Cached(key_id, terminal, now + self._cache_seconds)
        return terminal
