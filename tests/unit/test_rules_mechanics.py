"""The promotion mechanics with exact numbers: discounts, rule groups, coupons, the
redemption cap, and the properties every evaluation keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.rules.domain import (
    MIN_PRICE_ATTRIBUTE,
    BuyMPayN,
    Campaign,
    CampaignScope,
    CampaignStatus,
    CampaignTrigger,
    CheapestItemDiscount,
    CompiledCampaign,
    CouponBenefit,
    DiscountAmount,
    DiscountBase,
    DiscountPercent,
    DiscountPercentPerAmount,
    EarnFixedPoints,
    EarnPointsNthLine,
    EarnPointsPercent,
    EarnPointsPerUnits,
    Effect,
    Evaluation,
    FixedPrice,
    GroupMode,
    IncrementCounter,
    IssueCoupon,
    NthItemDiscount,
    NthLineDiscount,
    Payment,
    PresentedCoupon,
    Product,
    Purchase,
    Receipt,
    ReceiptLine,
    RedemptionCap,
    Rule,
    RuleGroup,
    Scope,
    SetPrice,
    Subject,
    compile_campaign,
    evaluate,
    explain,
    grants_for,
    purchase_facts,
    spread_within,
    triggered_rules,
)

AT = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
MEMBER = Subject("member-1", "basic", ())
GOLD = Subject("member-2", "gold", ())
CATALOGUE = {
    "MILK": Product("MILK", ("dairy", "food"), "farm", own_brand=True, list_ids=frozenset({"breakfast"})),
    "CHEESE": Product("CHEESE", ("cheese", "dairy", "food"), "alpine"),
    "SOAP": Product("SOAP", ("household",), "clean", attributes={"volume_ml": 500}),
    # sold at no less than 8.00 a bottle, whatever the promotion
    "WINE": Product("WINE", ("drinks",), "vineyard", attributes={MIN_PRICE_ATTRIBUTE: 800}),
}


def line(position: int, price: int, quantity: int = 1, sku: str = "", no_promotions: bool = False) -> ReceiptLine:
    """A line of `quantity` whole units at `price`."""
    return ReceiptLine(position, sku or f"SKU-{position}", price, quantity * 1000, price * quantity, no_promotions)


def receipt(*lines: ReceiptLine) -> Receipt:
    return Receipt("store-1", "pos-1", "pos", AT, "RUB", tuple(lines))


def rule(rule_id: str, effect: Effect, condition: str = "", priority: int = 0) -> Rule:
    return Rule(rule_id, rule_id, condition, effect, f"text {rule_id}", priority)


def group(
    group_id: str,
    *rules: Rule,
    mode: GroupMode = GroupMode.ALL,
    priority: int = 0,
    base: DiscountBase = DiscountBase.DISCOUNTED,
    condition: str = "",
) -> RuleGroup:
    return RuleGroup(group_id, group_id, mode, priority, condition, base, rules)


def campaign(*groups: RuleGroup, campaign_id: str = "c1") -> CompiledCampaign:
    return compile_campaign(Campaign(campaign_id, campaign_id, CampaignStatus.ACTIVE, None, None, 1, (), groups))


def run(
    the_receipt: Receipt,
    *campaigns: CompiledCampaign,
    subject: Subject = MEMBER,
    coupons: tuple[PresentedCoupon, ...] = (),
    cap: int = 0,
) -> Evaluation:
    return evaluate(the_receipt, subject, list(campaigns), coupons, CATALOGUE, cap)


def one(effect: Effect, *lines: ReceiptLine) -> Evaluation:
    return run(receipt(*lines), campaign(group("g", rule("r", effect))))


def discounts(evaluation: Evaluation) -> list[int]:
    return [outcome.discount_minor for outcome in evaluation.lines]


# spreading within caps


@pytest.mark.parametrize(
    ("total", "weights", "caps", "parts"),
    [
        pytest.param(2, [1, 1, 1], [1, 1, 1], [0, 1, 1], id="the remainder moves back when the last line is full"),
        pytest.param(500, [1000, 3000], [1000, 3000], [125, 375], id="pro rata"),
        pytest.param(5000, [1000, 3000], [1000, 3000], [1000, 3000], id="never more than the lines cost"),
        pytest.param(10, [5, 5, 0], [5, 5, 0], [5, 5, 0], id="a line without weight takes nothing"),
    ],
)
def test_spread_within_caps(total: int, weights: list[int], caps: list[int], parts: list[int]) -> None:
    assert spread_within(total, weights, caps) == parts


# discounts


def test_a_receipt_percent_is_spread_pro_rata_and_skips_no_promotions_lines() -> None:
    result = one(DiscountPercent(1000), line(1, 1000), line(2, 2345), line(3, 5000, no_promotions=True))
    assert discounts(result) == [99, 235, 0], "334 = 10% of 33.45, remainder on the last eligible line"
    assert [o.final_amount_minor for o in result.lines] == [901, 2110, 5000]
    assert result.discount_total_minor == 334
    assert [(a.rule_id, a.discount_minor, a.points) for a in result.applied] == [("r", 334, 0)]


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        pytest.param(Scope(skus=("CHEESE",)), [0, 300, 0], id="by sku"),
        pytest.param(Scope(category_ids=("dairy",)), [100, 300, 0], id="by category, matching subcategories"),
        pytest.param(Scope(brand_ids=("clean",)), [0, 0, 50], id="by brand"),
        pytest.param(Scope(product_list_ids=("breakfast",)), [100, 0, 0], id="by product list"),
        pytest.param(Scope(skus=("SOAP",), brand_ids=("farm",)), [100, 0, 50], id="any named matches"),
    ],
)
def test_a_line_discount_acts_on_its_scope(scope: Scope, expected: list[int]) -> None:
    lines = (line(1, 1000, sku="MILK"), line(2, 3000, sku="CHEESE"), line(3, 500, sku="SOAP"))
    assert discounts(one(DiscountPercent(1000, scope), *lines)) == expected


def test_an_amount_off_is_spread_pro_rata_and_never_exceeds_the_lines() -> None:
    assert discounts(one(DiscountAmount(500), line(1, 1000), line(2, 3000))) == [125, 375]
    assert discounts(one(DiscountAmount(5000), line(1, 1000), line(2, 3000))) == [1000, 3000]
    assert discounts(one(DiscountAmount(100), line(1, 1), line(2, 1), line(3, 1))) == [1, 1, 1]


def test_a_fixed_price_reprices_pieces_and_weight_and_never_raises_a_price() -> None:
    kilos = ReceiptLine(2, "APPLES", 20000, 1500, 30000, False)
    result = one(FixedPrice(9900), line(1, 15000, quantity=3), kilos, line(3, 5000))
    assert discounts(result) == [45000 - 29700, 30000 - 14850, 0]


def test_m_for_the_price_of_n_frees_the_cheapest_of_each_group() -> None:
    three_for_two = BuyMPayN(3, 2)
    assert discounts(one(three_for_two, line(1, 100, quantity=3), line(2, 50))) == [100, 0]
    assert discounts(one(three_for_two, line(1, 100, quantity=2), line(2, 50, quantity=2))) == [0, 50]
    assert discounts(one(three_for_two, line(1, 100, quantity=2))) == [0], "no full group"
    assert discounts(one(BuyMPayN(2, 1), line(1, 100, quantity=5))) == [200]


def test_every_nth_item_discount() -> None:
    half_off_second = NthItemDiscount(2, 5000)
    assert discounts(one(half_off_second, line(1, 300), line(2, 200), line(3, 100))) == [0, 100, 0]
    every_third_free = NthItemDiscount(3, 10000, Scope(skus=("A",)))
    lines = (line(1, 100, quantity=6, sku="A"), line(2, 10, quantity=3, sku="B"))
    assert discounts(one(every_third_free, *lines)) == [200, 0]


def test_a_weighed_line_has_no_units_to_give_away() -> None:
    kilos = ReceiptLine(1, "APPLES", 20000, 2500, 50000, False)
    assert discounts(one(NthItemDiscount(2, 10000), kilos)) == [0]


def test_the_cheapest_item_is_discounted_once_enough_units_are_bought() -> None:
    cheapest_free = CheapestItemDiscount(10000, 3)
    assert discounts(one(cheapest_free, line(1, 300), line(2, 200), line(3, 100))) == [0, 0, 100]
    assert discounts(one(cheapest_free, line(1, 300), line(2, 200))) == [0, 0]


def test_no_promotions_lines_are_never_touched() -> None:
    lines = (line(1, 100, no_promotions=True), line(2, 100, no_promotions=True))
    for effect in (
        DiscountPercent(5000),
        DiscountAmount(50),
        FixedPrice(1),
        BuyMPayN(2, 1),
        CheapestItemDiscount(10000, 1),
    ):
        assert discounts(one(effect, *lines)) == [0, 0], effect


# rule groups


def test_stacked_percentages_on_the_discounted_or_the_original_base() -> None:
    ten = DiscountPercent(1000)
    discounted = run(receipt(line(1, 1000)), campaign(group("g1", rule("a", ten)), group("g2", rule("b", ten))))
    assert discounts(discounted) == [190], "10% then 10% of what is left"
    original = campaign(
        group("g1", rule("a", ten)), group("g2", rule("b", ten), base=DiscountBase.ORIGINAL, priority=1)
    )
    assert discounts(run(receipt(line(1, 1000)), original)) == [200], "10% of the original twice"
    capped = campaign(
        group("g1", rule("a", DiscountPercent(8000))),
        group("g2", rule("b", DiscountPercent(5000)), base=DiscountBase.ORIGINAL, priority=1),
    )
    assert discounts(run(receipt(line(1, 1000)), capped)) == [1000], "never below zero"


def test_groups_apply_by_priority_across_campaigns() -> None:
    amount_first = campaign(group("g-amount", rule("amount", DiscountAmount(100)), priority=1), campaign_id="a")
    percent_later = campaign(group("g-percent", rule("percent", DiscountPercent(1000)), priority=2), campaign_id="b")
    result = run(receipt(line(1, 1000)), percent_later, amount_first)
    assert [(a.rule_id, a.discount_minor) for a in result.applied] == [("amount", 100), ("percent", 90)]


def test_first_mode_applies_the_first_rule_that_holds() -> None:
    rules = (
        rule("r1", DiscountAmount(10), "receipt.total_minor > 5000", priority=1),
        rule("r3", DiscountAmount(30), priority=3),
        rule("r2", DiscountAmount(20), priority=2),
    )
    result = run(receipt(line(1, 1000)), campaign(group("g", *rules, mode=GroupMode.FIRST)))
    assert [a.rule_id for a in result.applied] == ["r2"]
    assert result.skipped == [("r1", "condition is false"), ("r3", "group g: an earlier rule applied")]


def test_best_mode_applies_the_rule_worth_most() -> None:
    rules = (rule("percent", DiscountPercent(1000)), rule("amount", DiscountAmount(150)))
    best = campaign(group("g", *rules, mode=GroupMode.BEST))
    assert [a.rule_id for a in run(receipt(line(1, 1000)), best).applied] == ["amount"]
    assert [a.rule_id for a in run(receipt(line(1, 2000)), best).applied] == ["percent"]
    assert run(receipt(line(1, 1000)), best).skipped == [("percent", "group g: amount is worth more")]


def test_an_exclusive_group_that_holds_displaces_every_other_group() -> None:
    others = campaign(group("g-base", rule("base", DiscountPercent(500))), campaign_id="a")
    exclusive = campaign(
        group("g-vip", rule("vip", DiscountPercent(2000), 'member.tier == "gold"'), mode=GroupMode.EXCLUSIVE),
        group("g-points", rule("points", EarnFixedPoints(10)), priority=5),
        campaign_id="b",
    )
    gold = run(receipt(line(1, 1000)), others, exclusive, subject=GOLD)
    assert [a.rule_id for a in gold.applied] == ["vip"]
    assert discounts(gold) == [200]
    assert sorted(gold.skipped) == [
        ("base", "displaced by exclusive group g-vip"),
        ("points", "displaced by exclusive group g-vip"),
    ]
    basic = run(receipt(line(1, 1000)), others, exclusive)
    assert [a.rule_id for a in basic.applied] == ["base", "points"]


def test_a_group_condition_gates_its_rules() -> None:
    gated = campaign(group("g", rule("r", DiscountAmount(100)), condition="receipt.line_count >= 2"))
    assert discounts(run(receipt(line(1, 1000)), gated)) == [0]
    assert discounts(run(receipt(line(1, 1000), line(2, 1000)), gated)) == [50, 50]


def test_points_are_earned_on_the_discounted_amounts() -> None:
    result = run(
        receipt(line(1, 1000), line(2, 1000, no_promotions=True)),
        campaign(group("g", rule("points", EarnPointsPercent(500)), rule("discount", DiscountPercent(1000)))),
    )
    assert [o.points for o in result.lines] == [45, 0]
    assert [(a.rule_id, a.points, a.discount_minor) for a in result.applied] == [
        ("discount", 0, 100),
        ("points", 45, 0),
    ]


def test_points_on_a_product_scope() -> None:
    lines = (line(1, 1000, sku="MILK"), line(2, 2000, sku="SOAP"))
    result = run(
        receipt(*lines), campaign(group("g", rule("r", EarnPointsPercent(500, Scope(category_ids=("food",))))))
    )
    assert [o.points for o in result.lines] == [50, 0]


def test_conditions_see_line_product_attributes() -> None:
    conditioned = campaign(
        group(
            "g",
            rule(
                "r", DiscountAmount(100), 'receipt.lines.exists(l, l.brand_id == "clean" && l.quantity_milli >= 2000)'
            ),
        )
    )
    assert discounts(run(receipt(line(1, 500, quantity=2, sku="SOAP")), conditioned)) == [100]
    assert discounts(run(receipt(line(1, 500, quantity=1, sku="SOAP")), conditioned)) == [0]


# redemption cap


def test_the_default_redemption_cap_is_a_share_of_each_eligible_line() -> None:
    result = run(receipt(line(1, 1001), line(2, 2000, no_promotions=True)), cap=5000)
    assert [o.max_points_payment_minor for o in result.lines] == [500, 0]


def test_a_cap_rule_per_tier_replaces_the_default() -> None:
    caps = campaign(
        group(
            "caps",
            rule("gold", RedemptionCap(basis_points=9900), 'member.tier == "gold"', priority=1),
            rule("rest", RedemptionCap(all_but_minor=100), priority=2),
            mode=GroupMode.FIRST,
        )
    )
    lines = (line(1, 1000), line(2, 3000))
    gold = run(receipt(*lines), caps, subject=GOLD, cap=5000)
    assert [o.max_points_payment_minor for o in gold.lines] == [990, 2970]
    others = run(receipt(*lines), caps, cap=5000)
    assert [o.max_points_payment_minor for o in others.lines] == [975, 2925], "all but 1.00, pro rata"
    assert [(a.rule_id, a.points, a.discount_minor) for a in others.applied] == [("rest", 0, 0)]


def test_the_cap_is_taken_of_the_discounted_amount() -> None:
    result = run(receipt(line(1, 1000)), campaign(group("g", rule("r", DiscountPercent(2000)))), cap=5000)
    assert [o.max_points_payment_minor for o in result.lines] == [400]


# coupons


def coupon(code: str, benefit: CouponBenefit, series: str = "S1") -> PresentedCoupon:
    return PresentedCoupon(code, series, "coupon-campaign", benefit)


def test_coupons_apply_after_the_promotions_on_the_discounted_amounts() -> None:
    promotions = campaign(group("g", rule("r", DiscountPercent(1000))))
    result = run(
        receipt(line(1, 1000, sku="MILK"), line(2, 3000, sku="SOAP")),
        promotions,
        coupons=(
            coupon("TEN", CouponBenefit(percent_off_basis_points=1000, scope=Scope(category_ids=("dairy",)))),
            coupon("AMOUNT", CouponBenefit(amount_off_minor=301)),
        ),
    )
    # promotion: 100 + 300; TEN: 10% of 900 = 90 on MILK; AMOUNT: 301 over 810 and 2700
    assert discounts(result) == [100 + 90 + 69, 300 + 232]
    assert [(a.rule_id, a.coupon_code, a.discount_minor) for a in result.applied] == [
        ("r", "", 400),
        ("", "TEN", 90),
        ("", "AMOUNT", 301),
    ]
    assert result.applied[1].campaign_id == "coupon-campaign"
    assert result.unused_coupon_codes == []


def test_fixed_price_gift_and_points_coupons() -> None:
    lines = (line(1, 1000, quantity=2, sku="MILK"), line(2, 300, sku="SOAP"), line(3, 200, sku="SOAP"))
    result = run(
        receipt(*lines),
        coupons=(
            coupon("FIXED", CouponBenefit(fixed_price_minor=700, scope=Scope(skus=("MILK",)))),
            coupon("GIFT", CouponBenefit(gift_sku="SOAP")),
            coupon("POINTS", CouponBenefit(points=250)),
        ),
    )
    assert discounts(result) == [600, 0, 200], "MILK at 7.00 a piece; the cheapest SOAP free"
    assert result.points_total == 250
    assert [(a.coupon_code, a.points) for a in result.applied][2] == ("POINTS", 250)


def test_coupons_that_cannot_apply_are_reported_unused() -> None:
    result = run(
        receipt(line(1, 1000, sku="MILK"), line(2, 500, sku="TOBACCO", no_promotions=True)),
        coupons=(
            coupon("SCOPE", CouponBenefit(percent_off_basis_points=1000, scope=Scope(skus=("TOBACCO",)))),
            coupon("MIN", CouponBenefit(amount_off_minor=100, min_receipt_total_minor=5000)),
            coupon("GIFT", CouponBenefit(gift_sku="CHEESE")),
            coupon("OK", CouponBenefit(amount_off_minor=100)),
        ),
    )
    assert result.unused_coupon_codes == ["SCOPE", "MIN", "GIFT"]
    assert discounts(result) == [100, 0]
    anonymous = run(
        receipt(line(1, 1000)), subject=Subject("", "", ()), coupons=(coupon("P", CouponBenefit(points=5)),)
    )
    assert anonymous.unused_coupon_codes == ["P"]


def test_a_condition_may_test_the_presented_coupons() -> None:
    series_rule = campaign(group("g", rule("r", DiscountAmount(100), '"SERIES1" in receipt.coupon_series')))
    with_series = run(receipt(line(1, 1000)), series_rule, coupons=(coupon("X", CouponBenefit(points=1), "SERIES1"),))
    assert discounts(with_series) == [100]
    assert discounts(run(receipt(line(1, 1000)), series_rule)) == [0]


# properties

EFFECTS = st.one_of(
    st.builds(DiscountPercent, st.integers(1, 10000)),
    st.builds(DiscountAmount, st.integers(1, 10**6)),
    st.builds(FixedPrice, st.integers(0, 10**4)),
    st.builds(lambda m, n: BuyMPayN(m, min(n, m - 1)), st.integers(2, 5), st.integers(1, 4)),
    st.builds(NthItemDiscount, st.integers(2, 5), st.integers(1, 10000)),
    st.builds(CheapestItemDiscount, st.integers(1, 10000), st.integers(0, 4)),
    st.builds(EarnPointsPercent, st.integers(1, 10000)),
    st.builds(EarnFixedPoints, st.integers(1, 10**4)),
    st.builds(
        SetPrice,
        st.lists(st.sampled_from(["MILK", "SOAP", "WINE"]), min_size=2, max_size=3).map(tuple),
        st.integers(0, 10**5),
    ),
    st.builds(NthLineDiscount, st.integers(1, 4), st.integers(1, 10**5)),
    st.builds(DiscountPercentPerAmount, st.integers(1, 5000), st.integers(1, 10**5), st.integers(1, 10000)),
    st.builds(EarnPointsPerUnits, st.integers(1, 1000), st.integers(1, 3)),
    st.builds(lambda n, bp: EarnPointsNthLine(n, bp, every=True), st.integers(1, 3), st.integers(1, 10000)),
)
LINES = st.lists(
    st.tuples(st.integers(0, 10**5), st.integers(1, 4), st.booleans(), st.sampled_from(["MILK", "SOAP", "X", "WINE"])),
    min_size=1,
    max_size=12,
)


@settings(deadline=None, max_examples=150)
@given(
    lines=LINES,
    effects=st.lists(st.tuples(EFFECTS, st.sampled_from(list(DiscountBase))), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
    coupon_off=st.integers(0, 10**5),
)
def test_discounts_stay_within_the_lines_add_up_and_do_not_depend_on_line_order(
    lines: list[tuple[int, int, bool, str]],
    effects: list[tuple[Effect, DiscountBase]],
    order: object,
    coupon_off: int,
) -> None:
    the_lines = [
        line(position, price, quantity, sku, no_promo)
        for position, (price, quantity, no_promo, sku) in enumerate(lines, start=1)
    ]
    compiled = campaign(
        *(group(f"g{index}", rule(f"r{index}", effect), base=base) for index, (effect, base) in enumerate(effects))
    )
    coupons = (coupon("C", CouponBenefit(amount_off_minor=coupon_off)),) if coupon_off else ()
    result = run(receipt(*the_lines), compiled, coupons=coupons, cap=5000)
    for outcome, the_line in zip(result.lines, the_lines, strict=True):
        assert 0 <= outcome.discount_minor <= the_line.amount_minor
        assert outcome.final_amount_minor == the_line.amount_minor - outcome.discount_minor
        assert 0 <= outcome.max_points_payment_minor <= outcome.final_amount_minor
        if the_line.no_promotions:
            assert (outcome.discount_minor, outcome.points, outcome.max_points_payment_minor) == (0, 0, 0)
        if the_line.sku == "WINE":  # never below its minimum price (unless it was sold below it)
            assert outcome.final_amount_minor >= min(the_line.amount_minor, 800 * the_line.quantity_milli // 1000)
    assert sum(a.discount_minor for a in result.applied) == result.discount_total_minor
    assert sum(a.points for a in result.applied) == result.points_total
    assert sum(lot.points for lot in result.lots) == result.points_total

    shuffled = list(the_lines)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    again = run(receipt(*shuffled), compiled, coupons=coupons, cap=5000)
    assert sorted(again.lines, key=lambda o: o.position) == result.lines
    assert again.applied == result.applied


# campaign scope (who, where, when)


def scoped(scope: CampaignScope) -> CompiledCampaign:
    rules = (rule("r", DiscountAmount(100)),)
    return compile_campaign(Campaign("c-scoped", "c", CampaignStatus.ACTIVE, None, None, 1, rules, (), scope))


@pytest.mark.parametrize(
    ("scope", "subject", "store", "applies", "reason"),
    [
        (CampaignScope(tiers=("gold",)), GOLD, "store-1", True, ""),
        (CampaignScope(tiers=("gold",)), MEMBER, "store-1", False, "tier"),
        (CampaignScope(segments=("vip", "staff")), Subject("m", "", ("staff",)), "store-1", True, ""),
        (CampaignScope(segments=("vip",)), MEMBER, "store-1", False, "segment"),
        (CampaignScope(store_ids=("store-2",)), MEMBER, "store-2", True, ""),
        (CampaignScope(store_ids=("store-2",)), MEMBER, "store-1", False, "store"),
        (CampaignScope(channels=("web",)), MEMBER, "store-1", False, "channel"),
        (CampaignScope(weekdays=(1,)), MEMBER, "store-1", True, ""),  # 2026-03-02 is a Monday
        (CampaignScope(weekdays=(6, 7)), MEMBER, "store-1", False, "weekday"),
        (CampaignScope(days_of_month=(2,)), MEMBER, "store-1", True, ""),
        (CampaignScope(days_of_month=(1,)), MEMBER, "store-1", False, "day of month"),
    ],
)
def test_the_campaign_scope_prefilters_receipts(
    scope: CampaignScope, subject: Subject, store: str, applies: bool, reason: str
) -> None:
    the_receipt = Receipt(store, "pos-1", "pos", AT, "RUB", (line(1, 1000),))
    result = evaluate(the_receipt, subject, [scoped(scope)])
    assert discounts(result) == ([100] if applies else [0])
    assert result.skipped == ([] if applies else [("c-scoped", f"out of the campaign's scope: {reason}")])


def test_happy_hours_are_read_in_the_store_time_zone() -> None:
    happy = scoped(CampaignScope(hours=(13, 14)))
    moscow = ZoneInfo("Europe/Moscow")  # 12:30 UTC is 15:30 in Moscow
    at_noon_utc = receipt(line(1, 1000))
    assert discounts(evaluate(at_noon_utc, MEMBER, [happy])) == [0]
    assert discounts(evaluate(at_noon_utc, MEMBER, [happy], time_zone=ZoneInfo("Europe/London"))) == [0]
    earlier = Receipt("store-1", "pos-1", "pos", AT.replace(hour=10, minute=59), "RUB", (line(1, 1000),))
    assert discounts(evaluate(earlier, MEMBER, [happy], time_zone=moscow)) == [100], "13:59 in Moscow"
    assert discounts(evaluate(at_noon_utc, MEMBER, [scoped(CampaignScope(hours=(12,)))])) == [100]
    hour_rule = campaign(group("g", rule("r", DiscountAmount(7), "receipt.hour == 15")))
    assert discounts(evaluate(at_noon_utc, MEMBER, [hour_rule], time_zone=moscow)) == [7], "conditions too"


# simulation: an explanation for every rule


def test_every_rule_is_explained() -> None:
    vip_only = compile_campaign(
        Campaign(
            "c-vip",
            "vip",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (rule("vip", DiscountAmount(1)),),
            (),
            CampaignScope(tiers=("vip",)),
        )
    )
    ended = compile_campaign(
        Campaign("c-old", "old", CampaignStatus.ACTIVE, None, AT, 1, (rule("old", DiscountAmount(1)),))
    )
    main = campaign(
        group(
            "g-first",
            rule("big", DiscountAmount(500), "receipt.total_minor > 100000", priority=1),
            rule("small", DiscountAmount(100), priority=2),
            rule("smaller", DiscountAmount(50), priority=3),
            mode=GroupMode.FIRST,
        ),
        group("g-gated", rule("gated", DiscountAmount(9)), condition='member.tier == "vip"', priority=1),
        group("g-points", rule("points", EarnFixedPoints(10)), priority=2),
        campaign_id="c-main",
    )
    campaigns = [main, vip_only, ended]
    result = evaluate(receipt(line(1, 1000)), Subject("", "", ()), campaigns)
    explained = [
        (e.campaign_id, e.rule_id, e.applied, e.reason, e.discount_minor) for e in explain(campaigns, result, AT)
    ]
    assert explained == [
        ("c-main", "big", False, "condition is false: receipt.total_minor > 100000", 0),
        ("c-main", "small", True, "", 100),
        ("c-main", "smaller", False, "group g-first: an earlier rule applied", 0),
        ("c-main", "gated", False, 'the group\'s condition is false: member.tier == "vip"', 0),
        ("c-main", "points", False, "anonymous receipts earn no points", 0),
        ("c-old", "old", False, "the campaign is not live at the receipt's time", 0),
        ("c-vip", "vip", False, "out of the campaign's scope: tier", 0),
    ]


# member purchase statistics


def test_purchase_facts_as_of_the_receipt_time() -> None:
    history = (
        Purchase(AT - timedelta(days=400), 10_000),
        Purchase(AT - timedelta(days=20), 3_000),
        Purchase(AT - timedelta(days=19), -1_000, is_return=True),
        Purchase(AT - timedelta(days=3), 2_000),
        Purchase(AT + timedelta(days=1), 99_999),  # after the receipt: not yet
    )
    assert purchase_facts(history, AT) == {
        "count": 3,
        "total_minor": 14_000,
        "days_since_last": 3,
        "spend_last_7_days_minor": 2_000,
        "spend_last_30_days_minor": 4_000,
        "spend_last_90_days_minor": 4_000,
        "spend_last_180_days_minor": 4_000,
        "spend_last_365_days_minor": 4_000,
    }
    assert purchase_facts((), AT)["days_since_last"] == -1


def test_every_third_purchase_and_a_lapsed_customer() -> None:
    third = campaign(group("g", rule("r", DiscountAmount(100), "(member.purchases.count + 1) % 3 == 0")))
    lapsed = campaign(
        group("g", rule("back", EarnFixedPoints(500), "member.purchases.days_since_last > 90")), campaign_id="c2"
    )
    history = tuple(Purchase(AT - timedelta(days=200 - day), 1_000) for day in range(2))
    member = Subject("m", "", (), history)
    result = run(receipt(line(1, 1000)), third, lapsed, subject=member)
    assert [a.rule_id for a in result.applied] == ["r", "back"], "the third purchase, 199 days after the last"
    assert run(receipt(line(1, 1000)), third, subject=Subject("m", "", (), history[:1])).applied == []


# worked examples of DOMAIN.md (amounts in kopecks; 100 point units are one point)


def test_flat_five_percent_back() -> None:
    result = run(receipt(line(1, 10_000)), campaign(group("g", rule("r", EarnPointsPercent(500)))))
    assert result.points_total == 500, "100 roubles spent -> 5 points"


@pytest.mark.parametrize(("total", "points"), [(5_000, 250), (10_000, 700), (49_999, 3_499), (50_000, 5_000)])
def test_floating_rate_by_receipt_total(total: int, points: int) -> None:
    floating = campaign(
        group(
            "g",
            rule("10%", EarnPointsPercent(1000), "receipt.total_minor >= 50000", priority=1),
            rule("7%", EarnPointsPercent(700), "receipt.total_minor >= 10000", priority=2),
            rule("5%", EarnPointsPercent(500), priority=3),
            mode=GroupMode.FIRST,
        )
    )
    assert run(receipt(line(1, total)), floating).points_total == points


def test_rates_by_product_and_a_bonus_for_item_a() -> None:
    by_product = campaign(
        group(
            "g",
            rule("2%", EarnPointsPercent(200)),
            rule("A +1%", EarnPointsPercent(100, Scope(skus=("A",)))),
            rule("B +3%", EarnPointsPercent(300, Scope(skus=("B",)))),
            rule("A bonus", EarnFixedPoints(10_000), '"A" in receipt.skus'),
        )
    )
    result = run(receipt(line(1, 10_000, sku="A"), line(2, 10_000, sku="B"), line(3, 10_000, sku="C")), by_product)
    # A: 3% = 300 (+ its pro-rata third of the 100-point bonus); B: 5% = 500; C: 2% = 200
    assert [o.points for o in result.lines] == [300 + 3_333, 500 + 3_333, 200 + 3_334]


def test_happy_hours_and_big_receipts_each_give_fifty_points() -> None:
    happy = compile_campaign(
        Campaign(
            "happy",
            "h",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (rule("h", EarnFixedPoints(5_000)),),
            (),
            CampaignScope(hours=(13, 14)),
        )
    )
    big = campaign(group("g", rule("big", EarnFixedPoints(5_000), "receipt.total_minor > 200000")), campaign_id="big")
    at_one = Receipt("s", "t", "pos", AT.replace(hour=13), "RUB", (line(1, 250_000),))
    assert evaluate(at_one, MEMBER, [happy, big]).points_total == 10_000
    at_four = Receipt("s", "t", "pos", AT.replace(hour=16), "RUB", (line(1, 1_000),))
    assert evaluate(at_four, MEMBER, [happy, big]).points_total == 0


def test_online_grocer_one_percent_back_and_pay_up_to_99_percent() -> None:
    grocer = campaign(group("g", rule("1%", EarnPointsPercent(100)), rule("cap", RedemptionCap(basis_points=9900))))
    result = run(receipt(line(1, 123_456)), grocer, cap=5000)
    assert (result.points_total, result.lines[0].max_points_payment_minor) == (1_234, 122_221)


def test_a_permanent_five_percent_discount_for_vip() -> None:
    vip = compile_campaign(
        Campaign(
            "vip",
            "v",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (rule("5%", DiscountPercent(500)),),
            (),
            CampaignScope(tiers=("vip",)),
        )
    )
    assert discounts(evaluate(receipt(line(1, 10_000)), Subject("m", "vip", ()), [vip])) == [500]
    assert discounts(evaluate(receipt(line(1, 10_000)), MEMBER, [vip])) == [0]


# the mechanics catalogue of DOMAIN.md, one test per discount mechanic (docs/rules.md lists
# each with its rule definition); amounts in kopecks


ANYWHERE = CampaignScope()


def promo(*rules: Rule, scope: CampaignScope = ANYWHERE, start: datetime | None = None) -> CompiledCampaign:
    """A live campaign of default rules with a campaign scope."""
    return compile_campaign(Campaign("promo", "promo", CampaignStatus.ACTIVE, start, None, 1, rules, (), scope))


def at(
    moment: datetime,
    *lines: ReceiptLine,
    store: str = "store-1",
    channel: str = "pos",
    payments: tuple[Payment, ...] = (),
) -> Receipt:
    return Receipt(store, "pos-1", channel, moment, "RUB", tuple(lines), payments)


def off(campaign: CompiledCampaign, the_receipt: Receipt, subject: Subject = MEMBER) -> list[int]:
    return discounts(evaluate(the_receipt, subject, [campaign], (), CATALOGUE))


def test_d01_m_for_the_price_of_n() -> None:
    three_for_two = promo(rule("3 for 2", BuyMPayN(3, 2, Scope(skus=("TEA",)))))
    tea = (line(1, 300, quantity=2, sku="TEA"), line(2, 200, sku="TEA"), line(3, 100, sku="BUN"))
    assert off(three_for_two, receipt(*tea)) == [0, 200, 0], "of 3.00, 3.00, 2.00 the 2.00 is free"
    assert off(three_for_two, receipt(*tea[:1])) == [0], "two are not three"


def test_d02_discount_on_given_items() -> None:
    cheese = promo(rule("15% cheese", DiscountPercent(1500, Scope(skus=("CHEESE",)))))
    assert off(cheese, receipt(line(1, 1000, sku="MILK"), line(2, 3000, sku="CHEESE"))) == [0, 450]


def test_d03_fixed_price_for_items() -> None:
    cheese_at_25 = promo(rule("cheese at 25.00", FixedPrice(2500, Scope(skus=("CHEESE",)))))
    assert off(cheese_at_25, receipt(line(1, 1000, sku="MILK"), line(2, 3000, quantity=2, sku="CHEESE"))) == [0, 1000]


@pytest.mark.parametrize(
    ("scope", "condition", "expected"),
    [
        pytest.param(Scope(category_ids=("dairy",)), "", [100, 300, 0], id="category with subcategories"),
        pytest.param(Scope(brand_ids=("clean",)), "", [0, 0, 50], id="brand"),
        pytest.param(Scope(product_list_ids=("breakfast",)), "", [100, 0, 0], id="product list"),
        pytest.param(
            Scope(skus=("MILK", "CHEESE")),
            '"MILK" in receipt.skus && "CHEESE" in receipt.skus',
            [100, 300, 0],
            id="a set: only when all of it is bought",
        ),
    ],
)
def test_d04_discount_on_a_set_category_brand_or_list(scope: Scope, condition: str, expected: list[int]) -> None:
    ten = promo(rule("10%", DiscountPercent(1000, scope), condition))
    lines = (line(1, 1000, sku="MILK"), line(2, 3000, sku="CHEESE"), line(3, 500, sku="SOAP"))
    assert off(ten, receipt(*lines)) == expected
    assert sum(off(ten, receipt(lines[0], lines[2]))) == (0 if condition else expected[0] + expected[2])


def test_d05_fixed_price_for_a_set() -> None:
    breakfast = promo(rule("milk + cheese for 35.00", SetPrice(("MILK", "CHEESE"), 3500)))
    # one set (a milk of the two, the cheese) costs 10.00 + 30.00 = 40.00: 5.00 off, pro rata 1:3
    one_set = receipt(line(1, 1000, quantity=2, sku="MILK"), line(2, 3000, sku="CHEESE"), line(3, 500, sku="SOAP"))
    assert off(breakfast, one_set) == [125, 375, 0]
    two_sets = receipt(line(1, 1000, quantity=2, sku="MILK"), line(2, 3000, quantity=2, sku="CHEESE"))
    assert off(breakfast, two_sets) == [250, 750]
    assert off(breakfast, receipt(line(1, 1000, quantity=2, sku="MILK"))) == [0], "no cheese, no set"
    pair = promo(rule("two milks for 15.00", SetPrice(("MILK", "MILK"), 1500)))
    assert off(pair, receipt(line(1, 1000, quantity=3, sku="MILK"))) == [500], "a SKU named twice is needed twice"
    dear = promo(rule("a set dearer than its goods", SetPrice(("MILK", "CHEESE"), 5000)))
    assert off(dear, one_set) == [0, 0, 0], "a set price never raises a price"


def test_d06_m_percent_for_each_n_roubles_of_the_receipt() -> None:
    stepped = promo(rule("1% per 1,000.00, at most 10%", DiscountPercentPerAmount(100, 100_000, 1000)))
    # 3,450.00 holds three 1,000.00: 3% = 103.50, spread 145:200 with the remainder on the last line
    assert off(stepped, receipt(line(1, 145_000), line(2, 200_000))) == [4_350, 6_000]
    assert off(stepped, receipt(line(1, 99_999))) == [0]
    assert off(stepped, receipt(line(1, 1_500_000))) == [150_000], "15 steps, capped at 10%"


def test_d07_m_roubles_off_every_nth_line() -> None:
    every_second = promo(rule("50.00 off every 2nd line", NthLineDiscount(2, 5000)))
    lines = (
        line(1, 10_000),
        line(2, 20_000, no_promotions=True),  # not counted
        line(3, 4_000),  # the 2nd counted line: cheaper than 50.00, so all of it
        line(4, 30_000),
        line(5, 8_000),  # the 4th counted line
    )
    assert off(every_second, receipt(*lines)) == [0, 0, 4_000, 0, 5_000]


def test_d08_extra_discount_on_every_nth_purchase() -> None:
    third = promo(rule("5% on every 3rd purchase", DiscountPercent(500), "(member.purchases.count + 1) % 3 == 0"))
    two_before = Subject("m", "", (), (Purchase(AT - timedelta(days=9), 1), Purchase(AT - timedelta(days=3), 1)))
    assert off(third, receipt(line(1, 10_000)), two_before) == [500]
    assert off(third, receipt(line(1, 10_000)), Subject("m", "", (), two_before.purchases[:1])) == [0]


def test_d09_gift_item() -> None:
    gift = promo(
        rule(
            "a free mug over 1,000.00",
            CheapestItemDiscount(10_000, 0, Scope(skus=("MUG",))),
            "receipt.total_minor >= 105000",
        )
    )
    assert off(gift, receipt(line(1, 100_000), line(2, 5_000, quantity=2, sku="MUG"))) == [0, 5_000]
    assert off(gift, receipt(line(1, 90_000), line(2, 5_000, sku="MUG"))) == [0, 0]


def test_d10_discount_depending_on_last_period_spend() -> None:
    loyal = promo(
        rule(
            "7% for 5,000.00 in half a year",
            DiscountPercent(700),
            "member.purchases.spend_last_180_days_minor >= 500000",
        )
    )
    recent = Subject("m", "", (), (Purchase(AT - timedelta(days=30), 600_000),))
    long_ago = Subject("m", "", (), (Purchase(AT - timedelta(days=200), 600_000),))
    assert off(loyal, receipt(line(1, 10_000)), recent) == [700]
    assert off(loyal, receipt(line(1, 10_000)), long_ago) == [0]


def test_d11_happy_hours() -> None:
    happy = promo(rule("10% at 12-13", DiscountPercent(1000)), scope=CampaignScope(hours=(12,)))
    assert off(happy, at(AT, line(1, 10_000))) == [1_000]
    assert off(happy, at(AT.replace(hour=15), line(1, 10_000))) == [0]


def test_d12_days_of_week() -> None:
    mondays = promo(rule("10% on Mondays", DiscountPercent(1000)), scope=CampaignScope(weekdays=(1,)))
    assert off(mondays, at(AT, line(1, 10_000))) == [1_000]
    assert off(mondays, at(AT + timedelta(days=1), line(1, 10_000))) == [0]


def test_d13_days_of_month() -> None:
    second = promo(rule("10% on the 2nd", DiscountPercent(1000)), scope=CampaignScope(days_of_month=(2,)))
    assert off(second, at(AT, line(1, 10_000))) == [1_000]
    assert off(second, at(AT + timedelta(days=1), line(1, 10_000))) == [0]


def test_d14_chips_or_stickers_collected() -> None:
    stamps = promo(
        rule("a stamp a visit", IncrementCounter("stamps", 1)),
        rule("the 11th coffee free", DiscountPercent(10_000, Scope(skus=("COFFEE",))), "member.counters.stamps >= 10"),
    )
    coffee = receipt(line(1, 25_000, sku="COFFEE"), line(2, 9_000))
    tenth = evaluate(coffee, Subject("m", "", (), counters={"stamps": 10}), [stamps], (), CATALOGUE)
    assert (discounts(tenth), [a.rule_id for a in tenth.applied]) == (
        [25_000, 0],
        ["a stamp a visit", "the 11th coffee free"],
    )
    assert off(stamps, coffee, Subject("m", "", (), counters={"stamps": 9})) == [0, 0]


def test_d15_favourite_items() -> None:
    favourites = promo(rule("10% on the favourites", DiscountPercent(1000, Scope(product_list_ids=("breakfast",)))))
    assert off(favourites, receipt(line(1, 1000, sku="MILK"), line(2, 3000, sku="CHEESE"))) == [100, 0]


def test_d16_favourite_categories_and_brands() -> None:
    favourites = promo(rule("5%", DiscountPercent(500, Scope(category_ids=("cheese",), brand_ids=("clean",)))))
    lines = (line(1, 1000, sku="MILK"), line(2, 3000, sku="CHEESE"), line(3, 500, sku="SOAP"))
    assert off(favourites, receipt(*lines)) == [0, 150, 25]


def test_d17_every_nth_item_free() -> None:
    third_free = promo(rule("every 3rd free", NthItemDiscount(3, 10_000)))
    # units dearest first: 1.00 1.00 1.00 | 1.00 0.70 0.70: the cheapest of each three is free
    assert off(third_free, receipt(line(1, 100, quantity=4), line(2, 70, quantity=2))) == [100, 70]


def test_d18_first_purchase() -> None:
    first = promo(rule("15% on the first purchase", DiscountPercent(1500), "member.purchases.count == 0"))
    assert off(first, receipt(line(1, 10_000)), Subject("m", "", ())) == [1_500]
    assert off(first, receipt(line(1, 10_000)), Subject("m", "", (), (Purchase(AT - timedelta(days=1), 1),))) == [0]


def test_d21_precomputed_personal_discounts() -> None:
    offer = promo(rule("12% for Anna", DiscountPercent(1200)), scope=CampaignScope(segments=("offer-2026-03-17",)))
    assert off(offer, receipt(line(1, 10_000)), Subject("anna", "", ("offer-2026-03-17",))) == [1_200]
    assert off(offer, receipt(line(1, 10_000)), MEMBER) == [0]


def test_d22_receipt_total_threshold() -> None:
    over = promo(rule("200.00 off over 2,000.00", DiscountAmount(20_000), "receipt.total_minor >= 200000"))
    assert off(over, receipt(line(1, 150_000), line(2, 100_000))) == [12_000, 8_000]
    assert off(over, receipt(line(1, 199_999))) == [0]


def test_d23_partner_bank_card_payment() -> None:
    partner = promo(
        rule(
            "5% with the partner bank's card",
            DiscountPercent(500),
            'receipt.payments.exists(p, p.type == "bank_card" && p.card_bin.startsWith("220070"))',
        )
    )
    assert off(partner, at(AT, line(1, 10_000), payments=(Payment("bank_card", 10_000, "22007011"),))) == [500]
    assert off(partner, at(AT, line(1, 10_000), payments=(Payment("bank_card", 10_000, "41111111"),))) == [0]
    assert off(partner, at(AT, line(1, 10_000), payments=(Payment("cash", 10_000),))) == [0]


def test_d24_geolocation_as_the_stores_of_a_region() -> None:
    moscow = promo(rule("10% in Moscow", DiscountPercent(1000)), scope=CampaignScope(store_ids=("msk-1", "msk-2")))
    assert off(moscow, at(AT, line(1, 10_000), store="msk-2")) == [1_000]
    assert off(moscow, at(AT, line(1, 10_000), store="spb-1")) == [0]


def test_d25_a_given_store() -> None:
    opening = promo(rule("20% at the new store", DiscountPercent(2000)), scope=CampaignScope(store_ids=("store-9",)))
    assert off(opening, at(AT, line(1, 10_000), store="store-9")) == [2_000]
    assert off(opening, at(AT, line(1, 10_000), store="store-1")) == [0]


def test_d26_a_given_sales_channel() -> None:
    online = promo(rule("10% online", DiscountPercent(1000)), scope=CampaignScope(channels=("web",)))
    assert off(online, at(AT, line(1, 10_000), channel="web")) == [1_000]
    assert off(online, at(AT, line(1, 10_000), channel="pos")) == [0]


def test_d27_per_referred_friend() -> None:
    """A coupon for the referrer per friend who registers with their code (the service runs
    MEMBER_REFERRED campaigns for the payload's referrer_id: tests/integration/test_rules_rewards.py)."""
    per_friend = compile_campaign(
        Campaign(
            "friends",
            "friends",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (rule("a 15% coupon per friend", IssueCoupon("series-15")),),
            trigger=CampaignTrigger.MEMBER_REFERRED,
        )
    )
    referrer = Subject("host-1", "", ())
    fired = triggered_rules([per_friend], CampaignTrigger.MEMBER_REFERRED, referrer, AT)
    grants = grants_for("event-7", "host-1", [(c.campaign_id, r) for c, r in fired])
    assert [(g.request_id, g.member_id, g.effect) for g in grants] == [
        ("rules:event-7:a 15% coupon per friend:coupon", "host-1", IssueCoupon("series-15"))
    ]
    assert triggered_rules([per_friend], CampaignTrigger.MEMBER_REGISTERED, referrer, AT) == []
    assert off(per_friend, receipt(line(1, 10_000))) == [0], "never on a receipt"


def test_d28_employee_discount() -> None:
    staff = promo(rule("30% for staff", DiscountPercent(3000)), scope=CampaignScope(segments=("staff",)))
    assert off(staff, receipt(line(1, 10_000)), Subject("e", "", ("staff",))) == [3_000]
    assert off(staff, receipt(line(1, 10_000)), MEMBER) == [0]


def test_d29_each_nth_purchase_in_a_period() -> None:
    march = promo(
        rule("count March visits", IncrementCounter("march_visits", 1)),
        rule("10% on every 5th March visit", DiscountPercent(1000), "member.counters.march_visits % 5 == 4"),
        start=datetime(2026, 3, 1, tzinfo=UTC),
    )
    assert off(march, receipt(line(1, 10_000)), Subject("m", "", (), counters={"march_visits": 4})) == [1_000]
    assert off(march, receipt(line(1, 10_000)), Subject("m", "", (), counters={"march_visits": 5})) == [0]
    february = at(datetime(2026, 2, 27, tzinfo=UTC), line(1, 10_000))
    assert off(march, february, Subject("m", "", (), counters={"march_visits": 4})) == [0], "outside the period"


def test_d30_cash_payment() -> None:
    cash = promo(rule("3% paying cash", DiscountPercent(300), '"cash" in receipt.payment_types'))
    paid_in_cash = (Payment("cash", 5_000), Payment("bank_card", 5_000, "41111111"))
    assert off(cash, at(AT, line(1, 10_000), payments=paid_in_cash)) == [300]
    assert off(cash, at(AT, line(1, 10_000), payments=paid_in_cash[1:])) == [0]


def test_d31_target_segments() -> None:
    parents = promo(rule("10% for young parents", DiscountPercent(1000)), scope=CampaignScope(segments=("parents",)))
    assert off(parents, receipt(line(1, 10_000)), Subject("m", "", ("students", "parents"))) == [1_000]
    assert off(parents, receipt(line(1, 10_000)), Subject("m", "", ("students",))) == [0]


def test_d32_tier_holders() -> None:
    gold = promo(rule("7% for gold", DiscountPercent(700)), scope=CampaignScope(tiers=("gold",)))
    assert off(gold, receipt(line(1, 10_000)), GOLD) == [700]
    assert off(gold, receipt(line(1, 10_000)), MEMBER) == [0]


def test_d33_returning_lapsed_customers() -> None:
    welcome_back = promo(rule("20% back after 90 days", DiscountPercent(2000), "member.purchases.days_since_last > 90"))
    lapsed = Subject("m", "", (), (Purchase(AT - timedelta(days=120), 5_000),))
    regular = Subject("m", "", (), (Purchase(AT - timedelta(days=30), 5_000),))
    assert off(welcome_back, receipt(line(1, 10_000)), lapsed) == [2_000]
    assert off(welcome_back, receipt(line(1, 10_000)), regular) == [0]


# a line's minimum price


def test_no_discount_takes_a_line_below_its_minimum_price() -> None:
    half_off = promo(rule("50%", DiscountPercent(5000)))
    # 15.00 off 30.00; the wine (2 x 10.00, at least 2 x 8.00) takes 4.00, the milk the rest of its part and more
    wine_and_milk = receipt(line(1, 1000, quantity=2, sku="WINE"), line(2, 1000, sku="MILK"))
    assert off(half_off, wine_and_milk) == [400, 1000]
    assert off(promo(rule("wine at 5.00", FixedPrice(500, Scope(skus=("WINE",))))), wine_and_milk) == [400, 0]
    coupon = PresentedCoupon("HALF", "S", "", CouponBenefit(percent_off_basis_points=5000, scope=Scope(skus=("WINE",))))
    assert discounts(run(wine_and_milk, coupons=(coupon,))) == [400, 0], "coupons too"
