"""The receipt protocol's use cases: identify, calculate, commit, return, cancel, offline."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.common.v1 import coupon_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime.cache import TtlCache
from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound, Unavailable, Violations
from loyalty.runtime.paging import page_size
from loyalty.runtime.timeutil import to_timestamp, utcnow
from loyalty.runtime.validation import MAX_ID_LENGTH, check_receipt
from services.gateway import store
from services.gateway.auth import Terminal
from services.gateway.domain import (
    CalculationState,
    ReceiptKey,
    SagaState,
    allocate_pro_rata,
    apply_points_payment,
    is_fully_returned,
    plan_points_payment,
    plan_return,
    receipt_fingerprint,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.peers import Peers
from services.gateway.saga import (
    Saga,
    applied_promotions,
    cheque_lots,
    evaluated_lines,
    serialized_lots,
    sold_lines,
    unevaluated_lines,
)

log = logging.getLogger(__name__)

MAX_COUPONS = 20
MAX_OFFLINE_CHEQUES = 500
_HISTORY_KINDS = {
    accounts.ENTRY_KIND_ACCRUAL: pos.HISTORY_KIND_ACCRUAL,
    accounts.ENTRY_KIND_REDEMPTION: pos.HISTORY_KIND_REDEMPTION,
    accounts.ENTRY_KIND_EXPIRY: pos.HISTORY_KIND_EXPIRY,
    accounts.ENTRY_KIND_REVERSAL: pos.HISTORY_KIND_REVERSAL,
}


def check_identifier(identifier: pos.CustomerIdentifier, violations: Violations, field: str = "identifier") -> None:
    which = identifier.WhichOneof("kind")
    if which is None:
        violations.add(field, "give a card_number, a phone or a qr_token")
        return
    violations.check(bool(getattr(identifier, which)), f"{field}.{which}", "must not be empty")
    violations.check_length(getattr(identifier, which), f"{field}.{which}", 512)


def check_cheque(
    request: pos.CalculateChequeRequest | pos.CommitChequeRequest | pos.OfflineCheque,
    program_currency: str,
    committing: bool,
    violations: Violations,
) -> None:
    receipt = request.receipt
    check_receipt(receipt, violations)
    if receipt.currency_code and receipt.currency_code != program_currency:
        violations.add("receipt.currency_code", f"the program runs in {program_currency}")
    for index, line in enumerate(receipt.lines):
        if line.amount_minor and line.price_minor:
            # The amount may carry the register's own discount, never more than price x quantity.
            violations.check(
                line.amount_minor <= (line.price_minor * line.quantity_milli + 999) // 1000,
                f"receipt.lines[{index}].amount_minor",
                "exceeds price_minor x quantity_milli",
            )
    for index, payment in enumerate(receipt.payments):
        violations.check(payment.amount_minor >= 0, f"receipt.payments[{index}].amount_minor", "must not be negative")
    if committing:
        violations.check(bool(receipt.terminal_id), "receipt.terminal_id", "required to commit")
        violations.check(bool(receipt.receipt_number), "receipt.receipt_number", "required to commit")
    if request.HasField("identifier"):
        check_identifier(request.identifier, violations)


def _customer(member: members.MemberContext, available: int = 0, pending: int = 0) -> pos.Customer:
    return pos.Customer(
        member_id=member.member_id,
        tier=member.tier,
        card_number=member.card_number,
        available_points=available,
        pending_points=pending,
    )


@dataclass
class Deadline:
    """The time a calculation may still spend on calls to other services."""

    budget_seconds: float
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.budget_seconds - (time.monotonic() - self.started)

    def left(self) -> bool:
        return self.remaining() > 0.005


@dataclass
class CouponAttempt:
    code: str
    result: pos.CouponResult
    reservation_id: str = ""
    presented: coupon_pb2.PresentedCoupon | None = None


@dataclass
class Calculation:
    """What a calculation decided, before it is answered and stored."""

    member: members.MemberContext | None
    evaluation: rules.EvaluateReceiptResponse
    coupons: list[CouponAttempt]
    degradations: list[pos.Degradation.ValueType]
    balance: accounts.Balance | None


def identifier_key(identifier: pos.CustomerIdentifier) -> bytes:
    """The key of an identification in the cache: the kind and the value (a card number and
    the same digits as a phone are different keys)."""
    return identifier.SerializeToString(deterministic=True)


class PointOfSale:
    """Identify, calculate, commit, return and cancel receipts, orchestrating the other services."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        peers: Peers,
        saga: Saga,
        metrics: GatewayMetrics,
        program_currency: str,
        budget_seconds: float,
        hold_ttl_seconds: int,
        identifications: TtlCache[members.MemberContext] | None = None,
    ) -> None:
        self._sessions = sessions
        self._peers = peers
        self._saga = saga
        self._metrics = metrics
        self._currency = program_currency
        self._budget = budget_seconds
        self._hold_ttl = hold_ttl_seconds
        # A register identifies the customer, then calculates with the same card or phone
        # within seconds: the members service is asked once. Only answers are kept.
        self._identifications = identifications or TtlCache[members.MemberContext](0)

    async def _member(self, identifier: pos.CustomerIdentifier, budget: float | None = None) -> members.MemberContext:
        """The member an identifier names: from this replica's recent identifications, else
        from the members service."""
        key = identifier_key(identifier)
        member = self._identifications.get(key)
        if member is None:
            member = await self._peers.identify(identifier, budget=budget)
            self._identifications.put(key, member.member_id, member)
        return member

    async def identify(self, identifier: pos.CustomerIdentifier) -> pos.Customer:
        violations = Violations()
        check_identifier(identifier, violations)
        violations.raise_if_any()
        return await self._customer_with_balance(await self._member(identifier))

    async def register(self, request: pos.RegisterCustomerRequest) -> pos.RegisterCustomerResponse:
        violations = Violations()
        violations.check(bool(request.request_id), "request_id", "required")
        violations.check_length(request.request_id, "request_id", MAX_ID_LENGTH)
        violations.check(bool(request.phone), "phone", "required")
        violations.raise_if_any()
        member, created = await self._peers.register(request)
        context = members.MemberContext(
            member_id=member.member_id,
            tier=member.tier,
            account_holder_id=member.account_holder_id,
            card_number=request.card_number,
        )
        return pos.RegisterCustomerResponse(customer=await self._customer_with_balance(context), created=created)

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

    # Calculate

    async def calculate(self, terminal: Terminal, request: pos.CalculateChequeRequest) -> pos.CalculateChequeResponse:
        try:
            response = await self._calculate(terminal, request)
        except DomainError:
            self._metrics.receipts.labels("calculate", "rejected").inc()
            raise
        self._metrics.receipts.labels("calculate", "degraded" if response.degradations else "completed").inc()
        return response

    async def _calculate(self, terminal: Terminal, request: pos.CalculateChequeRequest) -> pos.CalculateChequeResponse:
        violations = Violations()
        check_cheque(request, self._currency, committing=False, violations=violations)
        violations.check(request.points_to_pay >= 0, "points_to_pay", "must not be negative")
        violations.check(len(request.coupon_codes) <= MAX_COUPONS, "coupon_codes", f"at most {MAX_COUPONS}")
        for index, code in enumerate(request.coupon_codes):
            violations.check(bool(code.strip()), f"coupon_codes[{index}]", "must not be empty")
            violations.check_length(code, f"coupon_codes[{index}]", MAX_ID_LENGTH)
        violations.raise_if_any()
        terminal.check_store(request.receipt.store_id)
        deadline = Deadline(self._budget)
        calculation_id = str(uuid.uuid4())
        receipt = request.receipt
        receipt_ref = (
            ReceiptKey(terminal.partner_id, receipt.terminal_id, receipt.receipt_number).ref
            if receipt.terminal_id and receipt.receipt_number
            else f"calculation:{calculation_id}"
        )
        decided = await self._decide(terminal, request, calculation_id, receipt_ref, deadline)
        response = pos.CalculateChequeResponse(calculation_id=calculation_id)
        response.degradations.extend(decided.degradations)
        base_lines = (
            evaluated_lines(decided.evaluation)
            if pos.DEGRADATION_PROMOTIONS_UNAVAILABLE not in decided.degradations
            else unevaluated_lines(receipt)
        )
        caps = [line.max_points_payment for line in base_lines]
        hold_id, points_payment = await self._hold_points(
            request, decided, caps, calculation_id, receipt_ref, deadline, response
        )
        lines = apply_points_payment(base_lines, points_payment)
        response.lines.extend(lines)
        response.applied_promotions.extend(applied_promotions(decided.evaluation))
        response.receipt_messages.extend(
            applied.receipt_text for applied in decided.evaluation.applied_promotions if applied.receipt_text
        )
        coupon_discounts: dict[str, int] = {}
        for applied in decided.evaluation.applied_promotions:
            if applied.coupon_code:
                coupon_discounts[applied.coupon_code] = coupon_discounts.get(applied.coupon_code, 0) + (
                    applied.discount_minor
                )
        for attempt in decided.coupons:
            attempt.result.discount_minor = coupon_discounts.get(attempt.code, 0)
            response.coupons.append(attempt.result)
            if attempt.result.message:
                response.cashier_messages.append(attempt.result.message)
        response.discount_total_minor = sum(line.discount_minor for line in lines)
        response.points_earned_total = sum(line.points_earned for line in lines)
        response.max_points_payment_total = sum(caps)
        response.points_to_pay = sum(points_payment)
        response.amount_due_minor = sum(line.final_amount_minor for line in lines) - response.points_to_pay
        expire_at = utcnow() + timedelta(seconds=self._hold_ttl)
        response.expire_time.FromDatetime(expire_at)
        if decided.member is not None:
            member = decided.member
            if decided.balance is not None:
                customer = _customer(
                    member, decided.balance.available - response.points_to_pay, decided.balance.pending
                )
            else:
                customer = _customer(member)
                customer.balance_unavailable = True
            response.customer.CopyFrom(customer)
        if response.degradations:
            response.cashier_messages.append("Loyalty service degraded: the sale goes on, points are settled later")
            for degradation in response.degradations:
                self._metrics.degraded_answers.labels(pos.Degradation.Name(degradation).lower()).inc()
        async with self._sessions() as session, session.begin():
            await store.add_calculation(
                session,
                store.CalculationRow(
                    calculation_id=calculation_id,
                    partner_id=terminal.partner_id,
                    receipt_hash=receipt_fingerprint(request),
                    member_id=decided.member.member_id if decided.member else "",
                    holder_id=decided.member.account_holder_id if decided.member else "",
                    hold_id=hold_id,
                    points_to_pay=response.points_to_pay,
                    coupon_reservations=[
                        [attempt.code, attempt.reservation_id, receipt_ref]
                        for attempt in decided.coupons
                        if attempt.result.outcome == pos.COUPON_OUTCOME_APPLIED
                    ],
                    evaluation=pos.CalculateChequeResponse(lines=base_lines).SerializeToString(),
                    response=response.SerializeToString(),
                    state=CalculationState.OPEN.value,
                    expire_at=expire_at,
                    created_at=utcnow(),
                    points_lots=serialized_lots(decided.evaluation),
                ),
            )
        return response

    async def _decide(
        self,
        terminal: Terminal,
        request: pos.CalculateChequeRequest,
        calculation_id: str,
        receipt_ref: str,
        deadline: Deadline,
    ) -> Calculation:
        """Who the customer is, which coupons hold and what the promotions give, within the
        deadline: a service that does not answer in time is done without."""
        degradations: list[pos.Degradation.ValueType] = []
        member: members.MemberContext | None = None
        if request.HasField("identifier"):
            try:
                member = await self._member(request.identifier, budget=deadline.remaining())
            except Unavailable:
                degradations.append(pos.DEGRADATION_CUSTOMER_UNAVAILABLE)
        coupons = await self._reserve_coupons(terminal, request, member, calculation_id, receipt_ref, deadline)
        if any(attempt.result.reason == "COUPONS_UNAVAILABLE" for attempt in coupons):
            degradations.append(pos.DEGRADATION_COUPONS_UNAVAILABLE)
        presented = [attempt.presented for attempt in coupons if attempt.presented is not None]

        async def evaluate() -> rules.EvaluateReceiptResponse | None:
            if not deadline.left():
                return None
            try:
                return await self._peers.evaluate(request.receipt, member, presented, budget=deadline.remaining())
            except Unavailable:
                return None

        async def read_balance() -> accounts.Balance | None:
            if member is None or not deadline.left():
                return None
            try:
                return await self._peers.balance(member.account_holder_id, budget=deadline.remaining())
            except DomainError:
                return None

        evaluation, balance = await asyncio.gather(evaluate(), read_balance())
        if evaluation is None:
            degradations.append(pos.DEGRADATION_PROMOTIONS_UNAVAILABLE)
            evaluation = rules.EvaluateReceiptResponse()
            unused = {attempt.code for attempt in coupons if attempt.presented is not None}
        else:
            unused = set(evaluation.unused_coupon_codes)
        if member is not None and balance is None:
            degradations.append(pos.DEGRADATION_BALANCE_UNAVAILABLE)
        for attempt in coupons:
            if attempt.presented is not None and attempt.code in unused:
                attempt.result.outcome = pos.COUPON_OUTCOME_NOT_APPLICABLE
                attempt.result.reason = "COUPON_NOT_APPLICABLE"
                attempt.result.message = f"Coupon {mask(attempt.code)}: nothing on this receipt qualifies"
                self._release_later(f"calc:{calculation_id}:coupon:{attempt.code}:release", attempt.reservation_id)
                attempt.presented = None
        return Calculation(member, evaluation, coupons, degradations, balance)

    async def _reserve_coupons(
        self,
        terminal: Terminal,
        request: pos.CalculateChequeRequest,
        member: members.MemberContext | None,
        calculation_id: str,
        receipt_ref: str,
        deadline: Deadline,
    ) -> list[CouponAttempt]:
        attempts: list[CouponAttempt] = []
        for code in dict.fromkeys(code.strip() for code in request.coupon_codes):
            result = pos.CouponResult(code=code)
            attempt = CouponAttempt(code, result)
            attempts.append(attempt)
            if not deadline.left():
                result.outcome, result.reason = pos.COUPON_OUTCOME_NOT_APPLICABLE, "COUPONS_UNAVAILABLE"
                continue
            try:
                reserved = await self._peers.reserve_coupon(
                    f"calc:{calculation_id}:coupon:{code}",
                    code,
                    member.member_id if member else "",
                    receipt_ref,
                    f"{terminal.partner_id}:{request.receipt.terminal_id}",
                    self._hold_ttl,
                    budget=deadline.remaining(),
                )
            except Unavailable:
                result.outcome, result.reason = pos.COUPON_OUTCOME_NOT_APPLICABLE, "COUPONS_UNAVAILABLE"
                result.message = f"Coupon {mask(code)} cannot be checked now"
                continue
            except DomainError as error:
                result.outcome, result.reason = pos.COUPON_OUTCOME_REJECTED, error.reason
                result.message = f"Coupon {mask(code)} refused: {error.message}"
                continue
            result.outcome = pos.COUPON_OUTCOME_APPLIED
            attempt.reservation_id = reserved.reservation.reservation_id
            attempt.presented = coupon_pb2.PresentedCoupon(
                code=code,
                series_id=reserved.coupon.series_id,
                campaign_id=reserved.coupon.campaign_id,
                benefit=reserved.coupon.benefit,
            )
        return attempts

    def _release_later(self, request_id: str, reservation_id: str) -> None:
        """Frees a reservation without holding up the answer; a failure only means the
        reservation lapses at its time limit instead."""

        async def release() -> None:
            try:
                await self._peers.release_coupon(request_id, reservation_id)
            except DomainError as error:
                log.info("coupon reservation left to lapse: %s", error.reason)

        task = asyncio.get_running_loop().create_task(release())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _hold_points(
        self,
        request: pos.CalculateChequeRequest,
        decided: Calculation,
        caps: list[int],
        calculation_id: str,
        receipt_ref: str,
        deadline: Deadline,
        response: pos.CalculateChequeResponse,
    ) -> tuple[str, list[int]]:
        """Holds the points the customer pays with; returns the hold and their spread over lines."""
        nothing = [0] * len(caps)
        if request.points_to_pay <= 0:
            return "", nothing
        member, balance = decided.member, decided.balance
        if member is None:
            response.cashier_messages.append("Points can be paid only by an identified customer")
            return "", nothing
        if balance is None or pos.DEGRADATION_PROMOTIONS_UNAVAILABLE in decided.degradations or not deadline.left():
            response.degradations.append(pos.DEGRADATION_POINTS_PAYMENT_UNAVAILABLE)
            return "", nothing
        payment = plan_points_payment(request.points_to_pay, caps, balance.available)
        if payment.limited_by == "cap":
            response.cashier_messages.append(f"At most {payment.accepted} points can pay for this receipt")
        elif payment.limited_by == "balance":
            response.cashier_messages.append(f"Only {payment.accepted} points are available")
        if payment.accepted == 0:
            return "", nothing
        try:
            hold = await self._peers.place_hold(
                f"calc:{calculation_id}:hold",
                member.account_holder_id,
                payment.accepted,
                self._hold_ttl,
                receipt_ref,
                budget=deadline.remaining(),
            )
        except Unavailable:
            response.degradations.append(pos.DEGRADATION_POINTS_PAYMENT_UNAVAILABLE)
            return "", nothing
        except FailedPrecondition as error:
            response.cashier_messages.append(f"Points cannot be paid: {error.reason}")
            return "", nothing
        return hold.hold_id, payment.per_line

    # Commit

    async def commit(self, terminal: Terminal, request: pos.CommitChequeRequest) -> pos.CommitChequeResponse:
        try:
            response = await self._commit(terminal, request, offline=False)
        except DomainError:
            self._metrics.receipts.labels("commit", "rejected").inc()
            raise
        if response.state == pos.CHEQUE_STATE_COMMITTED:
            self._metrics.receipts.labels("commit", "committed").inc()
            self._metrics.degraded_answers.labels("effects_deferred").inc()
        else:
            self._metrics.receipts.labels("commit", "completed").inc()
        return response

    async def _commit(
        self, terminal: Terminal, request: pos.CommitChequeRequest, offline: bool
    ) -> pos.CommitChequeResponse:
        violations = Violations()
        check_cheque(request, self._currency, committing=True, violations=violations)
        violations.check(request.points_paid >= 0, "points_paid", "must not be negative")
        violations.raise_if_any()
        terminal.check_store(request.receipt.store_id)
        key = ReceiptKey(terminal.partner_id, request.receipt.terminal_id, request.receipt.receipt_number)
        receipt_hash = receipt_fingerprint(request)
        async with self._sessions() as session:
            cheque = await store.find_cheque(session, key)
            calculation = (
                await store.find_calculation(session, request.calculation_id)
                if cheque is None and request.calculation_id
                else None
            )
        if cheque is None:
            planned = await self._planned(terminal, key, request, receipt_hash, offline, calculation)
            cheque = await self._record(planned)
        if cheque.receipt_hash != receipt_hash:
            raise FailedPrecondition(
                "RECEIPT_NUMBER_REUSED",
                f"receipt {key.receipt_number} of terminal {key.terminal_id} was committed with other content",
            )
        settled = await self._saga.settle(key, cheque) if cheque.saga_state == SagaState.COMMITTED.value else None
        if settled is not None and settled.cheque is not None:
            cheque = settled.cheque
        response = pos.CommitChequeResponse.FromString(cheque.response)
        response.state = cheque_state(cheque)
        if cheque.member_id:
            member = members.MemberContext(member_id=cheque.member_id, account_holder_id=cheque.holder_id)
            if settled is not None and settled.balance is not None:
                # The last ledger step of this very commit reported the balance after it.
                response.customer.CopyFrom(_customer(member, settled.balance.available, settled.balance.pending))
            else:
                response.customer.CopyFrom(await self._customer_with_balance(member))
        return response

    async def _planned(
        self,
        terminal: Terminal,
        key: ReceiptKey,
        request: pos.CommitChequeRequest,
        receipt_hash: str,
        offline: bool,
        calculation: store.CalculationRow | None,
    ) -> store.ChequeRow:
        """The receipt record to write: from the matching calculation, or calculated afresh
        (and, when the promotions cannot be reached now, left for the saga to evaluate)."""
        if calculation is not None and calculation.partner_id != terminal.partner_id:
            calculation = None
        if calculation is not None and calculation.state == CalculationState.CANCELLED.value:
            raise FailedPrecondition("CALCULATION_CANCELLED", "the calculation was cancelled; calculate again")
        matches = calculation is not None and calculation.receipt_hash == receipt_hash
        if request.points_paid and not matches:
            raise FailedPrecondition(
                "POINTS_PAYMENT_NEEDS_CALCULATION",
                "points can be paid only on a receipt calculated with them: send its calculation_id",
            )
        now = utcnow()
        hold_id, reservations, evaluated, used_calculation = "", [], True, ""
        promotions: list[pos.AppliedPromotion] = []
        points_lots: bytes | None = None
        if calculation is not None and matches:
            if request.points_paid > calculation.points_to_pay:
                raise FailedPrecondition(
                    "POINTS_PAID_EXCEED_HOLD",
                    f"points_paid {request.points_paid} is more than the {calculation.points_to_pay} held",
                )
            if request.points_paid and calculation.expire_at <= now:
                raise FailedPrecondition("CALCULATION_EXPIRED", "the points hold has lapsed; calculate again")
            calculated = pos.CalculateChequeResponse.FromString(calculation.response)
            base_lines = list(pos.CalculateChequeResponse.FromString(calculation.evaluation).lines)
            per_line = allocate_pro_rata(request.points_paid, [line.max_points_payment for line in base_lines])
            lines = apply_points_payment(base_lines, per_line)
            member_id, holder_id = calculation.member_id, calculation.holder_id
            discount = calculated.discount_total_minor
            promotions = list(calculated.applied_promotions)
            hold_id, reservations = calculation.hold_id, calculation.coupon_reservations
            used_calculation = calculation.calculation_id
            points_lots = calculation.points_lots
            evaluated = pos.DEGRADATION_PROMOTIONS_UNAVAILABLE not in calculated.degradations
        else:
            member: members.MemberContext | None = None
            try:
                if request.HasField("identifier"):
                    member = await self._member(request.identifier)
                evaluation = await self._peers.evaluate(request.receipt, member)
            except Unavailable as error:
                log.warning("receipt %s accepted for later evaluation: %s", key.ref, error.reason)
                evaluated = False
            if evaluated:
                lines = evaluated_lines(evaluation)
                discount = evaluation.discount_total_minor
                promotions = applied_promotions(evaluation)
                points_lots = serialized_lots(evaluation)
            else:
                lines = unevaluated_lines(request.receipt)
                discount = 0
            member_id = member.member_id if member and evaluated else ""
            holder_id = member.account_holder_id if member and evaluated else ""
        points = sum(line.points_earned for line in lines)
        response = pos.CommitChequeResponse(
            state=pos.CHEQUE_STATE_COMMITTED,
            points_earned_total=points,
            discount_total_minor=discount,
            lines=lines,
            commit_time=to_timestamp(now),
            points_paid=request.points_paid,
            coupon_codes=[code for code, *_ in reservations],
            applied_promotions=promotions,
        )
        return store.ChequeRow(
            partner_id=key.partner_id,
            terminal_id=key.terminal_id,
            receipt_number=key.receipt_number,
            store_id=request.receipt.store_id,
            receipt_hash=receipt_hash,
            receipt=pos.CalculateChequeRequest(receipt=request.receipt).SerializeToString(),
            identifier=request.identifier.SerializeToString(),
            evaluated=evaluated,
            calculation_id=used_calculation,
            offline=offline,
            member_id=member_id,
            holder_id=holder_id,
            points=points,
            points_paid=request.points_paid,
            hold_id=hold_id,
            coupon_reservations=reservations,
            response=response.SerializeToString(),
            saga_state=SagaState.COMMITTED.value,
            accrual_entry_id="",
            redemption_entry_id="",
            returned={},
            cancelled=False,
            attempts=0,
            last_error="",
            committed_at=now,
            completed_at=None,
            points_lots=points_lots,
        )

    async def _record(self, row: store.ChequeRow) -> store.ChequeRow:
        """Makes the receipt durable; a concurrent commit of the same receipt finds it
        recorded and gets the first record."""
        async with self._sessions() as session, session.begin():
            recorded = await store.add_cheque_if_new(session, row)
            if (
                recorded
                and row.calculation_id
                and not await store.mark_calculation_committed(session, row.calculation_id)
            ):
                raise FailedPrecondition("CALCULATION_CANCELLED", "the calculation was cancelled; calculate again")
            if not recorded:
                existing = await store.find_cheque(session, row.key)
        if recorded:
            return row
        assert existing is not None, "the conflicting receipt is committed before the insert returns"
        return existing

    # Returns and cancellations

    async def return_cheque(self, terminal: Terminal, request: pos.ReturnChequeRequest) -> pos.ReturnChequeResponse:
        violations = Violations()
        violations.check(bool(request.return_id), "return_id", "required")
        violations.check_length(request.return_id, "return_id", 100)
        violations.check(bool(request.original.terminal_id), "original.terminal_id", "required")
        violations.check(bool(request.original.receipt_number), "original.receipt_number", "required")
        violations.raise_if_any()
        terminal.check_store(request.store_id)
        response = await self._return(terminal, request, request.return_id, cancelling=False)
        self._metrics.receipts.labels("return", "completed").inc()
        return response

    async def _return(
        self, terminal: Terminal, request: pos.ReturnChequeRequest, return_id: str, cancelling: bool
    ) -> pos.ReturnChequeResponse:
        key = ReceiptKey(terminal.partner_id, request.original.terminal_id, request.original.receipt_number)
        request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        async with self._sessions() as session:
            cheque = await store.find_cheque(session, key)
        if cheque is None:
            raise NotFound("RECEIPT_NOT_FOUND", f"no committed receipt {key.receipt_number} of {key.terminal_id}")
        if not cheque.evaluated:
            await self._saga.complete(key)
        async with self._sessions() as session, session.begin():
            existing = await store.find_return(session, terminal.partner_id, return_id)
            if existing is None:
                cheque = await store.find_cheque(session, key, lock=True)
                assert cheque is not None
                existing = await store.find_return(session, terminal.partner_id, return_id)
            if existing is None:
                recorded = self._plan_return(cheque, request, return_id, request_hash, cancelling)
                await store.add_return(session, recorded)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise FailedPrecondition("RETURN_ID_REUSED", f"return {return_id} was made with other content")
            recorded = existing
        await self._saga.complete_return(terminal.partner_id, return_id)
        response = pos.ReturnChequeResponse.FromString(recorded.response)
        async with self._sessions() as session:
            cheque = await store.find_cheque(session, key)
        assert cheque is not None
        response.state = cheque_state(cheque)
        if cheque.member_id:
            member = members.MemberContext(member_id=cheque.member_id, account_holder_id=cheque.holder_id)
            response.customer.CopyFrom(await self._customer_with_balance(member))
        return response

    def _plan_return(
        self,
        cheque: store.ChequeRow,
        request: pos.ReturnChequeRequest,
        return_id: str,
        request_hash: str,
        cancelling: bool,
    ) -> store.ReturnRow:
        """Decides the return against the locked receipt and records it on the receipt."""
        if cheque.cancelled:
            raise FailedPrecondition("RECEIPT_CANCELLED", "the receipt was cancelled")
        if not cheque.evaluated:
            raise Unavailable("RECEIPT_NOT_SETTLED", "the receipt is still being settled; retry the return shortly")
        sold = sold_lines(cheque)
        plan = plan_return(
            sold,
            cheque.returned_quantities,
            [(line.position, line.quantity_milli) for line in request.lines],
            lot_points=[lot.points for lot in cheque_lots(cheque)],
        )
        cheque.returned = {str(position): quantity for position, quantity in plan.returned_after.items()}
        cheque.cancelled = cancelling
        reinstate = plan.complete and bool(cheque.coupon_reservations)
        response = pos.ReturnChequeResponse(
            points_taken_back=plan.points_taken_back,
            points_refunded=plan.points_refunded,
            amount_refund_minor=plan.amount_refund_minor,
            coupons_reinstated=[code for code, *_ in cheque.coupon_reservations] if reinstate else [],
        )
        now = utcnow()
        return store.ReturnRow(
            partner_id=cheque.partner_id,
            return_id=return_id,
            terminal_id=cheque.terminal_id,
            receipt_number=cheque.receipt_number,
            request_hash=request_hash,
            points_taken_back=plan.points_taken_back,
            points_refunded=plan.points_refunded,
            reinstate_coupons=reinstate,
            response=response.SerializeToString(),
            saga_state=SagaState.COMMITTED.value,
            attempts=0,
            last_error="",
            created_at=now,
            completed_at=None,
            lots_taken_back=plan.lots_taken_back,
        )

    async def cancel(self, terminal: Terminal, request: pos.CancelChequeRequest) -> pos.CancelChequeResponse:
        violations = Violations()
        violations.check(bool(request.request_id), "request_id", "required")
        violations.check_length(request.request_id, "request_id", 100)
        which = request.WhichOneof("target")
        violations.check(which is not None, "target", "give a calculation_id or a receipt")
        if which == "receipt":
            violations.check(bool(request.receipt.terminal_id), "receipt.terminal_id", "required")
            violations.check(bool(request.receipt.receipt_number), "receipt.receipt_number", "required")
        violations.raise_if_any()
        if which == "calculation_id":
            response = await self._cancel_calculation(terminal, request)
        else:
            returned = await self._return(
                terminal,
                pos.ReturnChequeRequest(return_id=f"cancel:{request.request_id}", original=request.receipt),
                f"cancel:{request.request_id}",
                cancelling=True,
            )
            response = pos.CancelChequeResponse(
                state=pos.CHEQUE_STATE_CANCELLED,
                points_refunded=returned.points_refunded,
                points_taken_back=returned.points_taken_back,
            )
        self._metrics.receipts.labels("cancel", "completed").inc()
        return response

    async def _cancel_calculation(
        self, terminal: Terminal, request: pos.CancelChequeRequest
    ) -> pos.CancelChequeResponse:
        async with self._sessions() as session, session.begin():
            calculation = await store.find_calculation(session, request.calculation_id, lock=True)
            if calculation is None or calculation.partner_id != terminal.partner_id:
                raise NotFound("CALCULATION_NOT_FOUND", f"no calculation {request.calculation_id}")
            if calculation.state == CalculationState.COMMITTED.value:
                raise FailedPrecondition(
                    "CALCULATION_COMMITTED", "the receipt was committed: cancel the receipt instead"
                )
            calculation.state = CalculationState.CANCELLED.value
            hold_id, reservations = calculation.hold_id, list(calculation.coupon_reservations)
            points = calculation.points_to_pay
        # Releasing is idempotent, so a repeated cancel simply releases again; if a
        # service is down its hold or reservation lapses at its time limit anyway.
        if hold_id:
            try:
                await self._peers.release_hold(f"cancel:{request.calculation_id}:hold", hold_id)
            except DomainError as error:
                log.warning("hold left to lapse: %s", error.reason)
        for code, reservation_id, _ in reservations:
            self._release_later(f"cancel:{request.calculation_id}:coupon:{code}", reservation_id)
        return pos.CancelChequeResponse(state=pos.CHEQUE_STATE_CANCELLED, points_refunded=points)

    # Offline and history

    async def upload_offline(
        self, terminal: Terminal, request: pos.UploadOfflineChequesRequest
    ) -> pos.UploadOfflineChequesResponse:
        violations = Violations()
        violations.check(bool(request.cheques), "cheques", "at least one receipt")
        violations.check(len(request.cheques) <= MAX_OFFLINE_CHEQUES, "cheques", f"at most {MAX_OFFLINE_CHEQUES}")
        violations.raise_if_any()
        response = pos.UploadOfflineChequesResponse()
        for offline in request.cheques:
            reference = pos.ReceiptReference(
                terminal_id=offline.receipt.terminal_id, receipt_number=offline.receipt.receipt_number
            )
            commit = pos.CommitChequeRequest(receipt=offline.receipt)
            if offline.HasField("identifier"):
                commit.identifier.CopyFrom(offline.identifier)
            try:
                committed = await self._commit(terminal, commit, offline=True)
            except DomainError as error:
                self._metrics.receipts.labels("offline", "rejected").inc()
                response.results.append(
                    pos.OfflineChequeResult(receipt=reference, error_reason=error.reason, error_message=error.message)
                )
                continue
            self._metrics.receipts.labels("offline", "committed").inc()
            response.results.append(
                pos.OfflineChequeResult(
                    receipt=reference, state=committed.state, points_earned_total=committed.points_earned_total
                )
            )
        return response

    async def history(self, request: pos.ListCustomerHistoryRequest) -> pos.ListCustomerHistoryResponse:
        violations = Violations()
        check_identifier(request.identifier, violations)
        size = page_size(request.page_size, violations)
        violations.raise_if_any()
        member = await self._member(request.identifier)
        entries = await self._peers.history(member.account_holder_id, size, request.page_token)
        return pos.ListCustomerHistoryResponse(
            customer=await self._customer_with_balance(member),
            items=[
                pos.HistoryItem(
                    kind=_HISTORY_KINDS.get(entry.kind, pos.HISTORY_KIND_OTHER),
                    points=entry.amount,
                    source_ref=entry.source_ref,
                    reason=entry.reason,
                    time=entry.create_time,
                )
                for entry in entries.entries
            ],
            next_page_token=entries.next_page_token,
        )

    # Gift cards are a tender: taken before the receipt is fiscalised, given back on return.

    async def gift_card_balance(
        self, terminal: Terminal, request: pos.GetGiftCardBalanceRequest
    ) -> pos.GetGiftCardBalanceResponse:
        violations = Violations()
        violations.check(bool(request.card_number), "card_number", "required")
        violations.check_length(request.card_number, "card_number", MAX_ID_LENGTH)
        violations.raise_if_any()
        card = await self._peers.gift_card(
            request.card_number, request.pin, f"{terminal.partner_id}:{request.terminal_id}"
        )
        response = pos.GetGiftCardBalanceResponse(
            balance_minor=card.balance_minor,
            currency_code=card.currency_code,
            active=card.status == rewards.GIFT_CARD_STATUS_ACTIVE,
        )
        if card.HasField("expire_time"):
            response.expire_time.CopyFrom(card.expire_time)
        return response

    @staticmethod
    def _check_gift_payment(
        request: pos.PayWithGiftCardRequest | pos.RefundGiftCardPaymentRequest, violations: Violations
    ) -> None:
        violations.check(bool(request.request_id), "request_id", "required")
        violations.check_length(request.request_id, "request_id", 100)
        violations.check(bool(request.card_number), "card_number", "required")
        violations.check_length(request.card_number, "card_number", MAX_ID_LENGTH)
        violations.check(request.amount_minor > 0, "amount_minor", "must be positive")
        violations.check(bool(request.receipt.terminal_id), "receipt.terminal_id", "required")
        violations.check(bool(request.receipt.receipt_number), "receipt.receipt_number", "required")

    async def pay_with_gift_card(
        self, terminal: Terminal, request: pos.PayWithGiftCardRequest
    ) -> pos.PayWithGiftCardResponse:
        violations = Violations()
        self._check_gift_payment(request, violations)
        violations.raise_if_any()
        terminal.check_store(request.store_id)
        key = ReceiptKey(terminal.partner_id, request.receipt.terminal_id, request.receipt.receipt_number)
        spent = await self._peers.spend_gift_card(
            f"gift:{terminal.partner_id}:{request.request_id}",
            request.card_number,
            request.pin,
            request.amount_minor,
            key.ref,
            f"{terminal.partner_id}:{request.receipt.terminal_id}",
        )
        return pos.PayWithGiftCardResponse(paid_minor=spent.spent_minor, balance_minor=spent.card.balance_minor)

    async def refund_gift_card(
        self, terminal: Terminal, request: pos.RefundGiftCardPaymentRequest
    ) -> pos.RefundGiftCardPaymentResponse:
        violations = Violations()
        self._check_gift_payment(request, violations)
        violations.raise_if_any()
        terminal.check_store(request.store_id)
        key = ReceiptKey(terminal.partner_id, request.receipt.terminal_id, request.receipt.receipt_number)
        refunded = await self._peers.refund_gift_card(
            f"gift:{terminal.partner_id}:{request.request_id}", request.card_number, request.amount_minor, key.ref
        )
        return pos.RefundGiftCardPaymentResponse(
            refunded_minor=refunded.refunded_minor, balance_minor=refunded.card.balance_minor
        )


def cheque_state(cheque: store.ChequeRow) -> pos.ChequeState.ValueType:
    if cheque.cancelled:
        return pos.CHEQUE_STATE_CANCELLED
    returned = cheque.returned_quantities
    if any(returned.values()):
        fully = cheque.evaluated and is_fully_returned(sold_lines(cheque), returned)
        return pos.CHEQUE_STATE_RETURNED if fully else pos.CHEQUE_STATE_PARTIALLY_RETURNED
    if cheque.saga_state == SagaState.COMPLETED.value:
        return pos.CHEQUE_STATE_COMPLETED
    return pos.CHEQUE_STATE_COMMITTED


def mask(code: str) -> str:
    """A coupon code as it may be shown or logged: its last four characters."""
    return f"…{code[-4:]}" if len(code) > 4 else "…"


_background: set[asyncio.Task[None]] = set()
