"""Transfers between holders and merges of accounts, through the real accounts service."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from tests.integration.test_accounts_store import accounts_stub, all_entries
from tests.integration.test_ledger_adjustments import tables
from tests.integration.test_ledger_holds import refusal

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub


async def give(
    stub: AccountsServiceAsyncStub,
    key: str,
    holder: str,
    amount: int,
    expire_at: datetime | None = None,
    currency: str = "",
    **fields: object,
) -> pb.AccruePointsResponse:
    request = pb.AccruePointsRequest(
        request_id=key,
        holder_id=holder,
        currency=currency,
        amount=amount,
        source=pb.ACCRUAL_SOURCE_CAMPAIGN,
        source_ref=key,
        **fields,  # type: ignore[arg-type]
    )
    if expire_at is not None:
        request.expire_time.FromDatetime(expire_at)
    return await stub.AccruePoints(request)


async def books(stub: AccountsServiceAsyncStub, holder: str, currency: str = "") -> pb.Balance:
    """The holder's balance, after checking that its entries add up to it."""
    balance = (await stub.GetBalance(pb.GetBalanceRequest(holder_id=holder, currency=currency))).balance
    entries: list[pb.Entry] = []
    token = ""
    while True:
        page = await stub.ListEntries(
            pb.ListEntriesRequest(holder_id=holder, currency=currency, page_size=100, page_token=token)
        )
        entries.extend(page.entries)
        if not (token := page.next_page_token):
            break
    assert sum(entry.amount for entry in entries) == balance.active + balance.pending - balance.negative
    return balance


def transfer(key: str, source: str, destination: str, amount: int) -> pb.TransferPointsRequest:
    return pb.TransferPointsRequest(
        request_id=key, from_holder_id=source, to_holder_id=destination, amount=amount, reason="to the family pool"
    )


async def test_a_transfer_moves_the_soonest_expiring_points_with_their_dates(tmp_path: Path, database_url: str) -> None:
    soon = (utcnow() + timedelta(days=10)).replace(microsecond=0)
    async with accounts_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        await give(stub, "a1", "member-a", 100, soon)
        await give(stub, "a2", "member-a", 200)
        await give(stub, "a3", "member-a", 50, store_ids=["store-7"])
        assert await refusal(stub.TransferPoints(transfer("t0", "member-a", "household-1", 301))) == (
            "INSUFFICIENT_POINTS"
        ), "promo points stay with their holder"

        moved = await stub.TransferPoints(transfer("t1", "member-a", "household-1", 150))
        assert await stub.TransferPoints(transfer("t1", "member-a", "household-1", 150)) == moved, "applied once"
        assert (moved.debit_entry.kind, moved.debit_entry.amount) == (pb.ENTRY_KIND_TRANSFER, -150)
        assert sorted(entry.amount for entry in moved.credit_entries) == [50, 100]
        assert (moved.from_balance.available, moved.to_balance.available) == (200, 150)
        assert (await books(stub, "member-a")).active == 200
        assert (await books(stub, "household-1")).active == 150
        async with sessions() as session:
            pool = await store.find_account(session, "household-1", "BONUS")
            assert pool is not None
            lots = (
                await session.execute(
                    select(store.LotRow.amount, store.LotRow.expire_at).where(
                        store.LotRow.account_id == pool.account_id
                    )
                )
            ).all()
        assert sorted(lots, key=lambda lot: lot[0]) == [(50, None), (100, soon)], "each point keeps its expiry"


async def test_a_transfer_into_an_account_with_a_debt_repays_it_first(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        earned = await give(stub, "b1", "member-b", 100)
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="p1", holder_id="member-b", amount=100))
        await stub.ReverseOperation(pb.ReverseOperationRequest(request_id="x1", entry_id=earned.entry.entry_id))
        await give(stub, "a1", "member-a", 300)
        moved = await stub.TransferPoints(transfer("t1", "member-a", "member-b", 130))
        assert (moved.to_balance.negative, moved.to_balance.available) == (0, 30)
        await books(stub, "member-b")


async def test_a_merge_moves_every_point_and_debt_in_every_currency(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        later = pb.AccruePointsRequest()
        later.activate_time.FromDatetime(utcnow() + timedelta(days=14))
        await give(stub, "a1", "old-card", 100)
        await give(stub, "a2", "old-card", 40, activate_time=later.activate_time)
        await give(stub, "a3", "old-card", 70, currency="MILES", store_ids=["store-7"])
        earned = await give(stub, "c1", "old-card", 25, currency="PROMO")
        await stub.RedeemPoints(
            pb.RedeemPointsRequest(request_id="p1", holder_id="old-card", currency="PROMO", amount=25)
        )
        await stub.ReverseOperation(pb.ReverseOperationRequest(request_id="x1", entry_id=earned.entry.entry_id))
        await give(stub, "m1", "member-1", 10)

        placed = await stub.PlaceHold(pb.PlaceHoldRequest(request_id="h1", holder_id="old-card", amount=5))
        merge = pb.MergeAccountsRequest(request_id="merge-1", from_holder_id="old-card", to_holder_id="member-1")
        assert await refusal(stub.MergeAccounts(merge)) == "ACCOUNT_HAS_LIVE_HOLDS"
        await stub.ReleaseHold(pb.ReleaseHoldRequest(request_id="r1", hold_id=placed.hold.hold_id))

        merged = await stub.MergeAccounts(merge)
        assert await stub.MergeAccounts(merge) == merged, "applied once"
        assert [(b.currency, b.active, b.pending, b.negative) for b in merged.balances] == [
            ("BONUS", 110, 40, 0),
            ("MILES", 70, 0, 0),
            ("PROMO", 0, 0, 25),
        ]
        for currency in ("BONUS", "MILES", "PROMO"):
            emptied = await books(stub, "old-card", currency)
            assert (emptied.active, emptied.pending, emptied.negative) == (0, 0, 0)
            await books(stub, "member-1", currency)


async def test_opposite_transfers_at_once_neither_deadlock_nor_lose_points(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await give(stub, "a", "member-a", 500)
        await give(stub, "b", "member-b", 500)
        calls = [
            stub.TransferPoints(transfer(f"t{index}", *pair, 30))
            for index in range(20)
            for pair in [("member-a", "member-b") if index % 2 else ("member-b", "member-a")]
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        failures = [read_remote_error(o).reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert failures == [], failures
        first, second = await books(stub, "member-a"), await books(stub, "member-b")
        assert (first.active, second.active) == (500, 500), "ten each way"
        assert len(await all_entries(stub, "member-a")) == 1 + 10 + 10
