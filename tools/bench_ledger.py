"""Measure the ledger's hot operations over gRPC against the accounts service on PostgreSQL.

    .venv/bin/python tools/bench_ledger.py --clients 1,64 --ops 3200 --operations hold,commit

It creates a scratch PostgreSQL database on 127.0.0.1 (dropped afterwards), starts the
accounts service as its own process (`python -m services.accounts`, migrations applied at
start-up) and drives it with N concurrent clients over one gRPC channel each:

- ``accrue``: AccruePoints, a new lot per call;
- ``redeem``: RedeemPoints of 1 point;
- ``hold``: PlaceHold of 5 points (a calculated receipt; the hold expires by itself);
- ``commit``: a receipt as the gateway runs it: PlaceHold, then CaptureHold and AccruePoints;

each once against a single hot account (every call serialised on its row lock) and once
spread over ``--accounts`` accounts (``--spread`` picks one of them). It prints operations
per second and p50/p99 latency per operation (a receipt counts as one operation), and the
errors, if any. ``--ops`` is per measurement, shared by the clients: give 64 clients a few
thousand, or each makes only a handful of calls and p99 is noise. The load average is
printed before and after, since the machine may be shared.

    .venv/bin/python tools/bench_ledger.py --mass 100000

instead uploads a mass accrual of that many items (one new account each) in chunks of
10,000, starts it, and prints how long the upload and the background job took, the items
uploaded and the accounts credited per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import grpc

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
STARTING_POINTS = 10**9


@asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"loyalty_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def accounts_service(database_url: str) -> AsyncIterator[str]:
    """The accounts service in its own process, as in a cluster; yields its address."""
    port = free_port()
    env = {
        **os.environ,
        "LOYALTY_ACCOUNTS__DATABASE_URL": database_url,
        "LOYALTY_ACCOUNTS__PORT": str(port),
        "LOYALTY_ACCOUNTS__METRICS_PORT": str(free_port()),
        "LOYALTY_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.accounts", env=env)
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: AccountsServiceAsyncStub = AccountsServiceStub(channel)
            for _attempt in range(300):
                try:
                    await stub.GetBalance(pb.GetBalanceRequest(holder_id="probe"), timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the accounts service did not start")
        yield address
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)


@dataclass
class Run:
    latencies: list[float]
    errors: dict[str, int]
    elapsed: float

    def line(self, name: str, clients: int) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000 if ordered else 0.0
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else 0.0
        rate = len(ordered) / self.elapsed if self.elapsed else 0.0
        errors = ", ".join(f"{code}: {count}" for code, count in sorted(self.errors.items())) or "none"
        return f"{name:<14} {clients:>7} {len(ordered):>6} {rate:>9.1f} {p50:>8.1f} {p99:>8.1f}   {errors}"


Operation = Callable[["AccountsServiceAsyncStub", str, str], Awaitable[None]]


async def accrue(stub: AccountsServiceAsyncStub, holder: str, key: str) -> None:
    await stub.AccruePoints(
        pb.AccruePointsRequest(
            request_id=key, holder_id=holder, amount=10, source=pb.ACCRUAL_SOURCE_RECEIPT, source_ref=key
        )
    )


async def redeem(stub: AccountsServiceAsyncStub, holder: str, key: str) -> None:
    await stub.RedeemPoints(pb.RedeemPointsRequest(request_id=key, holder_id=holder, amount=1, source_ref=key))


async def hold(stub: AccountsServiceAsyncStub, holder: str, key: str) -> None:
    await stub.PlaceHold(pb.PlaceHoldRequest(request_id=key, holder_id=holder, amount=5, source_ref=key))


async def commit(stub: AccountsServiceAsyncStub, holder: str, key: str) -> None:
    placed = await stub.PlaceHold(
        pb.PlaceHoldRequest(request_id=f"{key}:hold", holder_id=holder, amount=5, source_ref=key)
    )
    await stub.CaptureHold(pb.CaptureHoldRequest(request_id=f"{key}:capture", hold_id=placed.hold.hold_id))
    await accrue(stub, holder, f"{key}:accrue")


async def drive(address: str, operation: Operation, holders: list[str], clients: int, ops: int) -> Run:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = iter(range(ops))
    run_id = uuid.uuid4().hex[:8]

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: AccountsServiceAsyncStub = AccountsServiceStub(channel)
            for number in issued:
                holder = holders[(number * 7919 + index) % len(holders)]
                started = time.perf_counter()
                try:
                    await operation(stub, holder, f"bench:{run_id}:{number}")
                except grpc.aio.AioRpcError as failed:
                    errors[failed.code().name] = errors.get(failed.code().name, 0) + 1
                else:
                    latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    return Run(latencies, errors, time.perf_counter() - started)


async def fund(address: str, holders: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: AccountsServiceAsyncStub = AccountsServiceStub(channel)
        for start in range(0, len(holders), 50):
            await asyncio.gather(
                *(
                    stub.AccruePoints(
                        pb.AccruePointsRequest(
                            request_id=f"fund:{holder}",
                            holder_id=holder,
                            amount=STARTING_POINTS,
                            source=pb.ACCRUAL_SOURCE_CAMPAIGN,
                            source_ref="bench funding",
                        )
                    )
                    for holder in holders[start : start + 50]
                )
            )


MASS_CHUNK = 10_000


async def mass_accrual(address: str, count: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: AccountsServiceAsyncStub = AccountsServiceStub(channel)
        items = [pb.MassOperationItem(holder_id=f"mass-{index}", amount=10) for index in range(count)]
        began = time.perf_counter()
        create = pb.CreateMassOperationRequest(
            request_id="bench",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            actor="bench",
            reason="bench",
            items=items[:MASS_CHUNK],
        )
        operation_id = (await stub.CreateMassOperation(create)).operation.operation_id
        for start in range(MASS_CHUNK, count, MASS_CHUNK):
            chunk = pb.AddMassOperationItemsRequest(
                request_id=f"bench:{start}", operation_id=operation_id, items=items[start : start + MASS_CHUNK]
            )
            await stub.AddMassOperationItems(chunk)
        uploaded = time.perf_counter()
        await stub.StartMassOperation(pb.StartMassOperationRequest(request_id="bench:start", operation_id=operation_id))
        while True:
            await asyncio.sleep(0.5)
            got = (await stub.GetMassOperation(pb.GetMassOperationRequest(operation_id=operation_id))).operation
            if got.status == pb.MASS_OPERATION_STATUS_DONE:
                break
        applied = time.perf_counter()
    print(f"mass accrual of {count} items: upload {uploaded - began:.1f} s, job {applied - uploaded:.1f} s")
    print(f"uploaded {count / (uploaded - began):.0f} items/s")
    print(f"applied {got.applied}, failed {got.failed}: {got.applied / (applied - uploaded):.0f} accounts/s")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


async def main(arguments: argparse.Namespace) -> None:
    print(load_average(), flush=True)
    try:
        await measure(arguments)
    finally:
        print(load_average(), flush=True)


async def measure(arguments: argparse.Namespace) -> None:
    if arguments.mass:
        async with scratch_database(arguments.admin_dsn) as url, accounts_service(url) as address:
            await mass_accrual(address, arguments.mass)
        return
    clients = [int(value) for value in arguments.clients.split(",")]
    hot = ["hot-holder"]
    many = [f"holder-{index}" for index in range(arguments.accounts)]
    async with scratch_database(arguments.admin_dsn) as url, accounts_service(url) as address:
        await fund(address, hot + many)
        print(f"{'operation':<14} {'clients':>7} {'ops':>6} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}   errors")
        chosen = arguments.operations.split(",")
        for name, operation in (("accrue", accrue), ("redeem", redeem), ("hold", hold), ("commit", commit)):
            if name not in chosen:
                continue
            for spread, holders in (("hot", hot), ("many", many)):
                if arguments.spread not in ("both", spread):
                    continue
                for count in clients:
                    run = await drive(address, operation, holders, count, arguments.ops)
                    print(run.line(f"{name}/{spread}", count), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--ops", type=int, default=400, help="operations per measurement")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts the 'many' runs spread over")
    parser.add_argument("--operations", default="accrue,redeem,hold,commit", help="which operations to measure")
    parser.add_argument("--spread", choices=("both", "hot", "many"), default="both", help="which account spreads")
    parser.add_argument("--mass", type=int, default=0, help="measure a mass accrual of this many items instead")
    parser.add_argument("--admin-dsn", default=ADMIN_DSN, help="PostgreSQL to create the scratch database in")
    asyncio.run(main(parser.parse_args()))
