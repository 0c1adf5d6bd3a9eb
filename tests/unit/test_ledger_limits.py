"""Accrual limits against fraud: refused or clipped, only for receipts and campaigns."""

from __future__ import annotations

import pytest

from loyalty.runtime.errors import DomainError
from services.accounts.domain import AccrualLimits, AccrualSource, LimitPolicy


def refusal(limits: AccrualLimits, amount: int, source: AccrualSource, today: int) -> str:
    with pytest.raises(DomainError) as refused:
        limits.allowed(amount, source, today)
    return refused.value.reason


def test_within_the_limits_everything_is_credited() -> None:
    limits = AccrualLimits(per_receipt=500, per_day=1000)
    assert limits.allowed(500, AccrualSource.RECEIPT, 500) == 500
    assert AccrualLimits().allowed(10**9, AccrualSource.RECEIPT, 10**9) == 10**9, "no limits configured"


def test_over_a_limit_an_accrual_is_refused_by_default() -> None:
    limits = AccrualLimits(per_receipt=500, per_day=1000)
    assert refusal(limits, 501, AccrualSource.RECEIPT, 0) == "ACCRUAL_LIMIT_REACHED"
    assert refusal(limits, 101, AccrualSource.CAMPAIGN, 900) == "ACCRUAL_LIMIT_REACHED"
    assert limits.allowed(501, AccrualSource.CAMPAIGN, 0) == 501, "the receipt limit is for receipts"


def test_the_clip_policy_credits_up_to_the_tighter_limit() -> None:
    limits = AccrualLimits(per_receipt=500, per_day=1000, policy=LimitPolicy.CLIP)
    assert limits.allowed(800, AccrualSource.RECEIPT, 0) == 500
    assert limits.allowed(800, AccrualSource.RECEIPT, 700) == 300
    assert refusal(limits, 1, AccrualSource.RECEIPT, 1000) == "ACCRUAL_LIMIT_REACHED", "nothing left: no empty lot"


@pytest.mark.parametrize("source", [AccrualSource.STAFF, AccrualSource.MASS_JOB])
def test_deliberate_credits_are_not_limited(source: AccrualSource) -> None:
    assert AccrualLimits(per_receipt=1, per_day=1).allowed(5000, source, 5000) == 5000
