"""Coalition settlements: points issued by one partner and spent at another, net of returns."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import to_timestamp, utcnow
from tests.integration.test_accounts_store import accounts_stub
from tests.integration.test_ledger_transfers import give


def settlement(hours_from: float = -1, hours_to: float = 1) -> pb.GetPartnerSettlementRequest:
    now = utcnow()
    return pb.GetPartnerSettlementRequest(
        start_time=to_timestamp(now + timedelta(hours=hours_from)),
        end_time=to_timestamp(now + timedelta(hours=hours_to)),
    )


async def test_each_partner_pair_settles_what_was_spent_across_them(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        await give(stub, "a", "member-1", 100, utcnow() + timedelta(days=5), partner_id="partner-a")
        await give(stub, "b", "member-1", 100, utcnow() + timedelta(days=50), partner_id="partner-b")
        spent = await stub.RedeemPoints(
            pb.RedeemPointsRequest(request_id="p1", holder_id="member-1", amount=150, partner_id="partner-b")
        )
        # A return gives back the longest-lived points first: 50 of partner B's, then 30 of A's.
        await stub.ReverseOperation(
            pb.ReverseOperationRequest(request_id="x1", entry_id=spent.entry.entry_id, amount=80)
        )
        placed = await stub.PlaceHold(
            pb.PlaceHoldRequest(request_id="h1", holder_id="member-1", amount=20, partner_id="partner-c")
        )
        await stub.CaptureHold(pb.CaptureHoldRequest(request_id="c1", hold_id=placed.hold.hold_id))
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="p2", holder_id="member-1", amount=5))
        await give(stub, "moved", "member-2", 40, partner_id="partner-a")
        await stub.TransferPoints(
            pb.TransferPointsRequest(request_id="t1", from_holder_id="member-2", to_holder_id="member-1", amount=40)
        )
        await stub.RedeemPoints(
            pb.RedeemPointsRequest(request_id="p3", holder_id="member-1", amount=125, partner_id="partner-b")
        )

        lines = (await stub.GetPartnerSettlement(settlement())).lines
        # The last redemption takes A's 5 left, B's 100 and 20 of the 40 transferred A points.
        assert [(x.issuer_partner_id, x.spender_partner_id, x.points, x.money_amount) for x in lines] == [
            ("partner-a", "", 5, 5),
            ("partner-a", "partner-b", 70 + 5 + 20, 95),
            ("partner-a", "partner-c", 20, 20),
        ], "same-partner spending settles nothing; transferred points keep their issuer"
        assert list((await stub.GetPartnerSettlement(settlement(-2, -1))).lines) == [], "another period"


async def test_a_settlement_needs_a_period(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetPartnerSettlement(settlement(1, -1))
        assert {v.field for v in read_remote_error(refused.value).violations} == {"end_time"}
