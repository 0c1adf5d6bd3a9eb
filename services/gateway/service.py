"""The receipt protocol's use cases: identify, calculate, commit, and the commit saga."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime.errors import DomainError, FailedPrecondition, Violations
from loyalty.runtime.outbox import OutboxRelay, add_event
from loyalty.runtime.timeutil import to_timestamp, utcnow
from loyalty.runtime.validation import check_receipt
from services.gateway import store
from services.gateway.domain import ChequeState, CommitPlan, ReceiptKey, receipt_fingerprint
from services.gateway.metrics import GatewayMetrics
from services.gateway.peers import Peers

log = logging.getLogger(__name__)

_STATES = {
    ChequeState.COMMITTED: pos.CHEQUE_STATE_COMMITTED,
    ChequeState.COMPLETED: pos.CHEQUE_STATE_COMPLETED,
}
RESUME_BATCH = 100


def check_identifier(identifier: pos.CustomerIdentifier, violations: Violations, field: str = "identifier") -> None:
    which = identifier.WhichOneof("kind")
    if which == "card_number":
        violations.check(bool(identifier.card_number), f"{field}.card_number", "must not be empty")
    elif which == "phone":
        violations.check(bool(identifier.phone), f"{field}.phone", "must not be empty")
    else:
        violations.add(field, "give a card_number or a phone")


def check_calculation(request: pos.CalculateChequeRequest | pos.CommitChequeRequest, committing: bool) -> None:
    violations = Violations()
    check_receipt(request.receipt, violations)
    if committing:
        violations.check(bool(request.receipt.terminal_id), "receipt.terminal_id", "required to commit")
        violations.check(bool(request.receipt.receipt_number), "receipt.receipt_number", "required to commit")
    if request.HasField("identifier"):
        check_identifier(request.identifier, violations)
    violations.raise_if_any()


def _lines(evaluation: rules.EvaluateReceiptResponse) -> list[pos.ChequeLine]:
    return [
        pos.ChequeLine(
            position=line.position,
            discount_minor=line.discount_minor,
            final_amount_minor=line.final_amount_minor,
            points_earned=line.points,
        )
        for line in evaluation.lines
    ]


def _customer(member: members.MemberContext, available: int = 0, pending: int = 0) -> pos.Customer:
    return pos.Customer(
        member_id=member.member_id,
        tier=member.tier,
        card_number=member.card_number,
        available_points=available,
        pending_points=pending,
    )


class PointOfSale:
    """Identify, calculate and commit receipts, orchestrating the other services."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        peers: Peers,
        relay: OutboxRelay,
        metrics: GatewayMetrics,
        job_runs: Counter,
        resume_after: timedelta,
    ) -> None:
        self._sessions = sessions
        self._peers = peers
        self._relay = relay
        self._metrics = metrics
        self._job_runs = job_runs
        self._resume_after = resume_after

    async def identify(self, identifier: pos.CustomerIdentifier) -> pos.Customer:
        violations = Violations()
        check_identifier(identifier, violations)
        violations.raise_if_any()
        return await self._customer_with_balance(await self._peers.identify(identifier))

    async def _customer_with_balance(self, member: members.MemberContext) -> pos.Customer:
        """The customer for the cashier; a balance the ledger can't give now is left out
        rather than holding up the checkout."""
        try:
            balance = await self._peers.balance(member.account_holder_id)
        except DomainError as error:
            log.warning("balance unavailable for the receipt answer: %s", error.reason)
            self._metrics.degraded_answers.labels("balance_unavailable").inc()
            unknown = _customer(member)
            unknown.balance_unavailable = True
            return unknown
        return _customer(member, balance.available, balance.pending)

    async def _evaluate(
        self, request: pos.CalculateChequeRequest | pos.CommitChequeRequest
    ) -> tuple[members.MemberContext | None, rules.EvaluateReceiptResponse]:
        member = await self._peers.identify(request.identifier) if request.HasField("identifier") else None
        evaluation = await self._peers.evaluate(request.receipt, member)
        return member, evaluation

    async def calculate(self, request: pos.CalculateChequeRequest) -> pos.CalculateChequeResponse:
        try:
            response = await self._calculate(request)
        except DomainError:
            self._metrics.receipts.labels("calculate", "rejected").inc()
            raise
        self._metrics.receipts.labels("calculate", "completed").inc()
        return response

    async def _calculate(self, request: pos.CalculateChequeRequest) -> pos.CalculateChequeResponse:
        check_calculation(request, committing=False)
        member, evaluation = await self._evaluate(request)
        response = pos.CalculateChequeResponse(
            calculation_id=str(uuid.uuid4()),
            lines=_lines(evaluation),
            applied_promotions=[
                pos.AppliedPromotion(
                    campaign_id=applied.campaign_id,
                    rule_id=applied.rule_id,
                    receipt_text=applied.receipt_text,
                    points=applied.points,
                    discount_minor=applied.discount_minor,
                )
                for applied in evaluation.applied_promotions
            ],
            discount_total_minor=evaluation.discount_total_minor,
            points_earned_total=evaluation.points_total,
            receipt_messages=[a.receipt_text for a in evaluation.applied_promotions if a.receipt_text],
        )
        if member is not None:
            response.customer.CopyFrom(await self._customer_with_balance(member))
        async with self._sessions() as session, session.begin():
            await store.add_calculation(
                session,
                store.CalculationRow(
                    calculation_id=response.calculation_id,
                    receipt_hash=receipt_fingerprint(request),
                    member_id=member.member_id if member else "",
                    holder_id=member.account_holder_id if member else "",
                    response=response.SerializeToString(),
                    created_at=utcnow(),
                ),
            )
        return response

    async def _planned(self, request: pos.CommitChequeRequest, receipt_hash: str) -> store.ChequeRow:
        """The cheque record to write: from the matching calculation, or calculated afresh."""
        key = ReceiptKey(request.receipt.terminal_id, request.receipt.receipt_number)
        calculation = None
        if request.calculation_id:
            async with self._sessions() as session:
                calculation = await store.find_calculation(session, request.calculation_id)
        if calculation is not None and calculation.receipt_hash == receipt_hash:
            calculated = pos.CalculateChequeResponse.FromString(calculation.response)
            member_id, holder_id = calculation.member_id, calculation.holder_id
            lines, points, discount = (
                list(calculated.lines),
                calculated.points_earned_total,
                calculated.discount_total_minor,
            )
        else:
            member, evaluation = await self._evaluate(request)
            member_id = member.member_id if member else ""
            holder_id = member.account_holder_id if member else ""
            lines, points, discount = (
                _lines(evaluation),
                evaluation.points_total,
                evaluation.discount_total_minor,
            )
        now = utcnow()
        response = pos.CommitChequeResponse(
            state=pos.CHEQUE_STATE_COMMITTED,
            points_earned_total=points,
            discount_total_minor=discount,
            lines=lines,
            commit_time=to_timestamp(now),
        )
        return store.ChequeRow(
            terminal_id=key.terminal_id,
            receipt_number=key.receipt_number,
            receipt_hash=receipt_hash,
            member_id=member_id,
            holder_id=holder_id,
            points=points,
            response=response.SerializeToString(),
            state=ChequeState.COMMITTED.value,
            attempts=0,
            last_error="",
            committed_at=now,
            completed_at=None,
        )

    async def _record(self, row: store.ChequeRow) -> store.ChequeRow:
        """Makes the receipt durable with its cheque.committed event; a concurrent commit of
        the same receipt finds it recorded and gets the first record."""
        async with self._sessions() as session, session.begin():
            recorded = await store.add_cheque_if_new(session, row)
            if recorded:
                await add_event(
                    session,
                    store.outbox,
                    "cheque.committed",
                    key=row.key.ref,
                    payload={
                        "terminal_id": row.terminal_id,
                        "receipt_number": row.receipt_number,
                        "member_id": row.member_id,
                        "holder_id": row.holder_id,
                        "points": row.points,
                    },
                )
            else:
                existing = await store.find_cheque(session, row.key)
        if recorded:
            self._relay.notify()
            return row
        assert existing is not None, "the conflicting receipt is committed before the insert returns"
        return existing

    async def commit(self, request: pos.CommitChequeRequest) -> pos.CommitChequeResponse:
        try:
            response = await self._commit(request)
        except DomainError:
            self._metrics.receipts.labels("commit", "rejected").inc()
            raise
        if response.state == pos.CHEQUE_STATE_COMPLETED:
            self._metrics.receipts.labels("commit", "completed").inc()
        else:
            self._metrics.receipts.labels("commit", "committed").inc()
            self._metrics.degraded_answers.labels("effects_deferred").inc()
        return response

    async def _commit(self, request: pos.CommitChequeRequest) -> pos.CommitChequeResponse:
        check_calculation(request, committing=True)
        key = ReceiptKey(request.receipt.terminal_id, request.receipt.receipt_number)
        receipt_hash = receipt_fingerprint(request)
        async with self._sessions() as session:
            cheque = await store.find_cheque(session, key)
        if cheque is None:
            cheque = await self._record(await self._planned(request, receipt_hash))
        if cheque.receipt_hash != receipt_hash:
            raise FailedPrecondition(
                "RECEIPT_NUMBER_REUSED",
                f"receipt {key.receipt_number} of terminal {key.terminal_id} was committed with other content",
            )
        state = ChequeState(cheque.state)
        if state is ChequeState.COMMITTED:
            state = await self.complete(key)
        response = pos.CommitChequeResponse.FromString(cheque.response)
        response.state = _STATES[state]
        if cheque.member_id:
            member = members.MemberContext(member_id=cheque.member_id, account_holder_id=cheque.holder_id)
            response.customer.CopyFrom(await self._customer_with_balance(member))
        return response

    async def complete(self, key: ReceiptKey) -> ChequeState:
        """Applies what a committed receipt owes. Each step is idempotent by the receipt, so
        running this again after a crash or a failure never applies a step twice."""
        async with self._sessions() as session:
            cheque = await store.find_cheque(session, key)
        if cheque is None or cheque.state == ChequeState.COMPLETED.value:
            return ChequeState.COMPLETED
        plan = CommitPlan(key, cheque.holder_id, cheque.points)
        try:
            for step in plan.steps:
                if step == "accrue_points":
                    await self._peers.accrue(plan)
        except DomainError as error:
            log.warning("receipt %s not completed yet: %s", key.ref, error.reason)
            async with self._sessions() as session, session.begin():
                await store.record_attempt(session, key, f"{error.reason}: {error.message}")
            return ChequeState.COMMITTED
        async with self._sessions() as session, session.begin():
            await store.mark_completed(session, key, utcnow())
        return ChequeState.COMPLETED

    async def resume_unfinished(self) -> int:
        """Completes receipts left committed by a failure or a crash; returns how many."""
        async with self._sessions() as session:
            keys = await store.unfinished_cheques(session, utcnow() - self._resume_after, RESUME_BATCH)
        completed = 0
        for key in keys:
            completed += await self.complete(key) is ChequeState.COMPLETED
        async with self._sessions() as session:
            self._metrics.unfinished_receipts.set(await store.count_unfinished(session))
        return completed

    async def run_resumer(self, interval_seconds: float) -> None:
        while True:
            try:
                await self.resume_unfinished()
            except Exception:
                log.exception("resuming unfinished receipts failed; will retry")
                self._job_runs.labels("resume_receipts", "failed").inc()
            else:
                self._job_runs.labels("resume_receipts", "ok").inc()
            await asyncio.sleep(interval_seconds)
