"""Holds and which lots pay for a redemption."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from loyalty.runtime.errors import DomainError
from services.accounts.domain import (
    Allocation,
    Balance,
    Hold,
    HoldStatus,
    Lot,
    allocate,
    check_hold,
    ensure_available,
    held_total,
)

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def lot(lot_id: str, remaining: int, expires_in_days: int | None, activated_days_ago: int = 30) -> Lot:
    expire_at = NOW + timedelta(days=expires_in_days) if expires_in_days is not None else None
    return Lot(lot_id, remaining, NOW - timedelta(days=activated_days_ago), expire_at)


def test_soonest_expiring_lots_pay_first_and_lots_that_never_expire_last() -> None:
    lots = [lot("forever", 500, None), lot("december", 300, 200), lot("next-week", 100, 7), lot("june", 50, 20)]
    assert allocate(lots, 420, NOW) == [
        Allocation("next-week", 100),
        Allocation("june", 50),
        Allocation("december", 270),
    ]
    assert allocate(lots, 950, NOW)[-1] == Allocation("forever", 500)


def test_pending_expired_and_empty_lots_never_pay() -> None:
    lots = [
        lot("pending", 1000, 30, activated_days_ago=-1),
        lot("expired", 1000, -1),
        lot("empty", 0, 1),
        lot("good", 10, 5),
    ]
    assert allocate(lots, 10, NOW) == [Allocation("good", 10)]
    with pytest.raises(DomainError) as short:
        allocate(lots, 11, NOW)
    assert short.value.reason == "INSUFFICIENT_POINTS"


def test_a_hold_reserves_until_it_is_settled_or_expires() -> None:
    live = Hold("h1", 100, HoldStatus.ACTIVE, NOW + timedelta(minutes=5), 0)
    lapsed = Hold("h2", 200, HoldStatus.ACTIVE, NOW, 0)  # expiry is exclusive
    captured = Hold("h3", 400, HoldStatus.CAPTURED, NOW + timedelta(minutes=5), 400)
    assert held_total([live, lapsed, captured], NOW) == 100
    assert check_hold(live, NOW) is live
    for hold, reason in [
        (None, "HOLD_NOT_FOUND"),
        (lapsed, "HOLD_EXPIRED"),
        (captured, "HOLD_ALREADY_CAPTURED"),
        (Hold("h4", 1, HoldStatus.RELEASED, NOW + timedelta(minutes=5), 0), "HOLD_RELEASED"),
    ]:
        with pytest.raises(DomainError) as refused:
            check_hold(hold, NOW)
        assert refused.value.reason == reason


def test_available_is_active_minus_held() -> None:
    balance = Balance("m", "BONUS", active=1000, pending=500, held=300)
    assert balance.available == 700
    ensure_available(balance, 700)
    with pytest.raises(DomainError) as short:
        ensure_available(balance, 701)
    assert short.value.reason == "INSUFFICIENT_POINTS"
