"""RulesService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client import CollectorRegistry, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1 import rules_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from loyalty.runtime.validation import check_receipt, line_amount
from services.rules import service, store
from services.rules.domain import (
    BASIS_POINTS_DENOMINATOR,
    COUNTER_NAME,
    DAYS_OF_MONTH,
    DEFAULT_LOT,
    HOURS,
    MAX_BASIS_POINTS,
    MAX_CONDITION_LENGTH,
    MAX_IMPORT_BATCH,
    MAX_NAME_LENGTH,
    MAX_RECEIPT_TEXT_LENGTH,
    TRIGGERED_EFFECTS,
    WEEKDAYS,
    AttributeValue,
    AwardBadge,
    Brand,
    BuyMPayN,
    Campaign,
    CampaignLimits,
    CampaignScope,
    CampaignStatus,
    CampaignTrigger,
    CampaignUsage,
    Category,
    CheapestItemDiscount,
    ConditionError,
    CouponBenefit,
    DiscountAmount,
    DiscountBase,
    DiscountPercent,
    DiscountPercentPerAmount,
    EarnFixedPoints,
    EarnPointsCheapestItem,
    EarnPointsMultiplier,
    EarnPointsNthLine,
    EarnPointsPerAmount,
    EarnPointsPercent,
    EarnPointsPerUnits,
    Effect,
    Evaluation,
    ExpiryRounding,
    FixedPrice,
    GroupMode,
    IncrementCounter,
    IssueCoupon,
    NthItemDiscount,
    NthLineDiscount,
    Payment,
    PointsLot,
    PresentedCoupon,
    ProductList,
    ProductRecord,
    Receipt,
    ReceiptLine,
    RedemptionCap,
    Rule,
    RuleGroup,
    Scope,
    SetPrice,
    Subject,
    compile_condition,
)

Context = grpc.aio.ServicerContext[Any, Any]

MAX_RULES_PER_CAMPAIGN = 200
MAX_ID_LENGTH = 64
MAX_SIMULATED_DRAFTS = 20
MAX_CALENDAR_DAYS = 400
MAX_NAME_FILTER_LENGTH = 200
# the top-level Campaign fields UpdateCampaign may replace (the others are assigned)
UPDATABLE_CAMPAIGN_FIELDS = ("name", "start_time", "end_time", "scope", "limits", "trigger", "rules", "groups")

_STATUS = {
    CampaignStatus.DRAFT: pb.CAMPAIGN_STATUS_DRAFT,
    CampaignStatus.ACTIVE: pb.CAMPAIGN_STATUS_ACTIVE,
    CampaignStatus.PAUSED: pb.CAMPAIGN_STATUS_PAUSED,
    CampaignStatus.ENDED: pb.CAMPAIGN_STATUS_ENDED,
}
# SCHEDULED is reported, never stored: ListCampaigns asks for it separately
_STATUS_FROM_PROTO = {proto: status for status, proto in _STATUS.items()}
_MODES = {
    pb.RULE_GROUP_MODE_ALL: GroupMode.ALL,
    pb.RULE_GROUP_MODE_FIRST: GroupMode.FIRST,
    pb.RULE_GROUP_MODE_BEST: GroupMode.BEST,
    pb.RULE_GROUP_MODE_EXCLUSIVE: GroupMode.EXCLUSIVE,
}
_MODES_TO_PROTO = {mode: proto for proto, mode in _MODES.items()}
_BASES = {pb.DISCOUNT_BASE_DISCOUNTED: DiscountBase.DISCOUNTED, pb.DISCOUNT_BASE_ORIGINAL: DiscountBase.ORIGINAL}
_BASES_TO_PROTO = {base: proto for proto, base in _BASES.items()}
_TRIGGERS = {
    pb.CAMPAIGN_TRIGGER_UNSPECIFIED: CampaignTrigger.RECEIPT,
    pb.CAMPAIGN_TRIGGER_RECEIPT: CampaignTrigger.RECEIPT,
    pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED: CampaignTrigger.MEMBER_REGISTERED,
    pb.CAMPAIGN_TRIGGER_MEMBER_REFERRED: CampaignTrigger.MEMBER_REFERRED,
    pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY: CampaignTrigger.MEMBER_BIRTHDAY,
    pb.CAMPAIGN_TRIGGER_PROFILE_COMPLETED: CampaignTrigger.PROFILE_COMPLETED,
}
_TRIGGERS_TO_PROTO = {
    CampaignTrigger.RECEIPT: pb.CAMPAIGN_TRIGGER_RECEIPT,
    CampaignTrigger.MEMBER_REGISTERED: pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED,
    CampaignTrigger.MEMBER_REFERRED: pb.CAMPAIGN_TRIGGER_MEMBER_REFERRED,
    CampaignTrigger.MEMBER_BIRTHDAY: pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY,
    CampaignTrigger.PROFILE_COMPLETED: pb.CAMPAIGN_TRIGGER_PROFILE_COMPLETED,
}
# Triggers whose events carry no tier or segments, so a campaign on them has no scope.
_UNSCOPED_TRIGGERS = (
    CampaignTrigger.MEMBER_REFERRED,
    CampaignTrigger.MEMBER_BIRTHDAY,
    CampaignTrigger.PROFILE_COMPLETED,
)
_CHANNEL_SCOPES = {
    receipt_pb2.SALES_CHANNEL_POS: "pos",
    receipt_pb2.SALES_CHANNEL_WEB: "web",
    receipt_pb2.SALES_CHANNEL_APP: "app",
    receipt_pb2.SALES_CHANNEL_CALL_CENTRE: "call_centre",
}
_CHANNEL_TO_PROTO = {channel: proto for proto, channel in _CHANNEL_SCOPES.items()}
_ROUNDINGS = {
    pb.POINTS_EXPIRY_ROUNDING_UNSPECIFIED: ExpiryRounding.CURRENCY,
    pb.POINTS_EXPIRY_ROUNDING_NONE: ExpiryRounding.NONE,
    pb.POINTS_EXPIRY_ROUNDING_MONTH_END: ExpiryRounding.MONTH_END,
    pb.POINTS_EXPIRY_ROUNDING_YEAR_END: ExpiryRounding.YEAR_END,
}
_ROUNDINGS_TO_PROTO = {rounding: proto for proto, rounding in _ROUNDINGS.items()}
_PAYMENT_TYPES = {
    receipt_pb2.PAYMENT_TYPE_CASH: "cash",
    receipt_pb2.PAYMENT_TYPE_BANK_CARD: "bank_card",
    receipt_pb2.PAYMENT_TYPE_GIFT_CARD: "gift_card",
    receipt_pb2.PAYMENT_TYPE_OTHER: "other",
}
MAX_SET_SKUS = 20
_CHANNELS = {
    receipt_pb2.SALES_CHANNEL_UNSPECIFIED: "pos",
    receipt_pb2.SALES_CHANNEL_POS: "pos",
    receipt_pb2.SALES_CHANNEL_WEB: "web",
    receipt_pb2.SALES_CHANNEL_APP: "app",
    receipt_pb2.SALES_CHANNEL_CALL_CENTRE: "call_centre",
}


def _scope_from_proto(scope: pb.Scope) -> Scope:
    attributes: list[tuple[str, AttributeValue]] = []
    for name, value in sorted(scope.attributes.items()):
        kind = value.WhichOneof("value")
        if kind is not None:
            attributes.append((name, getattr(value, kind)))
    return Scope(
        tuple(scope.skus),
        tuple(scope.category_ids),
        tuple(scope.brand_ids),
        tuple(scope.product_list_ids),
        scope.own_brand,
        tuple(attributes),
    )


def _attribute_to_proto(raw: AttributeValue) -> pb.AttributeValue:
    if isinstance(raw, bool):
        return pb.AttributeValue(bool_value=raw)
    if isinstance(raw, int):
        return pb.AttributeValue(int_value=raw)
    return pb.AttributeValue(string_value=raw)


def _scope_to_proto(scope: Scope) -> pb.Scope:
    return pb.Scope(
        skus=scope.skus,
        category_ids=scope.category_ids,
        brand_ids=scope.brand_ids,
        product_list_ids=scope.product_list_ids,
        own_brand=scope.own_brand,
        attributes={name: _attribute_to_proto(value) for name, value in scope.attributes},
    )


def _lot_from_proto(lot: pb.PointsLot, where: str, violations: Violations) -> PointsLot:
    parameters = PointsLot(
        activation_delay_days=lot.activation_delay_days,
        expire_time=timestamp_field(lot, "expire_time", violations, f"{where}.expire_time"),
        lifetime_days=lot.lifetime_days,
        expiry_rounding=_ROUNDINGS.get(lot.expiry_rounding, ExpiryRounding.CURRENCY),
        currency=lot.currency,
    )
    violations.check(lot.expiry_rounding in _ROUNDINGS, f"{where}.expiry_rounding", "unknown rounding")
    for name, reason in parameters.problems():
        violations.add(f"{where}.{name}", reason)
    return parameters


def _lot_to_proto(lot: PointsLot) -> pb.PointsLot | None:
    """The lot as answered; the default lot is left out, as it was before lots existed."""
    if lot == DEFAULT_LOT:
        return None
    return pb.PointsLot(
        activation_delay_days=lot.activation_delay_days,
        expire_time=to_timestamp(lot.expire_time),
        lifetime_days=lot.lifetime_days,
        expiry_rounding=_ROUNDINGS_TO_PROTO[lot.expiry_rounding],
        currency=lot.currency,
    )


def _effect_from_proto(effect: pb.Effect, where: str, violations: Violations) -> Effect | None:
    kind = effect.WhichOneof("kind")
    field = f"{where}.{kind}"

    def basis_points(value: int, name: str = "basis_points", maximum: int = BASIS_POINTS_DENOMINATOR) -> int:
        violations.check(0 < value <= maximum, f"{field}.{name}", f"between 1 and {maximum}")
        return value

    if kind == "earn_points_percent":
        earn = effect.earn_points_percent
        rate = basis_points(earn.basis_points, maximum=MAX_BASIS_POINTS)
        return EarnPointsPercent(
            rate, _scope_from_proto(earn.scope), _lot_from_proto(earn.lot, f"{field}.lot", violations)
        )
    if kind == "increment_counter":
        increment = effect.increment_counter
        violations.check(
            COUNTER_NAME.fullmatch(increment.counter) is not None,
            f"{field}.counter",
            "a lowercase letter, then up to 39 lowercase letters, digits or underscores",
        )
        violations.check(increment.by > 0, f"{field}.by", "must be positive")
        return IncrementCounter(increment.counter, increment.by)
    if kind == "earn_points_per_amount":
        per_amount = effect.earn_points_per_amount
        violations.check(per_amount.points > 0, f"{field}.points", "must be positive")
        violations.check(per_amount.per_minor > 0, f"{field}.per_minor", "must be positive")
        return EarnPointsPerAmount(
            per_amount.points,
            per_amount.per_minor,
            _scope_from_proto(per_amount.scope),
            _lot_from_proto(per_amount.lot, f"{field}.lot", violations),
        )
    if kind == "earn_points_per_units":
        per_units = effect.earn_points_per_units
        violations.check(per_units.points > 0, f"{field}.points", "must be positive")
        violations.check(per_units.units > 0, f"{field}.units", "must be positive")
        return EarnPointsPerUnits(
            per_units.points,
            per_units.units,
            _scope_from_proto(per_units.scope),
            _lot_from_proto(per_units.lot, f"{field}.lot", violations),
        )
    if kind == "set_price":
        bundle = effect.set_price
        violations.check(2 <= len(bundle.skus) <= MAX_SET_SKUS, f"{field}.skus", f"between 2 and {MAX_SET_SKUS} SKUs")
        for index, sku in enumerate(bundle.skus):
            _check_id(sku, f"{field}.skus[{index}]", violations)
        violations.check(bundle.price_minor >= 0, f"{field}.price_minor", "must not be negative")
        return SetPrice(tuple(bundle.skus), bundle.price_minor)
    if kind == "nth_line_discount":
        nth_line_off = effect.nth_line_discount
        violations.check(nth_line_off.n >= 1, f"{field}.n", "at least 1")
        violations.check(nth_line_off.amount_minor > 0, f"{field}.amount_minor", "must be positive")
        return NthLineDiscount(nth_line_off.n, nth_line_off.amount_minor, _scope_from_proto(nth_line_off.scope))
    if kind == "discount_percent_per_amount":
        stepped = effect.discount_percent_per_amount
        violations.check(stepped.per_minor > 0, f"{field}.per_minor", "must be positive")
        return DiscountPercentPerAmount(
            basis_points(stepped.basis_points),
            stepped.per_minor,
            basis_points(stepped.max_basis_points, "max_basis_points"),
            _scope_from_proto(stepped.scope),
        )
    if kind == "earn_points_cheapest_item":
        cheapest_points = effect.earn_points_cheapest_item
        rate = basis_points(cheapest_points.basis_points, maximum=MAX_BASIS_POINTS)
        return EarnPointsCheapestItem(
            rate,
            _scope_from_proto(cheapest_points.scope),
            _lot_from_proto(cheapest_points.lot, f"{field}.lot", violations),
        )
    if kind == "earn_points_nth_line":
        nth_line = effect.earn_points_nth_line
        violations.check(nth_line.n >= 1, f"{field}.n", "at least 1")
        rate = basis_points(nth_line.basis_points, maximum=MAX_BASIS_POINTS)
        return EarnPointsNthLine(
            nth_line.n,
            rate,
            _scope_from_proto(nth_line.scope),
            _lot_from_proto(nth_line.lot, f"{field}.lot", violations),
            nth_line.every,
        )
    if kind == "earn_points_multiplier":
        multiplier = effect.earn_points_multiplier
        violations.check(
            BASIS_POINTS_DENOMINATOR < multiplier.basis_points <= MAX_BASIS_POINTS,
            f"{field}.basis_points",
            f"between {BASIS_POINTS_DENOMINATOR + 1} and {MAX_BASIS_POINTS}",
        )
        return EarnPointsMultiplier(
            multiplier.basis_points,
            _scope_from_proto(multiplier.scope),
            _lot_from_proto(multiplier.lot, f"{field}.lot", violations),
        )
    if kind == "earn_fixed_points":
        amount = effect.earn_fixed_points.amount
        violations.check(amount > 0, f"{field}.amount", "must be positive")
        return EarnFixedPoints(amount, _lot_from_proto(effect.earn_fixed_points.lot, f"{field}.lot", violations))
    if kind == "discount_percent":
        percent = effect.discount_percent
        return DiscountPercent(basis_points(percent.basis_points), _scope_from_proto(percent.scope))
    if kind == "discount_amount":
        amount_off = effect.discount_amount
        violations.check(amount_off.amount_minor > 0, f"{field}.amount_minor", "must be positive")
        return DiscountAmount(amount_off.amount_minor, _scope_from_proto(amount_off.scope))
    if kind == "fixed_price":
        price = effect.fixed_price
        violations.check(price.unit_price_minor >= 0, f"{field}.unit_price_minor", "must not be negative")
        return FixedPrice(price.unit_price_minor, _scope_from_proto(price.scope))
    if kind == "buy_m_pay_n":
        deal = effect.buy_m_pay_n
        violations.check(deal.buy_quantity >= 2, f"{field}.buy_quantity", "at least 2")
        violations.check(0 < deal.pay_quantity < deal.buy_quantity, f"{field}.pay_quantity", "1 to buy_quantity - 1")
        return BuyMPayN(deal.buy_quantity, deal.pay_quantity, _scope_from_proto(deal.scope))
    if kind == "nth_item_discount":
        nth = effect.nth_item_discount
        violations.check(nth.n >= 2, f"{field}.n", "at least 2")
        return NthItemDiscount(nth.n, basis_points(nth.basis_points), _scope_from_proto(nth.scope))
    if kind == "cheapest_item_discount":
        cheapest = effect.cheapest_item_discount
        violations.check(cheapest.min_units >= 0, f"{field}.min_units", "must not be negative")
        return CheapestItemDiscount(
            basis_points(cheapest.basis_points), cheapest.min_units, _scope_from_proto(cheapest.scope)
        )
    if kind == "redemption_cap":
        cap = effect.redemption_cap
        if cap.WhichOneof("limit") == "all_but_minor":
            violations.check(cap.all_but_minor >= 0, f"{field}.all_but_minor", "must not be negative")
            return RedemptionCap(all_but_minor=cap.all_but_minor)
        violations.check(
            0 <= cap.basis_points <= BASIS_POINTS_DENOMINATOR,
            f"{field}.basis_points",
            f"between 0 and {BASIS_POINTS_DENOMINATOR}",
        )
        return RedemptionCap(basis_points=cap.basis_points)
    if kind == "issue_coupon":
        _check_id(effect.issue_coupon.series_id, f"{field}.series_id", violations)
        return IssueCoupon(effect.issue_coupon.series_id)
    if kind == "award_badge":
        _check_id(effect.award_badge.badge_id, f"{field}.badge_id", violations)
        return AwardBadge(effect.award_badge.badge_id)
    violations.add(where, "required: one of the effects")
    return None


def _rules_from_proto(proto_rules: Sequence[pb.Rule], where: str, violations: Violations) -> tuple[Rule, ...]:
    rules = []
    for index, rule in enumerate(proto_rules):
        rule_where = f"{where}[{index}]"
        violations.check_length(rule.name, f"{rule_where}.name", MAX_NAME_LENGTH)
        violations.check_length(rule.receipt_text, f"{rule_where}.receipt_text", MAX_RECEIPT_TEXT_LENGTH)
        if not _condition_compiles(rule.condition, f"{rule_where}.condition", violations):
            continue
        effect = _effect_from_proto(rule.effect, f"{rule_where}.effect", violations)
        if effect is not None:
            rules.append(Rule(service.new_id(), rule.name, rule.condition, effect, rule.receipt_text, rule.priority))
    return tuple(rules)


def _condition_compiles(condition: str, where: str, violations: Violations) -> bool:
    if len(condition) > MAX_CONDITION_LENGTH:
        violations.check_length(condition, where, MAX_CONDITION_LENGTH)
        return False
    try:
        compile_condition(condition)
    except ConditionError as error:
        violations.add(where, f"not a valid condition: {error}")
    return True


def campaign_scope_from_proto(proto: pb.CampaignScope, violations: Violations) -> CampaignScope:
    for name, values, allowed in (
        ("weekdays", proto.weekdays, WEEKDAYS),
        ("days_of_month", proto.days_of_month, DAYS_OF_MONTH),
        ("hours", proto.hours, HOURS),
    ):
        violations.check(
            all(value in allowed for value in values),
            f"campaign.scope.{name}",
            f"between {allowed.start} and {allowed.stop - 1}",
        )
    violations.check(
        all(channel in _CHANNEL_SCOPES for channel in proto.channels), "campaign.scope.channels", "a sales channel"
    )
    for name, ids in (("segments", proto.segments), ("tiers", proto.tiers), ("store_ids", proto.store_ids)):
        for index, value in enumerate(ids):
            _check_id(value, f"campaign.scope.{name}[{index}]", violations)
    return CampaignScope(
        segments=tuple(sorted(set(proto.segments))),
        tiers=tuple(sorted(set(proto.tiers))),
        store_ids=tuple(sorted(set(proto.store_ids))),
        channels=tuple(sorted({_CHANNEL_SCOPES[c] for c in proto.channels if c in _CHANNEL_SCOPES})),
        weekdays=tuple(sorted(set(proto.weekdays))),
        days_of_month=tuple(sorted(set(proto.days_of_month))),
        hours=tuple(sorted(set(proto.hours))),
    )


def campaign_scope_to_proto(scope: CampaignScope) -> pb.CampaignScope:
    return pb.CampaignScope(
        segments=scope.segments,
        tiers=scope.tiers,
        store_ids=scope.store_ids,
        channels=[_CHANNEL_TO_PROTO[channel] for channel in scope.channels],
        weekdays=scope.weekdays,
        days_of_month=scope.days_of_month,
        hours=scope.hours,
    )


def campaign_from_proto(proto: pb.Campaign) -> Campaign:
    """A new draft from a request, with every problem reported against its field."""
    violations = Violations()
    violations.check(bool(proto.name.strip()), "campaign.name", "required")
    violations.check_length(proto.name, "campaign.name", MAX_NAME_LENGTH)
    rule_count = len(proto.rules) + sum(len(group.rules) for group in proto.groups)
    violations.check(
        0 < rule_count <= MAX_RULES_PER_CAMPAIGN,
        "campaign.rules",
        f"between 1 and {MAX_RULES_PER_CAMPAIGN} rules",
    )
    start_at = timestamp_field(proto, "start_time", violations, "campaign.start_time")
    end_at = timestamp_field(proto, "end_time", violations, "campaign.end_time")
    if start_at and end_at:
        violations.check(end_at > start_at, "campaign.end_time", "must be after start_time")
    scope = campaign_scope_from_proto(proto.scope, violations)
    limits = proto.limits
    for name, value in (
        ("discount_budget_minor", limits.discount_budget_minor),
        ("points_budget", limits.points_budget),
        ("max_uses_per_member", limits.max_uses_per_member),
    ):
        violations.check(value >= 0, f"campaign.limits.{name}", "must not be negative (0 is no limit)")
    violations.check(proto.trigger in _TRIGGERS, "campaign.trigger", "a known trigger")
    trigger = _TRIGGERS.get(proto.trigger, CampaignTrigger.RECEIPT)
    rules = _rules_from_proto(proto.rules, "campaign.rules", violations)
    if trigger is not CampaignTrigger.RECEIPT:
        _check_triggered(proto, rules, scope, violations)
    if trigger in _UNSCOPED_TRIGGERS:
        violations.check(
            scope == CampaignScope(),
            "campaign.scope",
            f"a {trigger.value} campaign has no scope: the member's tier and segments are not in the event",
        )
    groups = []
    for index, group in enumerate(proto.groups):
        where = f"campaign.groups[{index}]"
        violations.check_length(group.name, f"{where}.name", MAX_NAME_LENGTH)
        _condition_compiles(group.condition, f"{where}.condition", violations)
        violations.check(bool(group.rules), f"{where}.rules", "at least one rule")
        groups.append(
            RuleGroup(
                service.new_id(),
                group.name,
                _MODES.get(group.mode, GroupMode.ALL),
                group.priority,
                group.condition,
                _BASES.get(group.discount_base, DiscountBase.DISCOUNTED),
                _rules_from_proto(group.rules, f"{where}.rules", violations),
            )
        )
    violations.raise_if_any()
    return Campaign(
        service.new_id(),
        proto.name.strip(),
        CampaignStatus.DRAFT,
        start_at,
        end_at,
        0,
        rules,
        tuple(groups),
        scope,
        CampaignLimits(limits.discount_budget_minor, limits.points_budget, limits.max_uses_per_member),
        trigger,
    )


def _check_triggered(proto: pb.Campaign, rules: Sequence[Rule], scope: CampaignScope, violations: Violations) -> None:
    """An event-triggered campaign has no receipt: no groups, only effects that need none,
    and a scope of who (segments, tiers) but not where or when."""
    violations.check(not proto.groups, "campaign.groups", "not allowed for a campaign triggered by an event")
    for index, rule in enumerate(rules):
        violations.check(
            isinstance(rule.effect, TRIGGERED_EFFECTS),
            f"campaign.rules[{index}].effect",
            "an event-triggered campaign gives only earn_fixed_points, issue_coupon or award_badge",
        )
    violations.check(
        dataclasses.replace(scope, segments=(), tiers=()) == CampaignScope(),
        "campaign.scope",
        "an event-triggered campaign is scoped by segments and tiers only",
    )
    violations.check(
        not proto.limits.discount_budget_minor and not proto.limits.max_uses_per_member,
        "campaign.limits",
        "an event-triggered campaign runs once per member and gives no discount",
    )


def _effect_to_proto(effect: Effect) -> pb.Effect:
    if isinstance(effect, EarnPointsPercent):
        return pb.Effect(
            earn_points_percent=pb.EarnPointsPercent(
                basis_points=effect.basis_points, scope=_scope_to_proto(effect.scope), lot=_lot_to_proto(effect.lot)
            )
        )
    if isinstance(effect, EarnFixedPoints):
        return pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=effect.amount, lot=_lot_to_proto(effect.lot)))
    if isinstance(effect, EarnPointsPerUnits):
        return pb.Effect(
            earn_points_per_units=pb.EarnPointsPerUnits(
                points=effect.points,
                units=effect.units,
                scope=_scope_to_proto(effect.scope),
                lot=_lot_to_proto(effect.lot),
            )
        )
    if isinstance(effect, SetPrice):
        return pb.Effect(set_price=pb.SetPrice(skus=effect.skus, price_minor=effect.price_minor))
    if isinstance(effect, NthLineDiscount):
        return pb.Effect(
            nth_line_discount=pb.NthLineDiscount(
                n=effect.n, amount_minor=effect.amount_minor, scope=_scope_to_proto(effect.scope)
            )
        )
    if isinstance(effect, DiscountPercentPerAmount):
        return pb.Effect(
            discount_percent_per_amount=pb.DiscountPercentPerAmount(
                basis_points=effect.basis_points,
                per_minor=effect.per_minor,
                max_basis_points=effect.max_basis_points,
                scope=_scope_to_proto(effect.scope),
            )
        )
    if isinstance(effect, EarnPointsPerAmount):
        return pb.Effect(
            earn_points_per_amount=pb.EarnPointsPerAmount(
                points=effect.points,
                per_minor=effect.per_minor,
                scope=_scope_to_proto(effect.scope),
                lot=_lot_to_proto(effect.lot),
            )
        )
    if isinstance(effect, EarnPointsCheapestItem):
        return pb.Effect(
            earn_points_cheapest_item=pb.EarnPointsCheapestItem(
                basis_points=effect.basis_points, scope=_scope_to_proto(effect.scope), lot=_lot_to_proto(effect.lot)
            )
        )
    if isinstance(effect, EarnPointsNthLine):
        return pb.Effect(
            earn_points_nth_line=pb.EarnPointsNthLine(
                n=effect.n,
                basis_points=effect.basis_points,
                scope=_scope_to_proto(effect.scope),
                lot=_lot_to_proto(effect.lot),
                every=effect.every,
            )
        )
    if isinstance(effect, EarnPointsMultiplier):
        return pb.Effect(
            earn_points_multiplier=pb.EarnPointsMultiplier(
                basis_points=effect.basis_points, scope=_scope_to_proto(effect.scope), lot=_lot_to_proto(effect.lot)
            )
        )
    if isinstance(effect, DiscountPercent):
        return pb.Effect(
            discount_percent=pb.DiscountPercent(basis_points=effect.basis_points, scope=_scope_to_proto(effect.scope))
        )
    if isinstance(effect, DiscountAmount):
        return pb.Effect(
            discount_amount=pb.DiscountAmount(amount_minor=effect.amount_minor, scope=_scope_to_proto(effect.scope))
        )
    if isinstance(effect, FixedPrice):
        return pb.Effect(
            fixed_price=pb.FixedPrice(unit_price_minor=effect.unit_price_minor, scope=_scope_to_proto(effect.scope))
        )
    if isinstance(effect, BuyMPayN):
        return pb.Effect(
            buy_m_pay_n=pb.BuyMPayN(
                buy_quantity=effect.buy, pay_quantity=effect.pay, scope=_scope_to_proto(effect.scope)
            )
        )
    if isinstance(effect, NthItemDiscount):
        return pb.Effect(
            nth_item_discount=pb.NthItemDiscount(
                n=effect.n, basis_points=effect.basis_points, scope=_scope_to_proto(effect.scope)
            )
        )
    if isinstance(effect, CheapestItemDiscount):
        return pb.Effect(
            cheapest_item_discount=pb.CheapestItemDiscount(
                basis_points=effect.basis_points, min_units=effect.min_units, scope=_scope_to_proto(effect.scope)
            )
        )
    if isinstance(effect, IssueCoupon):
        return pb.Effect(issue_coupon=pb.IssueCoupon(series_id=effect.series_id))
    if isinstance(effect, AwardBadge):
        return pb.Effect(award_badge=pb.AwardBadge(badge_id=effect.badge_id))
    if isinstance(effect, IncrementCounter):
        return pb.Effect(increment_counter=pb.IncrementCounter(counter=effect.counter, by=effect.by))
    if effect.all_but_minor is not None:
        return pb.Effect(redemption_cap=pb.RedemptionCap(all_but_minor=effect.all_but_minor))
    return pb.Effect(redemption_cap=pb.RedemptionCap(basis_points=effect.basis_points or 0))


def _rule_to_proto(rule: Rule) -> pb.Rule:
    return pb.Rule(
        rule_id=rule.rule_id,
        name=rule.name,
        condition=rule.condition,
        effect=_effect_to_proto(rule.effect),
        receipt_text=rule.receipt_text,
        priority=rule.priority,
    )


def campaign_to_proto(campaign: Campaign) -> pb.Campaign:
    return pb.Campaign(
        campaign_id=campaign.campaign_id,
        name=campaign.name,
        status=pb.CAMPAIGN_STATUS_SCHEDULED
        if campaign.status is CampaignStatus.ACTIVE and campaign.start_at and campaign.start_at > utcnow()
        else _STATUS[campaign.status],
        start_time=to_timestamp(campaign.start_at),
        end_time=to_timestamp(campaign.end_at),
        version=campaign.version,
        scope=campaign_scope_to_proto(campaign.scope),
        limits=pb.CampaignLimits(
            discount_budget_minor=campaign.limits.discount_budget_minor,
            points_budget=campaign.limits.points_budget,
            max_uses_per_member=campaign.limits.max_uses_per_member,
        ),
        trigger=_TRIGGERS_TO_PROTO[campaign.trigger],
        rules=[_rule_to_proto(rule) for rule in campaign.rules],
        groups=[
            pb.RuleGroup(
                group_id=group.group_id,
                name=group.name,
                mode=_MODES_TO_PROTO[group.mode],
                priority=group.priority,
                condition=group.condition,
                discount_base=_BASES_TO_PROTO[group.discount_base],
                rules=[_rule_to_proto(rule) for rule in group.rules],
            )
            for group in campaign.groups
        ],
    )


def coupons_from_proto(coupons: Sequence[coupon_pb2.PresentedCoupon]) -> tuple[PresentedCoupon, ...]:
    """The coupons the rewards service accepted; the benefit kind decides what they give."""
    presented = []
    for coupon in coupons:
        benefit = coupon.benefit
        kind = benefit.WhichOneof("kind")
        presented.append(
            PresentedCoupon(
                coupon.code,
                coupon.series_id,
                coupon.campaign_id,
                CouponBenefit(
                    percent_off_basis_points=min(benefit.percent_off_basis_points, BASIS_POINTS_DENOMINATOR),
                    amount_off_minor=max(benefit.amount_off_minor, 0),
                    fixed_price_minor=max(benefit.fixed_price_minor, 0) if kind == "fixed_price_minor" else None,
                    gift_sku=benefit.gift_sku,
                    points=max(benefit.points, 0),
                    scope=Scope(
                        skus=tuple(benefit.skus),
                        category_ids=tuple(benefit.category_ids),
                        product_list_ids=tuple(benefit.product_list_ids),
                    ),
                    min_receipt_total_minor=benefit.min_receipt_total_minor,
                ),
            )
        )
    return tuple(presented)


def _check_id(value: str, where: str, violations: Violations, required: bool = True) -> None:
    if required:
        violations.check(bool(value.strip()), where, "required")
    violations.check_length(value, where, MAX_ID_LENGTH)


def category_from_proto(proto: pb.Category) -> Category:
    violations = Violations()
    _check_id(proto.category_id, "category.category_id", violations)
    _check_id(proto.parent_id, "category.parent_id", violations, required=False)
    violations.check_length(proto.name, "category.name", MAX_NAME_LENGTH)
    violations.raise_if_any()
    return Category(proto.category_id, proto.parent_id, proto.name)


def brand_from_proto(proto: pb.Brand) -> Brand:
    violations = Violations()
    _check_id(proto.brand_id, "brand.brand_id", violations)
    violations.check_length(proto.name, "brand.name", MAX_NAME_LENGTH)
    violations.raise_if_any()
    return Brand(proto.brand_id, proto.name)


def product_list_from_proto(proto: pb.ProductList) -> ProductList:
    violations = Violations()
    _check_id(proto.list_id, "product_list.list_id", violations)
    violations.check_length(proto.name, "product_list.name", MAX_NAME_LENGTH)
    for index, sku in enumerate(proto.skus):
        _check_id(sku, f"product_list.skus[{index}]", violations)
    violations.raise_if_any()
    return ProductList(proto.list_id, proto.name, tuple(sorted(set(proto.skus))))


def product_from_proto(proto: pb.Product, where: str, violations: Violations) -> ProductRecord:
    _check_id(proto.sku, f"{where}.sku", violations)
    violations.check_length(proto.name, f"{where}.name", MAX_NAME_LENGTH)
    violations.check(proto.price_minor >= 0, f"{where}.price_minor", "must not be negative")
    _check_id(proto.category_id, f"{where}.category_id", violations, required=False)
    _check_id(proto.brand_id, f"{where}.brand_id", violations, required=False)
    attributes: dict[str, AttributeValue] = {}
    for name, value in sorted(proto.attributes.items()):
        kind = value.WhichOneof("value")
        if kind is None:
            violations.add(f"{where}.attributes[{name}]", "a value is required")
            continue
        attributes[name] = getattr(value, kind)
    return ProductRecord(
        proto.sku, proto.name, proto.price_minor, proto.category_id, proto.brand_id, proto.own_brand, attributes
    )


def product_to_proto(product: ProductRecord) -> pb.Product:
    return pb.Product(
        sku=product.sku,
        name=product.name,
        price_minor=product.price_minor,
        category_id=product.category_id,
        brand_id=product.brand_id,
        own_brand=product.own_brand,
        attributes={name: _attribute_to_proto(raw) for name, raw in product.attributes.items()},
    )


def subject_from_proto(subject: pb.Subject) -> Subject:
    violations = Violations()
    birth_date: date | None = None
    if subject.birth_date:
        try:
            birth_date = date.fromisoformat(subject.birth_date)
        except ValueError:
            violations.add("subject.birth_date", "a date as YYYY-MM-DD")
    violations.raise_if_any()
    attributes: dict[str, AttributeValue] = {}
    for name, value in sorted(subject.attributes.items()):
        kind = value.WhichOneof("value")
        if kind is not None:
            attributes[name] = getattr(value, kind)
    return Subject(
        subject.member_id,
        subject.tier,
        tuple(subject.segments),
        card_type=subject.card_type,
        attributes=attributes,
        birth_date=birth_date,
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
        payments=tuple(
            Payment(_PAYMENT_TYPES.get(payment.type, ""), payment.amount_minor, payment.card_bin)
            for payment in receipt.payments
        ),
    )


def evaluation_to_proto(evaluation: Evaluation) -> pb.EvaluateReceiptResponse:
    return pb.EvaluateReceiptResponse(
        lines=[
            pb.LineResult(
                position=line.position,
                discount_minor=line.discount_minor,
                final_amount_minor=line.final_amount_minor,
                points=line.points,
                max_points_payment_minor=line.max_points_payment_minor,
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
                coupon_code=applied.coupon_code,
                coupon_series_id=applied.coupon_series_id,
                badge_id=applied.badge_id,
            )
            for applied in evaluation.applied
        ],
        points_total=evaluation.points_total,
        discount_total_minor=evaluation.discount_total_minor,
        unused_coupon_codes=evaluation.unused_coupon_codes,
        points_lots=[
            pb.PointsLotResult(
                points=lot.points,
                activate_time=to_timestamp(lot.activate_time),
                expire_time=to_timestamp(lot.lot.expire_time),
                lifetime_days=lot.lot.lifetime_days,
                expiry_rounding=_ROUNDINGS_TO_PROTO[lot.lot.expiry_rounding],
                currency=lot.lot.currency,
            )
            for lot in evaluation.lots
        ],
    )


def usage_to_proto(usage: CampaignUsage) -> pb.CampaignUsage:
    return pb.CampaignUsage(
        discount_minor=usage.discount_minor,
        points=usage.points,
        receipts=usage.receipts,
        participants=usage.participants,
        coupons_issued=usage.coupons_issued,
    )


class RulesApi(pb_grpc.RulesServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        live: service.LiveCampaigns,
        catalogue: service.CatalogueCache,
        registry: CollectorRegistry,
    ) -> None:
        self._sessions = sessions
        self._live = live
        self._catalogue = catalogue
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
            catalogue.invalidate()
            relay.notify()

        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, on_commit)

    async def CreateCampaign(self, request: pb.CreateCampaignRequest, context: Context) -> pb.CreateCampaignResponse:
        draft = campaign_from_proto(request.campaign)

        async def work(session: AsyncSession) -> pb.CreateCampaignResponse:
            created = await service.create_campaign(session, draft)
            return pb.CreateCampaignResponse(campaign=campaign_to_proto(created))

        return await self._idempotent.run("CreateCampaign", request, pb.CreateCampaignResponse, work)

    async def UpdateCampaign(self, request: pb.UpdateCampaignRequest, context: Context) -> pb.UpdateCampaignResponse:
        violations = Violations()
        violations.check(bool(request.campaign.campaign_id), "campaign.campaign_id", "required")
        paths = list(request.update_mask.paths)
        violations.check(bool(paths), "update_mask", f"required: some of {', '.join(UPDATABLE_CAMPAIGN_FIELDS)}")
        unknown = [path for path in paths if path not in UPDATABLE_CAMPAIGN_FIELDS]
        violations.check(
            not unknown,
            "update_mask",
            f"cannot update {', '.join(unknown)}: only {', '.join(UPDATABLE_CAMPAIGN_FIELDS)}",
        )
        violations.raise_if_any()
        replaces_rules = not {"rules", "groups"}.isdisjoint(paths)

        def edit(current: Campaign) -> Campaign:
            merged = campaign_to_proto(current)
            FieldMask(paths=paths).MergeMessage(
                request.campaign, merged, replace_message_field=True, replace_repeated_field=True
            )
            edited = campaign_from_proto(merged)
            return dataclasses.replace(
                edited,
                campaign_id=current.campaign_id,
                version=current.version,
                rules=edited.rules if replaces_rules else current.rules,
                groups=edited.groups if replaces_rules else current.groups,
            )

        async def work(session: AsyncSession) -> pb.UpdateCampaignResponse:
            updated = await service.update_draft(session, request.campaign.campaign_id, edit, replaces_rules)
            return pb.UpdateCampaignResponse(campaign=campaign_to_proto(updated))

        return await self._idempotent.run("UpdateCampaign", request, pb.UpdateCampaignResponse, work)

    async def ListCampaigns(self, request: pb.ListCampaignsRequest, context: Context) -> pb.ListCampaignsResponse:
        violations = Violations()
        size = page_size(request.page_size, violations)
        violations.check(
            all(status in pb.CampaignStatus.values() and status for status in request.statuses),
            "statuses",
            "campaign statuses",
        )
        violations.check(
            request.trigger == pb.CAMPAIGN_TRIGGER_UNSPECIFIED or request.trigger in _TRIGGERS,
            "trigger",
            "a known trigger",
        )
        violations.check_length(request.name_contains, "name_contains", MAX_NAME_FILTER_LENGTH)
        filters = json.dumps([sorted(set(request.statuses)), request.trigger, request.name_contains])
        scope = hashlib.sha256(filters.encode()).hexdigest()[:32]
        after = Cursor.decode(request.page_token, scope, violations)
        violations.raise_if_any()
        query = service.CampaignQuery(
            size=size,
            after=after,
            statuses=frozenset(_STATUS_FROM_PROTO[s] for s in request.statuses if s in _STATUS_FROM_PROTO),
            scheduled=pb.CAMPAIGN_STATUS_SCHEDULED in request.statuses,
            trigger=None if request.trigger == pb.CAMPAIGN_TRIGGER_UNSPECIFIED else _TRIGGERS[request.trigger],
            name_contains=request.name_contains,
            scope=scope,
        )
        async with self._sessions() as session:
            page = await service.list_campaigns(session, query)
        return pb.ListCampaignsResponse(
            campaigns=[campaign_to_proto(campaign) for campaign in page.campaigns],
            next_page_token=page.next_page_token,
        )

    async def GetCampaign(self, request: pb.GetCampaignRequest, context: Context) -> pb.GetCampaignResponse:
        violations = Violations()
        violations.check(bool(request.campaign_id), "campaign_id", "required")
        violations.raise_if_any()
        async with self._sessions() as session:
            campaign = await service.get_campaign(session, request.campaign_id)
            usage = await service.campaign_usage(session, request.campaign_id)
        return pb.GetCampaignResponse(campaign=campaign_to_proto(campaign), usage=usage_to_proto(usage))

    async def PublishCampaign(self, request: pb.PublishCampaignRequest, context: Context) -> pb.PublishCampaignResponse:
        violations = Violations()
        violations.check(bool(request.campaign_id), "campaign_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.PublishCampaignResponse:
            published, conflicts = await service.publish_checked(session, request.campaign_id, request.accept_conflicts)
            return pb.PublishCampaignResponse(
                campaign=campaign_to_proto(published),
                conflicts=[
                    pb.CampaignConflict(
                        kind=pb.CampaignConflictKind.Value(f"CAMPAIGN_CONFLICT_KIND_{conflict.kind.value}"),
                        subject_id=conflict.subject_id,
                        other_campaign_id=conflict.other_campaign_id,
                        description=conflict.description,
                    )
                    for conflict in conflicts
                ],
            )

        return await self._idempotent.run("PublishCampaign", request, pb.PublishCampaignResponse, work)

    async def _change_status(self, method: str, request: Any, response_type: Any, change: str) -> Any:
        violations = Violations()
        violations.check(bool(request.campaign_id), "campaign_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> Any:
            changed = await service.change_status(session, request.campaign_id, change)
            return response_type(campaign=campaign_to_proto(changed))

        return await self._idempotent.run(method, request, response_type, work)

    async def PauseCampaign(self, request: pb.PauseCampaignRequest, context: Context) -> pb.PauseCampaignResponse:
        response: pb.PauseCampaignResponse = await self._change_status(
            "PauseCampaign", request, pb.PauseCampaignResponse, "pause"
        )
        return response

    async def ResumeCampaign(self, request: pb.ResumeCampaignRequest, context: Context) -> pb.ResumeCampaignResponse:
        response: pb.ResumeCampaignResponse = await self._change_status(
            "ResumeCampaign", request, pb.ResumeCampaignResponse, "resume"
        )
        return response

    async def EndCampaign(self, request: pb.EndCampaignRequest, context: Context) -> pb.EndCampaignResponse:
        response: pb.EndCampaignResponse = await self._change_status(
            "EndCampaign", request, pb.EndCampaignResponse, "end"
        )
        return response

    async def EvaluateReceipt(self, request: pb.EvaluateReceiptRequest, context: Context) -> pb.EvaluateReceiptResponse:
        receipt = receipt_from_proto(request.receipt)
        subject = subject_from_proto(request.subject)
        if await self._live.mentions("purchases"):
            subject = await self._with_purchases(subject)
        if await self._live.mentions("counters"):
            subject = await self._with_counters(subject)
        coupons = coupons_from_proto(request.coupons)
        with self._evaluation_time.time():
            products = await self._catalogue.lookup([line.sku for line in receipt.lines])
            time_zone = self._catalogue.time_zone(receipt.store_id)
            evaluation = await self._live.evaluate(receipt, subject, coupons, products, time_zone)
        return evaluation_to_proto(evaluation)

    async def _with_purchases(self, subject: Subject) -> Subject:
        if not subject.member_id:
            return subject
        async with self._sessions() as session:
            purchases = await service.member_purchases(session, subject.member_id)
        return dataclasses.replace(subject, purchases=purchases)

    async def _with_counters(self, subject: Subject) -> Subject:
        if not subject.member_id:
            return subject
        async with self._sessions() as session:
            counters = await service.member_counters(session, subject.member_id)
        return dataclasses.replace(subject, counters=counters)

    async def PutCategory(self, request: pb.PutCategoryRequest, context: Context) -> pb.PutCategoryResponse:
        category = category_from_proto(request.category)

        async def work(session: AsyncSession) -> pb.PutCategoryResponse:
            await service.put_category(session, category)
            return pb.PutCategoryResponse(category=request.category)

        return await self._idempotent.run("PutCategory", request, pb.PutCategoryResponse, work)

    async def PutBrand(self, request: pb.PutBrandRequest, context: Context) -> pb.PutBrandResponse:
        brand = brand_from_proto(request.brand)

        async def work(session: AsyncSession) -> pb.PutBrandResponse:
            await service.put_brand(session, brand)
            return pb.PutBrandResponse(brand=request.brand)

        return await self._idempotent.run("PutBrand", request, pb.PutBrandResponse, work)

    async def PutProductList(self, request: pb.PutProductListRequest, context: Context) -> pb.PutProductListResponse:
        product_list = product_list_from_proto(request.product_list)

        async def work(session: AsyncSession) -> pb.PutProductListResponse:
            stored = await service.put_product_list(session, product_list)
            return pb.PutProductListResponse(
                product_list=pb.ProductList(list_id=stored.list_id, name=stored.name, skus=stored.skus)
            )

        return await self._idempotent.run("PutProductList", request, pb.PutProductListResponse, work)

    async def ImportProducts(
        self, request_iterator: AsyncIterator[pb.ImportProductsRequest], context: Context
    ) -> pb.ImportProductsResponse:
        async def batches() -> AsyncIterator[list[ProductRecord]]:
            offset = 0
            async for message in request_iterator:
                violations = Violations()
                violations.check(
                    len(message.products) <= MAX_IMPORT_BATCH, "products", f"at most {MAX_IMPORT_BATCH} per message"
                )
                batch = [
                    product_from_proto(product, f"products[{offset + index}]", violations)
                    for index, product in enumerate(message.products)
                ]
                violations.raise_if_any()
                offset += len(batch)
                yield batch

        async with self._sessions() as session, session.begin():
            imported = await service.import_products(session, batches())
        self._catalogue.invalidate()
        return pb.ImportProductsResponse(imported_count=imported)

    async def GetProduct(self, request: pb.GetProductRequest, context: Context) -> pb.GetProductResponse:
        violations = Violations()
        _check_id(request.sku, "sku", violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            record, facts = await service.get_product(session, request.sku)
        return pb.GetProductResponse(
            product=product_to_proto(record), category_ids=facts.category_ids, list_ids=sorted(facts.list_ids)
        )

    async def SimulateReceipt(self, request: pb.SimulateReceiptRequest, context: Context) -> pb.SimulateReceiptResponse:
        receipt = receipt_from_proto(request.receipt)
        violations = Violations()
        violations.check(
            len(request.draft_campaign_ids) <= MAX_SIMULATED_DRAFTS,
            "draft_campaign_ids",
            f"at most {MAX_SIMULATED_DRAFTS}",
        )
        for index, campaign_id in enumerate(request.draft_campaign_ids):
            _check_id(campaign_id, f"draft_campaign_ids[{index}]", violations)
        violations.raise_if_any()
        simulation = service.Simulation(
            receipt,
            # drafts may read them
            await self._with_counters(await self._with_purchases(subject_from_proto(request.subject))),
            coupons_from_proto(request.coupons),
            tuple(request.draft_campaign_ids),
            request.drafts_only,
        )
        async with self._sessions() as session:
            drafts = await service.compiled_drafts(session, simulation.draft_campaign_ids)
        products = await self._catalogue.lookup([line.sku for line in receipt.lines])
        evaluation, explanations = await self._live.simulate(
            simulation, drafts, products, self._catalogue.time_zone(receipt.store_id)
        )
        return pb.SimulateReceiptResponse(
            result=evaluation_to_proto(evaluation),
            explanations=[
                pb.RuleExplanation(
                    campaign_id=explanation.campaign_id,
                    group_id=explanation.group_id,
                    rule_id=explanation.rule_id,
                    rule_name=explanation.rule_name,
                    applied=explanation.applied,
                    reason=explanation.reason,
                    discount_minor=explanation.discount_minor,
                    points=explanation.points,
                )
                for explanation in explanations
            ],
        )

    async def ListCalendar(self, request: pb.ListCalendarRequest, context: Context) -> pb.ListCalendarResponse:
        violations = Violations()
        start = timestamp_field(request, "start_time", violations)
        end = timestamp_field(request, "end_time", violations)
        violations.check(request.HasField("start_time"), "start_time", "required")
        violations.check(
            start is None or end is None or start < end <= start + timedelta(days=MAX_CALENDAR_DAYS),
            "end_time",
            f"after start_time, at most {MAX_CALENDAR_DAYS} days later",
        )
        violations.check(request.HasField("end_time"), "end_time", "required")
        violations.check(
            request.channel == receipt_pb2.SALES_CHANNEL_UNSPECIFIED or request.channel in _CHANNEL_SCOPES,
            "channel",
            "a sales channel",
        )
        violations.check(
            all(status in pb.CampaignStatus.values() and status for status in request.statuses),
            "statuses",
            "campaign statuses",
        )
        if request.store_id:
            _check_id(request.store_id, "store_id", violations)
        violations.raise_if_any()
        assert start is not None and end is not None  # checked above
        async with self._sessions() as session:
            campaigns = await service.list_calendar(
                session, start, end, _CHANNEL_SCOPES.get(request.channel, ""), request.store_id
            )
        entries = []
        for campaign in campaigns:
            proto = campaign_to_proto(campaign)
            if request.statuses and proto.status not in request.statuses:
                continue
            entries.append(
                pb.CalendarEntry(
                    campaign_id=proto.campaign_id,
                    name=proto.name,
                    status=proto.status,
                    start_time=proto.start_time if proto.HasField("start_time") else None,
                    end_time=proto.end_time if proto.HasField("end_time") else None,
                    store_ids=proto.scope.store_ids,
                    channels=proto.scope.channels,
                )
            )
        return pb.ListCalendarResponse(
            entries=entries[: service.MAX_CALENDAR_ENTRIES], truncated=len(entries) > service.MAX_CALENDAR_ENTRIES
        )

    async def PutStore(self, request: pb.PutStoreRequest, context: Context) -> pb.PutStoreResponse:
        violations = Violations()
        _check_id(request.store.store_id, "store.store_id", violations)
        try:
            ZoneInfo(request.store.time_zone)
        except (ValueError, ZoneInfoNotFoundError):
            violations.add("store.time_zone", "an IANA time zone name, e.g. Europe/Moscow")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.PutStoreResponse:
            await service.put_store(session, request.store.store_id, request.store.time_zone)
            return pb.PutStoreResponse(store=request.store)

        return await self._idempotent.run("PutStore", request, pb.PutStoreResponse, work)
