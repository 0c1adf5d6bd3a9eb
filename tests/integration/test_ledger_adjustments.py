"""Manual adjustments by staff through the real accounts service, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import read_remote_error
from services.accounts import store
from tests.integration.test_accounts_store import accounts_stub, all_entries
from tests.integration.test_ledger_holds import balance, credit, hold, refusal

if TYPE_CHECKING:
    pass


def adjust(
    key: str, amount: int, actor: str = "staff-7", reason: str = "goodwill: late delivery"
) -> pb.AdjustPointsRequest:
    return pb.AdjustPointsRequest(
        request_id=key, holder_id="member-1", amount=amount, actor=actor, reason=reason, member_id="member-1"
    )


@asynccontextmanager
async def tables(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A second connection to the service's database, to read its audit trail and outbox."""
    engine = db.create_engine(database_url)
    try:
        yield db.create_session_factory(engine)
    finally:
        await engine.dispose()


async def payloads(sessions: async_sessionmaker[AsyncSession], event_type: str) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(select(store.outbox.c.payload).where(store.outbox.c.event_type == event_type))
    return [row[0] for row in rows]


async def test_staff_credit_and_debit_are_audited_announced_and_applied_once(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        credited = await stub.AdjustPoints(adjust("ticket-1:credit", 500))
        assert (credited.entry.kind, credited.entry.amount) == (pb.ENTRY_KIND_ADJUSTMENT, 500)
        assert credited.entry.reason == "goodwill: late delivery"
        assert credited.balance.available == 500
        assert await stub.AdjustPoints(adjust("ticket-1:credit", 500)) == credited, "a retry answers the first"
        changed = adjust("ticket-1:credit", 501)
        assert await refusal(stub.AdjustPoints(changed)) == "IDEMPOTENCY_KEY_REUSED"

        debited = await stub.AdjustPoints(adjust("ticket-2:debit", -120, actor="staff-9", reason="duplicate receipt"))
        assert (debited.entry.amount, debited.balance.available) == (-120, 380)

        assert [entry.amount for entry in await all_entries(stub)] == [-120, 500]
        async with sessions() as session:
            audit = (
                await session.execute(
                    select(store.AdjustmentRow.amount, store.AdjustmentRow.actor, store.AdjustmentRow.reason).order_by(
                        store.AdjustmentRow.amount
                    )
                )
            ).all()
        assert [tuple(row) for row in audit] == [
            (-120, "staff-9", "duplicate receipt"),
            (500, "staff-7", "goodwill: late delivery"),
        ]
        events = sorted(await payloads(sessions, "points.adjusted"), key=lambda payload: payload["amount"])
        assert [(e["amount"], e["actor"], e["reason"], e["member_id"], e["holder_id"]) for e in events] == [
            (-120, "staff-9", "duplicate receipt", "member-1", "member-1"),
            (500, "staff-7", "goodwill: late delivery", "member-1", "member-1"),
        ]


async def test_a_debit_beyond_what_is_available_is_refused_and_writes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        assert await refusal(stub.AdjustPoints(adjust("d0", -1))) == "INSUFFICIENT_POINTS", "no account yet"
        await credit(stub, "r1", 300)
        await stub.PlaceHold(hold("h1", 250))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AdjustPoints(adjust("d1", -51))
        remote = read_remote_error(refused.value)
        assert (remote.code, remote.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
        assert (await stub.AdjustPoints(adjust("d2", -50))).balance.available == 0, "held points are not debited"
        assert [entry.amount for entry in await all_entries(stub)] == [-50, 300]


async def test_an_adjustment_needs_an_actor_a_reason_and_an_amount(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AdjustPoints(adjust("bad", 0, actor=" ", reason=""))
        remote = read_remote_error(refused.value)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {violation.field for violation in remote.violations} == {"amount", "actor", "reason"}
        assert await all_entries(stub) == []


async def test_a_credit_repays_a_debt_first_and_an_adjustment_is_not_reversible(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        earned = await stub.AccruePoints(
            pb.AccruePointsRequest(
                request_id="a1", holder_id="member-1", amount=100, source=pb.ACCRUAL_SOURCE_RECEIPT, source_ref="a1"
            )
        )
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="p1", holder_id="member-1", amount=80))
        owed = await stub.ReverseOperation(pb.ReverseOperationRequest(request_id="x1", entry_id=earned.entry.entry_id))
        assert owed.balance.negative == 80
        repaid = await stub.AdjustPoints(adjust("c1", 100))
        assert (repaid.balance.negative, repaid.balance.available) == (0, 20)
        undo = pb.ReverseOperationRequest(request_id="x2", entry_id=repaid.entry.entry_id)
        assert await refusal(stub.ReverseOperation(undo)) == "ENTRY_NOT_REVERSIBLE"
        final = await balance(stub)
        assert sum(entry.amount for entry in await all_entries(stub)) == final.active - final.negative


async def test_parallel_debits_and_redemptions_never_overdraw(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await credit(stub, "r1", 100)
        await credit(stub, "r2", 100)
        calls: list[Any] = []
        for index in range(25):
            calls.append(stub.AdjustPoints(adjust(f"d{index}", -9)))
            calls.append(
                stub.RedeemPoints(pb.RedeemPointsRequest(request_id=f"p{index}", holder_id="member-1", amount=9))
            )
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        done = [o for o in outcomes if isinstance(o, pb.AdjustPointsResponse | pb.RedeemPointsResponse)]
        refused = {read_remote_error(o).reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
        assert len(done) == 200 // 9 and refused == {"INSUFFICIENT_POINTS"}, outcomes
        final = await balance(stub)
        assert final.active == 200 - 9 * len(done)
        assert sum(entry.amount for entry in await all_entries(stub)) == final.active


async def test_the_member_is_named_in_accrual_and_redemption_events(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        accrue = pb.AccruePointsRequest(
            request_id="a1",
            holder_id="household-1",
            member_id="member-2",
            amount=100,
            source=pb.ACCRUAL_SOURCE_RECEIPT,
            source_ref="a1",
        )
        await stub.AccruePoints(accrue)
        placed = await stub.PlaceHold(
            pb.PlaceHoldRequest(request_id="h1", holder_id="household-1", member_id="member-3", amount=30)
        )
        await stub.CaptureHold(pb.CaptureHoldRequest(request_id="c1", hold_id=placed.hold.hold_id))
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="p1", holder_id="household-1", amount=5))
        assert [(p["holder_id"], p["member_id"]) for p in await payloads(sessions, "points.accrued")] == [
            ("household-1", "member-2")
        ]
        redeemed = sorted(await payloads(sessions, "points.redeemed"), key=lambda payload: payload["amount"])
        assert [(p["amount"], p.get("member_id")) for p in redeemed] == [(5, None), (30, "member-3")]
