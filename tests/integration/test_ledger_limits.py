"""Accrual limits through the real accounts service: refused, or clipped and recorded."""

from __future__ import annotations

from pathlib import Path

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from tests.integration.test_ledger_adjustments import adjust, payloads, tables
from tests.integration.test_ledger_currencies import configured_stub
from tests.integration.test_ledger_holds import refusal

LIMITED: dict[str, dict[str, object]] = {
    "BONUS": {"max_accrual_per_day": 1000},
    "CLIP": {"max_accrual_per_receipt": 500, "max_accrual_per_day": 800, "accrual_limit_policy": "clip"},
}


def receipt(key: str, amount: int, currency: str = "BONUS") -> pb.AccruePointsRequest:
    return pb.AccruePointsRequest(
        request_id=key,
        holder_id="member-1",
        currency=currency,
        amount=amount,
        source=pb.ACCRUAL_SOURCE_RECEIPT,
        source_ref=key,
    )


async def test_an_accrual_over_the_daily_limit_is_refused_but_staff_credits_are_not(
    tmp_path: Path, database_url: str
) -> None:
    async with configured_stub(tmp_path, database_url, LIMITED) as stub:
        await stub.AccruePoints(receipt("r1", 900))
        assert await refusal(stub.AccruePoints(receipt("r2", 101))) == "ACCRUAL_LIMIT_REACHED"
        assert (await stub.AccruePoints(receipt("r3", 100))).capped == 0
        assert (await stub.AdjustPoints(adjust("s1", 5000))).balance.active == 6000, "staff credits are deliberate"
        assert await refusal(stub.AccruePoints(receipt("r4", 1))) == "ACCRUAL_LIMIT_REACHED"


async def test_the_clip_policy_credits_up_to_the_limit_and_records_the_rest(tmp_path: Path, database_url: str) -> None:
    async with configured_stub(tmp_path, database_url, LIMITED) as stub, tables(database_url) as sessions:
        first = await stub.AccruePoints(receipt("r1", 700, "CLIP"))
        assert (first.entry.amount, first.capped, first.balance.active) == (500, 200, 500), "per receipt"
        assert "200 of 700 points over the accrual limit" in first.entry.reason
        assert await stub.AccruePoints(receipt("r1", 700, "CLIP")) == first, "a retry answers the first result"
        second = await stub.AccruePoints(receipt("r2", 400, "CLIP"))
        assert (second.entry.amount, second.capped) == (300, 100), "per day"
        assert await refusal(stub.AccruePoints(receipt("r3", 1, "CLIP"))) == "ACCRUAL_LIMIT_REACHED"
        events = sorted(await payloads(sessions, "points.accrued"), key=lambda payload: payload["amount"])
        assert [(e["amount"], e["capped"]) for e in events] == [(300, 100), (500, 200)]
