"""Idempotent consumers: each consumer remembers the events it has handled."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.timeutil import UtcDateTime


def define_inbox_table(metadata: MetaData) -> Table:
    return Table(
        "inbox",
        metadata,
        Column("consumer", String(100), primary_key=True),
        Column("event_id", String(36), primary_key=True),
        Column("handled_at", UtcDateTime(), nullable=False),
    )


async def first_delivery(session: AsyncSession, inbox: Table, consumer: str, event_id: str) -> bool:
    """Records the event as handled in the caller's transaction; False when it already was.

    A concurrent duplicate loses on the primary key at commit and its whole
    transaction, handler effects included, rolls back.
    """
    seen = await session.scalar(
        select(inbox.c.event_id).where(inbox.c.consumer == consumer, inbox.c.event_id == event_id)
    )
    if seen is not None:
        return False
    await session.execute(inbox.insert().values(consumer=consumer, event_id=event_id, handled_at=datetime.now(UTC)))
    return True
