"""The real parts tests run against: PostgreSQL, Redis, and suites of services on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as aioredis
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.client.pos import pos_channel
from loyalty.gateway.v1 import api_key_service_pb2 as keys_pb
from loyalty.gateway.v1 import api_key_service_pb2_grpc as keys_grpc
from loyalty.runtime import db
from loyalty.runtime.server import ServiceHost, create_bus
from loyalty.runtime.settings import ServiceConfig, Settings
from services import suite

POSTGRES_ADMIN_DSN = os.environ.get("LOYALTY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LOYALTY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ADMIN_TOKEN = "test-admin-token"
PARTNER = "partner-1"


# Test servers take ports below the kernel's ephemeral range (32768-60999 here), so an
# outgoing connection can never be handed a port a test is about to listen on; a port is
# issued once per test session.
_TEST_PORTS = range(20_000, 32_000)
_issued_ports: set[int] = set()


def free_port() -> int:
    for _attempt in range(1000):
        port = random.choice(_TEST_PORTS)
        if port in _issued_ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port
    raise RuntimeError("no free port for a test server")


def asyncpg_dsn(database: str) -> str:
    return POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{database}"


def sqlalchemy_postgres_url(database: str) -> str:
    return asyncpg_dsn(database).replace("postgresql://", "postgresql+asyncpg://", 1)


@asynccontextmanager
async def scratch_postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test; dropped afterwards. Yields its SQLAlchemy URL."""
    name = f"loyalty_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield sqlalchemy_postgres_url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of the given kind ("sqlite" or "postgresql"); yields its URL."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        async with scratch_postgres_database() as url:
            yield url


@asynccontextmanager
async def migrated_engine(service: str, url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(url)
    try:
        await db.migrate(engine, suite.definition(service).migrations_dir)
        yield engine
    finally:
        await engine.dispose()


async def flush_redis_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def suite_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a whole suite on free loopback ports, metrics ports included."""
    groups = {name: ServiceConfig(port=free_port(), metrics_port=free_port()) for name in suite.START_ORDER}
    fast = {
        "log_format": "text",
        "outbox_poll_seconds": 0.1,
        "gauge_refresh_seconds": 0.2,
        "admin_token": SecretStr(ADMIN_TOKEN),
        # A busy 2-core CI box can take more than the 300 ms default over a whole
        # calculation; tests of the budget itself set their own.
        "calculate_budget_seconds": 5.0,
    }
    return Settings.model_validate({"data_dir": data_dir, **fast, **groups, **overrides})


@asynccontextmanager
async def running_suite(
    settings: Settings, names: tuple[str, ...] = suite.START_ORDER
) -> AsyncIterator[dict[str, ServiceHost]]:
    """Starts the named services in one process (the embedded shape) and stops them after."""
    bus = create_bus(settings)
    hosts: dict[str, ServiceHost] = {}
    try:
        for name in suite.START_ORDER:
            if name in names:
                host = ServiceHost(suite.definition(name), settings, bus)
                await host.start()
                hosts[name] = host
        yield hosts
    finally:
        for host in reversed(list(hosts.values())):
            await host.stop()
        await bus.close()


async def create_api_key(settings: Settings, partner_id: str = PARTNER, store_ids: tuple[str, ...] = ()) -> str:
    """A terminal API key made through the gateway's admin API; returns its secret."""
    async with grpc.aio.insecure_channel(settings.address("gateway")) as channel:
        created = await keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(request_id=str(uuid.uuid4()), partner_id=partner_id, store_ids=store_ids),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        )
    return created.secret


@asynccontextmanager
async def gateway_channel(
    settings: Settings, partner_id: str = PARTNER, store_ids: tuple[str, ...] = ()
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the gateway as a terminal of ``partner_id`` with a fresh API key."""
    secret = await create_api_key(settings, partner_id, store_ids)
    async with pos_channel(settings.address("gateway"), secret) as channel:
        yield channel


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str, seconds: float = 10.0) -> None:
    """Polls an asynchronous condition until it holds; fails the test naming `what` after `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                if await predicate():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s waiting for {what}") from None
