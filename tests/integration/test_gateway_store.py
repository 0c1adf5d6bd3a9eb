"""The gateway's durable receipt records against real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.gateway import store
from services.gateway.domain import ChequeState, ReceiptKey
from tests import infra


def cheque(number: str, minutes_ago: int = 10) -> store.ChequeRow:
    return store.ChequeRow(
        terminal_id="T1",
        receipt_number=number,
        receipt_hash="h" * 64,
        member_id="m-1",
        holder_id="m-1",
        points=500,
        response=b"\x08\x02",
        state=ChequeState.COMMITTED.value,
        attempts=0,
        last_error="",
        committed_at=utcnow() - timedelta(minutes=minutes_ago),
        completed_at=None,
    )


async def test_a_receipt_is_recorded_once_per_terminal_and_number(database_url: str) -> None:
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            assert await store.add_cheque_if_new(session, cheque("1"))
        retry = cheque("1")
        retry.points = 999
        async with sessions() as session, session.begin():
            assert not await store.add_cheque_if_new(session, retry)
        async with sessions() as session:
            found = await store.find_cheque(session, ReceiptKey("T1", "1"))
        assert found is not None and found.points == 500 and found.committed_at.tzinfo is not None


async def test_unfinished_receipts_are_found_oldest_first_until_completed(database_url: str) -> None:
    async with infra.migrated_engine("gateway", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await store.add_cheque_if_new(session, cheque("new", minutes_ago=0))
            await store.add_cheque_if_new(session, cheque("old", minutes_ago=30))
            await store.add_cheque_if_new(session, cheque("older", minutes_ago=60))
        cutoff = utcnow() - timedelta(minutes=1)
        async with sessions() as session:
            pending = await store.unfinished_cheques(session, cutoff, limit=10)
        assert [key.receipt_number for key in pending] == ["older", "old"], "a fresh commit is left to its caller"

        async with sessions() as session, session.begin():
            await store.record_attempt(session, ReceiptKey("T1", "old"), "UPSTREAM_UNAVAILABLE: accounts down")
            await store.mark_completed(session, ReceiptKey("T1", "older"), utcnow())
        async with sessions() as session:
            pending = await store.unfinished_cheques(session, cutoff, limit=10)
            old = await store.find_cheque(session, ReceiptKey("T1", "old"))
            older = await store.find_cheque(session, ReceiptKey("T1", "older"))
        assert [key.receipt_number for key in pending] == ["old"]
        assert old is not None and (old.attempts, old.last_error) == (1, "UPSTREAM_UNAVAILABLE: accounts down")
        assert older is not None and older.state == ChequeState.COMPLETED.value and older.completed_at is not None
