"""Promotions: campaigns, rules with CEL conditions, and how a receipt is evaluated. No I/O.

Conditions are compiled once per published campaign version (``compile_campaign``)
and only executed per receipt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import cel

MAX_BASIS_POINTS = 100_000
MAX_NAME_LENGTH = 200
MAX_RECEIPT_TEXT_LENGTH = 500
MAX_CONDITION_LENGTH = 4000
BASIS_POINTS_DENOMINATOR = 10_000


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"


@dataclass(frozen=True)
class EarnPointsPercent:
    """Points worth a share of the eligible amount; 500 basis points is 5%."""

    basis_points: int


@dataclass(frozen=True)
class EarnFixedPoints:
    amount: int


Effect = EarnPointsPercent | EarnFixedPoints


@dataclass(frozen=True)
class Rule:
    rule_id: str
    name: str
    condition: str
    effect: Effect
    receipt_text: str
    priority: int


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    name: str
    status: CampaignStatus
    start_at: datetime | None
    end_at: datetime | None
    version: int
    rules: tuple[Rule, ...]

    def is_live_at(self, moment: datetime) -> bool:
        return (
            self.status is CampaignStatus.ACTIVE
            and (self.start_at is None or self.start_at <= moment)
            and (self.end_at is None or moment < self.end_at)
        )


@dataclass(frozen=True)
class ReceiptLine:
    position: int
    sku: str
    price_minor: int
    quantity_milli: int
    amount_minor: int
    no_promotions: bool


@dataclass(frozen=True)
class Receipt:
    store_id: str
    terminal_id: str
    channel: str
    time: datetime
    currency_code: str
    lines: tuple[ReceiptLine, ...]

    @property
    def total_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines)


@dataclass(frozen=True)
class Subject:
    """The customer; member_id is empty for an anonymous receipt, which earns no points."""

    member_id: str
    tier: str
    segments: tuple[str, ...]


class ConditionError(ValueError):
    """A condition that does not compile or does not evaluate to a boolean."""


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    program: cel.Program | None


@dataclass(frozen=True)
class CompiledCampaign:
    campaign: Campaign
    rules: tuple[CompiledRule, ...]


SAMPLE_RECEIPT = Receipt(
    store_id="store-1",
    terminal_id="pos-1",
    channel="pos",
    time=datetime(2026, 1, 1, 12, 0),
    currency_code="RUB",
    lines=(ReceiptLine(1, "SKU-1", 10000, 1000, 10000, False),),
)
SAMPLE_SUBJECT = Subject(member_id="member-1", tier="basic", segments=("new",))


def activation(receipt: Receipt, subject: Subject) -> dict[str, Any]:
    """The variables a condition sees."""
    return {
        "receipt": {
            "total_minor": receipt.total_minor,
            "line_count": len(receipt.lines),
            "store_id": receipt.store_id,
            "terminal_id": receipt.terminal_id,
            "channel": receipt.channel,
            "currency_code": receipt.currency_code,
            "hour": receipt.time.hour,
            "weekday": receipt.time.isoweekday(),
            "skus": [line.sku for line in receipt.lines],
        },
        "member": {
            "id": subject.member_id,
            "identified": bool(subject.member_id),
            "tier": subject.tier,
            "segments": list(subject.segments),
        },
    }


def _holds(program: cel.Program, variables: dict[str, Any]) -> bool:
    try:
        result = program.execute(variables)
    except Exception as error:  # the CEL runtime raises several types for bad expressions
        raise ConditionError(str(error)) from error
    if not isinstance(result, bool):
        raise ConditionError(f"the condition must be true or false, not {type(result).__name__}")
    return result


def compile_condition(condition: str) -> cel.Program | None:
    """Compiles and trial-runs a condition on a sample receipt; empty means always."""
    if not condition.strip():
        return None
    try:
        program = cel.compile(condition)
    except Exception as error:
        raise ConditionError(str(error)) from error
    _holds(program, activation(SAMPLE_RECEIPT, SAMPLE_SUBJECT))
    return program


def compile_campaign(campaign: Campaign) -> CompiledCampaign:
    ordered = sorted(campaign.rules, key=lambda rule: (rule.priority, rule.rule_id))
    return CompiledCampaign(campaign, tuple(CompiledRule(rule, compile_condition(rule.condition)) for rule in ordered))


def spread(total: int, weights: list[int]) -> list[int]:
    """Splits `total` pro rata to `weights`, rounding down, with the remainder on the last
    weighted share, so the parts add up to the total; with no weight at all, nothing is
    given (lines excluded from promotions earn nothing)."""
    weight_sum = sum(weights)
    if weight_sum == 0 or total == 0:
        return [0] * len(weights)
    parts = [total * weight // weight_sum for weight in weights]
    last = max(index for index, weight in enumerate(weights) if weight > 0)
    parts[last] += total - sum(parts)
    return parts


@dataclass(frozen=True)
class Applied:
    campaign_id: str
    campaign_version: int
    rule_id: str
    receipt_text: str
    points: int
    discount_minor: int


@dataclass(frozen=True)
class LineOutcome:
    position: int
    discount_minor: int
    final_amount_minor: int
    points: int


@dataclass
class Evaluation:
    lines: list[LineOutcome]
    applied: list[Applied] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def points_total(self) -> int:
        return sum(line.points for line in self.lines)

    @property
    def discount_total_minor(self) -> int:
        return sum(line.discount_minor for line in self.lines)


def _line_points(effect: Effect, eligible: list[int]) -> list[int]:
    if isinstance(effect, EarnPointsPercent):
        total = sum(eligible) * effect.basis_points // BASIS_POINTS_DENOMINATOR
        return spread(total, eligible)
    return spread(effect.amount, eligible)


def evaluate(receipt: Receipt, subject: Subject, campaigns: list[CompiledCampaign]) -> Evaluation:
    """Applies every live rule whose condition holds. Points go to identified members only,
    and never on lines marked no_promotions."""
    eligible = [0 if line.no_promotions else line.amount_minor for line in receipt.lines]
    points = [0] * len(receipt.lines)
    evaluation = Evaluation(lines=[])
    variables = activation(receipt, subject)
    for compiled in campaigns:
        campaign = compiled.campaign
        if not campaign.is_live_at(receipt.time):
            continue
        for compiled_rule in compiled.rules:
            rule = compiled_rule.rule
            try:
                applies = compiled_rule.program is None or _holds(compiled_rule.program, variables)
            except ConditionError as error:
                evaluation.skipped.append((rule.rule_id, f"condition failed: {error}"))
                continue
            if not applies:
                evaluation.skipped.append((rule.rule_id, "condition is false"))
                continue
            if not subject.member_id:
                evaluation.skipped.append((rule.rule_id, "anonymous receipts earn no points"))
                continue
            earned = _line_points(rule.effect, eligible)
            points = [a + b for a, b in zip(points, earned, strict=True)]
            evaluation.applied.append(
                Applied(campaign.campaign_id, campaign.version, rule.rule_id, rule.receipt_text, sum(earned), 0)
            )
    evaluation.lines = [
        LineOutcome(line.position, 0, line.amount_minor, line_points)
        for line, line_points in zip(receipt.lines, points, strict=True)
    ]
    return evaluation
