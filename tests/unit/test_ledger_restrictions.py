"""Promo lots' restrictions: only in given stores, at most a share of the receipt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from loyalty.runtime.errors import DomainError
from services.accounts.domain import Lot, LotRestriction, PointCurrency, SpendContext, allocate, spendable_on

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
BONUS = PointCurrency("BONUS", "Bonus")


def lot(lot_id: str, remaining: int, expires_in_days: int, restriction: LotRestriction | None = None) -> Lot:
    return Lot(lot_id, remaining, NOW - timedelta(days=1), NOW + timedelta(days=expires_in_days), restriction)


PROMO_IN_STORE_7 = lot("promo-store", 100, 1, LotRestriction(frozenset({"store-7"})))
PROMO_HALF = lot("promo-half", 100, 2, LotRestriction(max_receipt_share_bp=5000))
REGULAR = lot("regular", 100, 30)
LOTS = [PROMO_IN_STORE_7, PROMO_HALF, REGULAR]


def test_without_a_receipt_only_unrestricted_points_pay() -> None:
    assert spendable_on(LOTS, NOW, None) == 100
    assert [a.lot_id for a in allocate(LOTS, 60, NOW)] == ["regular"]
    with pytest.raises(DomainError) as refused:
        allocate(LOTS, 101, NOW)
    assert refused.value.reason == "INSUFFICIENT_POINTS"


def test_store_points_pay_only_in_their_store() -> None:
    elsewhere = SpendContext(BONUS, store_id="store-8", receipt_amount=0)
    assert spendable_on(LOTS, NOW, elsewhere) == 100
    in_store = SpendContext(BONUS, store_id="store-7", receipt_amount=0)
    assert spendable_on(LOTS, NOW, in_store) == 200
    assert [(a.lot_id, a.amount) for a in allocate(LOTS, 150, NOW, in_store)] == [
        ("promo-store", 100),
        ("regular", 50),
    ], "soonest-expiring first, the capped lot skipped"


def test_share_capped_points_pay_at_most_their_share_of_the_receipt() -> None:
    receipt = SpendContext(BONUS, store_id="store-8", receipt_amount=61)
    assert spendable_on(LOTS, NOW, receipt) == 30 + 100, "50% of 61 is 30 whole points"
    assert [(a.lot_id, a.amount) for a in allocate(LOTS, 130, NOW, receipt)] == [("promo-half", 30), ("regular", 100)]
    with pytest.raises(DomainError):
        allocate(LOTS, 131, NOW, receipt)


def test_the_share_is_measured_in_money_at_the_currencys_rate() -> None:
    # A point unit is worth 2/3 of a minor money unit: 50% of a 100.00 receipt (5000) buys 7500 units.
    thirds = PointCurrency("MILES", "Miles", money_numerator=2, money_denominator=3)
    capped = lot("capped", 10_000, 5, LotRestriction(max_receipt_share_bp=5000))
    assert spendable_on([capped], NOW, SpendContext(thirds, receipt_amount=10_000)) == 7500
    assert 7500 * 2 <= 5000 * 3 < 7501 * 2, "exactly, not after rounding"
