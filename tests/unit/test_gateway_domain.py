"""What keys a receipt, how points pay for it, what a commit owes and what returns give back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime.errors import FailedPrecondition, InvalidArgument
from services.gateway.domain import (
    CommitPlan,
    ReceiptKey,
    SoldLine,
    allocate_pro_rata,
    apply_points_payment,
    earned_after_points_payment,
    plan_points_payment,
    plan_return,
    receipt_fingerprint,
    receipt_lots,
)
from services.gateway.peers import rules_subject


def commit(amount: int, card: str = "7700000000016", calculation_id: str = "") -> pos.CommitChequeRequest:
    return pos.CommitChequeRequest(
        receipt=receipt_pb2.Receipt(
            terminal_id="T1",
            receipt_number="42",
            currency_code="RUB",
            lines=[receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=amount, quantity_milli=1000)],
        ),
        identifier=pos.CustomerIdentifier(card_number=card),
        calculation_id=calculation_id,
        points_paid=5,
    )


def test_the_fingerprint_ignores_the_calculation_and_points_but_not_the_content() -> None:
    assert receipt_fingerprint(commit(100)) == receipt_fingerprint(commit(100, calculation_id="c-1"))
    assert receipt_fingerprint(commit(100)) != receipt_fingerprint(commit(101))
    assert receipt_fingerprint(commit(100)) != receipt_fingerprint(commit(100, card="7700000000024"))


def test_a_calculation_and_a_commit_of_one_receipt_have_one_fingerprint() -> None:
    request = commit(100)
    calculation = pos.CalculateChequeRequest(receipt=request.receipt, identifier=request.identifier)
    assert receipt_fingerprint(calculation) == receipt_fingerprint(request)


def test_step_keys_are_stable_per_partner_receipt_and_step() -> None:
    key = ReceiptKey("P1", "T1", "42")
    assert key.step_request_id("accrue_points") == ReceiptKey("P1", "T1", "42").step_request_id("accrue_points")
    assert key.step_request_id("accrue_points") != ReceiptKey("P1", "T1", "43").step_request_id("accrue_points")
    assert key.step_request_id("accrue_points") != ReceiptKey("P2", "T1", "42").step_request_id("accrue_points")
    assert key.step_request_id("accrue_points") != key.step_request_id("capture_hold")


def test_a_commit_owes_exactly_the_steps_its_receipt_needs() -> None:
    key = ReceiptKey("P1", "T1", "42")
    assert CommitPlan(key, holder_id="m-1", points=10).steps == ("accrue_points",)
    assert CommitPlan(key, holder_id="", points=10).steps == ()
    assert CommitPlan(key, holder_id="m-1", points=0).steps == ()
    paid = CommitPlan(key, "m-1", 10, hold_id="h-1", points_paid=300, coupon_reservations=("r-1",))
    assert paid.steps == ("capture_hold", "redeem_coupons", "accrue_points")
    assert CommitPlan(key, "m-1", 10, hold_id="h-1", points_paid=0).steps == ("release_hold", "accrue_points")


@given(st.integers(0, 10**9), st.lists(st.integers(0, 10**7), min_size=1, max_size=30))
def test_a_pro_rata_split_adds_up_and_never_exceeds_a_weight(amount: int, weights: list[int]) -> None:
    amount = min(amount, sum(weights))
    shares = allocate_pro_rata(amount, weights)
    assert sum(shares) == amount
    assert all(0 <= share <= weight for share, weight in zip(shares, weights, strict=True))


def test_points_pay_at_most_the_cap_and_the_balance() -> None:
    by_cap = plan_points_payment(10_000, [3_000, 1_000, 0], available=50_000)
    assert (by_cap.accepted, by_cap.per_line, by_cap.limited_by) == (4_000, [3_000, 1_000, 0], "cap")
    by_balance = plan_points_payment(10_000, [3_000, 1_000], available=2_000)
    assert (by_balance.accepted, by_balance.per_line, by_balance.limited_by) == (2_000, [1_500, 500], "balance")
    assert plan_points_payment(100, [3_000], available=2_000).limited_by == ""


def test_no_points_are_earned_on_the_part_paid_with_points() -> None:
    assert earned_after_points_payment(points_earned=500, final_amount_minor=10_000, points_paid=2_500) == 375
    assert earned_after_points_payment(points_earned=500, final_amount_minor=10_000, points_paid=10_000) == 0
    line = pos.ChequeLine(position=1, final_amount_minor=10_000, points_earned=500, max_points_payment=5_000)
    [paid] = apply_points_payment([line], [5_000])
    assert (paid.points_paid, paid.points_earned, line.points_earned) == (5_000, 250, 500)


SOLD = [
    SoldLine(position=1, quantity_milli=3000, final_amount_minor=10_000, points_earned=500, points_paid=1_001),
    SoldLine(position=2, quantity_milli=1000, final_amount_minor=2_345, points_earned=117, points_paid=0),
]


def test_partial_returns_add_up_to_the_whole_and_never_exceed_it() -> None:
    first = plan_return(SOLD, {}, [(1, 1000)])
    assert (first.points_taken_back, first.points_refunded, first.amount_refund_minor) == (166, 333, 3_333 - 333)
    assert not first.complete
    second = plan_return(SOLD, first.returned_after, [(1, 2000), (2, 1000)])
    assert second.complete
    assert first.points_taken_back + second.points_taken_back == 617
    assert first.points_refunded + second.points_refunded == 1_001
    assert first.amount_refund_minor + second.amount_refund_minor == 12_345 - 1_001
    with pytest.raises(FailedPrecondition) as nothing_left:
        plan_return(SOLD, second.returned_after, [])
    assert nothing_left.value.reason == "RECEIPT_ALREADY_RETURNED"


def test_a_return_above_what_is_left_or_of_an_unknown_line_is_refused_whole() -> None:
    with pytest.raises(FailedPrecondition) as too_much:
        plan_return(SOLD, {1: 2500}, [(2, 1000), (1, 1000)])
    assert too_much.value.reason == "RETURN_EXCEEDS_RECEIPT"
    with pytest.raises(InvalidArgument) as unknown:
        plan_return(SOLD, {}, [(7, 1000), (1, 0)])
    assert {v.field for v in unknown.value.violations} == {"lines[0].position", "lines[1].quantity_milli"}


def test_returning_everything_left_takes_back_exactly_the_remainder() -> None:
    rest = plan_return(SOLD, {1: 1000}, [])
    assert [line.quantity_milli for line in rest.lines] == [2000, 1000]
    assert rest.points_taken_back == 617 - 166 and rest.complete


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, 3000)), max_size=12))
def test_any_sequence_of_partial_returns_never_gives_back_more_than_the_receipt(steps: list[tuple[int, int]]) -> None:
    returned: dict[int, int] = {}
    taken = refunded = refund = 0
    for index, quantity in steps:
        line = SOLD[index]
        left = line.quantity_milli - returned.get(line.position, 0)
        if left == 0:
            continue
        plan = plan_return(SOLD, returned, [(line.position, min(quantity, left))])
        returned = plan.returned_after
        taken += plan.points_taken_back
        refunded += plan.points_refunded
        refund += plan.amount_refund_minor
    assert taken <= 617 and refunded <= 1_001 and refund <= 12_345 - 1_001
    if all(returned.get(line.position, 0) == line.quantity_milli for line in SOLD):
        assert (taken, refunded, refund) == (617, 1_001, 12_345 - 1_001)


def test_the_first_lot_keeps_the_accrual_key_of_receipts_from_before_lots() -> None:
    key = ReceiptKey("P1", "T1", "42")
    assert key.accrual_request_id(0) == key.step_request_id("accrue_points") == "cheque:P1:T1:42:accrue_points"
    assert len({key.accrual_request_id(index) for index in range(3)}) == 3


def test_lots_are_scaled_to_the_points_left_after_a_points_payment() -> None:
    promo = rules.PointsLotResult(points=100, currency="PROMO", lifetime_days=30)
    lots = receipt_lots(310, [rules.PointsLotResult(points=300), promo])
    assert [(lot.points, lot.currency, lot.lifetime_days) for lot in lots] == [(232, "", 0), (78, "PROMO", 30)]
    assert promo.points == 100, "the rules' lot is not changed"
    assert [lot.points for lot in receipt_lots(617, [])] == [617], "without lots: one lot of the defaults"
    assert receipt_lots(0, []) == []
    plan = CommitPlan(ReceiptKey("P1", "T1", "42"), "m-1", 100, lots=tuple(receipt_lots(100, [promo, promo])))
    assert [index for index, _ in plan.accruals] == [0, 1]
    nothing_in_first = receipt_lots(1, [rules.PointsLotResult(points=1), rules.PointsLotResult(points=1)])
    assert [index for index, _ in CommitPlan(plan.key, "m-1", 1, lots=tuple(nothing_in_first)).accruals] == [1]
    assert CommitPlan(plan.key, "", 100, lots=plan.lots).accruals == []


# SOLD earns 617 points: 517 by default and 100 in a lot that expires on 31 December
LOTS = [517, 100]


def test_each_return_takes_back_its_share_of_every_lot() -> None:
    half = plan_return(SOLD, {}, [(1, 1500), (2, 500)], lot_points=LOTS)
    assert half.points_taken_back == 250 + 58
    assert half.lots_taken_back == [258, 49]  # 517 * 308 // 617 and 100 * 308 // 617
    rest = plan_return(SOLD, half.returned_after, [], lot_points=LOTS)
    assert [a + b for a, b in zip(half.lots_taken_back, rest.lots_taken_back, strict=True)] == LOTS
    assert plan_return(SOLD, {}, [(1, 1000)], lot_points=[617]).lots_taken_back == [166], "one lot: as before"


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, 3000)), max_size=12), st.integers(0, 617))
def test_lot_returns_add_up_to_each_lot_and_never_exceed_it(steps: list[tuple[int, int]], promo: int) -> None:
    lots = [617 - promo, promo]
    returned: dict[int, int] = {}
    taken = [0, 0]
    for index, quantity in steps:
        line = SOLD[index]
        left = line.quantity_milli - returned.get(line.position, 0)
        if left == 0:
            continue
        plan = plan_return(SOLD, returned, [(line.position, min(quantity, left))], lot_points=lots)
        returned = plan.returned_after
        assert all(share >= 0 for share in plan.lots_taken_back)
        taken = [a + b for a, b in zip(taken, plan.lots_taken_back, strict=True)]
    assert all(0 <= back <= lot for back, lot in zip(taken, lots, strict=True))
    if all(returned.get(line.position, 0) == line.quantity_milli for line in SOLD):
        assert taken == lots


def test_the_rules_see_the_members_card_type_attributes_and_birth_date() -> None:
    member = members.MemberContext(
        member_id="m-1", tier="gold", segments=["vip"], card_type="platinum", birth_date="1990-05-17"
    )
    member.attributes["pets"].string_value = "cat"
    member.attributes["children"].int_value = 2
    member.attributes["vegan"].bool_value = True
    subject = rules_subject(member)
    assert (subject.member_id, subject.tier, list(subject.segments), subject.card_type) == (
        "m-1",
        "gold",
        ["vip"],
        "platinum",
    )
    assert {name: value.WhichOneof("value") for name, value in subject.attributes.items()} == {
        "pets": "string_value",
        "children": "int_value",
        "vegan": "bool_value",
    }
    assert (subject.attributes["pets"].string_value, subject.attributes["children"].int_value) == ("cat", 2)
    assert subject.attributes["vegan"].bool_value
    assert subject.birth_date == "1990-05-17"
