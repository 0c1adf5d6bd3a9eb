"""The ledger's use cases against real SQLite and PostgreSQL, and AccruePoints over real gRPC."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.runtime import db
from loyalty.runtime.errors import Violations, read_remote_error
from loyalty.runtime.idempotency import run_idempotent
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.accounts import service, store
from services.accounts.domain import Accrual, AccrualSource, Balance
from tests import infra

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub

DAY = timedelta(days=1)


def accrual(amount: int, holder_id: str = "member-1", currency: str = "BONUS", **changes: object) -> Accrual:
    values: dict[str, object] = {
        "holder_id": holder_id,
        "currency": currency,
        "amount": amount,
        "source": AccrualSource.RECEIPT,
        "source_ref": f"receipt:{amount}",
        "reason": "",
        "activate_at": utcnow() - timedelta(seconds=1),
        "expire_at": utcnow() + 365 * DAY,
    }
    values.update(changes)
    return Accrual(**values)  # type: ignore[arg-type]


async def count(sessions: async_sessionmaker[AsyncSession], table: type[store.Base]) -> int:
    async with sessions() as session:
        counted = await session.scalar(select(func.count()).select_from(table))
    assert counted is not None
    return counted


async def test_accrued_points_are_in_the_balance_and_the_outbox(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            first = await service.accrue_points(session, accrual(120))
        assert first.balance == Balance("member-1", "BONUS", active=120, pending=0, held=0)
        assert (first.entry.amount, first.entry.kind, first.entry.source_ref) == (120, "accrual", "receipt:120")
        async with sessions() as session, session.begin():
            second = await service.accrue_points(session, accrual(5))
            await service.accrue_points(session, accrual(1_000, currency="MILES"))
        assert second.balance.active == 125
        async with sessions() as session:
            bonus = await service.get_balance(session, "member-1", "BONUS")
            assert (bonus.active, bonus.pending, bonus.held, bonus.negative) == (125, 0, 0, 0)
            assert sum(expiry.amount for expiry in bonus.next_expiries) == 125, "both lots expire in a year"
            assert (await service.get_balance(session, "member-1", "MILES")).active == 1_000
            assert await service.get_balance(session, "member-2", "BONUS") == Balance("member-2", "BONUS", 0, 0, 0)
            events = (await session.execute(select(store.outbox.c.event_type, store.outbox.c.payload))).all()
        assert [event_type for event_type, _ in events] == ["points.accrued"] * 3
        assert sorted(payload["amount"] for _, payload in events) == [5, 120, 1_000]
        assert {payload["entry_id"] for _, payload in events} >= {first.entry.entry_id, second.entry.entry_id}
        assert await count(sessions, store.AccountRow) == 2, "one account per holder and currency"


async def test_delayed_and_expired_lots_are_not_active(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        now = utcnow()
        async with sessions() as session, session.begin():
            await service.accrue_points(session, accrual(1, activate_at=now - DAY, expire_at=None))
            delayed = await service.accrue_points(
                session, accrual(20, activate_at=now + 14 * DAY, expire_at=now + 400 * DAY)
            )
            await service.accrue_points(session, accrual(300, activate_at=now - 30 * DAY, expire_at=now - DAY))
        assert delayed.balance == Balance("member-1", "BONUS", active=1, pending=20, held=0)
        async with sessions() as session:
            balance = await service.get_balance(session, "member-1", "BONUS")
        assert (balance.active, balance.pending, balance.available) == (1, 20, 1), "the expired 300 count nowhere"


@pytest.mark.parametrize(("entries", "size"), [(8, 3), (6, 3), (5, 1), (4, 10)])
async def test_entries_are_listed_newest_first_each_exactly_once(database_url: str, entries: int, size: int) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        base = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
        async with sessions() as session, session.begin():
            account = await store.open_account(session, "member-1", "BONUS", base)
            other = await store.open_account(session, "member-2", "BONUS", base)
            for index in range(entries):
                # Pairs of entries share a timestamp, so the entry id has to break the tie.
                await store.add_accrual(session, account, accrual(index + 1), base + timedelta(seconds=index // 2))
            await store.add_accrual(session, other, accrual(999, holder_id="member-2"), base)

        listed: list[store.EntryRow] = []
        pages = 0
        after: Cursor | None = None
        while True:
            async with sessions() as session:
                page = await service.list_entries(session, "member-1", "BONUS", size, after)
            pages += 1
            assert len(page.entries) <= size
            listed.extend(page.entries)
            if page.next_cursor is None:
                break
            assert len(page.entries) == size, "only the last page may be short"
            violations = Violations()
            after = Cursor.decode(page.next_cursor.encode(), "member-1/BONUS", violations)
            assert violations.items == []
            assert pages <= entries, "the listing does not end"

        assert pages == max(1, -(-entries // size)), "no empty page after the last full one"
        ids = [entry.entry_id for entry in listed]
        assert len(ids) == len(set(ids)) == entries
        assert sorted(entry.amount for entry in listed) == list(range(1, entries + 1))
        keys = [(entry.created_at, entry.entry_id) for entry in listed]
        assert keys == sorted(keys, reverse=True), "newest first, ties by entry id"
        assert listed[0].created_at == base + timedelta(seconds=(entries - 1) // 2)


async def test_listing_entries_of_an_unknown_holder_is_empty(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session:
            page = await service.list_entries(session, "nobody", "BONUS", 10, None)
        assert (page.entries, page.next_cursor) == ([], None)


@asynccontextmanager
async def accounts_stub(tmp_path: Path, database_url: str) -> AsyncIterator[AccountsServiceAsyncStub]:
    settings = infra.suite_settings(tmp_path)
    settings.accounts.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("accounts",)),
        grpc.aio.insecure_channel(settings.address("accounts")) as channel,
    ):
        yield AccountsServiceStub(channel)


def accrue_request(request_id: str, amount: int = 100, holder_id: str = "member-1") -> pb.AccruePointsRequest:
    return pb.AccruePointsRequest(
        request_id=request_id,
        holder_id=holder_id,
        amount=amount,
        source=pb.ACCRUAL_SOURCE_RECEIPT,
        source_ref=f"receipt:{request_id}",
    )


async def all_entries(stub: AccountsServiceAsyncStub, holder_id: str = "member-1") -> list[pb.Entry]:
    entries: list[pb.Entry] = []
    token = ""
    while True:
        page = await stub.ListEntries(pb.ListEntriesRequest(holder_id=holder_id, page_size=7, page_token=token))
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def test_a_retried_accrual_credits_once(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        request = accrue_request("cheque:pos-1:0001:accrue", amount=250)
        first = await stub.AccruePoints(request)
        assert first.balance == pb.Balance(holder_id="member-1", currency="BONUS", active=250, available=250)
        assert (first.entry.amount, first.entry.kind, first.entry.currency) == (250, pb.ENTRY_KIND_ACCRUAL, "BONUS")

        again = await stub.AccruePoints(request)
        assert again == first, "a retry answers the first result, the same entry"

        changed = pb.AccruePointsRequest()
        changed.CopyFrom(request)
        changed.amount = 260
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await stub.AccruePoints(changed)
        remote = read_remote_error(reused.value)
        assert (remote.code, remote.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED")

        balance = await stub.GetBalance(pb.GetBalanceRequest(holder_id="member-1"))
        assert balance.balance.active == 250
        assert [entry.entry_id for entry in await all_entries(stub)] == [first.entry.entry_id]


async def test_concurrent_accruals_credit_once_per_request_id(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        same = accrue_request("same-key", amount=7, holder_id="member-1")
        repeated = await asyncio.gather(*(stub.AccruePoints(same) for _ in range(20)))
        assert all(response == repeated[0] for response in repeated), "every duplicate answers the first result"
        distinct = await asyncio.gather(
            *(stub.AccruePoints(accrue_request(f"key-{i}", amount=7, holder_id="member-2")) for i in range(20))
        )
        assert len({response.entry.entry_id for response in distinct}) == 20

        one = await stub.GetBalance(pb.GetBalanceRequest(holder_id="member-1"))
        twenty = await stub.GetBalance(pb.GetBalanceRequest(holder_id="member-2"))
        assert (one.balance.active, twenty.balance.active) == (7, 140)
        assert len(await all_entries(stub, "member-1")) == 1
        entries = await all_entries(stub, "member-2")
        assert len(entries) == 20
        assert {entry.entry_id for entry in entries} == {response.entry.entry_id for response in distinct}
        assert sum(entry.amount for entry in entries) == twenty.balance.active, "entries add up to the balance"


async def test_invalid_accruals_are_refused_with_every_field(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        now = utcnow()
        bad = pb.AccruePointsRequest(
            request_id="bad-1",
            holder_id="member-1",
            amount=0,
            source=pb.ACCRUAL_SOURCE_STAFF,
            activate_time=to_timestamp(now),
            expire_time=to_timestamp(now - DAY),
        )
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.AccruePoints(bad)
        remote = read_remote_error(invalid.value)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in remote.violations] == ["amount", "expire_time", "reason"]
        balance = await stub.GetBalance(pb.GetBalanceRequest(holder_id="member-1"))
        assert balance.balance.active == 0


async def test_a_holder_id_longer_than_the_ledger_holds_is_invalid(tmp_path: Path, database_url: str) -> None:
    """BUG: holder_id is stored in a 64-character column but never checked for length. On
    PostgreSQL the insert fails and the client gets INTERNAL with no reason; on SQLite the
    id is stored. It must be INVALID_ARGUMENT naming holder_id (same for source_ref > 200
    and reason > 500 characters)."""
    async with accounts_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AccruePoints(accrue_request("long-holder", holder_id="m" * 65))
        remote = read_remote_error(refused.value)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in remote.violations] == ["holder_id"]


async def test_a_page_token_works_only_for_its_own_listing(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        for index in range(3):
            await stub.AccruePoints(accrue_request(f"m1-{index}", holder_id="member-1"))
            await stub.AccruePoints(accrue_request(f"m2-{index}", holder_id="member-2"))
        first = await stub.ListEntries(pb.ListEntriesRequest(holder_id="member-1", page_size=2))
        assert len(first.entries) == 2 and first.next_page_token
        naive = base64.urlsafe_b64encode(json.dumps(["member-1/BONUS", "2026-03-01T09:00:00", "x"]).encode())
        refusals = {
            "another holder": pb.ListEntriesRequest(holder_id="member-2", page_token=first.next_page_token),
            "another currency": pb.ListEntriesRequest(
                holder_id="member-1", currency="MILES", page_token=first.next_page_token
            ),
            "garbage": pb.ListEntriesRequest(holder_id="member-1", page_token="not a token"),
            "time without offset": pb.ListEntriesRequest(holder_id="member-1", page_token=naive.decode()),
        }
        for what, request in refusals.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListEntries(request)
            remote = read_remote_error(refused.value)
            assert (remote.code, [v.field for v in remote.violations]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                ["page_token"],
            ), what
        rest = await stub.ListEntries(
            pb.ListEntriesRequest(holder_id="member-1", page_size=2, page_token=first.next_page_token)
        )
        assert len(rest.entries) == 1 and not rest.next_page_token
        assert {e.entry_id for e in first.entries}.isdisjoint({e.entry_id for e in rest.entries})


async def test_bursts_of_first_accruals_never_fail(tmp_path: Path, database_url: str) -> None:
    """BUG on SQLite: concurrent first accruals of a holder race on the new account's unique
    constraint; each losing INSERT leaves its DBAPI cursor to the garbage collector, which
    finalises it on the event-loop thread, blocking on that connection's mutex while the
    connection busy-waits for SQLite's write lock. The whole loop freezes until the 10 s busy
    timeout and the waiting calls fail with INTERNAL ("database is locked")."""
    async with accounts_stub(tmp_path, database_url) as stub:
        for burst in range(15):
            holder = f"member-{burst}"
            outcomes = await asyncio.gather(
                *(stub.AccruePoints(accrue_request(f"{holder}-{i}", amount=5, holder_id=holder)) for i in range(30)),
                return_exceptions=True,
            )
            failures = [read_remote_error(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert failures == [], f"burst {burst}: {[(f.code.name, f.message) for f in failures][:3]}"
            balance = await stub.GetBalance(pb.GetBalanceRequest(holder_id=holder))
            assert balance.balance.active == 30 * 5, f"burst {burst}"


async def test_a_duplicate_that_loses_the_key_race_answers_the_winner() -> None:
    """Two runs of one request at once: the second passes the key check while the first is
    still working, then waits on the account. When the first commits, the second does its
    work, finds the key taken, rolls back and answers the first's result: never an error,
    never a second credit."""
    async with infra.scratch_postgres_database() as url, infra.migrated_engine("accounts", url) as engine:
        sessions = db.create_session_factory(engine)
        request = accrue_request("cheque:pos-1:0042:accrue", amount=40, holder_id="member-new")
        async with sessions() as session, session.begin():
            await store.open_account(session, "member-new", "BONUS", utcnow())
        first_in_work, release_first = asyncio.Event(), asyncio.Event()

        def work(pause: bool) -> Callable[[AsyncSession], Awaitable[pb.AccruePointsResponse]]:
            async def accrue(session: AsyncSession) -> pb.AccruePointsResponse:
                result = await service.accrue_points(session, accrual(40, holder_id="member-new"))
                if pause:
                    first_in_work.set()
                    await release_first.wait()
                return pb.AccruePointsResponse(entry=pb.Entry(entry_id=result.entry.entry_id))

            return accrue

        async def run(work_fn: Callable[[AsyncSession], Awaitable[pb.AccruePointsResponse]]) -> pb.AccruePointsResponse:
            return await run_idempotent(
                sessions,
                store.idempotency_keys,
                "AccruePoints",
                request.request_id,
                request,
                pb.AccruePointsResponse,
                work_fn,
            )

        first = asyncio.create_task(run(work(pause=True)))
        await asyncio.wait_for(first_in_work.wait(), 10)
        second = asyncio.create_task(run(work(pause=False)))

        async def second_waits_on_the_account() -> bool:
            async with engine.connect() as probe:
                waiting = await probe.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            return bool(waiting)

        await infra.wait_until(second_waits_on_the_account, "the second run waiting on the account lock")
        release_first.set()
        answers = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert answers[0] == answers[1]
        async with sessions() as session:
            balance = await service.get_balance(session, "member-new", "BONUS")
            entries = await service.list_entries(session, "member-new", "BONUS", 10, None)
        assert balance.active == 40
        assert len(entries.entries) == 1, "the second run's own credit was rolled back"
