"""Balance.next_expiries through the real accounts service, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime.timeutil import utcnow
from services.accounts import service
from tests.integration.test_accounts_store import accounts_stub
from tests.integration.test_ledger_holds import balance


def _day_after_tomorrow() -> datetime:
    """Midnight UTC two days ahead: every instant below is in the future and on a known day."""
    return datetime.combine((utcnow() + timedelta(days=2)).date(), datetime.min.time(), tzinfo=UTC)


def accrual(
    key: str, amount: int, expire_at: datetime | None, activate_at: datetime | None = None
) -> pb.AccruePointsRequest:
    request = pb.AccruePointsRequest(
        request_id=key, holder_id="member-1", amount=amount, source=pb.ACCRUAL_SOURCE_RECEIPT, source_ref=key
    )
    if expire_at is not None:
        request.expire_time.FromDatetime(expire_at)
    if activate_at is not None:
        request.activate_time.FromDatetime(activate_at)
    return request


def expiries(found: pb.Balance) -> list[tuple[str, int]]:
    return [(expiry.day, expiry.amount) for expiry in found.next_expiries]


async def test_the_next_five_expiry_days_are_summed_per_day_without_the_job(tmp_path: Path, database_url: str) -> None:
    day = _day_after_tomorrow()
    async with accounts_stub(tmp_path, database_url) as stub:
        assert expiries(await balance(stub)) == [], "an unknown holder expires nothing"
        await stub.AccruePoints(accrual("forever", 1000, None))
        await stub.AccruePoints(accrual("d0-morning", 100, day + timedelta(hours=1)))
        await stub.AccruePoints(accrual("d0-evening", 50, day + timedelta(hours=23, minutes=59)))
        await stub.AccruePoints(accrual("d1", 30, day + timedelta(days=1)))
        await stub.AccruePoints(accrual("d2-pending", 20, day + timedelta(days=2, hours=5), activate_at=day))
        for offset in (3, 4, 5):
            await stub.AccruePoints(accrual(f"d{offset}", offset, day + timedelta(days=offset, hours=12)))

        def iso(offset: int) -> str:
            return (day + timedelta(days=offset)).date().isoformat()

        found = await balance(stub)
        assert expiries(found) == [(iso(0), 150), (iso(1), 30), (iso(2), 20), (iso(3), 3), (iso(4), 4)]
        assert (found.active, found.pending) == (1000 + 150 + 30 + 3 + 4 + 5, 20)

        # A redemption spends the soonest-expiring points first, so they no longer expire.
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="spend", holder_id="member-1", amount=120))
        assert expiries(await balance(stub)) == [(iso(0), 30), (iso(1), 30), (iso(2), 20), (iso(3), 3), (iso(4), 4)]
        await stub.RedeemPoints(pb.RedeemPointsRequest(request_id="spend-more", holder_id="member-1", amount=30))
        assert expiries(await balance(stub))[0] == (iso(1), 30), "a day whose points are all spent is gone"
        assert expiries(await balance(stub))[-1] == (iso(5), 5)


async def test_a_day_with_more_expiry_instants_than_a_batch_is_summed_whole(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "EXPIRY_INSTANTS_BATCH", 2)
    day = _day_after_tomorrow()
    async with accounts_stub(tmp_path, database_url) as stub:
        for minute in range(7):
            await stub.AccruePoints(accrual(f"d0-{minute}", 10 + minute, day + timedelta(hours=6, minutes=minute)))
        await stub.AccruePoints(accrual("d1", 5, day + timedelta(days=1)))
        await stub.AccruePoints(accrual("d1-later", 6, day + timedelta(days=1, hours=1)))
        assert expiries(await balance(stub)) == [
            (day.date().isoformat(), sum(10 + minute for minute in range(7))),
            ((day + timedelta(days=1)).date().isoformat(), 11),
        ]
