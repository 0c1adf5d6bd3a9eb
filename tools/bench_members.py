"""Members at scale on PostgreSQL: card emission time and identification latency.

    .venv/bin/python tools/bench_members.py emit --count 1000000
    .venv/bin/python tools/bench_members.py identify --members 1000000 --calls 20000 --concurrency 16
    .venv/bin/python tools/bench_members.py identify --members 1000000 --attributes 3

Each run creates a scratch database (dropped at the end unless --keep), migrates it, and:
- ``emit`` orders one batch and times the emission job writing it to the end;
- ``identify`` loads a generated dataset (members with phones and one card each, and with
  ``--attributes N`` N custom attributes each), starts the members service as its own
  process, and times IdentifyMember over gRPC, half by card and half by phone, reporting
  p50/p95/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.members.v1.members_service_pb2_grpc import MembersServiceStub
from loyalty.runtime import db
from services.members import jobs, service
from services.members.domain import batch_card_number
from services.members.server import DEFINITION

ADMIN_DSN = os.environ.get("LOYALTY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
LOAD_CHUNK = 50_000


def phone_of(index: int) -> str:
    return f"+7900{index:07d}"


def card_of(index: int) -> str:
    return batch_card_number("55", index, 10)


@asynccontextmanager
async def scratch_database(keep: bool) -> AsyncIterator[str]:
    """A new database; yields its asyncpg DSN."""
    name = f"loyalty_bench_members_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


async def migrate(dsn: str) -> None:
    engine = db.create_engine(sqlalchemy_url(dsn))
    try:
        await db.migrate(engine, DEFINITION.migrations_dir)
    finally:
        await engine.dispose()


async def generate_dataset(dsn: str, members: int, attributes: int = 0) -> None:
    """Members `0..members-1`, each with phone_of(i), one active card card_of(i) and integer
    attributes `attr0..attr<attributes-1>` (the context carries them), loaded with COPY in
    chunks."""
    connection = await asyncpg.connect(dsn)
    now = datetime.now(UTC)
    codes = [f"attr{number}" for number in range(attributes)]
    try:
        if codes:
            await connection.executemany(
                "INSERT INTO attribute_definitions (code, name, type, allowed_values) VALUES ($1, $1, 'int', '[]')",
                [(code,) for code in codes],
            )
        for start in range(0, members, LOAD_CHUNK):
            indexes = range(start, min(start + LOAD_CHUNK, members))
            ids = [str(uuid.UUID(int=index + 1)) for index in indexes]
            await connection.copy_records_to_table(
                "members",
                records=[
                    (member_id, phone_of(index), "Bench", "Member", "active", "basic", 1, now)
                    for member_id, index in zip(ids, indexes, strict=True)
                ],
                columns=[
                    "member_id",
                    "phone",
                    "first_name",
                    "last_name",
                    "status",
                    "tier",
                    "registration_channel",
                    "created_at",
                ],
            )
            await connection.copy_records_to_table(
                "cards",
                records=[
                    (card_of(index), member_id, "active", now) for member_id, index in zip(ids, indexes, strict=True)
                ],
                columns=["card_number", "member_id", "status", "issued_at"],
            )
            if codes:
                await connection.copy_records_to_table(
                    "member_attributes",
                    records=[
                        (member_id, code, "i", str(index))
                        for member_id, index in zip(ids, indexes, strict=True)
                        for code in codes
                    ],
                    columns=["member_id", "code", "kind", "value"],
                )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def bench_emit(args: argparse.Namespace) -> None:
    async with scratch_database(args.keep) as dsn:
        await migrate(dsn)
        engine = db.create_engine(sqlalchemy_url(dsn))
        sessions = db.create_session_factory(engine)
        try:
            async with sessions() as session, session.begin():
                order = service.parse_batch_order("", "77", 0, args.count, 10)
                batch = await service.order_card_batch(session, order)
            started = time.perf_counter()
            handled = await jobs.emit_card_batches(sessions)
            elapsed = time.perf_counter() - started
            async with sessions() as session:
                done = await service.get_card_batch(session, batch.batch_id)
        finally:
            await engine.dispose()
    print(
        f"emitted {done.emitted:,} cards ({done.skipped} skipped, {handled:,} handled) in {elapsed:.1f} s "
        f"({done.emitted / elapsed:,.0f} cards/s); batch {done.status}"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_serving(address: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)


async def bench_identify(args: argparse.Namespace) -> None:
    async with scratch_database(args.keep) as dsn:
        await migrate(dsn)
        started = time.perf_counter()
        await generate_dataset(dsn, args.members, args.attributes)
        print(
            f"loaded {args.members:,} members and cards ({args.attributes} attributes each) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        port = args.port or free_port()
        address = f"127.0.0.1:{port}"
        environment = {
            **os.environ,
            "LOYALTY_MEMBERS__DATABASE_URL": sqlalchemy_url(dsn),
            "LOYALTY_MEMBERS__PORT": str(port),
            "LOYALTY_MEMBERS__METRICS_PORT": "0",
            "LOYALTY_LOG_LEVEL": "WARNING",
        }
        server = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.members", env=environment)
        try:
            await wait_serving(address)
            latencies = await call_identify(address, args.members, args.calls, args.concurrency)
        finally:
            if server.returncode is None:
                server.terminate()
            await asyncio.wait_for(server.wait(), timeout=30)
    ordered = sorted(latencies)

    def percentile(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000

    print(
        f"IdentifyMember over {args.members:,} members: {len(ordered):,} calls, concurrency {args.concurrency}: "
        f"p50 {percentile(0.50):.2f} ms, p95 {percentile(0.95):.2f} ms, p99 {percentile(0.99):.2f} ms, "
        f"mean {statistics.fmean(ordered) * 1000:.2f} ms"
    )


async def call_identify(address: str, members: int, calls: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    chooser = random.Random(5)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = MembersServiceStub(channel)

        def request() -> pb.IdentifyMemberRequest:
            index = chooser.randrange(members)
            if chooser.random() < 0.5:
                return pb.IdentifyMemberRequest(card_number=card_of(index))
            return pb.IdentifyMemberRequest(phone=phone_of(index))

        for _warm_up in range(min(200, calls)):
            await stub.IdentifyMember(request())
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                call = request()
                started = time.perf_counter()
                await stub.IdentifyMember(call, timeout=10)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    emit = commands.add_parser("emit", help="time the emission job writing one batch")
    emit.add_argument("--count", type=int, default=1_000_000)
    identify = commands.add_parser("identify", help="time IdentifyMember over a generated dataset")
    identify.add_argument("--members", type=int, default=1_000_000)
    identify.add_argument("--calls", type=int, default=20_000)
    identify.add_argument("--concurrency", type=int, default=16)
    identify.add_argument("--attributes", type=int, default=0, help="custom attributes per member")
    identify.add_argument("--port", type=int, default=0, help="where the service listens; default: a free port")
    for command in (emit, identify):
        command.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    asyncio.run(bench_emit(args) if args.command == "emit" else bench_identify(args))


if __name__ == "__main__":
    main()
