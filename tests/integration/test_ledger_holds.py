"""Holds and redemptions through the real accounts service, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from tests.integration.test_accounts_store import accounts_stub, all_entries

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub


async def credit(stub: AccountsServiceAsyncStub, key: str, amount: int, expires_in: timedelta | None = None) -> None:
    request = pb.AccruePointsRequest(
        request_id=key, holder_id="member-1", amount=amount, source=pb.ACCRUAL_SOURCE_RECEIPT, source_ref=key
    )
    if expires_in is not None:
        request.expire_time.FromDatetime(utcnow() + expires_in)
    await stub.AccruePoints(request)


async def balance(stub: AccountsServiceAsyncStub) -> pb.Balance:
    return (await stub.GetBalance(pb.GetBalanceRequest(holder_id="member-1"))).balance


async def refusal(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return read_remote_error(refused.value).reason


def hold(key: str, amount: int, ttl_seconds: int = 0) -> pb.PlaceHoldRequest:
    return pb.PlaceHoldRequest(request_id=key, holder_id="member-1", amount=amount, ttl_seconds=ttl_seconds)


async def test_a_hold_counts_at_once_and_is_captured_in_part(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await credit(stub, "r1", 1000)
        placed = await stub.PlaceHold(hold("h1", 600))
        assert (placed.balance.active, placed.balance.held, placed.balance.available) == (1000, 600, 400)
        assert await refusal(stub.PlaceHold(hold("h2", 401))) == "INSUFFICIENT_POINTS"

        capture = pb.CaptureHoldRequest(request_id="c1", hold_id=placed.hold.hold_id, amount=250)
        captured = await stub.CaptureHold(capture)
        assert captured.entry.amount == -250 and captured.entry.kind == pb.ENTRY_KIND_REDEMPTION
        assert (captured.balance.active, captured.balance.held, captured.balance.available) == (750, 0, 750)
        again = await stub.CaptureHold(capture)
        assert again == captured, "a retried capture answers the first result"
        assert (
            await refusal(stub.CaptureHold(pb.CaptureHoldRequest(request_id="c2", hold_id=placed.hold.hold_id)))
            == "HOLD_ALREADY_CAPTURED"
        )
        assert [e.amount for e in await all_entries(stub)] == [-250, 1000]


async def test_released_and_expired_holds_free_their_points(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await credit(stub, "r1", 500)
        released = await stub.PlaceHold(hold("h1", 500))
        after_release = await stub.ReleaseHold(pb.ReleaseHoldRequest(request_id="x1", hold_id=released.hold.hold_id))
        assert (after_release.hold.status, after_release.balance.available) == (pb.HOLD_STATUS_RELEASED, 500)
        assert (
            await refusal(stub.CaptureHold(pb.CaptureHoldRequest(request_id="c1", hold_id=released.hold.hold_id)))
            == "HOLD_RELEASED"
        )

        lapsing = await stub.PlaceHold(hold("h2", 500, ttl_seconds=1))
        assert (await balance(stub)).available == 0
        await asyncio.sleep(1.1)
        assert (await balance(stub)).available == 500, "an expired hold reserves nothing"
        assert (
            await refusal(stub.CaptureHold(pb.CaptureHoldRequest(request_id="c2", hold_id=lapsing.hold.hold_id)))
            == "HOLD_EXPIRED"
        )
        assert (
            await refusal(stub.CaptureHold(pb.CaptureHoldRequest(request_id="c3", hold_id="no-such-hold")))
            == "HOLD_NOT_FOUND"
        )
        assert (await balance(stub)).active == 500, "nothing was spent"


async def test_redemption_spends_the_soonest_expiring_lots_first(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await credit(stub, "forever", 300)
        await credit(stub, "december", 300, expires_in=timedelta(days=200))
        await credit(stub, "next-week", 100, expires_in=timedelta(days=7))
        spent = await stub.RedeemPoints(
            pb.RedeemPointsRequest(request_id="p1", holder_id="member-1", amount=250, source_ref="receipt:T1:9")
        )
        assert spent.balance.active == 450
        assert (
            await refusal(stub.RedeemPoints(pb.RedeemPointsRequest(request_id="p2", holder_id="member-1", amount=451)))
            == "INSUFFICIENT_POINTS"
        )

    engine = db.create_engine(database_url)
    try:
        async with db.create_session_factory(engine)() as session:
            remaining = dict(
                (await session.execute(select(store.LotRow.source_ref, store.LotRow.remaining))).tuples().all()
            )
            allocations = (await session.execute(select(store.AllocationRow.amount))).scalars().all()
    finally:
        await engine.dispose()
    assert remaining == {"forever": 300, "december": 150, "next-week": 0}
    assert sorted(allocations) == [100, 150], "the redemption remembers the lots that paid for it"


async def test_parallel_holds_never_overdraw_and_exactly_those_that_fit_succeed(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await credit(stub, "r1", 200)
        outcomes = await asyncio.gather(*(stub.PlaceHold(hold(f"h{i}", 10)) for i in range(50)), return_exceptions=True)
        placed = [o for o in outcomes if isinstance(o, pb.PlaceHoldResponse)]
        refused = [read_remote_error(o).reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(placed) == 20 and refused == ["INSUFFICIENT_POINTS"] * 30, outcomes
        final = await balance(stub)
        assert (final.held, final.available) == (200, 0)


async def test_parallel_redemptions_never_overdraw_and_entries_sum_to_the_balance(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        for index in range(4):
            await credit(stub, f"r{index}", 50, expires_in=timedelta(days=index + 1))
        outcomes = await asyncio.gather(
            *(
                stub.RedeemPoints(pb.RedeemPointsRequest(request_id=f"p{i}", holder_id="member-1", amount=7))
                for i in range(50)
            ),
            return_exceptions=True,
        )
        spent = [o for o in outcomes if isinstance(o, pb.RedeemPointsResponse)]
        assert len(spent) == 200 // 7
        assert all(isinstance(o, pb.RedeemPointsResponse | grpc.aio.AioRpcError) for o in outcomes)
        final = await balance(stub)
        assert final.active == 200 - 7 * len(spent)
        assert sum(entry.amount for entry in await all_entries(stub)) == final.active
