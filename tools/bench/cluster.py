"""The suite under test in cluster mode (each service its own process, its own PostgreSQL
database, events on Redis Streams: services/cluster.py), CPU accounting per process, and a
py-spy profile of one service while it is under load."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import redis.asyncio as aioredis

from loyalty.runtime import db
from services import cluster, suite
from services.gateway import auth

ADMIN_DSN = os.environ.get("LOYALTY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LOYALTY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
# Outside the ephemeral range, like the tests' servers, so an outgoing connection never takes one.
PORTS = range(33_000, 40_000)
# One terminal key drives the whole load: lift its rate limit out of the way.
RATE_LIMIT = "1000000000"


def free_port() -> int:
    for _attempt in range(1000):
        port = random.choice(PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass(frozen=True)
class RunningCluster:
    prefix: str
    addresses: dict[str, str]
    database_urls: dict[str, str]
    pids: dict[str, int]


@asynccontextmanager
async def running_cluster(
    prefix: str, keep: bool, data_dir: Path, environment: Mapping[str, str] | None = None
) -> AsyncIterator[RunningCluster]:
    """Creates (or reuses) the databases `<prefix>_<service>`, starts the six processes and
    waits until each serves; stops them after, dropping the databases unless `keep`."""
    ports = {name: (free_port(), free_port()) for name in suite.START_ORDER}
    database_urls = await cluster.create_databases(ADMIN_DSN, prefix)
    extra = {"LOYALTY_STREAM_PREFIX": prefix, "LOYALTY_LOG_LEVEL": "WARNING", "LOYALTY_LOG_FORMAT": "text"}
    extra |= {"LOYALTY_API_KEY_RATE_LIMIT": RATE_LIMIT, "LOYALTY_DATA_DIR": str(data_dir), **(environment or {})}
    for name, (port, metrics_port) in ports.items():
        extra[f"LOYALTY_{name.upper()}__PORT"] = str(port)
        extra[f"LOYALTY_{name.upper()}__METRICS_PORT"] = str(metrics_port)
    processes = cluster.ServiceProcesses(cluster.cluster_environment(database_urls, REDIS_URL, extra))
    addresses = {name: f"127.0.0.1:{port}" for name, (port, _metrics) in ports.items()}
    _start_logging_to(processes, data_dir / "services.log")
    try:
        await _wait_started(processes, addresses)
        pids = {name: process.pid for name, process in processes.processes.items()}
        yield RunningCluster(prefix, addresses, database_urls, pids)
    finally:
        await asyncio.to_thread(processes.stop)
        if not keep:
            await cluster.drop_databases(ADMIN_DSN, prefix)
            client = aioredis.from_url(REDIS_URL)
            try:
                keys = [key async for key in client.scan_iter(f"{prefix}:*")]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()


def _start_logging_to(processes: cluster.ServiceProcesses, log: Path) -> None:
    """Starts the services with their stdout and stderr in `log`, so their warnings (a
    cancelled call's connection cleanup under overload) do not drown the bench's progress;
    the processes inherit the descriptors, so they are swapped only while starting them."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with log.open("ab") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            processes.start()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


async def _wait_started(processes: cluster.ServiceProcesses, addresses: Mapping[str, str]) -> None:
    """Waits until every service serves; fails at once when one of them exits instead."""

    async def watch() -> None:
        while True:
            for name, process in processes.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode} while starting")
            await asyncio.sleep(0.5)

    serving = asyncio.create_task(cluster.wait_serving(addresses))
    watching = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(180):
            done, _pending = await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()
        watching.cancel()
    for task in done:
        task.result()


async def create_terminal_key(gateway_url: str) -> str:
    """A terminal key written straight into the gateway's database (the cluster runs without a
    pepper or an admin token), as `loyalty api-key create` does."""
    engine = db.create_engine(gateway_url)
    try:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            created = await auth.create_api_key(session, "bench", [], "benchmark terminals", b"")
    finally:
        await engine.dispose()
    secret: str = created.secret
    return secret


class CpuMeter:
    """CPU seconds per process between start() and stop(), as percent of one core: each named
    process, this process (the load generator), the PostgreSQL backends serving the bench's
    databases (their process titles name the database), the redis-server, and the whole
    machine (200% is both cores of a 2-core box busy, whoever used them). A process that
    starts during the step counts from zero; one that ends during it is lost."""

    def __init__(self, pids: Mapping[str, int], database_prefix: str = "") -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._processes["load-generator"] = psutil.Process()
        self._database_prefix = database_prefix
        self._started: dict[tuple[str, int], float] = {}
        self._wall = 0.0

    @staticmethod
    def _seconds(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def _group(self, process: psutil.Process) -> str:
        name = process.info["name"] or ""
        if name.startswith("redis-server"):
            return "redis"
        if self._database_prefix and name.startswith("postgres"):
            title = " ".join(process.info["cmdline"] or ())
            return "postgres" if f" {self._database_prefix}_" in title else ""
        return ""

    def _sample(self) -> dict[tuple[str, int], float]:
        sample: dict[tuple[str, int], float] = {}
        for name, process in self._processes.items():
            try:
                sample[name, process.pid] = self._seconds(process)
            except psutil.NoSuchProcess:
                continue
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                group = self._group(process)
                if group:
                    sample[group, process.pid] = self._seconds(process)
            except psutil.Error:
                continue
        times = psutil.cpu_times()
        sample["machine", 0] = float(sum(times) - times.idle - getattr(times, "iowait", 0.0))
        return sample

    def start(self) -> None:
        self._started = self._sample()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        ended = self._sample()
        wall = time.perf_counter() - self._wall
        used: dict[str, float] = {"postgres": 0.0, "redis": 0.0} if self._database_prefix else {}
        for (name, pid), seconds in ended.items():
            used[name] = used.get(name, 0.0) + seconds - self._started.get((name, pid), 0.0)
        return {name: round(seconds / wall * 100, 1) for name, seconds in used.items()}


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(path) for path in [Path(sys.executable).parent / "py-spy"] if path.exists()), None
    )


async def record_profile(pid: int, seconds: float, output: Path) -> str:
    """Samples `pid` with py-spy for `seconds` at 100 Hz (pausing it briefly per sample, so
    idle threads are told apart) into a collapsed stack file; returns its text, or raises
    RuntimeError when py-spy cannot attach."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install '.[bench]')")
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--full-filenames",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    text = await asyncio.to_thread(lambda: output.read_text() if output.exists() else "")
    if process.returncode != 0 or not text:
        raise RuntimeError(f"py-spy failed ({process.returncode}): {out.decode(errors='replace')[-500:]}")
    return text
