"""Every service's Alembic migrations build exactly the schema its models describe,
on SQLite and on PostgreSQL, and applying them again changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, event, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.runtime import db
from services import suite
from tests import infra

DDL_WORDS = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")


def schema_differences(connection: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def schema_snapshot(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    return {
        table: (
            [(column["name"], str(column["type"]), column["nullable"]) for column in inspector.get_columns(table)],
            sorted(str(index["column_names"]) for index in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def run(engine: AsyncEngine, function: Any, *args: Any) -> Any:
    async with engine.connect() as connection:
        return await connection.run_sync(function, *args)


@pytest.mark.parametrize("service", suite.START_ORDER)
async def test_migrations_match_the_models_and_rerunning_them_is_a_no_op(service: str, database_url: str) -> None:
    definition = suite.definition(service)
    config = Config()
    config.set_main_option("script_location", str(definition.migrations_dir))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None

    async with infra.migrated_engine(service, database_url) as engine:
        assert await run(engine, schema_differences, definition.metadata) == []
        assert await run(engine, current_revision) == head
        tables = set(await run(engine, lambda connection: inspect(connection).get_table_names()))
        assert set(definition.metadata.tables) <= tables
        before = await run(engine, schema_snapshot)

        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        try:
            await db.migrate(engine, definition.migrations_dir)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record)

        assert any("alembic_version" in s for s in statements), "the second migrate() read the version"
        changes = [s for s in statements if s.lstrip().upper().startswith(DDL_WORDS)]
        assert changes == [], "the second migrate() must not change the schema or the version"
        assert await run(engine, schema_snapshot) == before
        assert await run(engine, current_revision) == head
        assert await run(engine, schema_differences, definition.metadata) == []
