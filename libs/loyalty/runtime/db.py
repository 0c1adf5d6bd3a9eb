"""Async SQLAlchemy engines and Alembic migrations, the same for every service."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _tune_sqlite(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # WAL lets readers run beside the one writer; the busy timeout makes a second
    # writer wait instead of failing at once; foreign keys are off by default in SQLite.
    # The driver's own transaction handling is switched off so that _begin_immediate
    # decides how each transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_immediate(connection: Connection) -> None:
    # A transaction takes SQLite's write lock when it starts rather than when it first
    # writes: two transactions can then never both read a row and race to change it
    # (SQLite has no SELECT ... FOR UPDATE), and a writer never waits on a lock while
    # holding a read snapshot it must give up anyway.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine.sync_engine, "connect", _tune_sqlite)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        return engine
    # No pre-ping: it costs a round trip on every checkout of the hot path (7% of the
    # gateway's samples under load). A connection the server dropped fails one call,
    # is discarded with the pool's stale connections, and the caller's retry (every
    # mutating call is idempotent) gets a fresh one; recycling bounds a connection's age.
    return create_async_engine(url, pool_pre_ping=False, pool_recycle=1800, pool_size=10, max_overflow=20)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(migrations_dir: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    return config


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine, migrations_dir: Path) -> None:
    """Brings the service's schema to the newest revision on the given engine."""
    config = alembic_config(migrations_dir)
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, config)


def _render_portable_type(kind: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Migrations name plain SQLAlchemy types, so they never import application code.
    from loyalty.runtime.timeutil import UtcDateTime

    if kind == "type" and isinstance(item, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online(target_metadata: Any) -> None:
    """Body of every service's Alembic ``env.py``: migrate on the connection handed in.

    ``migrate()`` passes the connection through ``config.attributes``, so the
    same env.py serves start-up, the CLI's ``migrate`` and the Helm hook Job.
    """
    from alembic import context

    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through loyalty.runtime.db.migrate (or `loyalty migrate <service>`)")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_portable_type,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
