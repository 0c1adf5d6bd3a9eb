"""The ``loyalty`` command: run the suite, one service, migrations, the demo receipt."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from alembic import command

from loyalty.runtime import db
from loyalty.runtime.server import ServiceHost, create_bus, run_until_signalled
from loyalty.runtime.settings import Settings
from loyalty.runtime.telemetry import configure_logging
from services import cluster, demo, suite
from services.gateway import auth
from services.gateway import store as gateway_store

log = logging.getLogger("loyalty")


def _run_embedded(settings: Settings, with_demo: bool) -> None:
    started = time.perf_counter()
    bus = create_bus(settings)
    hosts = [ServiceHost(suite.definition(name), settings, bus) for name in suite.START_ORDER]

    async def on_ready() -> None:
        elapsed = time.perf_counter() - started
        print(f"\nLoyalty platform is up in {elapsed:.1f}s (embedded: one process, SQLite in {settings.data_dir}/)")
        for name in suite.START_ORDER:
            config = settings.service(name)
            print(
                f"  {name:<14} grpc {settings.address(name)}   metrics http://127.0.0.1:{config.metrics_port}/metrics"
            )
        if with_demo:
            print(demo.instructions(settings, await demo.seed(settings)))
        print("Press Ctrl-C to stop.", flush=True)

    asyncio.run(run_until_signalled(hosts, bus, on_ready))


def _serve_one(settings: Settings, name: str) -> None:
    bus = create_bus(settings)
    host = ServiceHost(suite.definition(name), settings, bus)

    async def on_ready() -> None:
        print(f"{name} ready on port {host.port}", flush=True)

    asyncio.run(run_until_signalled([host], bus, on_ready))


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
                    config = db.alembic_config(definition.migrations_dir)
                    config.attributes["connection"] = sync_connection
                    ruff = Path(sys.executable).parent / "ruff"
                    config.set_section_option("post_write_hooks", "hooks", "ruff_fix, ruff_format")
                    config.set_section_option("post_write_hooks", "ruff_fix.type", "exec")
                    config.set_section_option("post_write_hooks", "ruff_fix.executable", str(ruff))
                    config.set_section_option(
                        "post_write_hooks", "ruff_fix.options", "check --fix --unsafe-fixes REVISION_SCRIPT_FILENAME"
                    )
                    config.set_section_option("post_write_hooks", "ruff_format.type", "exec")
                    config.set_section_option("post_write_hooks", "ruff_format.executable", str(ruff))
                    config.set_section_option(
                        "post_write_hooks", "ruff_format.options", "format REVISION_SCRIPT_FILENAME"
                    )
                    command.revision(config, message=message, autogenerate=True)

                await connection.run_sync(revision)
        finally:
            await engine.dispose()
            scratch.unlink(missing_ok=True)

    asyncio.run(generate())


async def _wait_serving(addresses: dict[str, str], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        await cluster.wait_serving(addresses)


async def _api_keys(settings: Settings, args: argparse.Namespace) -> None:
    """Terminal keys managed straight in the gateway's database, for operators with access to it."""
    pepper = auth.pepper_of(settings)
    engine = db.create_engine(settings.database_url("gateway"))
    try:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            if args.action == "create":
                created = await auth.create_api_key(session, args.partner, args.store or [], args.description, pepper)
                print(f"key {created.api_key.key_id} for partner {args.partner}; secret (shown once):")
                print(created.secret)
            elif args.action == "revoke":
                revoked = await auth.revoke_api_key(session, args.key_id)
                print(f"key {revoked.key_id} revoked")
            else:
                for row in await gateway_store.list_api_keys(session, args.partner or "", None, 500):
                    state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                    stores = ",".join(row.store_ids) or "all stores"
                    print(f"{row.key_id}  {row.partner_id:<16} {stores:<24} {state:<18} {row.description}")
    finally:
        await engine.dispose()


def _run_cluster(settings: Settings, admin_dsn: str, prefix: str, with_demo: bool) -> None:
    """Creates the databases, starts the six processes, waits for Ctrl-C, stops them."""
    database_urls = asyncio.run(cluster.create_databases(admin_dsn, prefix))
    processes = cluster.ServiceProcesses(
        cluster.cluster_environment(database_urls, settings.redis_url.get_secret_value())
    )
    processes.start()
    try:
        addresses = {name: settings.address(name) for name in suite.START_ORDER}
        asyncio.run(_wait_serving(addresses, seconds=60))
        print(
            "Cluster mode: six processes, PostgreSQL databases "
            + ", ".join(cluster.database_name(prefix, name) for name in suite.START_ORDER)
            + ", Redis Streams"
        )
        for name, address in addresses.items():
            print(f"  {name:<14} {address}  pid {processes.processes[name].pid}")
        if with_demo:
            print(demo.instructions(settings, asyncio.run(demo.seed(settings))))
        print("Press Ctrl-C to stop.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping:", processes.stop())


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
    cluster_run = commands.add_parser("cluster", help="each service its own process on PostgreSQL and Redis")
    cluster_run.add_argument(
        "--postgres-dsn",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="an admin connection used to create the per-service databases",
    )
    cluster_run.add_argument("--database-prefix", default="loyalty")
    cluster_run.add_argument("--no-demo", action="store_true", help="do not load the demo program")
    commands.add_parser("seed-demo", help="load the demo program into a running suite (idempotent)")
    keys_command = commands.add_parser("api-key", help="create, revoke or list terminal API keys (gateway database)")
    key_actions = keys_command.add_subparsers(dest="action", required=True)
    create_key = key_actions.add_parser("create", help="a new key; its secret is printed once")
    create_key.add_argument("--partner", required=True)
    create_key.add_argument("--store", action="append", help="a store the key may act for; repeat; default all")
    create_key.add_argument("--description", default="")
    revoke_key = key_actions.add_parser("revoke")
    revoke_key.add_argument("key_id")
    list_keys = key_actions.add_parser("list")
    list_keys.add_argument("--partner")
    receipt = commands.add_parser("demo-receipt", help="calculate and commit a demo receipt through the gateway")
    who = receipt.add_mutually_exclusive_group(required=True)
    who.add_argument("--card")
    who.add_argument("--phone")
    receipt.add_argument("--gateway", help="gateway address; default from settings")
    receipt.add_argument("--api-key", help="the terminal's API key; default: the one seed-demo left in the data dir")
    args = parser.parse_args(argv)

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "run":
        _run_embedded(settings, with_demo=not args.no_demo)
    elif args.command == "serve":
        _serve_one(settings, args.service)
    elif args.command == "cluster":
        _run_cluster(settings, args.postgres_dsn, args.database_prefix, with_demo=not args.no_demo)
    elif args.command == "migrate":
        names = list(suite.START_ORDER) if args.service == "all" else [args.service]
        asyncio.run(_migrate(settings, names))
    elif args.command == "revision":
        _new_revision(settings, args.service, args.message)
    elif args.command == "seed-demo":
        print(demo.instructions(settings, asyncio.run(demo.seed(settings))))
    elif args.command == "api-key":
        asyncio.run(_api_keys(settings, args))
    elif args.command == "demo-receipt":
        address = args.gateway or settings.address("gateway")
        api_key = args.api_key or demo.demo_key_file(settings).read_text().strip()
        return asyncio.run(demo.print_demo_receipt(address, api_key, card=args.card, phone=args.phone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
