"""Point currencies: worth in money without floats, and the expiry policies of an accrual."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.accounts.domain import (
    CurrencyRegistry,
    ExpiryRounding,
    MoneyRounding,
    PointCurrency,
    end_of_period,
    expiry_of,
)

ACTIVATION = datetime(2026, 3, 15, 10, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("rounding", "points", "money"),
    [
        (MoneyRounding.FLOOR, 5, 1),  # 5 * 1/3 = 1.67
        (MoneyRounding.HALF_UP, 5, 2),
        (MoneyRounding.CEILING, 5, 2),
        (MoneyRounding.FLOOR, 4, 1),  # 1.33
        (MoneyRounding.HALF_UP, 4, 1),
        (MoneyRounding.CEILING, 4, 2),
        (MoneyRounding.CEILING, 6, 2),  # exactly 2
        (MoneyRounding.HALF_UP, -5, -2),  # symmetric for a negative amount
    ],
)
def test_points_convert_to_money_by_the_currencys_rounding(rounding: MoneyRounding, points: int, money: int) -> None:
    third = PointCurrency("BONUS", "Bonus", money_numerator=1, money_denominator=3, rounding=rounding)
    assert third.to_money(points) == money


@given(
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=1, max_value=1000),
)
def test_a_conversion_is_within_a_minor_unit_of_the_exact_value(points: int, numerator: int, denominator: int) -> None:
    exact = points * numerator
    for rounding in MoneyRounding:
        money = PointCurrency("X", "X", money_numerator=numerator, money_denominator=denominator, rounding=rounding)
        converted = money.to_money(points) * denominator
        assert exact - denominator < converted < exact + denominator
        if rounding is MoneyRounding.FLOOR:
            assert converted <= exact
        if rounding is MoneyRounding.CEILING:
            assert converted >= exact


@pytest.mark.parametrize(
    ("moment", "rounding", "rounded"),
    [
        (datetime(2026, 3, 15, 10, 30, tzinfo=UTC), ExpiryRounding.MONTH_END, datetime(2026, 4, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), ExpiryRounding.MONTH_END, datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 4, 1, tzinfo=UTC), ExpiryRounding.MONTH_END, datetime(2026, 4, 1, tzinfo=UTC)),
        (datetime(2026, 3, 15, 10, 30, tzinfo=UTC), ExpiryRounding.YEAR_END, datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC), ExpiryRounding.YEAR_END, datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 3, 15, 10, 30, tzinfo=UTC), ExpiryRounding.NONE, datetime(2026, 3, 15, 10, 30, tzinfo=UTC)),
    ],
)
def test_an_expiry_is_moved_to_the_end_of_its_month_or_year(
    moment: datetime, rounding: ExpiryRounding, rounded: datetime
) -> None:
    assert end_of_period(moment, rounding) == rounded


def test_a_fixed_date_wins_then_the_requests_lifetime_then_the_currencys() -> None:
    promo = PointCurrency("PROMO", "Promo", lifetime_days=30, expiry_rounding=ExpiryRounding.MONTH_END)
    december = datetime(2026, 12, 31, tzinfo=UTC)
    assert expiry_of(ACTIVATION, promo, fixed=december, lifetime_days=5) == december, "never moved"
    assert expiry_of(ACTIVATION, promo, lifetime_days=5) == datetime(2026, 4, 1, tzinfo=UTC)
    assert expiry_of(ACTIVATION, promo, lifetime_days=5, rounding=ExpiryRounding.NONE) == ACTIVATION + timedelta(5)
    assert expiry_of(ACTIVATION, promo) == datetime(2026, 5, 1, tzinfo=UTC), "30 days: 14 April, end of April"
    assert expiry_of(ACTIVATION, promo, rounding=ExpiryRounding.YEAR_END) == datetime(2027, 1, 1, tzinfo=UTC)


def test_a_currency_not_configured_is_one_to_one_and_never_expires() -> None:
    plain = CurrencyRegistry({}).get("BONUS")
    assert (plain.code, plain.scale, plain.to_money(123)) == ("BONUS", 0, 123)
    assert expiry_of(ACTIVATION, plain) is None
    assert expiry_of(ACTIVATION, plain, lifetime_days=366) == ACTIVATION + timedelta(days=366)
