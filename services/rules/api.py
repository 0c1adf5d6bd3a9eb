"""RulesService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1 import rules_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from loyalty.runtime.validation import check_receipt, line_amount
from services.rules import service, store
from services.rules.domain import (
    MAX_BASIS_POINTS,
    MAX_CONDITION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_RECEIPT_TEXT_LENGTH,
    Campaign,
    CampaignStatus,
    ConditionError,
    EarnFixedPoints,
    EarnPointsPercent,
    Effect,
    Receipt,
    ReceiptLine,
    Rule,
    Subject,
    compile_condition,
)

Context = grpc.aio.ServicerContext[Any, Any]

MAX_RULES_PER_CAMPAIGN = 200
_STATUS = {CampaignStatus.DRAFT: pb.CAMPAIGN_STATUS_DRAFT, CampaignStatus.ACTIVE: pb.CAMPAIGN_STATUS_ACTIVE}
_CHANNELS = {
    receipt_pb2.SALES_CHANNEL_UNSPECIFIED: "pos",
    receipt_pb2.SALES_CHANNEL_POS: "pos",
    receipt_pb2.SALES_CHANNEL_WEB: "web",
    receipt_pb2.SALES_CHANNEL_APP: "app",
    receipt_pb2.SALES_CHANNEL_CALL_CENTRE: "call_centre",
}


def _effect_from_proto(effect: pb.Effect, where: str, violations: Violations) -> Effect | None:
    kind = effect.WhichOneof("kind")
    if kind == "earn_points_percent":
        bps = effect.earn_points_percent.basis_points
        violations.check(
            0 < bps <= MAX_BASIS_POINTS,
            f"{where}.earn_points_percent.basis_points",
            f"between 1 and {MAX_BASIS_POINTS}",
        )
        return EarnPointsPercent(bps)
    if kind == "earn_fixed_points":
        amount = effect.earn_fixed_points.amount
        violations.check(amount > 0, f"{where}.earn_fixed_points.amount", "must be positive")
        return EarnFixedPoints(amount)
    violations.add(where, "required: earn_points_percent or earn_fixed_points")
    return None


def campaign_from_proto(proto: pb.Campaign) -> Campaign:
    """A new draft from a request, with every problem reported against its field."""
    violations = Violations()
    violations.check(bool(proto.name.strip()), "campaign.name", "required")
    violations.check_length(proto.name, "campaign.name", MAX_NAME_LENGTH)
    violations.check(
        0 < len(proto.rules) <= MAX_RULES_PER_CAMPAIGN,
        "campaign.rules",
        f"between 1 and {MAX_RULES_PER_CAMPAIGN} rules",
    )
    start_at = timestamp_field(proto, "start_time", violations, "campaign.start_time")
    end_at = timestamp_field(proto, "end_time", violations, "campaign.end_time")
    if start_at and end_at:
        violations.check(end_at > start_at, "campaign.end_time", "must be after start_time")
    rules = []
    for index, rule in enumerate(proto.rules):
        where = f"campaign.rules[{index}]"
        violations.check_length(rule.name, f"{where}.name", MAX_NAME_LENGTH)
        violations.check_length(rule.receipt_text, f"{where}.receipt_text", MAX_RECEIPT_TEXT_LENGTH)
        if len(rule.condition) > MAX_CONDITION_LENGTH:
            violations.check_length(rule.condition, f"{where}.condition", MAX_CONDITION_LENGTH)
            continue
        try:
            compile_condition(rule.condition)
        except ConditionError as error:
            violations.add(f"{where}.condition", f"not a valid condition: {error}")
        effect = _effect_from_proto(rule.effect, f"{where}.effect", violations)
        if effect is not None:
            rules.append(
                Rule(
                    service.new_campaign_id(),
                    rule.name,
                    rule.condition,
                    effect,
                    rule.receipt_text,
                    rule.priority,
                )
            )
    violations.raise_if_any()
    return Campaign(
        service.new_campaign_id(), proto.name.strip(), CampaignStatus.DRAFT, start_at, end_at, 0, tuple(rules)
    )


def _effect_to_proto(effect: Effect) -> pb.Effect:
    if isinstance(effect, EarnPointsPercent):
        return pb.Effect(earn_points_percent=pb.EarnPointsPercent(basis_points=effect.basis_points))
    return pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=effect.amount))


def campaign_to_proto(campaign: Campaign) -> pb.Campaign:
    return pb.Campaign(
        campaign_id=campaign.campaign_id,
        name=campaign.name,
        status=_STATUS[campaign.status],
        start_time=to_timestamp(campaign.start_at),
        end_time=to_timestamp(campaign.end_at),
        version=campaign.version,
        rules=[
            pb.Rule(
                rule_id=rule.rule_id,
                name=rule.name,
                condition=rule.condition,
                effect=_effect_to_proto(rule.effect),
                receipt_text=rule.receipt_text,
                priority=rule.priority,
            )
            for rule in campaign.rules
        ],
    )


def receipt_from_proto(receipt: receipt_pb2.Receipt) -> Receipt:
    violations = Violations()
    check_receipt(receipt, violations)
    receipt_time = timestamp_field(receipt, "receipt_time", violations, "receipt.receipt_time")
    violations.raise_if_any()
    return Receipt(
        store_id=receipt.store_id,
        terminal_id=receipt.terminal_id,
        channel=_CHANNELS.get(receipt.channel, "pos"),
        time=receipt_time or utcnow(),
        currency_code=receipt.currency_code,
        lines=tuple(
            ReceiptLine(
                position=line.position,
                sku=line.sku,
                price_minor=line.price_minor,
                quantity_milli=line.quantity_milli,
                amount_minor=line_amount(line),
                no_promotions=line.no_promotions,
            )
            for line in receipt.lines
        ),
    )


class RulesApi(pb_grpc.RulesServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        live: service.LiveCampaigns,
        registry: CollectorRegistry,
    ) -> None:
        self._sessions = sessions
        self._live = live
        active = Gauge(
            "loyalty_active_campaigns",
            "Published campaigns live now, as of this replica's last refresh of its rules.",
            registry=registry,
        )
        active.set_function(lambda: live.live_count(utcnow()))
        self._evaluation_time = Histogram(
            "loyalty_rule_evaluation_seconds",
            "Time to evaluate one receipt against the live campaigns.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )

        def on_commit() -> None:
            live.invalidate()
            relay.notify()

        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, on_commit)

    async def CreateCampaign(self, request: pb.CreateCampaignRequest, context: Context) -> pb.CreateCampaignResponse:
        draft = campaign_from_proto(request.campaign)

        async def work(session: AsyncSession) -> pb.CreateCampaignResponse:
            created = await service.create_campaign(session, draft)
            return pb.CreateCampaignResponse(campaign=campaign_to_proto(created))

        return await self._idempotent.run("CreateCampaign", request, pb.CreateCampaignResponse, work)

    async def GetCampaign(self, request: pb.GetCampaignRequest, context: Context) -> pb.GetCampaignResponse:
        violations = Violations()
        violations.check(bool(request.campaign_id), "campaign_id", "required")
        violations.raise_if_any()
        async with self._sessions() as session:
            campaign = await service.get_campaign(session, request.campaign_id)
        return pb.GetCampaignResponse(campaign=campaign_to_proto(campaign))

    async def PublishCampaign(self, request: pb.PublishCampaignRequest, context: Context) -> pb.PublishCampaignResponse:
        violations = Violations()
        violations.check(bool(request.campaign_id), "campaign_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.PublishCampaignResponse:
            published = await service.publish_campaign(session, request.campaign_id)
            return pb.PublishCampaignResponse(campaign=campaign_to_proto(published))

        return await self._idempotent.run("PublishCampaign", request, pb.PublishCampaignResponse, work)

    async def EvaluateReceipt(self, request: pb.EvaluateReceiptRequest, context: Context) -> pb.EvaluateReceiptResponse:
        receipt = receipt_from_proto(request.receipt)
        subject = Subject(request.subject.member_id, request.subject.tier, tuple(request.subject.segments))
        with self._evaluation_time.time():
            evaluation = await self._live.evaluate(receipt, subject)
        return pb.EvaluateReceiptResponse(
            lines=[
                pb.LineResult(
                    position=line.position,
                    discount_minor=line.discount_minor,
                    final_amount_minor=line.final_amount_minor,
                    points=line.points,
                )
                for line in evaluation.lines
            ],
            applied_promotions=[
                pb.AppliedPromotion(
                    campaign_id=applied.campaign_id,
                    campaign_version=applied.campaign_version,
                    rule_id=applied.rule_id,
                    receipt_text=applied.receipt_text,
                    points=applied.points,
                    discount_minor=applied.discount_minor,
                )
                for applied in evaluation.applied
            ],
            points_total=evaluation.points_total,
            discount_total_minor=evaluation.discount_total_minor,
        )
