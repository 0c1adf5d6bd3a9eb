"""The promotion engine's fast path gives exactly what the straightforward one gives.

`evaluate` converts the conditions' variables to CEL once per receipt (without receipt.lines
when no condition about to run may read them, and with only the fields of the receipt, the
member and each line that those conditions' texts select), runs a condition text shared by
several rules once, finds the lines of a scope through an index of what each line can be
named by, sorts units without a key function over the whole-unit lines of a scope found once,
works out the lines' minimum prices once, the non-multiplier points once, a rule's discounts
once per amounts (a BEST group weighs, then applies), and does not weigh
the lone candidate of a BEST group. The reference below undoes all of that: every condition
runs on every variable converted afresh (with the lines whenever any condition mentions them,
as before), every mask asks `Scope.matches` line by line, and units, the room left on a line,
points and BEST groups are worked out as they were first written.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from unittest import mock

import cel
from hypothesis import given, settings
from hypothesis import strategies as st

from services.rules import domain
from services.rules.domain import (
    UNIT_MILLI,
    BuyMPayN,
    Campaign,
    CampaignScope,
    CampaignStatus,
    CheapestItemDiscount,
    CompiledCampaign,
    CompiledGroup,
    CompiledRule,
    ConditionError,
    DiscountAmount,
    DiscountBase,
    DiscountPercent,
    EarnFixedPoints,
    EarnPointsCheapestItem,
    EarnPointsMultiplier,
    EarnPointsPercent,
    Effect,
    Evaluation,
    FixedPrice,
    GroupMode,
    NthItemDiscount,
    Product,
    Receipt,
    ReceiptLine,
    Rule,
    RuleGroup,
    Scope,
    Subject,
    activation,
    compile_campaign,
    evaluate,
)

AT = datetime(2026, 3, 2, 12, 30, tzinfo=UTC)
SKUS = ("SKU-1", "SKU-2", "SKU-3", "SKU-4", "SKU-5", "SKU-UNKNOWN")
CATALOGUE = {
    "SKU-1": Product("SKU-1", ("c1", "food"), "b1", False, frozenset({"l1"}), {"volume": 1, "min_price_minor": 400}),
    "SKU-2": Product("SKU-2", ("c2", "food"), "b2", True, frozenset(), {"volume": 2}),
    "SKU-3": Product("SKU-3", ("c1", "food"), "", False, frozenset({"l1", "l2"}), {}),
    "SKU-4": Product("SKU-4", (), "b1", True, frozenset(), {}),
    "SKU-5": Product("SKU-5", ("c2", "food"), "b2", False, frozenset({"l2"}), {"volume": 5, "min_price_minor": 1500}),
}
# conditions sharing texts, reading the lines, the receipt as a whole, counters, or failing
CONDITIONS = (
    "",
    "true",
    "receipt.total_minor >= 3000",
    'receipt.lines.exists(l, l.brand_id == "b1" && l.quantity_milli >= 1000)',
    "receipt.lines.size() >= 3",
    '"c1" in receipt.category_ids',
    'member.tier == "gold" || "seg-1" in member.segments',
    "receipt.hour >= 8 && receipt.line_count >= 2",
    "size(receipt) > 3",
    "member.counters.visits >= 1",
    "receipt.total_minor / (receipt.line_count - 2) > 1",
    "receipt.line_count == 1 ? true : 5",
    # what a condition reads of its variables: whole maps, a few fields, shadowed macro variables
    "receipt.lines.exists(l, size(l) > 10)",
    "size(member) > 9 && receipt.skus.size() > 1",
    'receipt.lines.map(l, l.sku).exists(s, s == "SKU-3")',
    "receipt.lines.all(line, line.price_minor > 500) && size(receipt.lines) >= 2",
    "receipt.lines.exists(l, has(l.attributes.volume) && l.attributes.volume >= 2)",
    'receipt.lines.exists(l, l.sku == "SKU-1") && member.segments.exists(l, l == "seg-1")',
    'receipt.lines.filter(l, l.sku == "SKU-1").exists(m, size(m) == 11)',
)
SCOPES = (
    Scope(),
    Scope(category_ids=("c1",)),
    Scope(category_ids=("food",), brand_ids=("b2",)),
    Scope(brand_ids=("b1", "")),
    Scope(skus=("SKU-3", "SKU-UNKNOWN")),
    Scope(product_list_ids=("l1",)),
    Scope(own_brand=True),
    Scope(brand_ids=("b2",), own_brand=True),
)


def effects(scope: Scope) -> st.SearchStrategy[Effect]:
    return st.one_of(
        st.builds(DiscountPercent, st.integers(1, 10_000), st.just(scope)),
        st.builds(DiscountAmount, st.integers(1, 5000), st.just(scope)),
        st.builds(FixedPrice, st.integers(0, 3000), st.just(scope)),
        st.builds(BuyMPayN, st.just(3), st.sampled_from((1, 2)), st.just(scope)),
        st.builds(NthItemDiscount, st.integers(2, 3), st.integers(1, 10_000), st.just(scope)),
        st.builds(CheapestItemDiscount, st.integers(1, 10_000), st.integers(1, 4), st.just(scope)),
        st.builds(EarnPointsPercent, st.integers(1, 2000), st.just(scope)),
        st.builds(EarnFixedPoints, st.integers(1, 500)),
        st.builds(EarnPointsCheapestItem, st.integers(1, 10_000), st.just(scope)),
        st.builds(EarnPointsMultiplier, st.integers(10_000, 30_000), st.just(scope)),
    )


@st.composite
def rules(draw: st.DrawFn, prefix: str) -> Rule:
    effect = draw(st.sampled_from(SCOPES).flatmap(effects))
    return Rule(prefix, prefix, draw(st.sampled_from(CONDITIONS)), effect, f"text {prefix}", draw(st.integers(0, 3)))


@st.composite
def campaigns(draw: st.DrawFn) -> list[CompiledCampaign]:
    made = []
    for number in range(draw(st.integers(1, 3))):
        groups = tuple(
            RuleGroup(
                f"g{number}.{index}",
                "",
                draw(st.sampled_from(tuple(GroupMode))),
                draw(st.integers(0, 2)),
                draw(st.sampled_from(CONDITIONS[:8])),
                draw(st.sampled_from(tuple(DiscountBase))),
                tuple(draw(rules(f"r{number}.{index}.{order}")) for order in range(draw(st.integers(1, 4)))),
            )
            for index in range(draw(st.integers(1, 3)))
        )
        scope = draw(st.sampled_from((CampaignScope(), CampaignScope(tiers=("gold",)))))
        campaign = Campaign(f"c{number}", "", CampaignStatus.ACTIVE, None, None, 1, (), groups, scope)
        made.append(compile_campaign(campaign))
    return made


@st.composite
def receipts(draw: st.DrawFn) -> Receipt:
    count = draw(st.integers(1, 8))
    lines = []
    for position in draw(st.lists(st.integers(1, 50), min_size=count, max_size=count, unique=True)):
        price = draw(st.integers(1, 5000))
        quantity = draw(st.sampled_from((500, 1000, 2000, 3000, 1250)))
        no_promotions = draw(st.integers(0, 4)) == 0
        lines.append(
            ReceiptLine(position, draw(st.sampled_from(SKUS)), price, quantity, price * quantity // 1000, no_promotions)
        )
    return Receipt("store-1", "pos-1", "pos", AT, "RUB", tuple(lines))


subjects = st.builds(
    Subject,
    st.sampled_from(("", "member-1")),
    st.sampled_from(("gold", "basic")),
    st.sampled_from(((), ("seg-1",), ("seg-2", "seg-1"))),
    st.just(()),
    st.sampled_from(({}, {"visits": 2})),
)


def _plain_units(basket: domain._Basket, mask: list[bool], base: list[int]) -> list[tuple[int, int, int]]:
    units: list[tuple[int, int, int]] = []
    for index, (line, selected) in enumerate(zip(basket.lines, mask, strict=True)):
        if not selected or line.quantity_milli % UNIT_MILLI:
            continue
        count = line.quantity_milli // UNIT_MILLI
        share, remainder = divmod(base[index], count)
        units.extend((share, line.position, index) for _ in range(count - 1))
        units.append((share + remainder, line.position, index))
    units.sort(key=lambda unit: (-unit[0], unit[1]))
    return units


def _plain_final_points(picks: list[domain._Pick], basket: domain._Basket) -> list[int]:
    points = [0] * len(basket.lines)
    earned = domain._earned(picks, basket)
    for pick in picks:
        if isinstance(pick.effect, domain.POINTS_EFFECTS):
            pick.points = domain._points(pick.effect, basket, earned)
            points = [a + b for a, b in zip(points, pick.points, strict=True)]
    return points


def _plain_room(basket: domain._Basket, mask: list[bool]) -> list[int]:
    return [
        max(0, amount - domain._minimum_amount(line, product)) if selected else 0
        for amount, line, product, selected in zip(basket.current, basket.lines, basket.products, mask, strict=True)
    ]


def _plain_in_scope(basket: domain._Basket, scope: Scope) -> list[bool]:
    return [
        not line.no_promotions and scope.matches(line.sku, product)
        for line, product in zip(basket.lines, basket.products, strict=True)
    ]


def _plain_run_group(
    evaluator: domain._Evaluator, campaign: Campaign, compiled: CompiledGroup, rules: list[CompiledRule]
) -> None:
    group = compiled.group
    if group.mode is GroupMode.FIRST:
        rules, passed = rules[:1], rules[1:]
        evaluator.skipped.extend((r.rule.rule_id, f"group {group.group_id}: an earlier rule applied") for r in passed)
    elif group.mode is GroupMode.BEST and rules:
        best = max(
            rules, key=lambda r: domain._worth(r.rule.effect, evaluator.basket, group.discount_base, evaluator.picks)
        )
        evaluator.skipped.extend(
            (r.rule.rule_id, f"group {group.group_id}: {best.rule.rule_id} is worth more")
            for r in rules
            if r is not best
        )
        rules = [best]
    for compiled_rule in rules:
        evaluator.apply(campaign, group, compiled_rule.rule)


@contextmanager
def straightforward(with_lines: bool) -> Iterator[None]:
    """`evaluate` without its shortcuts; `with_lines` as it was decided before them: whenever
    any condition of any campaign mentions lines."""

    def plain_outcome(evaluator: domain._Evaluator, program: cel.Program) -> bool | str:
        facts = activation(
            evaluator.receipt,
            evaluator.subject,
            evaluator.coupons,
            evaluator.catalogue,
            evaluator.local,
            with_lines,
            evaluator.counters_read,
        )
        try:
            return domain._holds(program, cel.Context(variables=facts))
        except ConditionError as error:
            return str(error)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(domain._Evaluator, "outcome", plain_outcome))
        stack.enter_context(mock.patch.object(domain._Evaluator, "run_group", _plain_run_group))
        stack.enter_context(mock.patch.object(domain._Basket, "in_scope", _plain_in_scope))
        stack.enter_context(mock.patch.object(domain, "_units", _plain_units))
        stack.enter_context(mock.patch.object(domain, "_final_points", _plain_final_points))
        stack.enter_context(mock.patch.object(domain, "_room", _plain_room))
        stack.enter_context(mock.patch.object(domain, "_discounts", domain._fresh_discounts))
        yield


def reference(receipt: Receipt, subject: Subject, compiled: list[CompiledCampaign]) -> Evaluation:
    with straightforward(any(campaign.mentions("lines") for campaign in compiled)):
        return evaluate(receipt, subject, compiled, (), CATALOGUE, 5000)


@settings(max_examples=100, deadline=None)
@given(compiled=campaigns(), receipt=receipts(), subject=subjects)
def test_the_fast_path_gives_what_the_straightforward_one_gives(
    compiled: list[CompiledCampaign], receipt: Receipt, subject: Subject
) -> None:
    assert evaluate(receipt, subject, compiled, (), CATALOGUE, 5000) == reference(receipt, subject, compiled)


@settings(max_examples=60, deadline=None)
@given(compiled=campaigns(), receipt=receipts(), subject=subjects, seed=st.integers(0, 1000))
def test_evaluation_does_not_depend_on_the_order_of_the_lines(
    compiled: list[CompiledCampaign], receipt: Receipt, subject: Subject, seed: int
) -> None:
    shuffled_lines = list(receipt.lines)
    random.Random(seed).shuffle(shuffled_lines)
    shuffled = Receipt(
        receipt.store_id,
        receipt.terminal_id,
        receipt.channel,
        receipt.time,
        receipt.currency_code,
        tuple(shuffled_lines),
    )
    in_order = evaluate(receipt, subject, compiled, (), CATALOGUE, 5000)
    reordered = evaluate(shuffled, subject, compiled, (), CATALOGUE, 5000)

    def by_position(evaluation: Evaluation) -> list[domain.LineOutcome]:
        return sorted(evaluation.lines, key=lambda outcome: outcome.position)

    assert by_position(reordered) == by_position(in_order)
    assert [outcome.position for outcome in reordered.lines] == [line.position for line in shuffled_lines]
    assert (reordered.applied, reordered.skipped, reordered.lots) == (in_order.applied, in_order.skipped, in_order.lots)


@settings(max_examples=300, deadline=None)
@given(receipt=receipts(), scope=st.sampled_from(SCOPES))
def test_a_scope_takes_in_the_lines_scope_matches_says(receipt: Receipt, scope: Scope) -> None:
    basket = domain._Basket(receipt, CATALOGUE)
    assert basket.in_scope(scope) == _plain_in_scope(basket, scope)
    # asked again with an equal scope that is another object, and with the same object
    assert basket.in_scope(Scope(**vars(scope))) == basket.in_scope(scope) == _plain_in_scope(basket, scope)


def test_a_shared_condition_runs_once_per_receipt_and_its_failure_is_reported_for_every_rule() -> None:
    failing = "receipt.total_minor / (receipt.line_count - 2) > 1"
    rules_ = tuple(
        Rule(f"r{index}", "", condition, EarnFixedPoints(10), "", index)
        for index, condition in enumerate(("receipt.total_minor > 0", "receipt.total_minor > 0", failing, failing))
    )
    group = RuleGroup("g", "", GroupMode.ALL, 0, "", DiscountBase.DISCOUNTED, rules_)
    compiled = [compile_campaign(Campaign("c", "", CampaignStatus.ACTIVE, None, None, 1, (), (group,)))]
    two_lines = Receipt(
        "store-1", "pos-1", "pos", AT, "RUB", tuple(ReceiptLine(p, "SKU-1", 100, 1000, 100, False) for p in (1, 2))
    )
    runs: list[str] = []
    real_holds = domain._holds

    def counting_holds(program: cel.Program, variables: cel.Context) -> bool:
        runs.append(program.source)
        return real_holds(program, variables)

    with mock.patch.object(domain, "_holds", counting_holds):
        evaluation = evaluate(two_lines, Subject("m", "", ()), compiled, (), CATALOGUE, 5000)

    assert sorted(runs) == sorted(["receipt.total_minor > 0", failing])
    assert [entry.rule_id for entry in evaluation.applied] == ["r0", "r1"]
    failures = [(rule_id, reason) for rule_id, reason in evaluation.skipped if rule_id in ("r2", "r3")]
    assert [rule_id for rule_id, _ in failures] == ["r2", "r3"]
    assert failures[0][1] == failures[1][1] and failures[0][1].startswith("condition failed: ")
    assert evaluation == reference(two_lines, Subject("m", "", ()), compiled)


def test_the_lines_are_converted_only_when_a_condition_about_to_run_may_read_them() -> None:
    reads_lines = "receipt.lines.size() >= 1"
    without = compile_campaign(
        Campaign(
            "c1",
            "",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (Rule("r1", "", "receipt.total_minor > 0", EarnFixedPoints(1), "", 0),),
        )
    )
    with_lines = compile_campaign(
        Campaign(
            "c2",
            "",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (Rule("r2", "", reads_lines, EarnFixedPoints(1), "", 0),),
            scope=CampaignScope(tiers=("gold",)),
        )
    )
    one_line = Receipt("store-1", "pos-1", "pos", AT, "RUB", (ReceiptLine(1, "SKU-1", 100, 1000, 100, False),))
    converted: list[bool] = []
    real_activation = domain.activation

    def recording_activation(*args: object, **kwargs: object) -> dict[str, object]:
        facts = real_activation(*args, **kwargs)  # type: ignore[arg-type]
        converted.append("lines" in facts["receipt"])
        return facts

    with mock.patch.object(domain, "activation", recording_activation):
        # the campaign reading the lines is out of scope for a basic member: no lines converted
        evaluate(one_line, Subject("m", "basic", ()), [without, with_lines])
        evaluate(one_line, Subject("m", "gold", ()), [without, with_lines])
    assert converted == [False, True]
    assert without.reads_lines is False and with_lines.reads_lines is True


def test_a_condition_reading_the_receipt_as_a_whole_sees_its_lines_when_any_condition_mentions_them() -> None:
    one_line = Receipt("store-1", "pos-1", "pos", AT, "RUB", (ReceiptLine(1, "SKU-1", 100, 1000, 100, False),))
    fields = len(activation(one_line, Subject("m", "", ()), with_lines=False)["receipt"])
    whole = compile_campaign(
        Campaign(
            "c1",
            "",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (Rule("r1", "", f"size(receipt) > {fields}", EarnFixedPoints(1), "", 0),),
        )
    )
    lines_mentioned = compile_campaign(
        Campaign(
            "c2",
            "",
            CampaignStatus.ACTIVE,
            None,
            None,
            1,
            (Rule("r2", "", "receipt.lines.size() > 5", EarnFixedPoints(1), "", 0),),
        )
    )
    alone = evaluate(one_line, Subject("m", "", ()), [whole], (), CATALOGUE, 5000)
    together = evaluate(one_line, Subject("m", "", ()), [whole, lines_mentioned], (), CATALOGUE, 5000)
    # only with its lines does the receipt have more than `fields` fields
    assert [entry.rule_id for entry in alone.applied] == []
    assert [entry.rule_id for entry in together.applied] == ["r1"]
    assert together == reference(one_line, Subject("m", "", ()), [whole, lines_mentioned])


def test_a_condition_is_given_only_the_fields_its_text_selects() -> None:
    reads = domain.condition_reads(
        'receipt.lines.exists(l, l.brand_id == "b" && l.quantity_milli >= 1000) && member.tier == "gold"'
    )
    assert reads == domain.Reads(frozenset({"lines"}), frozenset({"tier"}), frozenset({"brand_id", "quantity_milli"}))
    assert domain.condition_reads("size(receipt.lines) > 1 && receipt.lines.size() > 1").line == frozenset()
    # anything not a plain field selection on a line, the receipt or the member reads all of it
    for whole_line in (
        "receipt.lines.filter(l, true).size() > 0",
        'receipt.lines[0].sku == "x"',
        "receipt.lines.exists(l, size(l) > 1)",
        'receipt.lines.exists(l, l.sku == "x") && member.segments.exists(l, l == "x")',
        "size(receipt) > 1",
    ):
        assert domain.condition_reads(whole_line).line is None, whole_line
    assert domain.condition_reads("size(receipt) > 1").receipt is None
    assert domain.condition_reads('"gold" in member.segments && size(member) > 1').member is None


def test_two_multipliers_add_to_what_the_other_points_effects_earned_and_never_compound() -> None:
    rules_ = (
        Rule("earn", "", "", EarnPointsPercent(1000), "", 0),
        Rule("x2", "", "", EarnPointsMultiplier(20_000), "", 1),
        Rule("x2-again", "", "", EarnPointsMultiplier(20_000), "", 2),
    )
    compiled = [compile_campaign(Campaign("c", "", CampaignStatus.ACTIVE, None, None, 1, rules_))]
    one_line = Receipt("store-1", "pos-1", "pos", AT, "RUB", (ReceiptLine(1, "SKU-1", 1000, 1000, 1000, False),))
    evaluation = evaluate(one_line, Subject("m", "", ()), compiled, (), CATALOGUE, 5000)
    assert [(entry.rule_id, entry.points) for entry in evaluation.applied] == [
        ("earn", 100),
        ("x2", 100),
        ("x2-again", 100),
    ]
    assert evaluation == reference(one_line, Subject("m", "", ()), compiled)


def test_an_effect_met_again_after_a_discount_works_on_the_new_amounts() -> None:
    # one rule object in two groups: its discounts are not taken from the first time
    half_off_every_second = Rule("r", "", "", NthItemDiscount(2, 5000, Scope(category_ids=("c1",))), "", 0)
    groups = tuple(
        RuleGroup(f"g{index}", "", GroupMode.ALL, index, "", DiscountBase.DISCOUNTED, (half_off_every_second,))
        for index in range(2)
    )
    compiled = [compile_campaign(Campaign("c", "", CampaignStatus.ACTIVE, None, None, 1, (), groups))]
    two_units = Receipt("store-1", "pos-1", "pos", AT, "RUB", (ReceiptLine(1, "SKU-1", 1000, 2000, 2000, False),))
    evaluation = evaluate(two_units, Subject("m", "", ()), compiled, (), CATALOGUE, 5000)
    assert [entry.discount_minor for entry in evaluation.applied] == [500, 375]
    assert evaluation == reference(two_units, Subject("m", "", ()), compiled)
