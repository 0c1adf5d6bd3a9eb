"""Accrual limits against fraud: refused or clipped, for receipts, campaigns and mass jobs."""

from __future__ import annotations

import pytest

from loyalty.runtime.errors import DomainError
from services.accounts.domain import (
    AccrualLimits,
    AccrualSource,
    LimitPolicy,
    MassCredit,
    MassItem,
    MassTarget,
    plan_mass_accrual,
)


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


@pytest.mark.parametrize("source", [AccrualSource.STAFF, AccrualSource.TRANSFER])
def test_deliberate_credits_are_not_limited(source: AccrualSource) -> None:
    assert AccrualLimits(per_receipt=1, per_day=1).allowed(5000, source, 5000) == 5000


def test_a_mass_job_credit_counts_against_the_day_but_is_no_receipt() -> None:
    limits = AccrualLimits(per_receipt=1, per_day=1000)
    assert limits.allowed(600, AccrualSource.MASS_JOB, 0) == 600
    assert refusal(limits, 600, AccrualSource.MASS_JOB, 600) == "ACCRUAL_LIMIT_REACHED"


def test_a_mass_chunk_is_decided_item_by_item_as_single_accruals_would_be() -> None:
    """Holder then index order; the day's allowance and a negative balance are used up
    by the earlier items of the same holder in the chunk."""
    accounts = {
        "a": MassTarget("acc-a", debt=30, blocked=False),
        "b": MassTarget("acc-b", debt=0, blocked=True),
        "c": MassTarget("acc-c", debt=0, blocked=False),
    }
    items = [
        MassItem(0, "c", 700),
        MassItem(1, "a", 50),
        MassItem(2, "b", 5),
        MassItem(3, "a", 100),
        MassItem(4, "c", 400),
    ]
    plan = plan_mass_accrual(items, accounts, AccrualLimits(per_day=1000, policy=LimitPolicy.CLIP), {"acc-a": 900})
    assert plan.credits == [
        MassCredit(1, "acc-a", 50, 30, 0),
        MassCredit(3, "acc-a", 50, 0, 50),
        MassCredit(0, "acc-c", 700, 0, 0),
        MassCredit(4, "acc-c", 300, 0, 100),
    ]
    assert plan.failures == {2: "ACCOUNT_BLOCKED"}
    assert plan.repaid == {"acc-a": 30}
    refused = plan_mass_accrual(items, accounts, AccrualLimits(per_day=1000), {"acc-a": 900})
    assert refused.failures == {2: "ACCOUNT_BLOCKED", 3: "ACCRUAL_LIMIT_REACHED", 4: "ACCRUAL_LIMIT_REACHED"}
    assert sum(credit.amount for credit in refused.credits) == 50 + 700
