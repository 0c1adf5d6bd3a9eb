"""The receipt saga: applies what a committed receipt or a return owes, each step
idempotent by the receipt, and resumes what a failure or a crash left unfinished."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime.errors import DomainError
from loyalty.runtime.outbox import OutboxRelay, add_event
from loyalty.runtime.timeutil import from_timestamp, utcnow
from loyalty.runtime.validation import line_amount
from services.gateway import store
from services.gateway.domain import CommitPlan, ReceiptKey, SagaState, SoldLine, receipt_lots
from services.gateway.metrics import GatewayMetrics
from services.gateway.peers import Peers

log = logging.getLogger(__name__)

RESUME_BATCH = 100
# A calculation is needed until its receipt is committed; a day is far beyond any hold.
CALCULATIONS_KEPT_FOR = timedelta(days=1)


def evaluated_lines(evaluation: rules.EvaluateReceiptResponse) -> list[pos.ChequeLine]:
    """The rules' answer as the register's lines, before any points payment."""
    return [
        pos.ChequeLine(
            position=line.position,
            discount_minor=line.discount_minor,
            final_amount_minor=line.final_amount_minor,
            points_earned=line.points,
            max_points_payment=line.max_points_payment_minor,
        )
        for line in evaluation.lines
    ]


def applied_promotions(evaluation: rules.EvaluateReceiptResponse) -> list[pos.AppliedPromotion]:
    return [
        pos.AppliedPromotion(
            campaign_id=applied.campaign_id,
            rule_id=applied.rule_id,
            receipt_text=applied.receipt_text,
            points=applied.points,
            discount_minor=applied.discount_minor,
            coupon_code=applied.coupon_code,
            coupon_series_id=applied.coupon_series_id,
            badge_id=applied.badge_id,
        )
        for applied in evaluation.applied_promotions
    ]


def serialized_lots(evaluation: rules.EvaluateReceiptResponse) -> bytes:
    """The evaluation's points lots as the calculation and the receipt keep them."""
    return rules.EvaluateReceiptResponse(points_lots=evaluation.points_lots).SerializeToString()


def cheque_lots(cheque: store.ChequeRow) -> list[rules.PointsLotResult]:
    """The receipt's earned points as the lots to credit, in lot order."""
    lots = rules.EvaluateReceiptResponse.FromString(cheque.points_lots or b"").points_lots
    return receipt_lots(cheque.points, lots)


def accrual_request(
    request_id: str, holder_id: str, source_ref: str, lot: rules.PointsLotResult
) -> accounts.AccruePointsRequest:
    """The AccruePoints of one lot, with the lot's activation, expiry and currency."""
    request = accounts.AccruePointsRequest(
        request_id=request_id,
        holder_id=holder_id,
        amount=lot.points,
        currency=lot.currency,
        source=accounts.ACCRUAL_SOURCE_RECEIPT,
        source_ref=source_ref,
        reason="points earned on a receipt",
        lifetime_days=lot.lifetime_days,
        # The two enums name the same roundings with the same numbers.
        expiry_rounding=accounts.ExpiryRounding.ValueType(lot.expiry_rounding),
    )
    if lot.HasField("activate_time"):
        request.activate_time.CopyFrom(lot.activate_time)
    if lot.HasField("expire_time"):
        request.expire_time.CopyFrom(lot.expire_time)
    return request


def unevaluated_lines(receipt: receipt_pb2.Receipt) -> list[pos.ChequeLine]:
    """Lines as charged, without any loyalty effect (promotions could not be evaluated)."""
    return [pos.ChequeLine(position=line.position, final_amount_minor=line_amount(line)) for line in receipt.lines]


def sold_lines(cheque: store.ChequeRow) -> list[SoldLine]:
    """A committed receipt's lines with what the program did on each, for returns."""
    receipt = pos.CalculateChequeRequest.FromString(cheque.receipt).receipt
    quantities = {line.position: line.quantity_milli for line in receipt.lines}
    response = pos.CommitChequeResponse.FromString(cheque.response)
    return [
        SoldLine(
            position=line.position,
            quantity_milli=quantities[line.position],
            final_amount_minor=line.final_amount_minor,
            points_earned=line.points_earned,
            points_paid=line.points_paid,
        )
        for line in response.lines
    ]


def committed_event(cheque: store.ChequeRow) -> dict[str, object]:
    """The cheque.committed payload: what tiers, statistics, chips and budgets need (coupon
    codes are bearer secrets and stay out of the streams)."""
    receipt = pos.CalculateChequeRequest.FromString(cheque.receipt).receipt
    response = pos.CommitChequeResponse.FromString(cheque.response)
    total = sum(line_amount(line) for line in receipt.lines)
    receipt_time = from_timestamp(receipt.receipt_time) if receipt.HasField("receipt_time") else cheque.committed_at
    return {
        "partner_id": cheque.partner_id,
        "terminal_id": cheque.terminal_id,
        "receipt_number": cheque.receipt_number,
        "store_id": cheque.store_id,
        "receipt_time": receipt_time.isoformat(),
        "currency_code": receipt.currency_code,
        "member_id": cheque.member_id,
        "holder_id": cheque.holder_id,
        "total_minor": total,
        "discount_minor": response.discount_total_minor,
        "paid_minor": total - response.discount_total_minor,
        "points": cheque.points,
        "points_paid": cheque.points_paid,
        "coupons_redeemed": len(cheque.coupon_reservations),
        # Budgets and per-member uses are counted from these.
        "applied_promotions": [
            {
                "campaign_id": applied.campaign_id,
                "rule_id": applied.rule_id,
                "by_coupon": bool(applied.coupon_code),
                "discount_minor": applied.discount_minor,
                "points": applied.points,
            }
            for applied in response.applied_promotions
        ],
        "offline": cheque.offline,
    }


def returned_event(cheque: store.ChequeRow, returned: store.ReturnRow) -> dict[str, object]:
    """The cheque.returned payload: what tiers, statistics and budgets take back."""
    answer = pos.ReturnChequeResponse.FromString(returned.response)
    return {
        "partner_id": cheque.partner_id,
        "terminal_id": cheque.terminal_id,
        "receipt_number": cheque.receipt_number,
        "return_id": returned.return_id,
        "store_id": cheque.store_id,
        "member_id": cheque.member_id,
        "holder_id": cheque.holder_id,
        "returned_minor": answer.amount_refund_minor + answer.points_refunded,
        "points_taken_back": returned.points_taken_back,
        "points_refunded": returned.points_refunded,
        "return_time": returned.created_at.isoformat(),
        "cancelled": cheque.cancelled,
    }


def lot_reversals(cheque: store.ChequeRow, returned: store.ReturnRow) -> list[tuple[str, int]]:
    """(accrual entry, points to take back) per lot of the receipt for one return. Receipts
    and returns from before lots have one accrual, which gives back all of it."""
    if returned.lots_taken_back is None or cheque.accrual_entry_ids is None:
        return [(cheque.accrual_entry_id, returned.points_taken_back)]
    return list(zip(cheque.accrual_entry_ids, returned.lots_taken_back, strict=True))


@dataclass(frozen=True)
class Settled:
    """Where a receipt's saga got to, with what the run saw on the way."""

    state: SagaState
    cheque: store.ChequeRow | None
    balance: accounts.Balance | None = None


@dataclass
class Saga:
    sessions: async_sessionmaker[AsyncSession]
    peers: Peers
    relay: OutboxRelay
    metrics: GatewayMetrics
    job_runs: Counter
    resume_after: timedelta

    async def complete(self, key: ReceiptKey) -> SagaState:
        """Applies what a committed receipt owes; see ``settle``."""
        return (await self.settle(key)).state

    async def settle(self, key: ReceiptKey, cheque: store.ChequeRow | None = None) -> Settled:
        """Applies what a committed receipt owes. Each step is idempotent by the receipt, so
        running this again after a crash or a failure never applies a step twice. The
        caller may hand in the row it just read or wrote; the answer carries the row as
        it ends and the balance the last ledger step reported, so a commit needs no
        further reads to answer."""
        if cheque is None:
            async with self.sessions() as session:
                cheque = await store.find_cheque(session, key)
        if cheque is None or cheque.saga_state == SagaState.COMPLETED.value:
            return Settled(SagaState.COMPLETED, cheque)
        balance: accounts.Balance | None = None
        try:
            if not cheque.evaluated:
                cheque = await self._evaluate_later(cheque)
            plan = CommitPlan(
                key,
                cheque.holder_id,
                cheque.points,
                cheque.hold_id,
                cheque.points_paid,
                tuple(reservation_id for _, reservation_id, _ in cheque.coupon_reservations),
                tuple(cheque_lots(cheque)),
            )
            redemption_entry_id = ""
            accrual_entry_ids = [""] * len(plan.lots)
            for step in plan.steps:
                request_id = key.step_request_id(step)
                if step == "capture_hold":
                    captured = await self.peers.capture_hold(request_id, plan.hold_id, plan.points_paid)
                    redemption_entry_id, balance = captured.entry.entry_id, captured.balance
                elif step == "release_hold":
                    balance = await self.peers.release_hold(request_id, plan.hold_id)
                elif step == "redeem_coupons":
                    for reservation_id in plan.coupon_reservations:
                        await self.peers.redeem_coupon(f"{request_id}:{reservation_id}", reservation_id)
                elif step == "accrue_points":
                    for index, lot in plan.accruals:
                        accrued = await self.peers.accrue(
                            accrual_request(key.accrual_request_id(index), plan.holder_id, key.ref, lot)
                        )
                        accrual_entry_ids[index] = accrued.entry.entry_id
                        if not lot.currency or (balance is not None and balance.currency == accrued.balance.currency):
                            # The register shows the program's own points.
                            balance = accrued.balance
        except DomainError as error:
            log.warning("receipt %s not completed yet: %s", key.ref, error.reason)
            async with self.sessions() as session, session.begin():
                await store.record_attempt(session, key, f"{error.reason}: {error.message}")
            return Settled(SagaState.COMMITTED, cheque)
        async with self.sessions() as session, session.begin():
            row = await store.find_cheque(session, key, lock=True)
            assert row is not None
            if row.saga_state == SagaState.COMPLETED.value:
                return Settled(SagaState.COMPLETED, row)
            row.saga_state = SagaState.COMPLETED.value
            row.completed_at = utcnow()
            row.attempts += 1
            row.last_error = ""
            # The first lot's entry, as before receipts had lots.
            row.accrual_entry_id = next((entry_id for entry_id in accrual_entry_ids if entry_id), "")
            row.accrual_entry_ids = accrual_entry_ids
            row.redemption_entry_id = redemption_entry_id
            await add_event(session, store.outbox, "cheque.committed", key=key.ref, payload=committed_event(row))
        self.relay.notify()
        return Settled(SagaState.COMPLETED, row, balance)

    async def _evaluate_later(self, cheque: store.ChequeRow) -> store.ChequeRow:
        """Evaluates a receipt accepted while the promotions (or the customer) could not be
        reached: the points it earns are those in force at its receipt time."""
        request = pos.CalculateChequeRequest.FromString(cheque.receipt)
        identifier = pos.CustomerIdentifier.FromString(cheque.identifier)
        member: members.MemberContext | None = None
        if identifier.WhichOneof("kind"):
            member = await self.peers.identify(identifier)
        evaluation = await self.peers.evaluate(request.receipt, member)
        lines = evaluated_lines(evaluation)
        async with self.sessions() as session, session.begin():
            row = await store.find_cheque(session, cheque.key, lock=True)
            assert row is not None
            if row.evaluated:
                return row
            response = pos.CommitChequeResponse.FromString(row.response)
            del response.lines[:]
            response.lines.extend(lines)
            response.points_earned_total = sum(line.points_earned for line in lines)
            response.discount_total_minor = evaluation.discount_total_minor
            del response.applied_promotions[:]
            response.applied_promotions.extend(applied_promotions(evaluation))
            row.response = response.SerializeToString()
            row.points = response.points_earned_total
            row.points_lots = serialized_lots(evaluation)
            row.member_id = member.member_id if member else ""
            row.holder_id = member.account_holder_id if member else ""
            row.evaluated = True
        return row

    async def complete_return(self, partner_id: str, return_id: str) -> SagaState:
        """Applies what a return owes: earned points taken back, paid points given back,
        coupons reinstated. Waits for the receipt's own saga first."""
        async with self.sessions() as session:
            returned = await store.find_return(session, partner_id, return_id)
        if returned is None or returned.saga_state == SagaState.COMPLETED.value:
            return SagaState.COMPLETED
        key = returned.receipt_key
        prefix = f"return:{partner_id}:{return_id}"
        try:
            if await self.complete(key) is not SagaState.COMPLETED:
                raise _NotSettled(key)
            async with self.sessions() as session:
                cheque = await store.find_cheque(session, key)
            assert cheque is not None
            for index, (entry_id, points) in enumerate(lot_reversals(cheque, returned)):
                if points and entry_id:
                    # The first lot keeps the key a return had before receipts had lots.
                    request_id = f"{prefix}:accrual" if index == 0 else f"{prefix}:accrual:{index}"
                    await self.peers.reverse(request_id, entry_id, points, f"return:{return_id}")
            if returned.points_refunded and cheque.redemption_entry_id:
                await self.peers.reverse(
                    f"{prefix}:redemption", cheque.redemption_entry_id, returned.points_refunded, f"return:{return_id}"
                )
            if returned.reinstate_coupons:
                for code, _, receipt_ref in cheque.coupon_reservations:
                    await self.peers.reinstate_coupon(f"{prefix}:coupon:{code}", code, receipt_ref)
        except (DomainError, _NotSettled) as error:
            reason = error.reason if isinstance(error, DomainError) else "RECEIPT_NOT_SETTLED"
            log.warning("return %s not completed yet: %s", return_id, reason)
            async with self.sessions() as session, session.begin():
                await store.record_return_attempt(session, partner_id, return_id, reason)
            return SagaState.COMMITTED
        async with self.sessions() as session, session.begin():
            if await store.mark_return_completed(session, partner_id, return_id, utcnow()):
                await add_event(
                    session,
                    store.outbox,
                    "cheque.returned",
                    key=key.ref,
                    payload=returned_event(cheque, returned),
                )
        self.relay.notify()
        return SagaState.COMPLETED

    async def resume_unfinished(self) -> int:
        """Completes receipts and returns left unfinished by a failure or a crash; returns
        how many it completed."""
        cutoff = utcnow() - self.resume_after
        async with self.sessions() as session:
            keys = await store.unfinished_cheques(session, cutoff, RESUME_BATCH)
            returns = await store.unfinished_returns(session, cutoff, RESUME_BATCH)
        completed = 0
        for key in keys:
            completed += await self.complete(key) is SagaState.COMPLETED
        for partner_id, return_id in returns:
            completed += await self.complete_return(partner_id, return_id) is SagaState.COMPLETED
        async with self.sessions() as session, session.begin():
            self.metrics.unfinished_receipts.set(await store.count_unfinished(session))
            await store.purge_calculations(session, utcnow() - CALCULATIONS_KEPT_FOR)
        return completed

    async def run_resumer(self, interval_seconds: float) -> None:
        while True:
            try:
                await self.resume_unfinished()
            except Exception:
                log.exception("resuming unfinished receipts failed; will retry")
                self.job_runs.labels("resume_receipts", "failed").inc()
            else:
                self.job_runs.labels("resume_receipts", "ok").inc()
            await asyncio.sleep(interval_seconds)


class _NotSettled(Exception):
    def __init__(self, key: ReceiptKey) -> None:
        super().__init__(f"receipt {key.ref} is not completed yet")
