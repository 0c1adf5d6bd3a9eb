"""The checks made when a campaign is published: exclusive groups that may meet, rules a
FIRST group never reaches, and percentages of the original amount over 100%."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from services.rules.domain import (
    Campaign,
    CampaignScope,
    CampaignStatus,
    Conflict,
    DiscountBase,
    DiscountPercent,
    EarnFixedPoints,
    GroupMode,
    RuleGroup,
    Scope,
    publication_conflicts,
)
from tests.unit.test_rules_mechanics import group, rule

MARCH = datetime(2026, 3, 1, tzinfo=UTC)
APRIL = datetime(2026, 4, 1, tzinfo=UTC)
MAY = datetime(2026, 5, 1, tzinfo=UTC)


def campaign(
    campaign_id: str, *groups: RuleGroup, start: datetime | None = MARCH, end: datetime | None = APRIL
) -> Campaign:
    return Campaign(campaign_id, campaign_id, CampaignStatus.DRAFT, start, end, 0, (), groups)


def kinds(conflicts: list[Conflict]) -> list[tuple[str, str, str]]:
    return [(c.kind.value, c.subject_id, c.other_campaign_id) for c in conflicts]


def exclusive(group_id: str) -> RuleGroup:
    return group(
        group_id, rule(f"{group_id}-r", DiscountPercent(1000), "receipt.total_minor > 0"), mode=GroupMode.EXCLUSIVE
    )


def test_exclusive_groups_that_may_meet_on_a_receipt_conflict() -> None:
    mine = campaign("new", exclusive("g-new"))
    overlapping = campaign("old", exclusive("g-old"), start=None, end=None)
    assert kinds(publication_conflicts(mine, [overlapping])) == [("EXCLUSIVE_OVERLAP", "g-new", "old")]
    later = campaign("old", exclusive("g-old"), start=APRIL, end=MAY)
    assert publication_conflicts(mine, [later]) == [], "periods only touch: the end is exclusive"
    other_store = dataclasses.replace(later, start_at=MARCH, scope=CampaignScope(store_ids=("s-2",)))
    in_store = dataclasses.replace(mine, scope=CampaignScope(store_ids=("s-1",)))
    assert publication_conflicts(in_store, [other_store]) == [], "different stores never share a receipt"
    same_store = dataclasses.replace(other_store, scope=CampaignScope(store_ids=("s-1", "s-2")))
    assert kinds(publication_conflicts(in_store, [same_store])) == [("EXCLUSIVE_OVERLAP", "g-new", "old")]
    not_exclusive = campaign("old", group("g", rule("r", DiscountPercent(1000))), start=None, end=None)
    assert publication_conflicts(mine, [not_exclusive]) == []
    two_in_one = campaign("new", exclusive("g-1"), exclusive("g-2"))
    assert kinds(publication_conflicts(two_in_one, [])) == [("EXCLUSIVE_OVERLAP", "g-2", "new")]


def test_rules_behind_an_always_true_rule_of_a_first_group_are_unreachable() -> None:
    first = group(
        "g",
        rule("gold", EarnFixedPoints(50), 'member.tier == "gold"', priority=0),
        rule("everyone", EarnFixedPoints(10), "", priority=1),
        rule("silver", EarnFixedPoints(30), 'member.tier == "silver"', priority=2),
        rule("true", EarnFixedPoints(5), "true", priority=3),
        mode=GroupMode.FIRST,
    )
    conflicts = publication_conflicts(campaign("c", first), [])
    assert kinds(conflicts) == [("UNREACHABLE_RULE", "silver", ""), ("UNREACHABLE_RULE", "true", "")]
    assert conflicts[0].description == "never applies: rule everyone comes first in FIRST group and always holds"
    last_is_fallback = dataclasses.replace(first, rules=first.rules[:2])
    assert publication_conflicts(campaign("c", last_is_fallback), []) == [], "an always-true last rule is a fallback"
    all_mode = dataclasses.replace(first, mode=GroupMode.ALL)
    assert publication_conflicts(campaign("c", all_mode), []) == []


def test_percentages_of_the_original_amount_over_100_percent_on_one_scope() -> None:
    soap = Scope(skus=("SOAP",))
    rules = (
        rule("a", DiscountPercent(6000, soap)),
        rule("b", DiscountPercent(5000, soap)),
        rule("c", DiscountPercent(9000)),
    )
    original = group("g", *rules, base=DiscountBase.ORIGINAL)
    conflicts = publication_conflicts(campaign("c", original), [])
    assert kinds(conflicts) == [("DISCOUNT_OVER_100_PERCENT", "b", "")]
    assert conflicts[0].description == "rules a, b take 110% of the original amount on the same lines"
    discounted = dataclasses.replace(original, discount_base=DiscountBase.DISCOUNTED)
    assert publication_conflicts(campaign("c", discounted), []) == [], "on the discounted base 60% then 50% is 80%"
    best = dataclasses.replace(original, mode=GroupMode.BEST)
    assert publication_conflicts(campaign("c", best), []) == [], "only one rule of a BEST group applies"
