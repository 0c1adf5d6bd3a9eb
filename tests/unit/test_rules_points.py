"""The points effects beyond a flat rate, with exact numbers: per each N of money, on the
cheapest item, on the n-th line, and multipliers of what the other rules earned."""

from __future__ import annotations

from services.rules.domain import (
    Campaign,
    CampaignStatus,
    CompiledCampaign,
    CouponBenefit,
    DiscountPercent,
    EarnFixedPoints,
    EarnPointsCheapestItem,
    EarnPointsMultiplier,
    EarnPointsNthLine,
    EarnPointsPerAmount,
    EarnPointsPercent,
    Effect,
    Evaluation,
    GroupMode,
    IncrementCounter,
    PresentedCoupon,
    ReceiptLine,
    Rule,
    RuleGroup,
    Scope,
    Subject,
    compile_campaign,
    counter_names,
    evaluate,
)
from tests.unit.test_rules_mechanics import CATALOGUE, MEMBER, group, line, receipt, rule

ANONYMOUS = Subject("", "", ())


def campaign(*groups: RuleGroup, campaign_id: str = "c1") -> CompiledCampaign:
    return compile_campaign(Campaign(campaign_id, campaign_id, CampaignStatus.ACTIVE, None, None, 1, (), groups))


def run(
    lines: tuple[ReceiptLine, ...],
    *rules: Rule,
    mode: GroupMode = GroupMode.ALL,
    coupons: tuple[PresentedCoupon, ...] = (),
    subject: Subject = MEMBER,
) -> Evaluation:
    return evaluate(receipt(*lines), subject, [campaign(group("g", *rules, mode=mode))], coupons, CATALOGUE)


def points(evaluation: Evaluation) -> list[int]:
    return [outcome.points for outcome in evaluation.lines]


def by_rule(evaluation: Evaluation) -> dict[str, int]:
    return {applied.rule_id or applied.coupon_code: applied.points for applied in evaluation.applied}


def test_points_per_each_whole_step_of_money() -> None:
    lines = (line(1, 20000, sku="MILK"), line(2, 15499, sku="SOAP"))
    per_100 = EarnPointsPerAmount(points=10, per_minor=10000)
    assert points(run(lines, rule("r", per_100))) == [16, 14], "354.99 holds three 100.00: 30, spread pro rata"
    food = EarnPointsPerAmount(points=10, per_minor=10000, scope=Scope(category_ids=("food",)))
    assert points(run(lines, rule("r", food))) == [20, 0], "only the 200.00 of food counts"
    # a 20% discount first leaves 283.99: two steps
    discounted = run(lines, rule("d", DiscountPercent(2000)), rule("r", per_100))
    assert sum(points(discounted)) == 20
    assert points(run((line(1, 9999),), rule("r", per_100))) == [0], "less than one step earns nothing"


def test_points_on_the_cheapest_item() -> None:
    lines = (
        line(1, 500, quantity=2, sku="MILK"),
        line(2, 300, sku="CHEESE"),
        line(3, 800, sku="SOAP"),
        line(4, 100, no_promotions=True),
    )
    assert points(run(lines, rule("r", EarnPointsCheapestItem(5000)))) == [0, 150, 0, 0]
    milk = EarnPointsCheapestItem(5000, Scope(skus=("MILK",)))
    assert points(run(lines, rule("r", milk))) == [250, 0, 0, 0]
    weighed = ReceiptLine(1, "MILK", 1000, 1500, 1500, False)
    assert points(run((weighed,), rule("r", milk))) == [0], "goods sold by weight have no unit"


def test_points_on_the_nth_line_in_position_order() -> None:
    # sent out of order; the no_promotions line is not counted
    lines = (line(3, 3000), line(1, 1000), line(2, 2000, no_promotions=True), line(4, 4000))
    assert points(run(lines, rule("r", EarnPointsNthLine(2, 1000)))) == [300, 0, 0, 0]
    assert points(run(lines, rule("r", EarnPointsNthLine(3, 1000)))) == [0, 0, 0, 400]
    assert points(run(lines, rule("r", EarnPointsNthLine(4, 1000)))) == [0, 0, 0, 0]


def test_a_multiplier_multiplies_what_the_other_rules_and_coupons_earned() -> None:
    lines = (line(1, 1000, sku="MILK"), line(2, 1000, sku="SOAP"))
    five_percent, ten_points = rule("percent", EarnPointsPercent(500)), rule("fixed", EarnFixedPoints(10))
    double_milk = rule("double", EarnPointsMultiplier(20000, Scope(skus=("MILK",))))
    result = run(lines, double_milk, five_percent, ten_points)
    assert points(result) == [110, 55], "MILK's 50 + 5 doubled; the multiplier's place in the rules does not matter"
    assert by_rule(result) == {"double": 55, "percent": 100, "fixed": 10}

    twice = run(lines, five_percent, rule("x2", EarnPointsMultiplier(20000)), rule("x2b", EarnPointsMultiplier(20000)))
    assert points(twice) == [150, 150], "two x2 make x3: each doubles the other rules' points, not each other's"

    one_and_half = run(lines, five_percent, rule("x1.5", EarnPointsMultiplier(15000)))
    assert points(one_and_half) == [75, 75]

    with_coupon = run(
        lines,
        rule("x2", EarnPointsMultiplier(20000)),
        coupons=(PresentedCoupon("PTS", "S1", "c1", CouponBenefit(points=40)),),
    )
    assert points(with_coupon) == [40, 40], "a points coupon is multiplied too"
    assert points(run(lines, rule("x2", EarnPointsMultiplier(20000)))) == [0, 0], "nothing to multiply"


def test_the_best_rule_counts_what_a_multiplier_would_add() -> None:
    lines = (line(1, 10000),)
    earn = campaign(group("earn", rule("percent", EarnPointsPercent(500))), campaign_id="a")
    best = campaign(
        group(
            "best",
            rule("x2", EarnPointsMultiplier(20000)),
            rule("fixed", EarnFixedPoints(400)),
            mode=GroupMode.BEST,
            priority=1,
        ),
        campaign_id="b",
    )
    result = evaluate(receipt(*lines), MEMBER, [earn, best], (), CATALOGUE)
    assert by_rule(result) == {"percent": 500, "x2": 500}, "doubling 500 is worth more than 400"


def test_anonymous_receipts_earn_none_of_them() -> None:
    lines = (line(1, 20000),)
    effects: tuple[Effect, ...] = (
        EarnPointsPerAmount(10, 10000),
        EarnPointsCheapestItem(5000),
        EarnPointsNthLine(1, 1000),
        EarnPointsMultiplier(20000),
    )
    result = run(lines, *(rule(f"r{i}", effect) for i, effect in enumerate(effects)), subject=ANONYMOUS)
    assert result.applied == [] and points(result) == [0]
    assert all(reason == "anonymous receipts earn no points" for _, reason in result.skipped)


# counters


def test_conditions_read_the_member_counters_and_a_counter_never_set_reads_zero() -> None:
    every_fifth = rule("fifth", EarnFixedPoints(100), "receipt.total_minor >= 50000 && member.counters.big % 5 == 4")
    count = rule("count", IncrementCounter("big", 1), "receipt.total_minor >= 50000")
    lines = (line(1, 60000),)
    fresh = run(lines, every_fifth, count)
    assert [(a.rule_id, a.points) for a in fresh.applied] == [("count", 0)], "no counter yet: 0, not an error"
    fourth = run(lines, every_fifth, count, subject=Subject("member-1", "basic", (), counters={"big": 4}))
    assert [(a.rule_id, a.points) for a in fourth.applied] == [("count", 0), ("fifth", 100)]
    small = run((line(1, 40000),), every_fifth, count, subject=Subject("member-1", "basic", (), counters={"big": 9}))
    assert small.applied == [], "a purchase under 500.00 neither counts nor earns"
    anonymous = run(lines, count, subject=ANONYMOUS)
    assert anonymous.applied == [] and anonymous.skipped == [("count", "anonymous receipts keep no counters")]


def test_counter_names_are_read_from_the_conditions() -> None:
    assert counter_names("member.counters.big % 5 == 4 && member.counters.stamps_2 > 0 || x.counters") == {
        "big",
        "stamps_2",
    }
