"""Mass accruals and deductions: uploaded in chunks, applied by the background job exactly
once per item, through crashes and several replicas, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
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
from tests.integration.test_ledger_currencies import configured_stub
from tests.integration.test_ledger_holds import refusal
from tests.integration.test_ledger_limits import LIMITED, receipt

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub

CURRENCY = "BONUS"


def items(*pairs: tuple[str, int]) -> list[pb.MassOperationItem]:
    return [pb.MassOperationItem(holder_id=holder_id, amount=amount) for holder_id, amount in pairs]


async def finished(stub: AccountsServiceAsyncStub, operation_id: str) -> pb.MassOperation:
    """The operation once the service's own background job has finished it."""
    for _ in range(600):
        operation = (await stub.GetMassOperation(pb.GetMassOperationRequest(operation_id=operation_id))).operation
        if operation.status in (pb.MASS_OPERATION_STATUS_DONE, pb.MASS_OPERATION_STATUS_CANCELLED):
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
        assert await payloads(sessions, "points.adjusted") == [], "an accrual announces chunks, not items"
        chunks = await payloads(sessions, "points.mass_applied")
        assert [(e["operation_id"], e["applied"], e["points"], e["actor"]) for e in chunks] == [
            (operation_id, 4, 605, "marketing-1")
        ]
        async with sessions() as session:
            written = (await session.execute(select(store.EntryRow.source_ref, store.EntryRow.reason))).tuples()
            refs = {ref for ref, reason in written if reason == "campaign: spring bonus"}
        assert refs == {f"mass:{operation_id}:{index}" for index in range(4)}, "an entry per item, with the reason"

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
            await jobs.apply_mass_operations(sessions, chunk=4, workers=1)
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


async def test_a_mass_accrual_honours_the_daily_accrual_limit_and_records_what_it_clips(
    tmp_path: Path, database_url: str
) -> None:
    """BONUS refuses over 1,000 points a day, CLIP clips at 800 a day (500 per receipt):
    mass items count against the same day as receipts. Chunks run in parallel, so the items
    are chosen for an outcome that does not depend on which chunk applies first."""
    async with configured_stub(tmp_path, database_url, LIMITED) as stub, tables(database_url) as sessions:
        await stub.AccruePoints(receipt("r1", 900))
        refuse = pb.CreateMassOperationRequest(
            request_id="refuse",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            currency="BONUS",
            actor="marketing-1",
            reason="bonus",
            items=items(("member-1", 200), ("m-2", 600), ("m-2", 400), ("m-4", 1001)),
            start=True,
        )
        refused = await finished(stub, (await stub.CreateMassOperation(refuse)).operation.operation_id)
        assert (refused.applied, refused.failed, refused.capped_points) == (2, 2, 0)
        assert [(f.index, f.reason) for f in refused.failures] == [
            (0, "ACCRUAL_LIMIT_REACHED"),
            (3, "ACCRUAL_LIMIT_REACHED"),
        ]
        assert await available(stub, "m-2") == 1000
        assert await refusal(stub.AccruePoints(receipt("r2", 101))) == "ACCRUAL_LIMIT_REACHED"

        await stub.AccruePoints(receipt("c1", 700, "CLIP"))
        for key, amount in (("c2", 500), ("c3", 300)):
            full = receipt(key, amount, "CLIP")
            full.holder_id = "m-5"
            await stub.AccruePoints(full)
        clip = pb.CreateMassOperationRequest(
            request_id="clip",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            currency="CLIP",
            actor="marketing-1",
            reason="bonus",
            items=items(("member-1", 400), ("m-3", 1000), ("m-5", 5)),
            start=True,
        )
        clipped = await finished(stub, (await stub.CreateMassOperation(clip)).operation.operation_id)
        assert (clipped.applied, clipped.failed, clipped.capped_points) == (2, 1, 100 + 200)
        assert [(f.index, f.reason) for f in clipped.failures] == [(2, "ACCRUAL_LIMIT_REACHED")], "clipped to nothing"
        balances = [
            (await stub.GetBalance(pb.GetBalanceRequest(holder_id=holder, currency="CLIP"))).balance.available
            for holder in ("member-1", "m-3", "m-5")
        ]
        assert balances == [500 + 300, 800, 800]
        async with sessions() as session:
            reasons = set(
                await session.scalars(select(store.EntryRow.reason).where(store.EntryRow.source_ref.like("mass:%")))
            )
        assert reasons == {
            "bonus",
            "bonus; 100 of 400 points over the accrual limit not credited",
            "bonus; 200 of 1000 points over the accrual limit not credited",
        }
        chunks = await payloads(sessions, "points.mass_applied")
        announced: Counter[tuple[str, str]] = Counter()
        for event in chunks:
            announced[(event["currency"], "points")] += event["points"]
            announced[(event["currency"], "capped")] += event["capped"]
        assert announced == Counter({("BONUS", "points"): 1000, ("CLIP", "points"): 1100, ("CLIP", "capped"): 300})


async def test_a_cancel_keeps_what_was_applied_and_is_refused_once_finished(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        create = pb.CreateMassOperationRequest(
            request_id="draft",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            actor="marketing-1",
            reason="bonus",
            items=items(("m-1", 10), ("m-2", 20), ("m-3", 30)),
        )
        operation_id = (await stub.CreateMassOperation(create)).operation.operation_id
        cancel = pb.CancelMassOperationRequest(request_id="cancel-1", operation_id=operation_id)
        cancelled = (await stub.CancelMassOperation(cancel)).operation
        assert (cancelled.status, cancelled.applied, cancelled.cancelled) == (pb.MASS_OPERATION_STATUS_CANCELLED, 0, 3)
        assert (await stub.CancelMassOperation(cancel)).operation == cancelled, "a retry answers the first result"
        again = pb.CancelMassOperationRequest(request_id="cancel-2", operation_id=operation_id)
        assert await refusal(stub.CancelMassOperation(again)) == "MASS_OPERATION_FINISHED"
        start = pb.StartMassOperationRequest(request_id="start", operation_id=operation_id)
        assert await refusal(stub.StartMassOperation(start)) == "MASS_OPERATION_STARTED"
        await asyncio.sleep(1.5)
        assert [await available(stub, holder) for holder in ("m-1", "m-2", "m-3")] == [0, 0, 0]

        run = pb.CreateMassOperationRequest(
            request_id="run",
            kind=pb.MASS_OPERATION_KIND_ACCRUAL,
            actor="marketing-1",
            reason="bonus",
            items=items(("m-1", 10)),
            start=True,
        )
        done = await finished(stub, (await stub.CreateMassOperation(run)).operation.operation_id)
        late = pb.CancelMassOperationRequest(request_id="late", operation_id=done.operation_id)
        assert await refusal(stub.CancelMassOperation(late)) == "MASS_OPERATION_FINISHED"
        assert await available(stub, "m-1") == 10

        unknown = pb.CancelMassOperationRequest(request_id="unknown", operation_id="no-such-operation")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.CancelMassOperation(unknown)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert await refusal(stub.CancelMassOperation(unknown)) == "MASS_OPERATION_NOT_FOUND"
        assert await refusal(stub.CancelMassOperation(pb.CancelMassOperationRequest(request_id="x"))) == (
            "INVALID_ARGUMENT"
        )


async def test_no_item_is_applied_after_a_cancel_commits_while_the_job_runs(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers apply slowed-down chunks; the cancel lands mid-job. What it reports as
    applied is final: the chunks in flight finished before it, none started after it."""
    pairs = [(f"h-{index}", 1) for index in range(400)]
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            view = await service.create_mass_operation(
                session, MassOperationKind.ACCRUAL, CURRENCY, "ops", "bonus", None, pairs, start=True
            )
        operation_id = view.operation.operation_id
        credit = store.add_mass_credits

        async def slowly(*args: Any) -> None:
            await asyncio.sleep(0.05)
            await credit(*args)

        monkeypatch.setattr(store, "add_mass_credits", slowly)
        job = asyncio.create_task(jobs.apply_mass_operations(sessions, chunk=10, workers=2))
        while True:
            async with sessions() as session:
                if (await service.mass_operation_view(session, operation_id)).applied >= 60:
                    break
            await asyncio.sleep(0.01)
        async with sessions() as session, session.begin():
            at_cancel = await service.cancel_mass_operation(session, operation_id)
        handled = await job
        refs, _ = await ledger(sessions)
        async with sessions() as session:
            after = await service.mass_operation_view(session, operation_id)
        assert 60 <= at_cancel.applied < 400, "the cancel came mid-job"
        assert handled == at_cancel.applied, "no chunk ran after the cancel"
        assert sum(refs.values()) == at_cancel.applied == after.applied
        assert (after.operation.status, after.cancelled) == ("cancelled", 400 - at_cancel.applied)
        assert await jobs.apply_mass_operations(sessions) == 0, "a cancelled operation is never resumed"
