"""The ``loyalty`` command: run the suite, one service, migrations, the demo receipt."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from alembic import command

from loyalty.runtime import db
from loyalty.runtime.server import ServiceHost, create_bus, run_until_signalled
from loyalty.runtime.settings import Settings
from loyalty.runtime.telemetry import configure_logging
from services import demo, suite

log = logging.getLogger("loyalty")


def _run_embedded(settings: Settings, with_demo: bool) -> None:
    started = time.perf_counter()
    bus = create_bus(settings)
    hosts = [ServiceHost(suite.definition(name), settings, bus) for name in suite.START_ORDER]

    def ready() -> None:
        elapsed = time.perf_counter() - started
        print(f"\nLoyalty platform is up in {elapsed:.1f}s (embedded: one process, SQLite in {settings.data_dir}/)")
        for name in suite.START_ORDER:
            config = settings.service(name)
            print(f"  {name:<14} grpc {settings.bind_host}:{config.port}   metrics :{config.metrics_port}/metrics")

    async def main() -> None:
        async def ready_and_seed() -> None:
            if with_demo:
                card = await demo.seed(settings)
                print(demo.instructions(settings, card))
            print("Press Ctrl-C to stop.", flush=True)

        def on_ready() -> None:
            ready()
            seeding.append(asyncio.create_task(ready_and_seed()))

        seeding: list[asyncio.Task[None]] = []
        await run_until_signalled(hosts, bus, on_ready)

    asyncio.run(main())


def _serve_one(settings: Settings, name: str) -> None:
    bus = create_bus(settings)
    host = ServiceHost(suite.definition(name), settings, bus)
    asyncio.run(run_until_signalled([host], bus, lambda: print(f"{name} ready on port {host.port}", flush=True)))


async def _migrate(settings: Settings, names: list[str]) -> None:
    for name in names:
        engine = db.create_engine(settings.database_url(name))
        try:
            await db.migrate(engine, suite.definition(name).migrations_dir)
        finally:
            await engine.dispose()
        print(f"{name}: schema at head")


def _new_revision(settings: Settings, name: str, message: str) -> None:
    """Autogenerates a migration by comparing the models with a scratch database at head."""
    definition = suite.definition(name)
    scratch = Path(settings.data_dir) / f".revision-{name}.db"
    scratch.unlink(missing_ok=True)

    async def generate() -> None:
        engine = db.create_engine(f"sqlite+aiosqlite:///{scratch.resolve()}")
        try:
            await db.migrate(engine, definition.migrations_dir)
            async with engine.begin() as connection:

                def revision(sync_connection: object) -> None:
                    config = db._alembic_config(definition.migrations_dir)
                    config.attributes["connection"] = sync_connection
                    command.revision(config, message=message, autogenerate=True)

                await connection.run_sync(revision)
        finally:
            await engine.dispose()
            scratch.unlink(missing_ok=True)

    asyncio.run(generate())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loyalty", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="all six services in one process (embedded default)")
    run.add_argument("--no-demo", action="store_true", help="do not load the demo program")
    serve = commands.add_parser("serve", help="one service in this process (cluster mode)")
    serve.add_argument("service", choices=suite.START_ORDER)
    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("service", choices=[*suite.START_ORDER, "all"])
    revision = commands.add_parser("revision", help="autogenerate a migration for a service (development)")
    revision.add_argument("service", choices=suite.START_ORDER)
    revision.add_argument("-m", "--message", required=True)
    receipt = commands.add_parser("demo-receipt", help="calculate and commit a demo receipt through the gateway")
    who = receipt.add_mutually_exclusive_group(required=True)
    who.add_argument("--card")
    who.add_argument("--phone")
    receipt.add_argument("--gateway", help="gateway address; default from settings")
    args = parser.parse_args(argv)

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "run":
        _run_embedded(settings, with_demo=not args.no_demo)
    elif args.command == "serve":
        _serve_one(settings, args.service)
    elif args.command == "migrate":
        names = list(suite.START_ORDER) if args.service == "all" else [args.service]
        asyncio.run(_migrate(settings, names))
    elif args.command == "revision":
        _new_revision(settings, args.service, args.message)
    elif args.command == "demo-receipt":
        address = args.gateway or settings.address("gateway")
        return asyncio.run(demo.print_demo_receipt(address, card=args.card, phone=args.phone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
