"""Idempotent mutations: a repeat with the same key answers the first result.

The key is recorded in the same transaction as the change it guards, so a
change and its record commit together or not at all. Two concurrent calls with
one key race on the primary key; the loser rolls back and answers the winner's
result. The same key with a different request is refused, never applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument
from loyalty.runtime.timeutil import UtcDateTime

ResponseT = TypeVar("ResponseT", bound=Message)

MAX_KEY_LENGTH = 200
MAX_ATTEMPTS = 4


def define_idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(64), primary_key=True),
        Column("key", String(MAX_KEY_LENGTH), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
    )


def fingerprint(request: Message, key_field: str = "request_id") -> str:
    """A stable hash of the request without its idempotency key."""
    copy = type(request)()
    copy.CopyFrom(request)
    if key_field in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField(key_field)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def validate_key(key: str, field: str = "request_id") -> None:
    if not key:
        raise InvalidArgument([FieldViolation(field, "required: a client-chosen idempotency key")])
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument([FieldViolation(field, f"at most {MAX_KEY_LENGTH} characters")])


async def _recorded(
    session: AsyncSession,
    table: Table,
    scope: str,
    key: str,
    request_hash: str,
    response_type: type[ResponseT],
) -> ResponseT | None:
    row = (
        await session.execute(
            select(table.c.request_hash, table.c.response).where(table.c.scope == scope, table.c.key == key)
        )
    ).one_or_none()
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise FailedPrecondition(
            "IDEMPOTENCY_KEY_REUSED",
            f"{scope} key {key!r} was already used for a different request",
        )
    return response_type.FromString(row.response)


async def run_idempotent(
    sessions: async_sessionmaker[AsyncSession],
    table: Table,
    scope: str,
    key: str,
    request: Message,
    response_type: type[ResponseT],
    work: Callable[[AsyncSession], Awaitable[ResponseT]],
    after_commit: Callable[[], None] | None = None,
) -> ResponseT:
    """Runs ``work`` once per (scope, key) in one transaction with the key's record.

    A transaction that loses a race on a unique constraint (this key, or a row the work
    creates) is rolled back; if the key was recorded meanwhile its answer is returned,
    otherwise the work is tried again.
    """
    validate_key(key)
    request_hash = fingerprint(request)
    for _attempt in range(MAX_ATTEMPTS):
        async with sessions() as session:
            try:
                async with session.begin():
                    previous = await _recorded(session, table, scope, key, request_hash, response_type)
                    if previous is not None:
                        return previous
                    response = await work(session)
                    await session.execute(
                        table.insert().values(
                            scope=scope,
                            key=key,
                            request_hash=request_hash,
                            response=response.SerializeToString(),
                            created_at=datetime.now(UTC),
                        )
                    )
            except IntegrityError:
                async with sessions() as reader:
                    winner = await _recorded(reader, table, scope, key, request_hash, response_type)
                if winner is not None:
                    return winner
                continue
            if after_commit is not None:
                after_commit()
            return response
    raise FailedPrecondition("IDEMPOTENCY_CONFLICT", f"{scope} key {key!r} kept conflicting; retry")


@dataclass(frozen=True)
class IdempotentCalls:
    """``run_idempotent`` bound to one service's sessions and key table, keyed by each
    request's ``request_id``; ``on_commit`` runs after every committed change (it wakes
    the outbox relay, for one)."""

    sessions: async_sessionmaker[AsyncSession]
    table: Table
    on_commit: Callable[[], None] | None = None

    async def run(
        self,
        scope: str,
        request: Message,
        response_type: type[ResponseT],
        work: Callable[[AsyncSession], Awaitable[ResponseT]],
        committed: Callable[[ResponseT], None] | None = None,
    ) -> ResponseT:
        """Runs the call once; ``committed`` sees the response only when this very call's
        work committed (not on a replay), e.g. to count what it did."""
        key: str = getattr(request, "request_id")  # noqa: B009 - every mutating request has one
        fresh: list[ResponseT] = []

        async def recording_work(session: AsyncSession) -> ResponseT:
            fresh[:] = [await work(session)]
            return fresh[0]

        def after_commit() -> None:
            if self.on_commit is not None:
                self.on_commit()
            if committed is not None:
                committed(fresh[0])

        return await run_idempotent(
            self.sessions, self.table, scope, key, request, response_type, recording_work, after_commit
        )
