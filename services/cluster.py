"""The cluster shape on one machine: each service its own process, its own PostgreSQL
database, events on Redis Streams. What a Kubernetes deployment runs, minus Kubernetes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import suite


def database_name(prefix: str, service: str) -> str:
    return f"{prefix}_{service}"


async def create_databases(admin_dsn: str, prefix: str, names: Sequence[str] = suite.START_ORDER) -> dict[str, str]:
    """Creates each service's database when missing; returns the SQLAlchemy URL per service."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        existing = {row["datname"] for row in await admin.fetch("SELECT datname FROM pg_database")}
        for name in names:
            if database_name(prefix, name) not in existing:
                await admin.execute(f'CREATE DATABASE "{database_name(prefix, name)}"')
    finally:
        await admin.close()
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return {name: f"{base}/{database_name(prefix, name)}" for name in names}


async def drop_databases(admin_dsn: str, prefix: str, names: Sequence[str] = suite.START_ORDER) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database_name(prefix, name)}" WITH (FORCE)')
    finally:
        await admin.close()


def cluster_environment(
    database_urls: Mapping[str, str], redis_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every service process: Redis for events, a database per service."""
    env = {**os.environ, "LOYALTY_EVENT_BUS": "redis", "LOYALTY_REDIS_URL": redis_url}
    for name, url in database_urls.items():
        env[f"LOYALTY_{name.upper()}__DATABASE_URL"] = url
    env.update(extra or {})
    return env


async def wait_serving(addresses: Mapping[str, str]) -> None:
    """Waits until every address answers SERVING to the standard gRPC health check;
    bound it with ``asyncio.timeout``."""
    for address in addresses.values():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)


class ServiceProcesses:
    """Runs `python -m services.<name>` per service; stops them with SIGTERM."""

    def __init__(self, env: Mapping[str, str], names: Sequence[str] = suite.START_ORDER) -> None:
        self._env = dict(env)
        self._names = names
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, names: Sequence[str] | None = None) -> None:
        for name in names or self._names:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=self._env)

    def kill(self, name: str) -> None:
        """Ends one service at once, as a crash or an OOM kill would: no graceful shutdown."""
        process = self.processes[name]
        process.kill()
        process.wait()

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM to all, then waits; returns each exit code (a process that had to be killed: -9)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = -9
        return codes
