"""Returns: accruals and redemptions undone, wholly or in part, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import DomainError, read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.accounts import jobs, service, store
from services.accounts.domain import Accrual, AccrualSource, Balance
from services.accounts.metrics import LedgerMetrics
from tests import infra
from tests.integration.test_accounts_store import accounts_stub


async def accrue(sessions: async_sessionmaker[AsyncSession], amount: int, expires_in: timedelta | None = None) -> str:
    now = utcnow()
    accrual = Accrual(
        holder_id="m-1",
        currency="BONUS",
        amount=amount,
        source=AccrualSource.RECEIPT,
        source_ref=f"receipt:{amount}",
        reason="",
        activate_at=now - timedelta(days=1),
        expire_at=now + expires_in if expires_in is not None else None,
    )
    async with sessions() as session, session.begin():
        return (await service.accrue_points(session, accrual)).entry.entry_id


async def redeem(sessions: async_sessionmaker[AsyncSession], amount: int) -> str:
    async with sessions() as session, session.begin():
        return (await service.redeem_points(session, "m-1", "BONUS", amount, "receipt:pay", "")).entry.entry_id


async def reverse(sessions: async_sessionmaker[AsyncSession], entry_id: str, amount: int = 0) -> Balance:
    async with sessions() as session, session.begin():
        return (await service.reverse_entry(session, entry_id, amount, "return:1")).balance


async def conserved(sessions: async_sessionmaker[AsyncSession]) -> Balance:
    """The balance, after checking that the entries add up to it."""
    async with sessions() as session:
        balance = await service.get_balance(session, "m-1", "BONUS")
        total = await session.scalar(select(func.coalesce(func.sum(store.EntryRow.amount), 0)))
    assert total == balance.active + balance.pending - balance.negative, "entries must sum to the balance"
    return balance


async def test_earned_points_are_taken_back_pro_rata_and_never_twice(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        earned = await accrue(sessions, 1000)
        assert (await reverse(sessions, earned, 300)).active == 700  # three tenths of the lines returned
        assert (await reverse(sessions, earned)).active == 0  # the rest
        with pytest.raises(DomainError) as again:
            await reverse(sessions, earned, 1)
        assert again.value.reason == "ALREADY_REVERSED"
        await conserved(sessions)


async def test_taking_back_spent_points_leaves_a_negative_balance_the_next_accrual_repays(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        earned = await accrue(sessions, 500)
        await redeem(sessions, 400)
        after_return = await reverse(sessions, earned)
        assert (after_return.active, after_return.negative, after_return.available) == (0, 400, 0)
        await conserved(sessions)
        await accrue(sessions, 1000)
        repaid = await conserved(sessions)
        assert (repaid.active, repaid.negative, repaid.available) == (600, 0, 600)


async def test_spent_points_go_back_into_the_lots_that_paid_and_into_an_expired_lot_expired(
    database_url: str,
) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        await accrue(sessions, 100, timedelta(seconds=1.5))
        await accrue(sessions, 300, timedelta(days=100))
        paid = await redeem(sessions, 250)  # 100 from the short lot, 150 from the long one
        assert (await reverse(sessions, paid, 50)).active == 200, "the longest-lived points come back first"
        await asyncio.sleep(1.6)
        await jobs.expire_lots(sessions, LedgerMetrics.create(CollectorRegistry()))  # the short lot's expiry written
        back = await reverse(sessions, paid)  # 100 more to the long lot, 100 to the expired one
        assert back.active == 300
        balance = await conserved(sessions)
        assert balance.active == 300
        with pytest.raises(DomainError) as more:
            await reverse(sessions, paid, 1)
        assert more.value.reason == "ALREADY_REVERSED"


async def test_reversal_over_grpc_is_idempotent_and_refuses_what_it_cannot_undo(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        earned = await stub.AccruePoints(
            pb.AccruePointsRequest(request_id="a1", holder_id="member-1", amount=800, source=pb.ACCRUAL_SOURCE_RECEIPT)
        )
        undo = pb.ReverseOperationRequest(request_id="ret-1", entry_id=earned.entry.entry_id, amount=200)
        first = await stub.ReverseOperation(undo)
        assert (first.entry.kind, first.entry.amount, first.balance.active) == (pb.ENTRY_KIND_REVERSAL, -200, 600)
        assert await stub.ReverseOperation(undo) == first, "a retried return applies once"
        for request, reason in [
            (pb.ReverseOperationRequest(request_id="ret-2", entry_id="nope"), "ENTRY_NOT_FOUND"),
            (pb.ReverseOperationRequest(request_id="ret-3", entry_id=first.entry.entry_id), "ENTRY_NOT_REVERSIBLE"),
            (
                pb.ReverseOperationRequest(request_id="ret-4", entry_id=earned.entry.entry_id, amount=601),
                "REVERSAL_EXCEEDS_OPERATION",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ReverseOperation(request)
            assert read_remote_error(refused.value).reason == reason
