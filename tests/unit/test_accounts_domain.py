"""The ledger's rules: which lots count at an instant, what can be spent, what an accrual may be."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty.runtime.errors import FieldViolation, Violations
from services.accounts.domain import (
    MAX_POINTS_PER_OPERATION,
    Accrual,
    AccrualSource,
    Balance,
    Lot,
    balance_at,
    check_accrual,
    check_currency,
    forecast_range,
    month_starts,
)

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)
DAY = timedelta(days=1)


def lot(lot_id: str, remaining: int, activate_at: datetime, expire_at: datetime | None = None) -> Lot:
    return Lot(lot_id, remaining, activate_at, expire_at)


# Amounts with one non-zero digit each, so a sum tells exactly which lots it counted.
LOTS = [
    lot("activates-now", 1, NOW),
    lot("expires-a-tick-after-now", 20, NOW - DAY, NOW + TICK),
    lot("expires-now", 300, NOW - 2 * DAY, NOW),
    lot("activates-a-tick-after-now", 4_000, NOW + TICK),
    lot("activates-tomorrow", 50_000, NOW + DAY, NOW + 2 * DAY),
]


@pytest.mark.parametrize(
    ("moment", "active", "pending"),
    [
        pytest.param(NOW - TICK, 20 + 300, 1 + 4_000 + 50_000, id="a tick before now"),
        pytest.param(NOW, 1 + 20, 4_000 + 50_000, id="now: activate_at is inclusive, expire_at exclusive"),
        pytest.param(NOW + TICK, 1 + 4_000, 50_000, id="a tick after now"),
        pytest.param(NOW + 2 * DAY, 1 + 4_000, 0, id="after every expiry"),
    ],
)
def test_balance_counts_each_lot_by_its_state_at_the_instant(moment: datetime, active: int, pending: int) -> None:
    balance = balance_at("member-1", "BONUS", LOTS, held=0, now=moment)
    assert balance == Balance("member-1", "BONUS", active=active, pending=pending, held=0)


def test_a_lot_is_active_from_its_activation_and_expired_at_its_expiry() -> None:
    single = lot("l", 10, NOW, NOW + DAY)
    states = {
        "before activation": (single.is_active(NOW - TICK), single.is_pending(NOW - TICK)),
        "at activation": (single.is_active(NOW), single.is_pending(NOW)),
        "a tick before expiry": (single.is_active(NOW + DAY - TICK), single.is_pending(NOW + DAY - TICK)),
        "at expiry": (single.is_active(NOW + DAY), single.is_pending(NOW + DAY)),
    }
    assert states == {
        "before activation": (False, True),
        "at activation": (True, False),
        "a tick before expiry": (True, False),
        "at expiry": (False, False),
    }


def test_a_lot_without_expiry_stays_active() -> None:
    forever = lot("l", 10, NOW)
    assert forever.is_active(NOW + 100_000 * DAY)


def test_no_lots_is_a_zero_balance() -> None:
    assert balance_at("member-1", "BONUS", [], held=0, now=NOW) == Balance("member-1", "BONUS", 0, 0, 0)


@pytest.mark.parametrize(
    ("active", "held", "available"),
    [(100, 0, 100), (100, 30, 70), (100, 100, 0), (100, 130, 0), (0, 5, 0)],
)
def test_available_is_active_minus_held_and_never_negative(active: int, held: int, available: int) -> None:
    assert Balance("m", "BONUS", active=active, pending=999, held=held).available == available


def test_pending_points_are_not_available() -> None:
    balance = balance_at("m", "BONUS", [lot("later", 500, NOW + DAY), lot("now", 70, NOW)], held=20, now=NOW)
    assert (balance.active, balance.pending, balance.held, balance.available) == (70, 500, 20, 50)


@given(active=st.integers(0, 10**15), held=st.integers(0, 10**15))
def test_available_is_between_zero_and_active(active: int, held: int) -> None:
    available = Balance("m", "BONUS", active=active, pending=0, held=held).available
    assert 0 <= available <= active
    assert available == (active - held if held <= active else 0)


def accrual(**changes: object) -> Accrual:
    base = Accrual(
        holder_id="member-1",
        currency="BONUS",
        amount=100,
        source=AccrualSource.RECEIPT,
        source_ref="receipt:pos-1:0001",
        reason="",
        activate_at=NOW,
        expire_at=NOW + 365 * DAY,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def problems(candidate: Accrual) -> list[FieldViolation]:
    violations = Violations()
    check_accrual(candidate, violations)
    return violations.items


@pytest.mark.parametrize(
    "candidate",
    [
        pytest.param(accrual(), id="receipt"),
        pytest.param(accrual(amount=1), id="one point"),
        pytest.param(accrual(amount=MAX_POINTS_PER_OPERATION), id="the most points"),
        pytest.param(accrual(expire_at=None), id="no expiry"),
        pytest.param(accrual(expire_at=NOW + TICK), id="expires a tick after activation"),
        pytest.param(accrual(source=AccrualSource.STAFF, reason="goodwill for a late order"), id="staff"),
        pytest.param(accrual(source=AccrualSource.MASS_JOB, reason=""), id="mass job without reason"),
        pytest.param(accrual(currency="X"), id="one-letter currency"),
        pytest.param(accrual(currency="MILES_2026"), id="currency with digits and _"),
        pytest.param(accrual(currency="A" * 16), id="16-character currency"),
    ],
)
def test_acceptable_accruals_have_no_violations(candidate: Accrual) -> None:
    assert problems(candidate) == []


@pytest.mark.parametrize(
    ("candidate", "field"),
    [
        pytest.param(accrual(amount=0), "amount", id="zero"),
        pytest.param(accrual(amount=-5), "amount", id="negative"),
        pytest.param(accrual(amount=MAX_POINTS_PER_OPERATION + 1), "amount", id="too large"),
        pytest.param(accrual(expire_at=NOW), "expire_time", id="expires at activation"),
        pytest.param(accrual(expire_at=NOW - DAY), "expire_time", id="expires before activation"),
        pytest.param(accrual(source=AccrualSource.STAFF, reason=""), "reason", id="staff without reason"),
        pytest.param(accrual(source=AccrualSource.STAFF, reason=" \t "), "reason", id="staff blank reason"),
        pytest.param(accrual(holder_id=""), "holder_id", id="no holder"),
        pytest.param(accrual(currency=""), "currency", id="empty currency"),
        pytest.param(accrual(currency="bonus"), "currency", id="lower-case currency"),
        pytest.param(accrual(currency="1BONUS"), "currency", id="currency starting with a digit"),
        pytest.param(accrual(currency="BO-NUS"), "currency", id="currency with a dash"),
        pytest.param(accrual(currency="A" * 17), "currency", id="17-character currency"),
    ],
)
def test_each_unacceptable_accrual_names_its_field(candidate: Accrual, field: str) -> None:
    assert [violation.field for violation in problems(candidate)] == [field]


def test_every_problem_is_reported_at_once() -> None:
    bad = accrual(holder_id="", currency="points", amount=0, source=AccrualSource.STAFF, reason="", expire_at=NOW - DAY)
    assert problems(bad) == [
        FieldViolation("holder_id", "required"),
        FieldViolation("currency", "upper-case letters, digits or _, e.g. BONUS"),
        FieldViolation("amount", "must be positive"),
        FieldViolation("expire_time", "must be after activation"),
        FieldViolation("reason", "a staff accrual needs a reason"),
    ]


def test_the_amount_limit_is_described() -> None:
    assert problems(accrual(amount=MAX_POINTS_PER_OPERATION + 1)) == [
        FieldViolation("amount", f"at most {MAX_POINTS_PER_OPERATION}")
    ]


@pytest.mark.parametrize("currency", ["BONUS\n", "MILES_2026\n"])
def test_a_currency_with_a_line_break_is_refused(currency: str) -> None:
    """`$` alone matches before a trailing newline: the whole string has to match, or
    "BONUS\\n" would open a second, distinct account for the holder."""
    violations = Violations()
    check_currency(currency, violations, field="currency")
    assert [violation.field for violation in violations.items] == ["currency"]


def test_forecast_months_roll_over_the_year_and_default_to_twelve_from_now() -> None:
    violations = Violations()
    now = datetime(2030, 11, 20, 8, tzinfo=UTC)
    first, months = forecast_range("", 0, now, violations)
    assert (first, months) == (date(2030, 11, 1), 12)
    assert month_starts(date(2030, 11, 1), 3) == [
        datetime(2030, 11, 1, tzinfo=UTC),
        datetime(2030, 12, 1, tzinfo=UTC),
        datetime(2031, 1, 1, tzinfo=UTC),
        datetime(2031, 2, 1, tzinfo=UTC),
    ]
    assert forecast_range("2031-02", 120, now, violations) == (date(2031, 2, 1), 120)
    assert not violations.items
    for first_month, count, field in (("2031-00", 1, "first_month"), ("31-01", 1, "first_month"), ("", 121, "months")):
        bad = Violations()
        forecast_range(first_month, count, now, bad)
        assert [violation.field for violation in bad.items] == [field]
