"""Gift cards over real gRPC on SQLite and PostgreSQL: sold, spent in parts, refunded; PINs;
and a ledger whose balance is the sum of its append-only entries and never goes negative."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import func, select, update

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.runtime.errors import RemoteError, read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.rewards import store
from services.rewards.domain import WRONG_PIN_LIMIT
from tests.integration.test_rewards_lifecycle import Rewards, failed, refusal, rewards_service


async def sell(rewards: Rewards, amount_minor: int, pin: str = "", validity_days: int = 365) -> pb.GiftCard:
    """One card issued in a batch of its own and activated with the amount."""
    batch = await rewards.stub.IssueGiftCards(
        pb.IssueGiftCardsRequest(
            request_id=f"batch-{amount_minor}-{pin}", count=1, currency_code="RUB", validity_days=validity_days
        )
    )
    (card,) = batch.cards
    activated = await rewards.stub.ActivateGiftCard(
        pb.ActivateGiftCardRequest(
            request_id=f"sell-{card.card_number}",
            card_number=card.card_number,
            amount_minor=amount_minor,
            pin=pin,
            receipt_ref="receipt:pos-1:sale",
        )
    )
    return activated.card


def spend(card_number: str, amount_minor: int, receipt: str, request_id: str, pin: str = "") -> pb.SpendGiftCardRequest:
    return pb.SpendGiftCardRequest(
        request_id=request_id,
        card_number=card_number,
        pin=pin,
        amount_minor=amount_minor,
        receipt_ref=receipt,
        terminal_id="pos-1",
    )


async def ledger(rewards: Rewards, card_number: str) -> tuple[int, int, int]:
    """(stored balance, sum of entries, lowest balance any entry left)."""
    async with rewards.engine.connect() as connection:
        balance = await connection.scalar(
            select(store.GiftCardRow.balance_minor).where(store.GiftCardRow.card_number == card_number)
        )
        total, lowest = (
            await connection.execute(
                select(
                    func.sum(store.GiftCardEntryRow.amount_minor), func.min(store.GiftCardEntryRow.balance_after_minor)
                ).where(store.GiftCardEntryRow.card_number == card_number)
            )
        ).one()
    return int(balance or 0), int(total or 0), int(lowest or 0)


async def test_a_gift_card_is_sold_spent_in_parts_and_refunded(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        batch = await rewards.stub.IssueGiftCards(
            pb.IssueGiftCardsRequest(request_id="batch-1", count=3, currency_code="RUB", validity_days=365)
        )
        assert len({card.card_number for card in batch.cards}) == 3
        assert all(c.status == pb.GIFT_CARD_STATUS_INACTIVE and c.balance_minor == 0 for c in batch.cards)
        number = batch.cards[0].card_number
        unsold = await refusal(rewards.stub.SpendGiftCard(spend(number, 100, "receipt:pos-1:1", "early")))
        assert (unsold.code, unsold.reason) == failed("GIFT_CARD_NOT_ACTIVE")

        sale = pb.ActivateGiftCardRequest(
            request_id="sell-1", card_number=number, amount_minor=300_000, receipt_ref="receipt:pos-1:1"
        )
        card = (await rewards.stub.ActivateGiftCard(sale)).card
        assert (card.status, card.balance_minor, card.has_pin) == (pb.GIFT_CARD_STATUS_ACTIVE, 300_000, False)
        days = (card.expire_time.ToDatetime() - utcnow().replace(tzinfo=None)).days
        assert days in (364, 365), "valid a year from the sale"
        assert (await rewards.stub.ActivateGiftCard(sale)).card == card, "a retried sale loads nothing twice"
        sale.request_id = "sell-again"
        assert (await refusal(rewards.stub.ActivateGiftCard(sale))).reason == "GIFT_CARD_ALREADY_ACTIVE"

        first = spend(number, 120_000, "receipt:pos-1:2", "pay-1")
        paid = await rewards.stub.SpendGiftCard(first)
        assert (paid.card.balance_minor, paid.spent_minor) == (180_000, 120_000)
        assert await rewards.stub.SpendGiftCard(first) == paid, "a retried payment pays once"
        second = await rewards.stub.SpendGiftCard(spend(number, 80_000, "receipt:pos-1:3", "pay-2"))
        assert second.card.balance_minor == 100_000
        too_much = await refusal(rewards.stub.SpendGiftCard(spend(number, 100_001, "receipt:pos-1:4", "pay-3")))
        assert (too_much.code, too_much.reason) == failed("GIFT_CARD_INSUFFICIENT_BALANCE")

        refund = pb.RefundGiftCardRequest(
            request_id="refund-1", card_number=number, amount_minor=50_000, receipt_ref="receipt:pos-1:2"
        )
        refunded = await rewards.stub.RefundGiftCard(refund)
        assert (refunded.card.balance_minor, refunded.refunded_minor) == (150_000, 50_000)
        assert await rewards.stub.RefundGiftCard(refund) == refunded
        over = pb.RefundGiftCardRequest(
            request_id="refund-2", card_number=number, amount_minor=70_001, receipt_ref="receipt:pos-1:2"
        )
        assert (await refusal(rewards.stub.RefundGiftCard(over))).reason == "GIFT_CARD_REFUND_EXCEEDS_SPEND"
        read = await rewards.stub.GetGiftCard(pb.GetGiftCardRequest(card_number=number.lower(), terminal_id="pos-1"))
        assert read.card.balance_minor == 150_000
        assert await ledger(rewards, number) == (150_000, 150_000, 100_000)

        unknown = await refusal(rewards.stub.SpendGiftCard(spend("ZZZZZZZZZZZZZZZZ", 1, "receipt:pos-1:5", "x")))
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "GIFT_CARD_NOT_FOUND")
        async with rewards.engine.begin() as connection:
            await connection.execute(
                update(store.GiftCardRow)
                .where(store.GiftCardRow.card_number == number)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        expired = await refusal(rewards.stub.SpendGiftCard(spend(number, 1, "receipt:pos-1:6", "late")))
        assert (expired.code, expired.reason) == failed("GIFT_CARD_EXPIRED")
        state = await rewards.stub.GetGiftCard(pb.GetGiftCardRequest(card_number=number))
        assert (state.card.status, state.card.balance_minor) == (pb.GIFT_CARD_STATUS_EXPIRED, 150_000)


async def test_a_pin_guards_the_card_and_guessing_it_is_stopped(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with rewards_service(tmp_path, database_url) as rewards:
        card = await sell(rewards, 100_000, pin="2468")
        assert card.has_pin
        number = card.card_number
        async with rewards.engine.connect() as connection:
            stored = await connection.scalar(
                select(store.GiftCardRow.pin_hash).where(store.GiftCardRow.card_number == number)
            )
        assert stored is not None and "2468" not in stored

        no_pin = await refusal(rewards.stub.GetGiftCard(pb.GetGiftCardRequest(card_number=number)))
        assert (no_pin.code, no_pin.reason) == failed("GIFT_CARD_WRONG_PIN")
        paid = await rewards.stub.SpendGiftCard(spend(number, 1000, "receipt:pos-1:1", "pay-1", pin="2468"))
        assert paid.card.balance_minor == 99_000
        for attempt in range(WRONG_PIN_LIMIT - 1):
            wrong = await refusal(
                rewards.stub.SpendGiftCard(spend(number, 1000, "receipt:pos-1:2", f"guess-{attempt}", pin="1111"))
            )
            assert wrong.reason == "GIFT_CARD_WRONG_PIN"

        with pytest.raises(grpc.aio.AioRpcError) as locked:
            await rewards.stub.SpendGiftCard(spend(number, 1000, "receipt:pos-1:3", "right", pin="2468"))
        remote = read_remote_error(locked.value)
        assert (remote.code, remote.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WRONG_PINS")
        status = rpc_status.from_call(locked.value)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(detail.Unpack(retry) for detail in status.details)
        assert 0 < retry.retry_delay.seconds <= 15 * 60, "tells the register when to try again"
        assert (await ledger(rewards, number))[0] == 99_000, "no wrong PIN moved money"
    assert "GIFT_CARD_WRONG_PIN" in caplog.text, "the refusals were logged, by reason"
    assert number not in caplog.text and "2468" not in caplog.text, "card numbers and PINs never reach the logs"


async def test_concurrent_payments_never_overdraw_a_card(tmp_path: Path, database_url: str) -> None:
    """Twenty registers pay 100.00 each from a card holding 1,000.00 at the same moment: the
    card's row lock serialises them, exactly ten are paid and the balance ends at zero."""
    async with rewards_service(tmp_path, database_url) as rewards:
        card = await sell(rewards, 100_000)

        async def register(index: int) -> pb.SpendGiftCardResponse | RemoteError:
            try:
                return await rewards.stub.SpendGiftCard(
                    spend(card.card_number, 10_000, f"receipt:pos-{index}:1", f"pay-{index}")
                )
            except grpc.aio.AioRpcError as error:
                return read_remote_error(error)

        outcomes = await asyncio.gather(*(register(index) for index in range(20)))
        paid = [o for o in outcomes if isinstance(o, pb.SpendGiftCardResponse)]
        refused = {(o.code, o.reason) for o in outcomes if isinstance(o, RemoteError)}
        assert len(paid) == 10, outcomes
        assert refused == {failed("GIFT_CARD_INSUFFICIENT_BALANCE")}
        assert sorted(o.card.balance_minor for o in paid) == list(range(0, 100_000, 10_000))
        assert await ledger(rewards, card.card_number) == (0, 0, 0)


async def test_invalid_gift_card_requests_name_every_field(tmp_path: Path, database_url: str) -> None:
    async with rewards_service(tmp_path, database_url) as rewards:
        batch = await refusal(
            rewards.stub.IssueGiftCards(
                pb.IssueGiftCardsRequest(request_id="b", count=0, currency_code="rub", validity_days=-1)
            )
        )
        assert [v.field for v in batch.violations] == ["count", "currency_code", "validity_days"]
        sale = await refusal(
            rewards.stub.ActivateGiftCard(pb.ActivateGiftCardRequest(request_id="s", amount_minor=0, pin="12"))
        )
        assert [v.field for v in sale.violations] == ["card_number", "amount_minor", "pin", "receipt_ref"]
        pay = await refusal(rewards.stub.SpendGiftCard(pb.SpendGiftCardRequest(request_id="p", amount_minor=-5)))
        assert [v.field for v in pay.violations] == ["card_number", "amount_minor", "receipt_ref"]
