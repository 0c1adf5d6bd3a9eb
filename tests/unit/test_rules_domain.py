"""Promotions' rules: pro-rata spreading, conditions in CEL, and how a receipt is evaluated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.rules.domain import (
    Applied,
    Campaign,
    CampaignStatus,
    CompiledCampaign,
    ConditionError,
    EarnFixedPoints,
    EarnPointsPercent,
    Effect,
    LineOutcome,
    Receipt,
    ReceiptLine,
    Rule,
    Subject,
    compile_campaign,
    compile_condition,
    evaluate,
    spread,
)

AT = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
TICK = timedelta(microseconds=1)
MEMBER = Subject("member-1", "basic", ("new",))
ANONYMOUS = Subject("", "", ())


def line(position: int, amount_minor: int, no_promotions: bool = False) -> ReceiptLine:
    return ReceiptLine(position, f"SKU-{position}", amount_minor, 1000, amount_minor, no_promotions)


def receipt(*lines: ReceiptLine, time: datetime = AT) -> Receipt:
    return Receipt("store-1", "pos-1", "pos", time, "RUB", tuple(lines))


def rule(rule_id: str, effect: Effect, condition: str = "", priority: int = 0) -> Rule:
    return Rule(rule_id, f"rule {rule_id}", condition, effect, f"text of {rule_id}", priority)


def campaign(
    *rules: Rule,
    campaign_id: str = "c1",
    status: CampaignStatus = CampaignStatus.ACTIVE,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> CompiledCampaign:
    return compile_campaign(Campaign(campaign_id, "a campaign", status, start_at, end_at, 3, rules))


def points(evaluation_lines: list[LineOutcome]) -> list[int]:
    return [outcome.points for outcome in evaluation_lines]


# spread()


@pytest.mark.parametrize(
    ("total", "weights", "parts"),
    [
        pytest.param(10, [1, 1, 1], [3, 3, 4], id="remainder on the last line"),
        pytest.param(10, [1, 1, 1, 0], [3, 3, 4, 0], id="remainder on the last weighted line"),
        pytest.param(10, [0, 1, 0, 1, 0], [0, 5, 0, 5, 0], id="zero weights get nothing"),
        pytest.param(617, [10_000, 2_345], [499, 118], id="pro rata, rounded down"),
        pytest.param(1, [5, 5], [0, 1], id="a single point goes to the last"),
        pytest.param(7, [0, 3], [0, 7], id="one weighted line takes it all"),
        pytest.param(0, [1, 2], [0, 0], id="nothing to spread"),
        pytest.param(100, [0, 0, 0], [0, 0, 0], id="no weight at all spreads nothing"),
        pytest.param(100, [], [], id="no lines"),
    ],
)
def test_spread_examples(total: int, weights: list[int], parts: list[int]) -> None:
    assert spread(total, weights) == parts


@given(
    total=st.integers(0, 10**12),
    weights=st.lists(st.integers(0, 10**9) | st.just(0), min_size=1, max_size=40),
)
def test_spread_parts_add_up_to_the_total_pro_rata(total: int, weights: list[int]) -> None:
    weight_sum = sum(weights)
    assume(weight_sum > 0)
    parts = spread(total, weights)
    assert len(parts) == len(weights)
    assert sum(parts) == total
    assert all(part == 0 for part, weight in zip(parts, weights, strict=True) if weight == 0)
    last = max(index for index, weight in enumerate(weights) if weight > 0)
    for index, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        share = total * weight // weight_sum
        if index == last:
            weighted_lines = sum(1 for w in weights if w > 0)
            assert share <= part < share + weighted_lines, "the remainder is less than one point per line"
        else:
            assert part == share


# evaluate(): effects


def test_percent_points_are_spread_over_the_lines_pro_rata() -> None:
    result = evaluate(
        receipt(line(1, 10_000), line(2, 2_345)),
        MEMBER,
        [campaign(rule("r1", EarnPointsPercent(500)))],
    )
    assert result.lines == [LineOutcome(1, 0, 10_000, 499), LineOutcome(2, 0, 2_345, 118)]
    assert result.points_total == 617
    assert result.discount_total_minor == 0
    assert result.applied == [Applied("c1", 3, "r1", "text of r1", 617, 0)]
    assert result.skipped == []


def test_fixed_points_are_given_once_per_receipt_spread_over_the_lines() -> None:
    result = evaluate(
        receipt(line(1, 3_000), line(2, 1_000)),
        MEMBER,
        [campaign(rule("r1", EarnFixedPoints(100)))],
    )
    assert points(result.lines) == [75, 25]
    assert result.applied == [Applied("c1", 3, "r1", "text of r1", 100, 0)]


def test_no_promotions_lines_get_no_points_and_do_not_count_towards_the_percent() -> None:
    lines = (line(1, 10_000, no_promotions=True), line(2, 2_345), line(3, 5_000, no_promotions=True))
    percent = evaluate(receipt(*lines), MEMBER, [campaign(rule("r1", EarnPointsPercent(500)))])
    assert points(percent.lines) == [0, 117, 0], "5% of 23.45 only"
    fixed = evaluate(receipt(*lines), MEMBER, [campaign(rule("r1", EarnFixedPoints(100)))])
    assert points(fixed.lines) == [0, 100, 0]


def test_a_receipt_of_only_no_promotions_lines_earns_nothing() -> None:
    lines = (line(1, 10_000, no_promotions=True), line(2, 500, no_promotions=True))
    result = evaluate(
        receipt(*lines), MEMBER, [campaign(rule("r1", EarnFixedPoints(100)), rule("r2", EarnPointsPercent(900)))]
    )
    assert points(result.lines) == [0, 0]
    assert result.points_total == 0


@settings(deadline=None)  # each example compiles a CEL program; timing is not the property
@given(
    amounts=st.lists(st.tuples(st.integers(0, 10**9), st.booleans()), min_size=1, max_size=20),
    basis_points=st.integers(1, 100_000),
)
def test_percent_points_are_the_rate_of_the_eligible_amount(amounts: list[tuple[int, bool]], basis_points: int) -> None:
    lines = [line(position, amount, no_promo) for position, (amount, no_promo) in enumerate(amounts, start=1)]
    result = evaluate(receipt(*lines), MEMBER, [campaign(rule("r1", EarnPointsPercent(basis_points)))])
    eligible = sum(amount for amount, no_promo in amounts if not no_promo)
    assert result.points_total == eligible * basis_points // 10_000
    assert all(outcome.points == 0 for outcome, (_, no_promo) in zip(result.lines, amounts, strict=True) if no_promo)
    assert [outcome.final_amount_minor for outcome in result.lines] == [amount for amount, _ in amounts]


def test_rules_of_every_live_campaign_add_up_in_priority_order() -> None:
    first = campaign(
        rule("r-late", EarnFixedPoints(10), priority=5),
        rule("r-b", EarnFixedPoints(20), priority=1),
        rule("r-a", EarnFixedPoints(30), priority=1),
        campaign_id="c1",
    )
    second = campaign(rule("r-other", EarnPointsPercent(1_000)), campaign_id="c2")
    result = evaluate(receipt(line(1, 1_000), line(2, 1_000)), MEMBER, [first, second])
    assert [(a.campaign_id, a.rule_id, a.points) for a in result.applied] == [
        ("c1", "r-a", 30),
        ("c1", "r-b", 20),
        ("c1", "r-late", 10),
        ("c2", "r-other", 200),
    ]
    assert points(result.lines) == [130, 130]
    assert result.points_total == 260


def test_an_anonymous_receipt_earns_nothing() -> None:
    result = evaluate(
        receipt(line(1, 10_000)),
        ANONYMOUS,
        [campaign(rule("r1", EarnPointsPercent(500)), rule("r2", EarnFixedPoints(50)))],
    )
    assert points(result.lines) == [0]
    assert result.applied == []
    assert result.skipped == [
        ("r1", "anonymous receipts earn no points"),
        ("r2", "anonymous receipts earn no points"),
    ]


# evaluate(): conditions


@pytest.mark.parametrize(
    ("condition", "the_receipt", "subject", "applies"),
    [
        ("receipt.total_minor >= 200000", receipt(line(1, 150_000), line(2, 50_000)), MEMBER, True),
        ("receipt.total_minor >= 200000", receipt(line(1, 150_000), line(2, 49_999)), MEMBER, False),
        ('member.tier == "gold"', receipt(line(1, 1_000)), Subject("m", "gold", ()), True),
        ('member.tier == "gold"', receipt(line(1, 1_000)), MEMBER, False),
        ("receipt.hour >= 18", receipt(line(1, 1_000), time=AT.replace(hour=18, minute=0)), MEMBER, True),
        ("receipt.hour >= 18", receipt(line(1, 1_000), time=AT.replace(hour=17, minute=59)), MEMBER, False),
        (
            'receipt.total_minor >= 200000 && member.tier == "gold"',
            receipt(line(1, 200_000)),
            Subject("m", "gold", ()),
            True,
        ),
        ('receipt.total_minor >= 200000 && member.tier == "gold"', receipt(line(1, 200_000)), MEMBER, False),
        ('"SKU-2" in receipt.skus', receipt(line(1, 1_000), line(2, 1_000)), MEMBER, True),
        ('"SKU-2" in receipt.skus', receipt(line(1, 1_000)), MEMBER, False),
        ('"vip" in member.segments', receipt(line(1, 1_000)), Subject("m", "basic", ("new", "vip")), True),
        ('"vip" in member.segments', receipt(line(1, 1_000)), MEMBER, False),
    ],
)
def test_a_rule_applies_only_when_its_condition_holds(
    condition: str, the_receipt: Receipt, subject: Subject, applies: bool
) -> None:
    result = evaluate(the_receipt, subject, [campaign(rule("r1", EarnFixedPoints(40), condition))])
    assert result.points_total == (40 if applies else 0)
    assert [a.rule_id for a in result.applied] == (["r1"] if applies else [])
    assert result.skipped == ([] if applies else [("r1", "condition is false")])


def test_a_condition_that_fails_at_run_time_skips_its_rule_only() -> None:
    """The condition passes the trial run on the sample (segments ["new"]) and fails on
    a member with no segments; the receipt is still evaluated."""
    fragile = rule("r1", EarnFixedPoints(1_000), 'member.segments[0] == "new"', priority=0)
    steady = rule("r2", EarnFixedPoints(7), priority=1)
    compiled = [campaign(fragile, steady)]

    without_segments = evaluate(receipt(line(1, 1_000)), Subject("m", "basic", ()), compiled)
    assert without_segments.points_total == 7
    assert [a.rule_id for a in without_segments.applied] == ["r2"]
    assert [rule_id for rule_id, _ in without_segments.skipped] == ["r1"]
    assert without_segments.skipped[0][1].startswith("condition failed:")

    with_segments = evaluate(receipt(line(1, 1_000)), MEMBER, compiled)
    assert with_segments.points_total == 1_007


def test_a_condition_with_a_non_boolean_result_at_run_time_skips_its_rule() -> None:
    """True on the sample (tier "basic"), a string for other tiers."""
    odd = rule("r1", EarnFixedPoints(5), 'member.tier == "basic" ? true : member.tier')
    result = evaluate(receipt(line(1, 1_000)), Subject("m", "gold", ()), [campaign(odd)])
    assert result.points_total == 0
    assert result.skipped == [("r1", "condition failed: the condition must be true or false, not str")]


# evaluate(): the campaign's period and status


@pytest.mark.parametrize(
    ("start_at", "end_at", "status", "live"),
    [
        pytest.param(None, None, CampaignStatus.ACTIVE, True, id="open-ended"),
        pytest.param(AT, None, CampaignStatus.ACTIVE, True, id="starts at the receipt"),
        pytest.param(AT + TICK, None, CampaignStatus.ACTIVE, False, id="starts a tick after the receipt"),
        pytest.param(None, AT + TICK, CampaignStatus.ACTIVE, True, id="ends a tick after the receipt"),
        pytest.param(None, AT, CampaignStatus.ACTIVE, False, id="ends at the receipt (exclusive)"),
        pytest.param(AT - timedelta(days=30), AT - timedelta(days=1), CampaignStatus.ACTIVE, False, id="over"),
        pytest.param(None, None, CampaignStatus.DRAFT, False, id="a draft"),
    ],
)
def test_a_campaign_outside_its_period_is_ignored(
    start_at: datetime | None, end_at: datetime | None, status: CampaignStatus, live: bool
) -> None:
    compiled = campaign(rule("r1", EarnFixedPoints(25)), status=status, start_at=start_at, end_at=end_at)
    always = campaign(rule("r-always", EarnFixedPoints(1)), campaign_id="c-always")
    result = evaluate(receipt(line(1, 1_000)), MEMBER, [compiled, always])
    assert result.points_total == (26 if live else 1)
    # groups of equal priority go by campaign id: "c-always" before "c1"
    assert [a.rule_id for a in result.applied] == (["r-always", "r1"] if live else ["r-always"])
    assert result.skipped == []


# compile_condition()


@pytest.mark.parametrize("condition", ["", "   ", "\n\t"])
def test_an_empty_condition_means_always(condition: str) -> None:
    assert compile_condition(condition) is None


@pytest.mark.parametrize(
    "condition",
    [
        "receipt.total_minor >= 0",
        "receipt.line_count == 1",
        'receipt.store_id == "store-1"',
        'receipt.terminal_id != ""',
        'receipt.channel == "pos"',
        'receipt.currency_code == "RUB"',
        "receipt.hour < 24",
        "receipt.weekday >= 1 && receipt.weekday <= 7",
        '"SKU-1" in receipt.skus',
        'member.id != ""',
        "member.identified",
        'member.tier == "basic"',
        "size(member.segments) >= 0",
    ],
)
def test_every_documented_variable_is_available(condition: str) -> None:
    program = compile_condition(condition)
    assert program is not None


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        pytest.param("receipt.total_minor >", "Syntax error", id="syntax error"),
        pytest.param("receipt.total_minor >= (1", "Syntax error", id="unbalanced parenthesis"),
        pytest.param("receipt.total_minor + 1", "must be true or false, not int", id="a number"),
        pytest.param('"gold"', "must be true or false, not str", id="a string"),
        pytest.param('customer.tier == "gold"', "customer", id="unknown variable"),
        pytest.param("receipt.discount > 0", "discount", id="unknown field"),
        pytest.param("receipt.total_minor / 0 == 1", "division by zero", id="fails on the sample"),
    ],
)
def test_a_condition_that_cannot_work_is_rejected(condition: str, message: str) -> None:
    with pytest.raises(ConditionError) as rejected:
        compile_condition(condition)
    assert message in str(rejected.value)


def test_a_campaign_with_a_bad_condition_does_not_compile() -> None:
    bad = Campaign(
        "c1",
        "n",
        CampaignStatus.DRAFT,
        None,
        None,
        0,
        (rule("ok", EarnFixedPoints(1)), rule("bad", EarnFixedPoints(1), "receipt.total_minor")),
    )
    with pytest.raises(ConditionError):
        compile_campaign(bad)
