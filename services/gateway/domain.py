"""The receipt protocol's rules: what keys a receipt, how points pay for it, what a commit
owes and what a return gives back. No I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.runtime.errors import FailedPrecondition, Violations


class SagaState(StrEnum):
    """How far a committed receipt's (or a return's) effects have got."""

    COMMITTED = "committed"
    COMPLETED = "completed"


class CalculationState(StrEnum):
    OPEN = "open"
    COMMITTED = "committed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ReceiptKey:
    """A receipt is identified by the partner, its terminal and its number on that terminal:
    two partners' registers may well both be called "pos-1"."""

    partner_id: str
    terminal_id: str
    receipt_number: str

    @property
    def ref(self) -> str:
        return f"receipt:{self.partner_id}:{self.terminal_id}:{self.receipt_number}"

    def step_request_id(self, step: str) -> str:
        """The idempotency key of one saga step: a retry of the step can never apply twice."""
        return f"cheque:{self.partner_id}:{self.terminal_id}:{self.receipt_number}:{step}"

    def accrual_request_id(self, lot_index: int) -> str:
        """The idempotency key of one lot's accrual. The first lot keeps the key of the
        single accrual made before receipts had lots, so a receipt committed before an
        upgrade and settled after it is never accrued twice."""
        step = self.step_request_id("accrue_points")
        return step if lot_index == 0 else f"{step}:{lot_index}"


def receipt_fingerprint(
    request: pos.CommitChequeRequest | pos.CalculateChequeRequest | pos.OfflineCheque,
) -> str:
    """What makes two submissions the same receipt: its content and the customer, not the
    calculation id, the coupons or the points (a retry may or may not carry them)."""
    canonical = pos.CalculateChequeRequest(receipt=request.receipt, identifier=request.identifier)
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


def _cumulative_share(total: int, part: int, whole: int) -> int:
    """``total`` scaled by ``part / whole``, rounded down. Differences of cumulative shares
    add up to ``total`` exactly once ``part`` reaches ``whole``: nothing is lost to rounding."""
    return total * part // whole if whole else 0


def allocate_pro_rata(amount: int, weights: Sequence[int]) -> list[int]:
    """Splits ``amount`` over the weights in proportion, each share at most its weight when
    ``amount`` does not exceed their sum; the shares add up to ``amount`` exactly."""
    whole = sum(weights)
    shares: list[int] = []
    running = 0
    for weight in weights:
        before = _cumulative_share(amount, running, whole)
        running += weight
        shares.append(_cumulative_share(amount, running, whole) - before)
    return shares


def earned_after_points_payment(points_earned: int, final_amount_minor: int, points_paid: int) -> int:
    """Points are not earned on the part of a line paid with points."""
    if final_amount_minor <= 0:
        return 0
    return points_earned * (final_amount_minor - points_paid) // final_amount_minor


@dataclass(frozen=True)
class PointsPayment:
    """How much of a points payment is accepted and how it is spread over the lines."""

    requested: int
    accepted: int
    per_line: list[int]
    limited_by: str  # "", "cap" or "balance"


def plan_points_payment(requested: int, caps: Sequence[int], available: int) -> PointsPayment:
    """The points to hold: what was asked, at most the receipt's redemption cap and the
    available balance, spread over the lines in proportion to their caps."""
    cap_total = sum(caps)
    accepted = max(0, min(requested, cap_total, available))
    limited_by = ""
    if accepted < requested:
        limited_by = "cap" if min(cap_total, available) == cap_total else "balance"
    return PointsPayment(requested, accepted, allocate_pro_rata(accepted, caps), limited_by)


def apply_points_payment(lines: Sequence[pos.ChequeLine], per_line: Sequence[int]) -> list[pos.ChequeLine]:
    """The lines with their points payment and the points they still earn."""
    paid_lines = []
    for line, paid in zip(lines, per_line, strict=True):
        paid_line = pos.ChequeLine()
        paid_line.CopyFrom(line)
        paid_line.points_paid = paid
        paid_line.points_earned = earned_after_points_payment(line.points_earned, line.final_amount_minor, paid)
        paid_lines.append(paid_line)
    return paid_lines


def receipt_lots(points: int, lots: Sequence[rules.PointsLotResult]) -> list[rules.PointsLotResult]:
    """The receipt's ``points`` as the lots to credit. The rules' lots add up to what the
    receipt earned before any points payment; paying with points lowers the earnings, so
    the lots are scaled down pro rata (exactly, in whole points). Without lots (an older
    calculation, or rules that gave none) the points are one lot of the program's defaults."""
    if not lots:
        return [rules.PointsLotResult(points=points)] if points > 0 else []
    scaled = allocate_pro_rata(points, [lot.points for lot in lots])
    result = []
    for lot, lot_points in zip(lots, scaled, strict=True):
        copy = rules.PointsLotResult()
        copy.CopyFrom(lot)
        copy.points = lot_points
        result.append(copy)
    return result


@dataclass(frozen=True)
class CommitPlan:
    """The effects a committed receipt owes; the saga applies each exactly once."""

    key: ReceiptKey
    holder_id: str
    points: int
    hold_id: str = ""
    points_paid: int = 0
    coupon_reservations: tuple[str, ...] = ()
    # The points as lots (see ``receipt_lots``); they add up to ``points``.
    lots: tuple[rules.PointsLotResult, ...] = ()

    @property
    def accruals(self) -> list[tuple[int, rules.PointsLotResult]]:
        """The lots to credit with their index (the index keys the accrual, so it stays
        the lot's position even when an earlier lot came to nothing)."""
        if not (self.holder_id and self.points > 0):
            return []
        return [(index, lot) for index, lot in enumerate(self.lots) if lot.points > 0]

    @property
    def steps(self) -> tuple[str, ...]:
        steps: list[str] = []
        if self.hold_id:
            steps.append("capture_hold" if self.points_paid > 0 else "release_hold")
        if self.coupon_reservations:
            steps.append("redeem_coupons")
        if self.holder_id and self.points > 0:
            steps.append("accrue_points")
        return tuple(steps)


@dataclass(frozen=True)
class SoldLine:
    """What a committed line was: its quantity and what the program did on it."""

    position: int
    quantity_milli: int
    final_amount_minor: int
    points_earned: int
    points_paid: int


@dataclass(frozen=True)
class ReturnedLine:
    position: int
    quantity_milli: int
    amount_refund_minor: int
    points_taken_back: int
    points_refunded: int


@dataclass(frozen=True)
class ReturnPlan:
    """What one return gives back. Shares are cumulative per line, so any sequence of
    partial returns adds up to exactly the original once everything is returned."""

    lines: list[ReturnedLine]
    returned_after: dict[int, int] = field(default_factory=dict)
    complete: bool = False
    # Points taken back from each of the receipt's lots, in lot order (see plan_return).
    lots_taken_back: list[int] = field(default_factory=list)

    @property
    def points_taken_back(self) -> int:
        return sum(line.points_taken_back for line in self.lines)

    @property
    def points_refunded(self) -> int:
        return sum(line.points_refunded for line in self.lines)

    @property
    def amount_refund_minor(self) -> int:
        return sum(line.amount_refund_minor for line in self.lines)


def plan_return(
    sold: Sequence[SoldLine],
    already_returned: Mapping[int, int],
    requested: Sequence[tuple[int, int]],
    field_prefix: str = "lines",
    lot_points: Sequence[int] = (),
) -> ReturnPlan:
    """The return of ``requested`` (position, quantity) pairs, or of everything not yet
    returned when empty. Asking for more than is left is refused whole.

    ``lot_points`` are the receipt's earned points by lot (adding up to the lines' points).
    Each lot gives back its cumulative share of the points taken back so far, so any
    sequence of partial returns takes back exactly each lot once everything is returned
    and never more than the lot."""
    by_position = {line.position: line for line in sold}
    remaining = {line.position: line.quantity_milli - already_returned.get(line.position, 0) for line in sold}
    if not any(remaining.values()):
        raise FailedPrecondition("RECEIPT_ALREADY_RETURNED", "every line of the receipt was already returned")
    wanted: dict[int, int] = {}
    if requested:
        violations = Violations()
        for index, (position, quantity) in enumerate(requested):
            where = f"{field_prefix}[{index}]"
            if position not in by_position:
                violations.add(f"{where}.position", "no such line on the original receipt")
                continue
            violations.check(position not in wanted, f"{where}.position", "duplicates another returned line")
            violations.check(quantity > 0, f"{where}.quantity_milli", "must be positive")
            wanted[position] = quantity
        violations.raise_if_any()
        for position, quantity in wanted.items():
            if quantity > remaining[position]:
                raise FailedPrecondition(
                    "RETURN_EXCEEDS_RECEIPT",
                    f"line {position}: {quantity} returned but only {remaining[position]} left to return",
                )
    else:
        wanted = {position: left for position, left in remaining.items() if left > 0}
    lines: list[ReturnedLine] = []
    returned_after = {line.position: already_returned.get(line.position, 0) for line in sold}
    for position, quantity in sorted(wanted.items()):
        line = by_position[position]
        before = returned_after[position]
        after = before + quantity
        returned_after[position] = after

        def share(total: int, line: SoldLine = line, before: int = before, after: int = after) -> int:
            return _cumulative_share(total, after, line.quantity_milli) - _cumulative_share(
                total, before, line.quantity_milli
            )

        lines.append(
            ReturnedLine(
                position=position,
                quantity_milli=quantity,
                amount_refund_minor=share(line.final_amount_minor) - share(line.points_paid),
                points_taken_back=share(line.points_earned),
                points_refunded=share(line.points_paid),
            )
        )
    earned = sum(line.points_earned for line in sold)

    def taken_back_by(returned: Mapping[int, int]) -> int:
        return sum(
            _cumulative_share(line.points_earned, returned.get(line.position, 0), line.quantity_milli) for line in sold
        )

    before, after = taken_back_by(already_returned), taken_back_by(returned_after)
    lots_taken_back = [
        _cumulative_share(points, after, earned) - _cumulative_share(points, before, earned) for points in lot_points
    ]
    return ReturnPlan(
        lines=lines,
        returned_after=returned_after,
        complete=is_fully_returned(sold, returned_after),
        lots_taken_back=lots_taken_back,
    )


def is_fully_returned(sold: Sequence[SoldLine], returned: Mapping[int, int]) -> bool:
    return all(returned.get(line.position, 0) >= line.quantity_milli for line in sold)
