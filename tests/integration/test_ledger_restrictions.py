"""Promo points restricted to stores and to a share of the receipt, through the real service."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime.timeutil import utcnow
from tests.integration.test_accounts_store import accounts_stub
from tests.integration.test_ledger_holds import balance, credit, refusal

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub


async def promo(stub: AccountsServiceAsyncStub, key: str, amount: int, days: int, **restriction: object) -> None:
    request = pb.AccruePointsRequest(
        request_id=key,
        holder_id="member-1",
        amount=amount,
        source=pb.ACCRUAL_SOURCE_CAMPAIGN,
        source_ref=key,
        **restriction,  # type: ignore[arg-type]
    )
    request.expire_time.FromDatetime(utcnow() + timedelta(days=days))
    await stub.AccruePoints(request)


def redeem(key: str, amount: int, store_id: str = "", receipt_amount: int = 0) -> pb.RedeemPointsRequest:
    return pb.RedeemPointsRequest(
        request_id=key, holder_id="member-1", amount=amount, store_id=store_id, receipt_amount=receipt_amount
    )


async def test_promo_points_pay_only_in_their_stores_and_up_to_their_share(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await promo(stub, "store-only", 100, 1, store_ids=["store-7", "store-9"])
        await promo(stub, "half", 100, 2, max_receipt_share_bp=5000)
        await credit(stub, "regular", 100)
        assert (await balance(stub)).available == 300, "promo points are the member's points"

        assert await refusal(stub.RedeemPoints(redeem("p1", 101))) == "INSUFFICIENT_POINTS", "no store, no receipt"
        assert await refusal(stub.RedeemPoints(redeem("p2", 201, "store-8", 10_000))) == "INSUFFICIENT_POINTS"
        assert await refusal(stub.RedeemPoints(redeem("p3", 251, "store-7", 100))) == "INSUFFICIENT_POINTS"
        spent = await stub.RedeemPoints(redeem("p4", 250, "store-7", 100))
        assert (spent.entry.amount, spent.balance.available) == (-250, 50), "100 + 50% of 100 + 100"


async def test_a_hold_checks_the_restrictions_and_its_capture_honours_them(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await promo(stub, "store-only", 100, 1, store_ids=["store-7"])
        await credit(stub, "regular", 50)
        elsewhere = pb.PlaceHoldRequest(request_id="h1", holder_id="member-1", amount=120, store_id="store-8")
        assert await refusal(stub.PlaceHold(elsewhere)) == "INSUFFICIENT_POINTS"
        in_store = pb.PlaceHoldRequest(request_id="h2", holder_id="member-1", amount=120, store_id="store-7")
        placed = await stub.PlaceHold(in_store)
        assert placed.balance.available == 30
        captured = await stub.CaptureHold(pb.CaptureHoldRequest(request_id="c2", hold_id=placed.hold.hold_id))
        assert (captured.entry.amount, captured.balance.available) == (-120, 30)
        assert await refusal(stub.RedeemPoints(redeem("p1", 31, "store-7"))) == "INSUFFICIENT_POINTS"
