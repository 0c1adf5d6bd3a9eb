"""The benchmark: a dataset, the suite in cluster mode on PostgreSQL and Redis, POS traffic
through the gateway at open-loop rates and closed-loop concurrencies, a bare gRPC echo ceiling
measured in the same run, a py-spy profile of the busiest service, and a report.

    .venv/bin/python -m tools.bench run                              # make bench: a modest run
    .venv/bin/python -m tools.bench run --members 1000000 --products 50000 --rates 2,4,8,16 --concurrency 4,16
    .venv/bin/python -m tools.bench echo --echo-concurrency 1,8,32   # the ceiling alone

Results go to var/bench/<UTC time>/: results.json, summary.md, latency.png, profile-<service>.txt.
docs/performance.md explains the figures and records the latest ones.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped,unused-ignore]

from loyalty.client.pos import PosClient, RetryPolicy
from tools.bench import cluster, dataset, echo, report
from tools.bench.load import Mix, PosTraffic, Recorder, RunResult, arrival_offsets, run_closed_loop, run_open_loop

CLIENT_CHANNELS = 4
NO_RETRY = RetryPolicy(attempts=1)


def numbers(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    return {
        "cpu": model,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_average_at_start": ", ".join(f"{value:.2f}" for value in psutil.getloadavg()),
    }


def step_of(
    name: str, kind: str, mode: str, target: float, result: RunResult, recorder: Recorder, cpu: dict[str, float]
) -> report.Step:
    return report.Step(
        name=name,
        kind=kind,
        mode=mode,
        target=target,
        seconds=round(result.seconds, 3),
        completed=len(recorder.units),
        rpcs={
            rpc: report.summarise(recorder.latencies.get(rpc, []), recorder.errors.get(rpc))
            for rpc in sorted(set(recorder.latencies) | set(recorder.errors))
        },
        unit=report.summarise(recorder.units, {"failed": recorder.failed_units} if recorder.failed_units else None),
        cpu_percent=cpu,
        dropped=result.dropped,
        notes=dict(recorder.notes),
    )


async def measure(
    name: str,
    kind: str,
    mode: str,
    target: float,
    seconds: float,
    make_action: Callable[[Recorder], Callable[[int], Awaitable[None]]],
    meter: cluster.CpuMeter,
    seed: int,
) -> report.Step:
    recorder = Recorder()
    action = make_action(recorder)
    meter.start()
    if mode == "open":
        offsets = arrival_offsets(target, seconds, random.Random(seed))
        result = await run_open_loop(action, offsets, recorder)
    else:
        result = await run_closed_loop(action, int(target), seconds, recorder)
    step = step_of(name, kind, mode, target, result, recorder, meter.stop())
    print(
        f"  {name}: {step.throughput:,.1f}/s, p50 {step.unit.p50_ms:.1f} ms, p99 {step.unit.p99_ms:.1f} ms, "
        f"failed {recorder.failed_units}, dropped {result.dropped}",
        flush=True,
    )
    return step


async def echo_steps(args: argparse.Namespace) -> list[report.Step]:
    """The ceiling: the echo server in its own process, the same client machinery."""
    port = cluster.free_port()
    server = echo.start_server(port)
    steps: list[report.Step] = []
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CLIENT_CHANNELS)]
        await echo.wait_ready(channels[0])
        calls = [echo.echo_call(channel, echo.payload()) for channel in channels]

        def make(recorder: Recorder) -> Callable[[int], Awaitable[None]]:
            async def action(sequence: int) -> None:
                await recorder.call("Echo", calls[sequence % len(calls)]())

            return action

        meter = cluster.CpuMeter({"echo-server": server.pid})
        await run_closed_loop(make(Recorder()), 4, min(2.0, args.seconds), Recorder())
        for concurrency in args.echo_concurrency:
            steps.append(
                await measure(f"echo c={concurrency:g}", "echo", "closed", concurrency, args.seconds, make, meter, 0)
            )
        for channel in channels:
            await channel.close(None)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return steps


async def build_dataset(args: argparse.Namespace, running: cluster.RunningCluster, tag: str) -> dict[str, Any]:
    scale = args.scale
    members_dsn = cluster.asyncpg_dsn(running.database_urls["members"])
    facts: dict[str, Any] = {"members": scale.members, "products": scale.products, "coupons": scale.coupons}
    present = await dataset.count_members(members_dsn)
    if present == scale.members:
        print(f"reusing {present:,} members already loaded", flush=True)
    elif present:
        raise SystemExit(f"the members database holds {present:,} members, not {scale.members:,}; use another --prefix")
    else:
        await dataset.create_segments(running.addresses["members"])
        print(f"loading {scale.members:,} members with cards, phones, tiers and segments (COPY) ...", flush=True)
        seconds = await dataset.load_members(members_dsn, scale.members)
        facts["members_load_seconds"] = round(seconds, 1)
        print(f"loading the catalogue: {scale.products:,} products (ImportProducts) ...", flush=True)
        facts["catalogue_load_seconds"] = round(
            await dataset.load_catalogue(running.addresses["rules"], scale.products), 1
        )
    facts["live_rules"] = await dataset.publish_program(running.addresses["rules"])
    print(f"  {facts['live_rules']} live rules; {scale.coupons:,} coupon codes (ImportPromoCodes) ...", flush=True)
    facts["coupons_load_seconds"] = round(
        await dataset.load_coupons(running.addresses["rewards"], tag, scale.coupons), 1
    )
    print(f"funding {scale.funded_members:,} points accounts (AccruePoints) ...", flush=True)
    seconds = await dataset.fund_accounts(running.addresses["accounts"], tag, scale.funded_members)
    facts["funded_accounts"] = scale.funded_members
    facts["accrual_seconds"] = round(seconds, 1)
    facts["accruals_per_second"] = round(scale.funded_members / seconds, 1) if seconds else None
    return facts


async def pos_steps(
    args: argparse.Namespace, running: cluster.RunningCluster, tag: str, api_key: str
) -> tuple[list[report.Step], dict[str, Any]]:
    address = running.addresses["gateway"]
    clients = [
        PosClient(address, api_key, timeout_seconds=args.timeout, retry=NO_RETRY) for _ in range(CLIENT_CHANNELS)
    ]
    coupons = itertools.count()
    mix = Mix()
    meter = cluster.CpuMeter(running.pids, running.prefix)

    def maker(step: str) -> Callable[[Recorder], Callable[[int], Awaitable[None]]]:
        def make(recorder: Recorder) -> Callable[[int], Awaitable[None]]:
            traffic = [
                PosTraffic(client, args.scale, tag, step, recorder, mix, args.seed, coupons) for client in clients
            ]

            async def action(sequence: int) -> None:
                await traffic[sequence % len(traffic)].sale(sequence)

            return action

        return make

    steps: list[report.Step] = []
    profile: dict[str, Any] = {}
    try:
        meter.start()
        await asyncio.sleep(args.idle_seconds)
        idle = report.summarise([])
        steps.append(report.Step("idle", "idle", "closed", 0, args.idle_seconds, 0, {}, idle, meter.stop()))
        print(f"warming up for {args.warmup:g} s ...", flush=True)
        await run_closed_loop(maker("warm")(Recorder()), 4, args.warmup, Recorder())
        for index, rate in enumerate(args.rates):
            steps.append(
                await measure(f"open {rate:g}/s", "pos", "open", rate, args.seconds, maker(f"o{index}"), meter, index)
            )
        for index, concurrency in enumerate(args.concurrency):
            steps.append(
                await measure(
                    f"closed c={concurrency:g}",
                    "pos",
                    "closed",
                    concurrency,
                    args.seconds,
                    maker(f"c{index}"),
                    meter,
                    index,
                )
            )
        if args.profile_seconds > 0 and steps:
            profile = await profile_busiest(args, running, steps, maker("p"))
    finally:
        for client in clients:
            await client.close()
    return steps, profile


async def profile_busiest(
    args: argparse.Namespace,
    running: cluster.RunningCluster,
    steps: list[report.Step],
    make: Callable[[Recorder], Callable[[int], Awaitable[None]]],
) -> dict[str, Any]:
    """py-spy on the service that used the most CPU in the heaviest step (or on each of
    --profile-service, all at once), while the highest closed-loop concurrency runs again."""
    heaviest = max(steps, key=lambda step: step.throughput)
    busiest = max(running.pids, key=lambda name: heaviest.cpu_percent.get(name, 0.0))
    services = [name.strip() for name in args.profile_service.split(",") if name.strip()] or [busiest]
    concurrency = int(max(args.concurrency, default=8))
    print(f"profiling {', '.join(services)} for {args.profile_seconds:g} s at c={concurrency} ...", flush=True)
    outputs = {service: args.out / f"profile-{service}.txt" for service in services}
    recorder = Recorder()
    recorded = await asyncio.gather(
        *(
            cluster.record_profile(running.pids[service], args.profile_seconds, outputs[service])
            for service in services
        ),
        run_closed_loop(make(recorder), concurrency, args.profile_seconds + 1, recorder),
        return_exceptions=True,
    )
    profiles: dict[str, Any] = {}
    for service, collapsed in zip(services, recorded, strict=False):
        if isinstance(collapsed, str):
            profiles[service] = {"raw": outputs[service].name, **report.top_frames(collapsed, limit=25)}
        else:
            print(f"  no profile of {service}: {collapsed}")
            profiles[service] = {"error": str(collapsed)}
    return {"busiest": busiest, "concurrency": concurrency, "seconds": args.profile_seconds, "services": profiles}


async def run(args: argparse.Namespace) -> None:
    started = datetime.now(UTC)
    args.out = args.out or Path("var/bench") / started.strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    args.scale = dataset.Scale(
        members=args.members,
        products=args.products,
        coupons=args.coupons,
        funded_members=min(args.funded, args.members),
    )
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["python -m tools.bench", *sys.argv[1:]]),
        "config": {
            "seconds_per_step": args.seconds,
            "rates": args.rates,
            "concurrency": args.concurrency,
            "echo_concurrency": args.echo_concurrency,
            "mix": vars(Mix()),
        },
    }
    if args.note:
        meta["note"] = args.note
    print("echo ceiling ...", flush=True)
    steps = await echo_steps(args)
    tag = uuid.uuid4().hex[:6]
    prefix = args.prefix or f"loyalty_bench_{tag}"
    print(f"starting the cluster (databases {prefix}_*) ...", flush=True)
    environment = {"LOYALTY_CALCULATE_BUDGET_SECONDS": str(args.calculate_budget)} if args.calculate_budget else {}
    meta["config"]["calculate_budget_seconds"] = args.calculate_budget or "default (0.3)"
    keep = args.keep or bool(args.prefix)
    async with cluster.running_cluster(prefix, keep, args.out / "var", environment) as running:
        meta["dataset"] = await build_dataset(args, running, tag)
        api_key = await cluster.create_terminal_key(running.database_urls["gateway"])
        pos, profile = await pos_steps(args, running, tag, api_key)
    steps += pos
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    paths = report.write(args.out, meta, steps, profile)
    print(f"\n{paths['markdown'].read_text()}\nwritten: " + ", ".join(str(path) for path in paths.values()))


async def run_echo(args: argparse.Namespace) -> None:
    args.out = args.out or Path("var/bench") / datetime.now(UTC).strftime("echo-%Y%m%dT%H%M%SZ")
    steps = await echo_steps(args)
    meta = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    paths = report.write(args.out, meta, steps)
    print(paths["markdown"].read_text())


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    full = commands.add_parser("run", help="dataset, cluster, POS load, echo ceiling, profile, report")
    ceiling = commands.add_parser("echo", help="the echo ceiling alone")
    for command in (full, ceiling):
        command.add_argument("--seconds", type=float, default=20, help="length of each measured step")
        command.add_argument("--echo-concurrency", type=numbers, default=[1.0, 8.0, 32.0])
        command.add_argument("--out", type=Path, default=None, help="default: var/bench/<UTC time>")
    full.add_argument("--members", type=int, default=100_000)
    full.add_argument("--products", type=int, default=10_000)
    full.add_argument("--coupons", type=int, default=20_000)
    full.add_argument("--funded", type=int, default=1_000, help="members given points to pay with")
    full.add_argument("--rates", type=numbers, default=[2.0, 4.0, 8.0, 16.0], help="open-loop sales per second")
    full.add_argument("--concurrency", type=numbers, default=[1.0, 4.0, 16.0], help="closed-loop concurrent registers")
    full.add_argument("--warmup", type=float, default=5)
    full.add_argument("--timeout", type=float, default=5, help="deadline of each POS call")
    full.add_argument("--profile-seconds", type=float, default=15, help="0: no profile")
    full.add_argument(
        "--profile-service", default="", help="services to profile at once, comma-separated; default: the busiest"
    )
    full.add_argument("--idle-seconds", type=float, default=5, help="CPU of the suite without load, measured first")
    full.add_argument("--prefix", default="", help="reuse (and keep) databases <prefix>_*: load members once")
    full.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    full.add_argument(
        "--calculate-budget", type=float, default=0, help="the gateway's CalculateCheque budget in seconds; 0: default"
    )
    full.add_argument("--seed", type=int, default=1)
    full.add_argument("--note", default="", help="a remark recorded with the results (e.g. the machine was busy)")
    return root


def main() -> None:
    args = parser().parse_args()
    started = time.perf_counter()
    asyncio.run(run(args) if args.command == "run" else run_echo(args))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
