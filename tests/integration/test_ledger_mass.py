"""Mass accruals and deductions: uploaded in chunks, applied by the background job exactly
once per item, through crashes and several replicas, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime import db
from services.accounts import jobs, service, store
from services.accounts.domain import MassOperationKind
from tests import infra
from tests.integration.test_accounts_store import accounts_stub, accrue_request
from tests.integration.test_ledger_adjustments import payloads, tables
from tests.integration.test_ledger_holds import refusal

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub

CURRENCY = "BONUS"


def items(*pairs: tuple[str, int]) -> list[pb.MassOperationItem]:
    return [pb.MassOperationItem(holder_id=holder_id, amount=amount) for holder_id, amount in pairs]


async def finished(stub: AccountsServiceAsyncStub, operation_id: str) -> pb.MassOperation:
    """The operation once the service's own background job has finished it."""
    for _ in range(600):
        operation = (await stub.GetMassOperation(pb.GetMassOperationRequest(operation_id=operation_id))).operation
        if operation.status == pb.MASS_OPERATION_STATUS_DONE:
            return operation
        await asyncio.sleep(0.1)
    raise AssertionError(f"mass operation {operation_id} never finished")


async def available(stub: AccountsServiceAsyncStub, holder_id: str) -> int:
    return int((await stub.GetBalance(pb.GetBalanceRequest(holder_id=holder_id))).balance.available)


async def test_an_uploaded_accrual_and_a_deduction_run_in_the_background(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        create = pb.CreateMassOperationRequest(
            request_id="bonus",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            actor="marketing-1",
            reason="campaign: spring bonus",
            items=items(("m-1", 100), ("m-2", 200)),
        )
        draft = (await stub.CreateMassOperation(create)).operation
        assert (draft.status, draft.total) == (pb.MASS_OPERATION_STATUS_DRAFT, 2)
        operation_id = draft.operation_id
        chunk = pb.AddMassOperationItemsRequest(
            request_id="bonus:chunk:2", operation_id=operation_id, items=items(("m-1", 5), ("m-3", 300))
        )
        assert (await stub.AddMassOperationItems(chunk)).operation.total == 4
        assert (await stub.AddMassOperationItems(chunk)).operation.total == 4, "a retried chunk is added once"
        await asyncio.sleep(1.5)
        assert await available(stub, "m-1") == 0, "a draft applies nothing"
        start = pb.StartMassOperationRequest(request_id="bonus:start", operation_id=operation_id)
        assert (await stub.StartMassOperation(start)).operation.status in (
            pb.MASS_OPERATION_STATUS_RUNNING,
            pb.MASS_OPERATION_STATUS_DONE,
        )
        late = pb.AddMassOperationItemsRequest(request_id="late", operation_id=operation_id, items=items(("m-9", 1)))
        assert await refusal(stub.AddMassOperationItems(late)) == "MASS_OPERATION_STARTED"

        done = await finished(stub, operation_id)
        assert (done.total, done.applied, done.failed) == (4, 4, 0)
        assert [await available(stub, holder) for holder in ("m-1", "m-2", "m-3")] == [105, 200, 300]
        events = await payloads(sessions, "points.adjusted")
        assert sorted((e["holder_id"], e["amount"], e["actor"]) for e in events) == [
            ("m-1", 5, "marketing-1"),
            ("m-1", 100, "marketing-1"),
            ("m-2", 200, "marketing-1"),
            ("m-3", 300, "marketing-1"),
        ]
        async with sessions() as session:
            audited = await session.scalar(
                select(func.count()).select_from(store.AdjustmentRow).where(store.AdjustmentRow.actor == "marketing-1")
            )
            refs = set(await session.scalars(select(store.EntryRow.source_ref)))
        assert audited == 4
        assert refs == {f"mass:{operation_id}:{index}" for index in range(4)}

        await stub.BlockAccount(pb.BlockAccountRequest(request_id="b", holder_id="m-3", actor="fraud", reason="x"))
        deduct = pb.CreateMassOperationRequest(
            request_id="claw-back",
            kind=pb.MASS_OPERATION_KIND_DEDUCTION,
            actor="finance-2",
            reason="duplicate bonus",
            items=items(("m-1", 105), ("m-2", 201), ("m-3", 50), ("m-4", 1)),
            start=True,
        )
        deducted = await finished(stub, (await stub.CreateMassOperation(deduct)).operation.operation_id)
        assert (deducted.total, deducted.applied, deducted.failed) == (4, 2, 2)
        assert [(f.index, f.holder_id, f.reason) for f in deducted.failures] == [
            (1, "m-2", "INSUFFICIENT_POINTS"),
            (3, "m-4", "INSUFFICIENT_POINTS"),
        ]
        assert [await available(stub, holder) for holder in ("m-1", "m-2", "m-3")] == [0, 200, 250]

        blocked = pb.CreateMassOperationRequest(
            request_id="to-blocked",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            actor="marketing-1",
            reason="bonus",
            items=items(("m-3", 1), ("m-1", 1)),
            start=True,
        )
        refused = await finished(stub, (await stub.CreateMassOperation(blocked)).operation.operation_id)
        assert [(f.index, f.reason) for f in refused.failures] == [(0, "ACCOUNT_BLOCKED")]
        assert refused.applied == 1


async def test_a_mass_operation_needs_a_kind_an_actor_a_reason_and_sound_items(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await stub.AccruePoints(accrue_request("r1", 10))
        for request in (
            pb.CreateMassOperationRequest(request_id="a", actor="x", reason="y", items=items(("m-1", 1))),
            pb.CreateMassOperationRequest(request_id="b", kind=pb.MASS_OPERATION_KIND_ACCRUAL, reason="y"),
            pb.CreateMassOperationRequest(request_id="c", kind=pb.MASS_OPERATION_KIND_ACCRUAL, actor="x"),
            pb.CreateMassOperationRequest(
                request_id="d", kind=pb.MASS_OPERATION_KIND_ACCRUAL, actor="x", reason="y", items=items(("m-1", 0))
            ),
            pb.CreateMassOperationRequest(
                request_id="e", kind=pb.MASS_OPERATION_KIND_ACCRUAL, actor="x", reason="y", items=items(("", 1))
            ),
            pb.CreateMassOperationRequest(
                request_id="f",
                kind=pb.MASS_OPERATION_KIND_ACCRUAL,
                actor="x",
                reason="y",
                items=items(*[("m-1", 1)] * 10_001),
            ),
        ):
            assert await refusal(stub.CreateMassOperation(request)) == "INVALID_ARGUMENT"
        missing = pb.GetMassOperationRequest(operation_id="nope")
        assert await refusal(stub.GetMassOperation(missing)) == "MASS_OPERATION_NOT_FOUND"


def holders_of(count: int) -> list[tuple[str, int]]:
    """Items over fewer holders than items, so some holders get several in one chunk."""
    return [(f"h-{index % 7}", index + 1) for index in range(count)]


async def ledger(sessions: async_sessionmaker[AsyncSession]) -> tuple[Counter[str], dict[str, int]]:
    """How many entries each source reference has, and each holder's points."""
    async with sessions() as session:
        refs = Counter(await session.scalars(select(store.EntryRow.source_ref)))
        totals = await session.execute(
            select(store.AccountRow.holder_id, func.sum(store.LotRow.remaining))
            .join(store.LotRow, store.LotRow.account_id == store.AccountRow.account_id)
            .group_by(store.AccountRow.holder_id)
        )
        return refs, {holder: int(total) for holder, total in totals.all()}


def expected_totals(pairs: list[tuple[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for holder, amount in pairs:
        totals[holder] = totals.get(holder, 0) + amount
    return totals


async def test_a_job_that_crashes_midway_resumes_and_applies_each_item_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = holders_of(25)
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            view = await service.create_mass_operation(
                session, MassOperationKind.ACCRUAL, CURRENCY, "ops", "bonus", None, pairs, start=True
            )
        operation_id = view.operation.operation_id

        settle = store.settle_mass_items
        calls = 0

        async def crash_on_the_third_chunk(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("the replica died after writing the ledger rows, before committing")
            await settle(*args)

        monkeypatch.setattr(store, "settle_mass_items", crash_on_the_third_chunk)
        with pytest.raises(RuntimeError):
            await jobs.apply_mass_operations(sessions, chunk=4)
        refs, _ = await ledger(sessions)
        assert sum(refs.values()) == 8, "two chunks committed, the third rolled back"
        async with sessions() as session:
            midway = await service.mass_operation_view(session, operation_id)
        assert (midway.applied, midway.failed, midway.operation.status) == (8, 0, "running")

        monkeypatch.setattr(store, "settle_mass_items", settle)
    # A restarted replica: a new engine over the same database.
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        assert await jobs.apply_mass_operations(sessions, chunk=4) == 25 - 8
        refs, totals = await ledger(sessions)
        assert refs == Counter({f"mass:{operation_id}:{index}": 1 for index in range(25)})
        assert totals == expected_totals(pairs)
        async with sessions() as session:
            done = await service.mass_operation_view(session, operation_id)
        assert (done.applied, done.failed, done.operation.status) == (25, 0, "done")
        assert await jobs.apply_mass_operations(sessions, chunk=4) == 0, "nothing is applied twice"


async def test_replicas_running_the_job_at_once_apply_each_item_once(database_url: str) -> None:
    accrual_pairs = holders_of(60)
    deduction_pairs = [(f"h-{index % 7}", 3) for index in range(30)]
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_mass_operation(
                session, MassOperationKind.ACCRUAL, CURRENCY, "ops", "bonus", None, accrual_pairs, start=True
            )
        async with sessions() as session, session.begin():
            await service.create_mass_operation(
                session, MassOperationKind.DEDUCTION, CURRENCY, "ops", "fix", None, deduction_pairs, start=True
            )
        handled = await asyncio.gather(*(jobs.apply_mass_operations(sessions, chunk=5) for _ in range(3)))
        assert sum(handled) == 90
        refs, totals = await ledger(sessions)
        assert set(refs.values()) == {1} and len(refs) == 90
        expected = expected_totals(accrual_pairs)
        for holder, amount in deduction_pairs:
            expected[holder] -= amount
        assert totals == expected
