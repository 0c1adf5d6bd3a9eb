"""Campaign limits, reward effects and event-triggered rules, decided without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from services.rules.domain import (
    EVERYONE,
    NO_LIMITS,
    AwardBadge,
    Campaign,
    CampaignLimits,
    CampaignScope,
    CampaignStatus,
    CampaignTrigger,
    CampaignUsage,
    DiscountPercent,
    EarnFixedPoints,
    IssueCoupon,
    Receipt,
    ReceiptLine,
    Rule,
    Subject,
    compile_campaign,
    evaluate,
    explain,
    grants_for,
    limit_refusals,
    triggered_rules,
)

AT = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
MEMBER = Subject("member-1", "gold", ())
RECEIPT = Receipt("store-1", "pos-1", "pos", AT, "RUB", (ReceiptLine(1, "A", 10_000, 1000, 10_000, False),))


def campaign(
    campaign_id: str,
    *rules: Rule,
    limits: CampaignLimits = NO_LIMITS,
    trigger: CampaignTrigger = CampaignTrigger.RECEIPT,
    scope: CampaignScope = EVERYONE,
) -> Campaign:
    return Campaign(campaign_id, campaign_id, CampaignStatus.ACTIVE, None, None, 1, rules, (), scope, limits, trigger)


def rule(rule_id: str, effect: object, condition: str = "") -> Rule:
    return Rule(rule_id, rule_id, condition, effect, "", 0)  # type: ignore[arg-type]


def test_each_limit_refuses_once_reached_and_not_before() -> None:
    limits = CampaignLimits(discount_budget_minor=1000, points_budget=500, max_uses_per_member=3)
    assert limits.refusal(CampaignUsage(999, 499, 7), 2) is None
    assert limits.refusal(CampaignUsage(1000, 0, 1), 0) == "the discount budget is spent (1000 of 1000)"
    assert limits.refusal(CampaignUsage(0, 600, 1), 0) == "the points budget is spent (600 of 500)"
    assert limits.refusal(CampaignUsage(), 3) == "the member has used the campaign 3 times (at most 3)"
    assert CampaignLimits().refusal(CampaignUsage(10**12, 10**12, 10**9), 10**6) is None, "zero is no limit"


def test_a_refused_campaign_gives_nothing_and_says_why() -> None:
    compiled = [
        compile_campaign(campaign("a", rule("a1", DiscountPercent(1000)), limits=CampaignLimits(points_budget=100))),
        compile_campaign(campaign("b", rule("b1", EarnFixedPoints(50)))),
    ]
    refusals = limit_refusals(compiled, {"a": CampaignUsage(0, 100, 2)}, {})
    assert refusals == {"a": "the points budget is spent (100 of 100)"}
    evaluation = evaluate(RECEIPT, MEMBER, compiled, refusals=refusals)
    assert (evaluation.discount_total_minor, evaluation.points_total) == (0, 50)
    reasons = {e.rule_id: e.reason for e in explain(compiled, evaluation, AT)}
    assert reasons == {"a1": "the points budget is spent (100 of 100)", "b1": ""}
    assert evaluate(RECEIPT, MEMBER, compiled).discount_total_minor == 1000, "without refusals it applies"


def test_coupon_and_badge_effects_are_reported_for_members_only() -> None:
    compiled = [compile_campaign(campaign("c", rule("c1", IssueCoupon("S-1")), rule("c2", AwardBadge("B-1"))))]
    applied = evaluate(RECEIPT, MEMBER, compiled).applied
    assert [(a.rule_id, a.coupon_series_id, a.badge_id, a.discount_minor) for a in applied] == [
        ("c1", "S-1", "", 0),
        ("c2", "", "B-1", 0),
    ]
    assert evaluate(RECEIPT, Subject("", "", ()), compiled).applied == []


def test_registration_fires_the_live_triggered_rules_that_hold() -> None:
    welcome = campaign(
        "w",
        rule("points", EarnFixedPoints(500)),
        rule("coupon", IssueCoupon("S-1")),
        rule("gold only", AwardBadge("B-1"), condition='member.tier == "silver"'),
        trigger=CampaignTrigger.MEMBER_REGISTERED,
    )
    silver_only = campaign(
        "s",
        rule("s1", EarnFixedPoints(1)),
        trigger=CampaignTrigger.MEMBER_REGISTERED,
        scope=CampaignScope(tiers=("silver",)),
    )
    on_receipts = campaign("r", rule("r1", EarnFixedPoints(7)))
    compiled = [compile_campaign(c) for c in (welcome, silver_only, on_receipts)]
    fired = triggered_rules(compiled, CampaignTrigger.MEMBER_REGISTERED, MEMBER, AT)
    assert [(c.campaign_id, r.rule_id) for c, r in fired] == [("w", "coupon"), ("w", "points")], "by (priority, id)"
    grants = grants_for("event-1", "member-1", [(c.campaign_id, r) for c, r in fired])
    assert [(g.request_id, g.effect) for g in grants] == [
        ("rules:event-1:coupon:coupon", IssueCoupon("S-1")),
        ("rules:event-1:points:points", EarnFixedPoints(500)),
    ]
    assert grants_for("event-1", "member-1", [("w", r) for _, r in fired], (IssueCoupon, AwardBadge)) == grants[:1]
    assert grants_for("event-1", "", [("w", r) for _, r in fired]) == [], "no member, nothing to hand out"
    assert evaluate(RECEIPT, MEMBER, compiled).points_total == 7, "a triggered campaign is not run on receipts"
