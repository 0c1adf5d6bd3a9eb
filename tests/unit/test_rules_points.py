"""The points effects beyond a flat rate, with exact numbers: per each N of money, on the
cheapest item, on the n-th line, and multipliers of what the other rules earned."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from services.rules.domain import (
    DEFAULT_LOT,
    Campaign,
    CampaignScope,
    CampaignStatus,
    CampaignTrigger,
    CompiledCampaign,
    CouponBenefit,
    DiscountPercent,
    EarnFixedPoints,
    EarnPointsCheapestItem,
    EarnPointsMultiplier,
    EarnPointsNthLine,
    EarnPointsPerAmount,
    EarnPointsPercent,
    EarnPointsPerUnits,
    Effect,
    Evaluation,
    ExpiryRounding,
    GroupMode,
    IncrementCounter,
    LotOutcome,
    Payment,
    PointsLot,
    PresentedCoupon,
    Purchase,
    Receipt,
    ReceiptLine,
    RedemptionCap,
    Rule,
    RuleGroup,
    Scope,
    Subject,
    birthday_distances,
    compile_campaign,
    counter_names,
    evaluate,
    grants_for,
    triggered_rules,
)
from tests.unit.test_rules_mechanics import AT, CATALOGUE, GOLD, MEMBER, at, group, line, promo, receipt, rule

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


# the mechanics catalogue of DOMAIN.md, one test per points mechanic (docs/rules.md lists
# each with its rule definition); 100 point units are one point


def earned(campaign: CompiledCampaign, the_receipt: Receipt, subject: Subject = MEMBER) -> list[int]:
    return points(evaluate(the_receipt, subject, [campaign], (), CATALOGUE))


def test_p01_percent_on_all_goods() -> None:
    five = promo(rule("5%", EarnPointsPercent(500)))
    # 5% of 123.45 is 617 units, spread 100.00 : 23.45 with the remainder on the last line
    assert earned(five, receipt(line(1, 10_000), line(2, 2_345))) == [499, 118]


def test_p02_fixed_points_on_an_item() -> None:
    item_a = promo(rule("+100 with A", EarnFixedPoints(10_000), '"A" in receipt.skus'))
    assert earned(item_a, receipt(line(1, 3_000, sku="A"), line(2, 1_000, sku="C"))) == [7_500, 2_500]
    assert earned(item_a, receipt(line(1, 3_000, sku="C"))) == [0]


def test_p03_item_specific_rates() -> None:
    rates = promo(
        rule("2%", EarnPointsPercent(200)),
        rule("A 3%", EarnPointsPercent(100, Scope(skus=("A",)))),
        rule("B 5%", EarnPointsPercent(300, Scope(skus=("B",)))),
    )
    assert earned(rates, receipt(line(1, 10_000, sku="A"), line(2, 10_000, sku="B"), line(3, 10_000))) == [
        300,
        500,
        200,
    ]


def test_p04_points_for_a_set() -> None:
    the_set = promo(rule("+50 for A and B", EarnFixedPoints(5_000), '"A" in receipt.skus && "B" in receipt.skus'))
    assert earned(the_set, receipt(line(1, 1_000, sku="A"), line(2, 4_000, sku="B"))) == [1_000, 4_000]
    assert earned(the_set, receipt(line(1, 1_000, sku="A"))) == [0]


def test_p05_per_each_n_roubles() -> None:
    per_hundred = promo(rule("10 per 100.00", EarnPointsPerAmount(1_000, 10_000)))
    assert earned(per_hundred, receipt(line(1, 35_499))) == [3_000]


def test_p06_on_each_nth_purchase() -> None:
    fifth = promo(rule("+100 on every 5th", EarnFixedPoints(10_000), "(member.purchases.count + 1) % 5 == 0"))
    four = Subject("m", "", (), tuple(Purchase(AT - timedelta(days=day + 1), 1) for day in range(4)))
    assert earned(fifth, receipt(line(1, 1_000)), four) == [10_000]
    assert earned(fifth, receipt(line(1, 1_000)), Subject("m", "", (), four.purchases[:3])) == [0]


def test_p07_depending_on_last_period() -> None:
    active = promo(
        rule("3% after 1,000.00 a month", EarnPointsPercent(300), "member.purchases.spend_last_30_days_minor >= 100000")
    )
    assert earned(
        active, receipt(line(1, 10_000)), Subject("m", "", (), (Purchase(AT - timedelta(days=10), 100_000),))
    ) == [300]
    assert earned(
        active, receipt(line(1, 10_000)), Subject("m", "", (), (Purchase(AT - timedelta(days=40), 100_000),))
    ) == [0]


def test_p08_reactivation_after_a_long_time_without_a_purchase() -> None:
    back = promo(rule("+200 after half a year", EarnFixedPoints(20_000), "member.purchases.days_since_last > 180"))
    assert earned(back, receipt(line(1, 1_000)), Subject("m", "", (), (Purchase(AT - timedelta(days=200), 1),))) == [
        20_000
    ]
    assert earned(back, receipt(line(1, 1_000)), Subject("m", "", (), (Purchase(AT - timedelta(days=100), 1),))) == [0]


def test_p09_happy_hours_and_days() -> None:
    happy = promo(rule("+50 Monday noon", EarnFixedPoints(5_000)), scope=CampaignScope(weekdays=(1,), hours=(12,)))
    assert earned(happy, at(AT, line(1, 1_000))) == [5_000]
    assert earned(happy, at(AT.replace(hour=14), line(1, 1_000))) == [0]
    assert earned(happy, at(AT + timedelta(days=1), line(1, 1_000))) == [0]


def test_p10_favourite_items_categories_and_brands() -> None:
    favourites = promo(
        rule("7% on the favourites", EarnPointsPercent(700, Scope(product_list_ids=("breakfast",)))),
        rule("5% on household", EarnPointsPercent(500, Scope(category_ids=("household",), brand_ids=("alpine",)))),
    )
    lines = (line(1, 1_000, sku="MILK"), line(2, 3_000, sku="CHEESE"), line(3, 500, sku="SOAP"), line(4, 900))
    assert earned(favourites, receipt(*lines)) == [70, 150, 25, 0]


def test_p11_extra_points_on_the_cheapest_item() -> None:
    cheapest = promo(rule("50% of the cheapest", EarnPointsCheapestItem(5_000)))
    assert earned(cheapest, receipt(line(1, 3_000), line(2, 400, quantity=2))) == [0, 200]


def test_p12_own_brand() -> None:
    own = promo(rule("10% on own brand", EarnPointsPercent(1_000, Scope(own_brand=True))))
    assert earned(own, receipt(line(1, 1_000, sku="MILK"), line(2, 3_000, sku="CHEESE"))) == [100, 0]


def test_p13_welcome_points_valid_until_31_august_on_registration() -> None:
    until = datetime(2026, 8, 31, 21, tzinfo=UTC)
    welcome = compile_campaign(
        Campaign(
            "welcome",
            "w",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (rule("500 points", EarnFixedPoints(50_000, PointsLot(expire_time=until))),),
            trigger=CampaignTrigger.MEMBER_REGISTERED,
        )
    )
    fired = triggered_rules([welcome], CampaignTrigger.MEMBER_REGISTERED, Subject("new", "", ()), AT)
    grants = grants_for("event-1", "new", [(campaign.campaign_id, fired_rule) for campaign, fired_rule in fired])
    assert [(g.request_id, g.effect) for g in grants] == [
        ("rules:event-1:500 points:points", EarnFixedPoints(50_000, PointsLot(expire_time=until)))
    ]
    assert evaluate(receipt(line(1, 1_000)), MEMBER, [welcome]).points_total == 0, "never on a receipt"


def test_p15_promo_points_with_their_own_expiry() -> None:
    new_year = datetime(2026, 12, 31, 21, tzinfo=UTC)
    promo_points = promo(
        rule("5%", EarnPointsPercent(500)),
        rule("+100 promo", EarnFixedPoints(10_000, PointsLot(expire_time=new_year))),
    )
    result = evaluate(receipt(line(1, 10_000)), MEMBER, [promo_points])
    # lots come in the order their rules applied: by priority, then id ("+100 promo" < "5%")
    assert result.lots == [
        LotOutcome(10_000, PointsLot(expire_time=new_year), None),
        LotOutcome(500, DEFAULT_LOT, None),
    ]
    assert sum(lot.points for lot in result.lots) == result.points_total == 10_500


def test_p16_melting_points() -> None:
    melting = PointsLot(lifetime_days=14, expiry_rounding=ExpiryRounding.NONE)
    result = evaluate(receipt(line(1, 10_000)), MEMBER, [promo(rule("2 weeks", EarnPointsPercent(1_000, lot=melting)))])
    assert result.lots == [LotOutcome(1_000, melting, None)]


def test_p17_by_product_attributes() -> None:
    big_bottles = promo(rule("10% on 500 ml", EarnPointsPercent(1_000, Scope(attributes=(("volume_ml", 500),)))))
    assert earned(big_bottles, receipt(line(1, 1_000, sku="MILK"), line(2, 500, sku="SOAP"))) == [0, 50]
    wrong_type = promo(
        rule("a string is not a number", EarnPointsPercent(1_000, Scope(attributes=(("volume_ml", "500"),))))
    )
    assert earned(wrong_type, receipt(line(1, 500, sku="SOAP"))) == [0]


def test_p19_pay_up_to_n_percent_of_the_receipt() -> None:
    thirty = promo(rule("pay up to 30%", RedemptionCap(basis_points=3_000)))
    result = evaluate(receipt(line(1, 10_000), line(2, 555)), MEMBER, [thirty], (), CATALOGUE, 5_000)
    assert [outcome.max_points_payment_minor for outcome in result.lines] == [3_000, 166]


def test_p20_each_nth_line() -> None:
    every_second = promo(rule("10% on every 2nd line", EarnPointsNthLine(2, 1_000, every=True)))
    lines = (line(1, 1_000), line(2, 2_000), line(3, 3_000), line(4, 4_000), line(5, 5_000))
    assert earned(every_second, receipt(*lines)) == [0, 200, 0, 400, 0]


def test_p21_each_n_units_of_a_product() -> None:
    water = promo(rule("+5 per 3 bottles", EarnPointsPerUnits(500, 3, Scope(skus=("WATER",)))))
    # 7 bottles make two threes: 1000 units, spread 4.00 : 3.00
    bottles = (line(1, 100, quantity=4, sku="WATER"), line(2, 100, quantity=3, sku="WATER"), line(3, 900))
    assert earned(water, receipt(*bottles)) == [571, 429, 0]
    apples = promo(rule("+1 per kg", EarnPointsPerUnits(100, 1, Scope(skus=("APPLES",)))))
    assert earned(apples, receipt(ReceiptLine(1, "APPLES", 20_000, 2_500, 50_000, False))) == [200], "2.5 kg: two"


def test_p22_delayed_accrual() -> None:
    delayed = PointsLot(activation_delay_days=14)
    result = evaluate(
        receipt(line(1, 10_000)), MEMBER, [promo(rule("in 2 weeks", EarnPointsPercent(500, lot=delayed)))]
    )
    assert result.lots == [LotOutcome(500, delayed, AT + timedelta(days=14))]


def test_p23_multiplier() -> None:
    double_household = promo(
        rule("1%", EarnPointsPercent(100)),
        rule("x2 on household", EarnPointsMultiplier(20_000, Scope(category_ids=("household",)))),
    )
    assert earned(double_household, receipt(line(1, 10_000, sku="MILK"), line(2, 5_000, sku="SOAP"))) == [100, 100]


def test_p26_by_tier() -> None:
    gold = promo(rule("10% for gold", EarnPointsPercent(1_000)), scope=CampaignScope(tiers=("gold",)))
    assert earned(gold, receipt(line(1, 10_000)), GOLD) == [1_000]
    assert earned(gold, receipt(line(1, 10_000)), MEMBER) == [0]


def test_p27_on_a_product_segment() -> None:
    segment = promo(rule("3% on breakfast goods", EarnPointsPercent(300, Scope(product_list_ids=("breakfast",)))))
    assert earned(segment, receipt(line(1, 10_000, sku="MILK"), line(2, 10_000, sku="SOAP"))) == [300, 0]


def test_p28_on_a_target_audience() -> None:
    students = promo(rule("5% for students", EarnPointsPercent(500)), scope=CampaignScope(segments=("students",)))
    assert earned(students, receipt(line(1, 10_000)), Subject("s", "", ("students",))) == [500]
    assert earned(students, receipt(line(1, 10_000)), MEMBER) == [0]


def test_p30_region_or_store() -> None:
    region = promo(rule("+20 in the north", EarnFixedPoints(2_000)), scope=CampaignScope(store_ids=("north-1",)))
    assert earned(region, at(AT, line(1, 1_000), store="north-1")) == [2_000]
    assert earned(region, at(AT, line(1, 1_000), store="south-1")) == [0]


def test_p31_payment_method() -> None:
    by_card = promo(rule("2% paying by card", EarnPointsPercent(200), '"bank_card" in receipt.payment_types'))
    assert earned(by_card, at(AT, line(1, 10_000), payments=(Payment("bank_card", 10_000, "41111111"),))) == [200]
    assert earned(by_card, at(AT, line(1, 10_000), payments=(Payment("cash", 10_000),))) == [0]


def test_p32_sales_channel() -> None:
    app = promo(rule("3% in the app", EarnPointsPercent(300)), scope=CampaignScope(channels=("app",)))
    assert earned(app, at(AT, line(1, 10_000), channel="app")) == [300]
    assert earned(app, at(AT, line(1, 10_000), channel="pos")) == [0]


def test_p33_employees() -> None:
    staff = promo(rule("5% for staff", EarnPointsPercent(500)), scope=CampaignScope(segments=("staff",)))
    assert earned(staff, receipt(line(1, 10_000)), Subject("e", "", ("staff",))) == [500]
    assert earned(staff, receipt(line(1, 10_000)), MEMBER) == [0]


def test_every_fifth_purchase_over_500_earns_100_points_that_expire_on_31_december() -> None:
    """DOMAIN.md's worked example with its expiry (the commit-time counting is in
    tests/integration/test_rules_points.py)."""
    new_year = datetime(2026, 12, 31, 21, tzinfo=UTC)
    every_fifth = promo(
        rule("count", IncrementCounter("big_purchases", 1), "receipt.total_minor >= 50000"),
        rule(
            "+100",
            EarnFixedPoints(10_000, PointsLot(expire_time=new_year)),
            "receipt.total_minor >= 50000 && member.counters.big_purchases % 5 == 4",
        ),
        rule("1%", EarnPointsPercent(100)),
    )
    fifth = evaluate(receipt(line(1, 60_000)), Subject("m", "", (), counters={"big_purchases": 4}), [every_fifth])
    assert fifth.lots == [LotOutcome(10_000, PointsLot(expire_time=new_year), None), LotOutcome(600, DEFAULT_LOT, None)]
    fourth = evaluate(receipt(line(1, 60_000)), Subject("m", "", (), counters={"big_purchases": 3}), [every_fifth])
    assert fourth.lots == [LotOutcome(600, DEFAULT_LOT, None)]


def test_lots_group_equal_parameters_and_add_up_to_the_points() -> None:
    promo_lot = PointsLot(lifetime_days=30, expiry_rounding=ExpiryRounding.MONTH_END, currency="PROMO")
    mixed = promo(
        rule("a", EarnPointsPercent(100, lot=promo_lot)),
        rule("b", EarnFixedPoints(1_000)),
        rule("c", EarnPointsPerAmount(50, 1_000, lot=promo_lot)),
        rule("x2", EarnPointsMultiplier(20_000)),
    )
    result = evaluate(receipt(line(1, 10_000), line(2, 5_000)), MEMBER, [mixed])
    # a: 150, b: 1000, c: 15 steps x 50 = 750; the multiplier adds 1900 more on the default lot
    assert result.lots == [LotOutcome(900, promo_lot, None), LotOutcome(2_900, DEFAULT_LOT, None)]
    assert result.points_total == 3_800
    assert evaluate(receipt(line(1, 10_000)), ANONYMOUS, [mixed]).lots == []


def test_bad_lot_parameters_are_named() -> None:
    assert PointsLot(expire_time=AT, lifetime_days=3).problems() == [
        ("expire_time", "a fixed expiry excludes lifetime_days and expiry_rounding")
    ]
    assert [name for name, _ in PointsLot(-1, None, 40_000, ExpiryRounding.NONE, "promo").problems()] == [
        "activation_delay_days",
        "lifetime_days",
        "currency",
    ]
    assert [name for name, _ in PointsLot(expiry_rounding=ExpiryRounding.YEAR_END).problems()] == ["expiry_rounding"]


# the customer context beyond tier and segments: card type, attributes, birthday


@pytest.mark.parametrize(
    ("born", "today", "distances"),
    [
        pytest.param(date(1990, 3, 2), date(2026, 3, 2), (0, 0), id="on the day"),
        pytest.param(date(1990, 3, 5), date(2026, 3, 2), (3, 362), id="three days before"),
        pytest.param(date(1990, 2, 27), date(2026, 3, 2), (362, 3), id="three days after"),
        pytest.param(date(1990, 1, 1), date(2026, 12, 30), (2, 363), id="over the new year"),
        pytest.param(date(2000, 2, 29), date(2026, 2, 28), (0, 0), id="29 February on the 28th in other years"),
        pytest.param(date(2000, 2, 29), date(2028, 2, 28), (1, 365), id="and on the 29th in leap years"),
        pytest.param(None, date(2026, 3, 2), (-1, -1), id="unknown"),
    ],
)
def test_days_to_and_since_the_birthday(born: date | None, today: date, distances: tuple[int, int]) -> None:
    assert birthday_distances(born, today) == distances


def test_birthday_ten_times_the_points_on_the_day() -> None:
    birthday = promo(
        rule("1%", EarnPointsPercent(100)),
        rule("x10 on the birthday", EarnPointsMultiplier(100_000), "member.days_to_birthday == 0"),
    )
    born_today = Subject("m", "", (), birth_date=date(1990, 3, 2))  # AT is 2 March
    assert earned(birthday, receipt(line(1, 10_000)), born_today) == [1_000]
    assert earned(birthday, receipt(line(1, 10_000)), Subject("m", "", (), birth_date=date(1990, 3, 3))) == [100]
    assert earned(birthday, receipt(line(1, 10_000)), MEMBER) == [100], "no birth date, no birthday"


def test_birthday_points_a_few_days_before_valid_a_few_days_after() -> None:
    week = PointsLot(lifetime_days=7, expiry_rounding=ExpiryRounding.NONE)
    soon = promo(rule("+100 before the birthday", EarnFixedPoints(10_000, week), "member.days_to_birthday <= 3"))
    result = evaluate(receipt(line(1, 1_000)), Subject("m", "", (), birth_date=date(1985, 3, 5)), [soon])
    assert result.lots == [LotOutcome(10_000, week, None)]
    late = evaluate(receipt(line(1, 1_000)), Subject("m", "", (), birth_date=date(1985, 3, 6)), [soon])
    assert late.points_total == 0


def test_special_card_holders_and_survey_answers() -> None:
    platinum = promo(rule("10% for platinum cards", EarnPointsPercent(1_000), 'member.card_type == "platinum"'))
    assert earned(platinum, receipt(line(1, 10_000)), Subject("m", "", (), card_type="platinum")) == [1_000]
    assert earned(platinum, receipt(line(1, 10_000)), Subject("m", "", (), card_type="basic")) == [0]
    pets = promo(
        rule(
            "dog owners: 5% on pet food",
            EarnPointsPercent(500),
            '"survey_pet" in member.attributes && member.attributes.survey_pet == "dog"',
        )
    )
    assert earned(pets, receipt(line(1, 10_000)), Subject("m", "", (), attributes={"survey_pet": "dog"})) == [500]
    assert earned(pets, receipt(line(1, 10_000)), Subject("m", "", (), attributes={"survey_pet": "cat"})) == [0]
    assert earned(pets, receipt(line(1, 10_000)), MEMBER) == [0], "not answered"
