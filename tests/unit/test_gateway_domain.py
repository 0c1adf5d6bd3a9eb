"""What keys a receipt and what a committed receipt owes."""

from __future__ import annotations

from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from services.gateway.domain import CommitPlan, ReceiptKey, receipt_fingerprint


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
    )


def test_the_fingerprint_ignores_the_calculation_id_but_not_the_content() -> None:
    assert receipt_fingerprint(commit(100)) == receipt_fingerprint(commit(100, calculation_id="c-1"))
    assert receipt_fingerprint(commit(100)) != receipt_fingerprint(commit(101))
    assert receipt_fingerprint(commit(100)) != receipt_fingerprint(commit(100, card="7700000000024"))


def test_a_calculation_and_a_commit_of_one_receipt_have_one_fingerprint() -> None:
    request = commit(100)
    calculation = pos.CalculateChequeRequest(receipt=request.receipt, identifier=request.identifier)
    assert receipt_fingerprint(calculation) == receipt_fingerprint(request)


def test_step_keys_are_stable_per_receipt_and_step() -> None:
    key = ReceiptKey("T1", "42")
    assert key.step_request_id("accrue_points") == ReceiptKey("T1", "42").step_request_id("accrue_points")
    assert key.step_request_id("accrue_points") != ReceiptKey("T1", "43").step_request_id("accrue_points")
    assert key.step_request_id("accrue_points") != ReceiptKey("T2", "42").step_request_id("accrue_points")


def test_only_an_identified_receipt_with_points_owes_an_accrual() -> None:
    key = ReceiptKey("T1", "42")
    assert CommitPlan(key, holder_id="m-1", points=10).steps == ("accrue_points",)
    assert CommitPlan(key, holder_id="", points=10).steps == ()
    assert CommitPlan(key, holder_id="m-1", points=0).steps == ()
