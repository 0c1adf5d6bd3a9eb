"""Promotions: campaigns, rule groups, rules with CEL conditions, effects, and how a receipt
is evaluated. No I/O.

Conditions are compiled once per published campaign version (``compile_campaign``)
and only executed per receipt.

Evaluation, in order (docs/rules.md explains it for marketers):
1. the rule groups of every live campaign, by (group priority, campaign id, group order);
   an exclusive group with a rule that holds displaces every other group;
2. inside a group, rules by (priority, id): mode ``all`` applies each rule that holds,
   ``first`` the first one, ``best`` the one worth most to the customer;
3. discounts change the line amounts at once, so the next group discounts the already
   discounted amounts (or, with base ``original``, computes on the original amounts and is
   capped by what is left of the line);
4. presented coupons, on the discounted amounts;
5. points, on the final amounts; then the redemption cap per line.
Lines flagged ``no_promotions`` are never discounted, earn nothing and cannot be paid with
points.
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any

import cel

MAX_BASIS_POINTS = 100_000
MAX_NAME_LENGTH = 200
MAX_RECEIPT_TEXT_LENGTH = 500
MAX_CONDITION_LENGTH = 4000
BASIS_POINTS_DENOMINATOR = 10_000
UNIT_MILLI = 1000


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    ENDED = "ended"


# which statuses each status change may start from, and where it leads
STATUS_CHANGES: dict[str, tuple[frozenset[CampaignStatus], CampaignStatus]] = {
    "pause": (frozenset({CampaignStatus.ACTIVE}), CampaignStatus.PAUSED),
    "resume": (frozenset({CampaignStatus.PAUSED}), CampaignStatus.ACTIVE),
    "end": (frozenset({CampaignStatus.ACTIVE, CampaignStatus.PAUSED}), CampaignStatus.ENDED),
}


class GroupMode(StrEnum):
    """How the rules of a group combine."""

    ALL = "all"
    FIRST = "first"
    BEST = "best"
    EXCLUSIVE = "exclusive"


class DiscountBase(StrEnum):
    """What a group's percentages and unit prices are computed on."""

    DISCOUNTED = "discounted"
    ORIGINAL = "original"


@dataclass(frozen=True)
class Product:
    """What the rules know of a SKU: its category with every ancestor, brand, lists, attributes."""

    sku: str
    category_ids: tuple[str, ...] = ()
    brand_id: str = ""
    own_brand: bool = False
    list_ids: frozenset[str] = frozenset()
    attributes: Mapping[str, Any] = field(default_factory=dict)


Catalogue = Mapping[str, Product]
NO_CATALOGUE: Catalogue = {}
MAX_IMPORT_BATCH = 5000
MAX_CATEGORY_DEPTH = 32
AttributeValue = str | int | bool


@dataclass(frozen=True)
class Category:
    category_id: str
    parent_id: str
    name: str


@dataclass(frozen=True)
class Brand:
    brand_id: str
    name: str


@dataclass(frozen=True)
class ProductRecord:
    """A catalogue product as the retailer maintains it."""

    sku: str
    name: str
    price_minor: int
    category_id: str
    brand_id: str
    own_brand: bool
    attributes: Mapping[str, AttributeValue]


@dataclass(frozen=True)
class ProductList:
    list_id: str
    name: str
    skus: tuple[str, ...]


def category_path(category_id: str, parents: Mapping[str, str]) -> tuple[str, ...]:
    """The category and its ancestors, nearest first; empty for no category."""
    path: list[str] = []
    while category_id and category_id not in path and len(path) < MAX_CATEGORY_DEPTH:
        path.append(category_id)
        category_id = parents.get(category_id, "")
    return tuple(path)


def creates_cycle(category_id: str, parent_id: str, parents: Mapping[str, str]) -> bool:
    """Whether hanging `category_id` under `parent_id` would make it its own ancestor."""
    return category_id in category_path(parent_id, parents)


@dataclass(frozen=True)
class Scope:
    """The lines an effect acts on: a line matches when it is named by SKU, or its category
    (or an ancestor), brand or product list is named, or it is an own-brand product and
    `own_brand` is set, or its product has one of the `attributes` (name, value) with that
    very value and type; nothing named means every line."""

    skus: tuple[str, ...] = ()
    category_ids: tuple[str, ...] = ()
    brand_ids: tuple[str, ...] = ()
    product_list_ids: tuple[str, ...] = ()
    own_brand: bool = False
    attributes: tuple[tuple[str, AttributeValue], ...] = ()

    @property
    def everything(self) -> bool:
        return not (
            self.skus
            or self.category_ids
            or self.brand_ids
            or self.product_list_ids
            or self.own_brand
            or self.attributes
        )

    def matches(self, sku: str, product: Product | None) -> bool:
        if self.everything or sku in self.skus:
            return True
        if product is None:
            return False
        return (
            any(category in self.category_ids for category in product.category_ids)
            or (bool(product.brand_id) and product.brand_id in self.brand_ids)
            or any(list_id in product.list_ids for list_id in self.product_list_ids)
            or (self.own_brand and product.own_brand)
            or any(_same_value(product.attributes.get(name), value) for name, value in self.attributes)
        )


def _same_value(actual: Any, wanted: AttributeValue) -> bool:
    """Equal and of the same type (True is not 1)."""
    return type(actual) is type(wanted) and actual == wanted


EVERYTHING = Scope()


class ExpiryRounding(StrEnum):
    """Where an expiry computed from a lot's lifetime is moved ("" leaves it to the currency)."""

    CURRENCY = ""
    NONE = "none"
    MONTH_END = "month_end"
    YEAR_END = "year_end"


POINTS_CURRENCY = re.compile(r"[A-Z][A-Z0-9_]{0,15}")
MAX_ACTIVATION_DELAY_DAYS = 3650
MAX_LIFETIME_DAYS = 36500


@dataclass(frozen=True)
class PointsLot:
    """How the points of a points effect are credited: after `activation_delay_days` (0: the
    currency's own delay), expiring at `expire_time` (a fixed moment such as 31 December) or
    `lifetime_days` after activation moved by `expiry_rounding` (0 and "": the currency's
    defaults), in `currency` ("" is the program's default). The default lot is today's
    behaviour: the accounts service decides everything."""

    activation_delay_days: int = 0
    expire_time: datetime | None = None
    lifetime_days: int = 0
    expiry_rounding: ExpiryRounding = ExpiryRounding.CURRENCY
    currency: str = ""

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with the parameters, as (field, reason)."""
        problems = []
        if not 0 <= self.activation_delay_days <= MAX_ACTIVATION_DELAY_DAYS:
            problems.append(("activation_delay_days", f"between 0 and {MAX_ACTIVATION_DELAY_DAYS}"))
        if not 0 <= self.lifetime_days <= MAX_LIFETIME_DAYS:
            problems.append(("lifetime_days", f"between 0 and {MAX_LIFETIME_DAYS}"))
        if self.expire_time is not None and (self.lifetime_days or self.expiry_rounding):
            problems.append(("expire_time", "a fixed expiry excludes lifetime_days and expiry_rounding"))
        if self.expiry_rounding and not self.lifetime_days:
            problems.append(("expiry_rounding", "only with lifetime_days"))
        if self.currency and POINTS_CURRENCY.fullmatch(self.currency) is None:
            problems.append(("currency", "an uppercase letter, then up to 15 uppercase letters, digits or underscores"))
        return problems


DEFAULT_LOT = PointsLot()


@dataclass(frozen=True)
class EarnPointsPercent:
    """Points worth a share of the final amount of the lines in scope; 500 basis points is 5%."""

    basis_points: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class EarnFixedPoints:
    """Points once per receipt, spread over the eligible lines."""

    amount: int
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class DiscountPercent:
    """A percentage off the lines in scope (the whole receipt when the scope is empty)."""

    basis_points: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class DiscountAmount:
    """A fixed amount off the lines in scope, spread pro rata, never more than they cost."""

    amount_minor: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class FixedPrice:
    """The lines in scope are sold at this unit price (never raised)."""

    unit_price_minor: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class BuyMPayN:
    """Of every `buy` units in scope the customer pays `pay`: the cheapest are free."""

    buy: int
    pay: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class NthItemDiscount:
    """Every n-th unit in scope (the cheapest of each n) gets `basis_points` off; 10000 is free."""

    n: int
    basis_points: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class CheapestItemDiscount:
    """The cheapest unit in scope gets `basis_points` off once there are `min_units` units."""

    basis_points: int
    min_units: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class RedemptionCap:
    """The share of each line payable by points (`basis_points`), or all of the eligible
    lines but `all_but_minor` (spread pro rata); the first cap that applies wins."""

    basis_points: int | None = None
    all_but_minor: int | None = None


@dataclass(frozen=True)
class IssueCoupon:
    """A personal coupon of a rewards series, issued once the receipt is committed (or on the
    campaign's trigger)."""

    series_id: str


@dataclass(frozen=True)
class AwardBadge:
    """A rewards badge, awarded once the receipt is committed (or on the campaign's trigger)."""

    badge_id: str


@dataclass(frozen=True)
class IncrementCounter:
    """Adds `by` to the member's counter `counter` once the receipt is committed (taken back
    when the whole receipt is returned); conditions read it as member.counters.<counter>."""

    counter: str
    by: int


@dataclass(frozen=True)
class EarnPointsPerAmount:
    """`points` for each whole `per_minor` of the final amount of the lines in scope
    (10 points per each 100.00: 354.99 earns 30), spread over those lines."""

    points: int
    per_minor: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class EarnPointsCheapestItem:
    """Points worth `basis_points` of the final price of the cheapest whole unit in scope."""

    basis_points: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class EarnPointsNthLine:
    """Points worth `basis_points` of the final amount of the n-th line in scope (in position
    order), or of every n-th line with `every`; nothing when fewer lines are in scope."""

    n: int
    basis_points: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT
    every: bool = False


@dataclass(frozen=True)
class EarnPointsMultiplier:
    """Multiplies what the other points rules and coupons earned on the lines in scope:
    20000 basis points (x2) adds as much again. It is applied after every other points
    effect, always to their points (never to another multiplier's), so two x2 multipliers
    make x3, not x4."""

    basis_points: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class EarnPointsPerUnits:
    """`points` for each whole `units` units bought of the lines in scope (a product, a
    category; weight counts too: 2.5 kg is 2.5 units), spread over those lines."""

    points: int
    units: int
    scope: Scope = EVERYTHING
    lot: PointsLot = DEFAULT_LOT


@dataclass(frozen=True)
class SetPrice:
    """A set of SKUs sold together for `price_minor`: one unit of each SKU in `skus` (a SKU
    named twice is needed twice) makes a set; every whole set on the receipt costs the price,
    the difference spread pro rata over the units making the sets. Never raised."""

    skus: tuple[str, ...]
    price_minor: int

    @property
    def scope(self) -> Scope:
        return Scope(skus=tuple(sorted(set(self.skus))))


@dataclass(frozen=True)
class NthLineDiscount:
    """`amount_minor` off every n-th line in scope (position order, `no_promotions` lines not
    counted), never more than the line costs."""

    n: int
    amount_minor: int
    scope: Scope = EVERYTHING


@dataclass(frozen=True)
class DiscountPercentPerAmount:
    """`basis_points` off for each whole `per_minor` of the lines in scope (1% for each
    1,000.00), at most `max_basis_points`, computed on their sum and spread."""

    basis_points: int
    per_minor: int
    max_basis_points: int
    scope: Scope = EVERYTHING


PointsEffect = (
    EarnPointsPercent
    | EarnFixedPoints
    | EarnPointsPerAmount
    | EarnPointsCheapestItem
    | EarnPointsNthLine
    | EarnPointsMultiplier
    | EarnPointsPerUnits
)
DiscountEffect = (
    DiscountPercent
    | DiscountAmount
    | FixedPrice
    | BuyMPayN
    | NthItemDiscount
    | CheapestItemDiscount
    | SetPrice
    | NthLineDiscount
    | DiscountPercentPerAmount
)
RewardEffect = IssueCoupon | AwardBadge
Effect = PointsEffect | DiscountEffect | RedemptionCap | RewardEffect | IncrementCounter
# The effects an event-triggered campaign may have: nothing to discount or cap without a receipt.
TRIGGERED_EFFECTS = (EarnFixedPoints, IssueCoupon, AwardBadge)
DISCOUNT_EFFECTS = (
    DiscountPercent,
    DiscountAmount,
    FixedPrice,
    BuyMPayN,
    NthItemDiscount,
    CheapestItemDiscount,
    SetPrice,
    NthLineDiscount,
    DiscountPercentPerAmount,
)
POINTS_EFFECTS = (
    EarnPointsPercent,
    EarnFixedPoints,
    EarnPointsPerAmount,
    EarnPointsCheapestItem,
    EarnPointsNthLine,
    EarnPointsMultiplier,
    EarnPointsPerUnits,
)


class CampaignTrigger(StrEnum):
    """What runs a campaign's rules: a receipt being evaluated, or an event of the members service."""

    RECEIPT = "receipt"
    MEMBER_REGISTERED = "member_registered"
    # a friend registered with the member's referral code; the member (the referrer) is rewarded
    MEMBER_REFERRED = "member_referred"
    # member.birthday: once per member per year
    MEMBER_BIRTHDAY = "member_birthday"
    # member.profile_completed: once per member
    PROFILE_COMPLETED = "profile_completed"


@dataclass(frozen=True)
class CampaignUsage:
    """What a campaign's rules have given on committed receipts so far."""

    discount_minor: int = 0
    points: int = 0
    receipts: int = 0
    # members it applied to at least once (read only for GetCampaign, not for the limits)
    participants: int = 0
    coupons_issued: int = 0


@dataclass(frozen=True)
class CampaignLimits:
    """Budgets and uses per member; zero means no limit."""

    discount_budget_minor: int = 0
    points_budget: int = 0
    max_uses_per_member: int = 0

    def refusal(self, usage: CampaignUsage, member_uses: int) -> str | None:
        """Why the campaign gives nothing more, or None while it may."""
        if self.discount_budget_minor and usage.discount_minor >= self.discount_budget_minor:
            return f"the discount budget is spent ({usage.discount_minor} of {self.discount_budget_minor})"
        if self.points_budget and usage.points >= self.points_budget:
            return f"the points budget is spent ({usage.points} of {self.points_budget})"
        if self.max_uses_per_member and member_uses >= self.max_uses_per_member:
            return f"the member has used the campaign {member_uses} times (at most {self.max_uses_per_member})"
        return None


NO_LIMITS = CampaignLimits()


def given_back(amount: int, returned_minor: int, paid_minor: int, whole: bool) -> int:
    """How much of what a receipt gave (`amount` of discount or points) its returns so far give
    back to the campaign's budget: all of it once the whole receipt is returned, else the
    returned share of what was paid, rounded down."""
    if whole or paid_minor <= 0 or returned_minor >= paid_minor:
        return amount
    return amount * max(0, returned_minor) // paid_minor


WEEKDAYS = range(1, 8)
DAYS_OF_MONTH = range(1, 32)
HOURS = range(24)
CHANNELS = ("pos", "web", "app", "call_centre")


@dataclass(frozen=True)
class CampaignScope:
    """Who, where and when a campaign applies: a fast prefilter before any condition runs.
    Each field left empty means no restriction; a filled one must match (any of its values).
    Weekdays (1 = Monday), days of month and hours are read in the store's time zone."""

    segments: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    store_ids: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    weekdays: tuple[int, ...] = ()
    days_of_month: tuple[int, ...] = ()
    hours: tuple[int, ...] = ()

    def refusal(self, receipt: Receipt, subject: Subject, local: datetime) -> str | None:
        """Why the campaign does not apply to this receipt, or None when it does."""
        checks = (
            ("segment", self.segments, any(segment in self.segments for segment in subject.segments)),
            ("tier", self.tiers, subject.tier in self.tiers),
            ("store", self.store_ids, receipt.store_id in self.store_ids),
            ("channel", self.channels, receipt.channel in self.channels),
            ("weekday", self.weekdays, local.isoweekday() in self.weekdays),
            ("day of month", self.days_of_month, local.day in self.days_of_month),
            ("hour", self.hours, local.hour in self.hours),
        )
        for name, restriction, matches in checks:
            if restriction and not matches:
                return f"out of the campaign's scope: {name}"
        return None


EVERYONE = CampaignScope()


@dataclass(frozen=True)
class Rule:
    rule_id: str
    name: str
    condition: str
    effect: Effect
    receipt_text: str
    priority: int


@dataclass(frozen=True)
class RuleGroup:
    group_id: str
    name: str
    mode: GroupMode
    priority: int
    condition: str
    discount_base: DiscountBase
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Campaign:
    """A campaign; `rules` form its default group (mode all, priority 0, discounted base)."""

    campaign_id: str
    name: str
    status: CampaignStatus
    start_at: datetime | None
    end_at: datetime | None
    version: int
    rules: tuple[Rule, ...]
    groups: tuple[RuleGroup, ...] = ()
    scope: CampaignScope = EVERYONE
    limits: CampaignLimits = NO_LIMITS
    trigger: CampaignTrigger = CampaignTrigger.RECEIPT

    def is_live_at(self, moment: datetime) -> bool:
        return (
            self.status is CampaignStatus.ACTIVE
            and (self.start_at is None or self.start_at <= moment)
            and (self.end_at is None or moment < self.end_at)
        )

    def all_groups(self) -> tuple[RuleGroup, ...]:
        default = RuleGroup("", "", GroupMode.ALL, 0, "", DiscountBase.DISCOUNTED, self.rules)
        return ((default,) if self.rules else ()) + self.groups


@dataclass(frozen=True)
class ReceiptLine:
    position: int
    sku: str
    price_minor: int
    quantity_milli: int
    amount_minor: int
    no_promotions: bool


@dataclass(frozen=True)
class Payment:
    """How a part of the receipt is paid: `type` is "cash", "bank_card", "gift_card" or "other";
    `card_bin` the first digits of a bank card (partner-bank promotions)."""

    type: str
    amount_minor: int
    card_bin: str = ""


@dataclass(frozen=True)
class Receipt:
    store_id: str
    terminal_id: str
    channel: str
    time: datetime
    currency_code: str
    lines: tuple[ReceiptLine, ...]
    payments: tuple[Payment, ...] = ()

    @property
    def total_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines)


SPEND_WINDOWS_DAYS = (7, 30, 90, 180, 365)


@dataclass(frozen=True)
class Purchase:
    """A committed receipt (or a return, negative) of a member, from the gateway's events."""

    time: datetime
    amount_minor: int
    is_return: bool = False


@dataclass(frozen=True)
class Subject:
    """The customer; member_id is empty for an anonymous receipt, which earns no points.
    `purchases` are the member's earlier receipts and returns (only loaded when a live
    condition reads member.purchases)."""

    member_id: str
    tier: str
    segments: tuple[str, ...]
    purchases: tuple[Purchase, ...] = ()
    # the member's counters as committed receipts left them (loaded only when a live
    # condition reads member.counters)
    counters: Mapping[str, int] = field(default_factory=dict)
    # the member's card type, typed attributes (survey answers, preferences) and birth date,
    # as the caller knows them
    card_type: str = ""
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    birth_date: date | None = None


def birthday_distances(birth_date: date | None, today: date) -> tuple[int, int]:
    """Days from `today` to the next birthday and since the last one (both 0 on the day;
    -1 and -1 when the birth date is unknown). A 29 February birthday falls on 28 February
    in other years."""
    if birth_date is None:
        return -1, -1
    this_year = _birthday_in(birth_date, today.year)
    upcoming = this_year if this_year >= today else _birthday_in(birth_date, today.year + 1)
    last = this_year if this_year <= today else _birthday_in(birth_date, today.year - 1)
    return (upcoming - today).days, (today - last).days


def _birthday_in(birth_date: date, year: int) -> date:
    if (birth_date.month, birth_date.day) == (2, 29) and not calendar.isleap(year):
        return date(year, 2, 28)
    return date(year, birth_date.month, birth_date.day)


COUNTER_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_COUNTER_READ = re.compile(r"\bcounters\.([a-z][a-z0-9_]*)")


def counter_names(conditions: str) -> set[str]:
    """The counters a condition text reads as member.counters.<name>: a counter never
    incremented reads as 0 rather than failing the condition."""
    return set(_COUNTER_READ.findall(conditions))


def purchase_facts(purchases: Sequence[Purchase], moment: datetime) -> dict[str, int]:
    """member.purchases as conditions see it, as of the receipt's time: receipts before it
    (returns lower the spend, not the count)."""
    earlier = [purchase for purchase in purchases if purchase.time <= moment]
    sales = [purchase for purchase in earlier if not purchase.is_return]
    facts = {
        "count": len(sales),
        "total_minor": sum(purchase.amount_minor for purchase in earlier),
        "days_since_last": (moment - max(p.time for p in sales)).days if sales else -1,
    }
    for days in SPEND_WINDOWS_DAYS:
        facts[f"spend_last_{days}_days_minor"] = sum(
            purchase.amount_minor for purchase in earlier if (moment - purchase.time).days < days
        )
    return facts


@dataclass(frozen=True)
class CouponBenefit:
    """What an accepted coupon gives; exactly one of the benefit fields is set."""

    percent_off_basis_points: int = 0
    amount_off_minor: int = 0
    fixed_price_minor: int | None = None
    gift_sku: str = ""
    points: int = 0
    scope: Scope = EVERYTHING
    min_receipt_total_minor: int = 0


@dataclass(frozen=True)
class PresentedCoupon:
    code: str
    series_id: str
    campaign_id: str
    benefit: CouponBenefit


class ConditionError(ValueError):
    """A condition that does not compile or does not evaluate to a boolean."""


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    program: cel.Program | None


@dataclass(frozen=True)
class CompiledGroup:
    group: RuleGroup
    program: cel.Program | None
    rules: tuple[CompiledRule, ...]


@dataclass(frozen=True)
class CompiledCampaign:
    campaign: Campaign
    groups: tuple[CompiledGroup, ...]
    # every condition's text, to tell whether any may read receipt.lines or member.purchases
    # (a plain mention is enough to say yes)
    conditions: str = ""

    def mentions(self, word: str) -> bool:
        return word in self.conditions

    @functools.cached_property
    def counters(self) -> frozenset[str]:
        """The counters its conditions read, found once rather than per receipt."""
        return frozenset(counter_names(self.conditions))

    @functools.cached_property
    def reads_lines(self) -> bool:
        """Whether a condition may read receipt.lines (or the receipt as a whole)."""
        programs = [group.program for group in self.groups] + [rule.program for rule in self.rules]
        return any(program is not None and not _decided_without_lines(program.source) for program in programs)

    @functools.cached_property
    def reads(self) -> Reads:
        """What its conditions may read of their variables, found once rather than per receipt."""
        programs = [group.program for group in self.groups] + [rule.program for rule in self.rules]
        reads = NOTHING_READ
        for program in programs:
            if program is not None:
                reads |= condition_reads(program.source)
        return reads

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        return tuple(rule for group in self.groups for rule in group.rules)


SAMPLE_RECEIPT = Receipt(
    store_id="store-1",
    terminal_id="pos-1",
    channel="pos",
    time=datetime(2026, 1, 1, 12, 0),
    currency_code="RUB",
    lines=(ReceiptLine(1, "SKU-1", 10000, 1000, 10000, False),),
)
SAMPLE_SUBJECT = Subject(member_id="member-1", tier="basic", segments=("new",))
SAMPLE_COUPONS = (PresentedCoupon("CODE-1", "SERIES-1", "", CouponBenefit(points=1)),)


def activation(
    receipt: Receipt,
    subject: Subject,
    coupons: Sequence[PresentedCoupon] = (),
    catalogue: Catalogue = NO_CATALOGUE,
    local: datetime | None = None,
    with_lines: bool = True,
    counters_read: Iterable[str] = (),
    reads: Reads | None = None,
) -> dict[str, Any]:
    """The variables a condition sees (documented in docs/rules.md); times are the store's
    local time `local` when known. `receipt.lines` (a map per line) is by far the dearest
    part to hand to CEL, so it is left out when no condition mentions it; with `reads`, only
    the fields the conditions may read are kept (the CEL library converts every value, and
    copies the whole of `receipt.lines` each time a condition reads it)."""
    local = local or receipt.time
    products = [catalogue.get(line.sku) or Product(line.sku) for line in receipt.lines]

    def line_facts(line: ReceiptLine, product: Product) -> dict[str, Any]:
        return {
            "position": line.position,
            "sku": line.sku,
            "price_minor": line.price_minor,
            "quantity_milli": line.quantity_milli,
            "amount_minor": line.amount_minor,
            "no_promotions": line.no_promotions,
            "category_ids": list(product.category_ids),
            "brand_id": product.brand_id,
            "own_brand": product.own_brand,
            "list_ids": sorted(product.list_ids),
            "attributes": dict(product.attributes),
        }

    to_birthday, since_birthday = birthday_distances(subject.birth_date, local.date())
    facts: dict[str, Any] = {
        "receipt": {
            "total_minor": receipt.total_minor,
            "line_count": len(receipt.lines),
            "store_id": receipt.store_id,
            "terminal_id": receipt.terminal_id,
            "channel": receipt.channel,
            "currency_code": receipt.currency_code,
            "hour": local.hour,
            "weekday": local.isoweekday(),
            "day_of_month": local.day,
            "skus": [line.sku for line in receipt.lines],
            "category_ids": sorted({category for product in products for category in product.category_ids}),
            "brand_ids": sorted({product.brand_id for product in products if product.brand_id}),
            "list_ids": sorted({list_id for product in products for list_id in product.list_ids}),
            "coupon_codes": [coupon.code for coupon in coupons],
            "coupon_series": [coupon.series_id for coupon in coupons],
            "payments": [
                {"type": payment.type, "amount_minor": payment.amount_minor, "card_bin": payment.card_bin}
                for payment in receipt.payments
            ],
            "payment_types": sorted({payment.type for payment in receipt.payments}),
        },
        "member": {
            "id": subject.member_id,
            "identified": bool(subject.member_id),
            "tier": subject.tier,
            "segments": list(subject.segments),
            "purchases": purchase_facts(subject.purchases, receipt.time),
            "counters": {**dict.fromkeys(counters_read, 0), **subject.counters},
            "card_type": subject.card_type,
            "attributes": dict(subject.attributes),
            "days_to_birthday": to_birthday,
            "days_since_birthday": since_birthday,
        },
    }
    if with_lines:
        facts["receipt"]["lines"] = [
            line_facts(line, product) for line, product in zip(receipt.lines, products, strict=True)
        ]
    if reads is not None:
        _keep_only(facts, "receipt", reads.receipt)
        _keep_only(facts, "member", reads.member)
        if "lines" in facts["receipt"] and reads.line is not None:
            wanted = reads.line
            facts["receipt"]["lines"] = [
                {name: value for name, value in line.items() if name in wanted} for line in facts["receipt"]["lines"]
            ]
    return facts


def _keep_only(facts: dict[str, Any], variable: str, fields: frozenset[str] | None) -> None:
    if fields is not None:
        facts[variable] = {name: value for name, value in facts[variable].items() if name in fields}


# the receipt's fields other than lines, as conditions see them
_RECEIPT_FIELDS = frozenset(activation(SAMPLE_RECEIPT, SAMPLE_SUBJECT, with_lines=False)["receipt"])
_RECEIPT_MENTION = re.compile(r"\breceipt\b\s*(?:\.\s*([A-Za-z_]\w*))?")


@functools.lru_cache(maxsize=4096)
def _decided_without_lines(condition: str) -> bool:
    """Whether a condition has the same outcome when receipt.lines is left out of its
    variables: it never mentions lines, and every mention of receipt selects one of its other
    fields (so nothing can look at the receipt as a whole, such as its size)."""
    if "lines" in condition:
        return False
    return all(match.group(1) in _RECEIPT_FIELDS for match in _RECEIPT_MENTION.finditer(condition))


@dataclass(frozen=True)
class Reads:
    """The fields of `receipt`, `member` and each of `receipt.lines` that conditions may read;
    None is every field (a use the text does not prove to be a plain field selection)."""

    receipt: frozenset[str] | None = frozenset()
    member: frozenset[str] | None = frozenset()
    line: frozenset[str] | None = frozenset()

    def __or__(self, other: Reads) -> Reads:
        def union(mine: frozenset[str] | None, theirs: frozenset[str] | None) -> frozenset[str] | None:
            return None if mine is None or theirs is None else mine | theirs

        return Reads(union(self.receipt, other.receipt), union(self.member, other.member), union(self.line, other.line))


NOTHING_READ = Reads()
_LINE_FIELDS = frozenset(activation(SAMPLE_RECEIPT, SAMPLE_SUBJECT)["receipt"]["lines"][0])
_MEMBER_MENTION = re.compile(r"\bmember\b\s*(?:\.\s*([A-Za-z_]\w*))?")
_LINES_WORD = re.compile(r"\blines\b")
# the only uses of receipt.lines whose elements can be trimmed: their size, and a macro whose
# variable (captured) then only ever selects fields
_LINES_READ = re.compile(
    r"\breceipt\s*\.\s*lines\s*\.\s*(?:(?:exists|all|exists_one|map)\s*\(\s*([A-Za-z_]\w*)\s*,|size\s*\(\s*\))"
    r"|\bsize\s*\(\s*receipt\s*\.\s*lines\s*\)"
)


@functools.lru_cache(maxsize=4096)
def condition_reads(condition: str) -> Reads:
    """What a condition may read of its variables, from its text, erring towards more: a
    mention of `receipt` or `member` that does not select a field reads all of its fields, and
    the lines' fields are narrowed only when every mention of `lines` is one of `_LINES_READ`
    and every mention of each macro variable declares it or selects a line field with it.
    A string literal can only make the answer larger (a word in it counts as a mention)."""
    receipt: set[str] | None = set()
    for match in _RECEIPT_MENTION.finditer(condition):
        if match.group(1) is None:
            receipt = None
            break
        assert receipt is not None
        receipt.add(match.group(1))
    member: set[str] | None = set()
    for match in _MEMBER_MENTION.finditer(condition):
        if match.group(1) is None:
            member = None
            break
        assert member is not None
        member.add(match.group(1))
    return Reads(
        None if receipt is None else frozenset(receipt),
        None if member is None else frozenset(member),
        None if receipt is None else _line_reads(condition),
    )


def _line_reads(condition: str) -> frozenset[str] | None:
    uses = list(_LINES_READ.finditer(condition))
    if len(uses) != len(_LINES_WORD.findall(condition)):
        return None
    fields: set[str] = set()
    for name in {use.group(1) for use in uses if use.group(1)}:
        word = re.escape(name)
        declarations = re.findall(rf"\b(?:exists|all|exists_one|map)\s*\(\s*{word}\s*,", condition)
        selections = re.findall(rf"\b{word}\s*\.\s*([A-Za-z_]\w*)\b(?!\s*\()", condition)
        if len(declarations) + len(selections) != len(re.findall(rf"\b{word}\b", condition)):
            return None
        if not _LINE_FIELDS.issuperset(selections):
            return None
        fields.update(selections)
    return frozenset(fields)


def _holds(program: cel.Program, variables: dict[str, Any] | cel.Context) -> bool:
    try:
        result = program.execute(variables)
    except Exception as error:  # the CEL runtime raises several types for bad expressions
        raise ConditionError(str(error)) from error
    if not isinstance(result, bool):
        raise ConditionError(f"the condition must be true or false, not {type(result).__name__}")
    return result


@functools.lru_cache(maxsize=4096)
def compile_condition(condition: str) -> cel.Program | None:
    """Compiles and trial-runs a condition on a sample receipt; empty means always. The live
    campaigns are compiled again after every publication, so a text compiled before is
    answered from a cache (a program is immutable and can be shared) rather than re-parsed."""
    if not condition.strip():
        return None
    try:
        program = cel.compile(condition)
    except Exception as error:
        raise ConditionError(str(error)) from error
    _holds(program, activation(SAMPLE_RECEIPT, SAMPLE_SUBJECT, SAMPLE_COUPONS, counters_read=counter_names(condition)))
    return program


def _by_priority(rules: Sequence[Rule]) -> list[Rule]:
    return sorted(rules, key=lambda rule: (rule.priority, rule.rule_id))


def compile_campaign(campaign: Campaign) -> CompiledCampaign:
    conditions = [group.condition for group in campaign.all_groups()]
    conditions += [rule.condition for group in campaign.all_groups() for rule in group.rules]
    return CompiledCampaign(
        campaign,
        tuple(
            CompiledGroup(
                group,
                compile_condition(group.condition),
                tuple(CompiledRule(rule, compile_condition(rule.condition)) for rule in _by_priority(group.rules)),
            )
            for group in campaign.all_groups()
        ),
        "\n".join(conditions),
    )


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


def spread_within(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """Like `spread`, but no part exceeds its cap (a discount never takes a line below zero):
    what the remainder would push over a cap moves to the nearest earlier line with room.
    `total` is first cut to the sum of the caps."""
    total = min(total, sum(caps))
    parts = [min(part, cap) for part, cap in zip(spread(total, weights), caps, strict=True)]
    overflow = total - sum(parts)
    for index in reversed(range(len(parts))):
        if overflow == 0:
            break
        room = min(overflow, caps[index] - parts[index])
        parts[index] += room
        overflow -= room
    return parts


def scaled(amount: int, basis_points: int) -> int:
    return amount * basis_points // BASIS_POINTS_DENOMINATOR


@dataclass(frozen=True)
class Applied:
    campaign_id: str
    campaign_version: int
    rule_id: str
    receipt_text: str
    points: int
    discount_minor: int
    coupon_code: str = ""
    coupon_series_id: str = ""
    badge_id: str = ""


@dataclass(frozen=True)
class LineOutcome:
    position: int
    discount_minor: int
    final_amount_minor: int
    points: int
    max_points_payment_minor: int = 0


@dataclass(frozen=True)
class LotOutcome:
    """The points of a receipt that share one lot's parameters; `activate_time` is the
    receipt's time plus the lot's activation delay (None: no delay of its own)."""

    points: int
    lot: PointsLot
    activate_time: datetime | None


@dataclass
class Evaluation:
    lines: list[LineOutcome]
    applied: list[Applied] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unused_coupon_codes: list[str] = field(default_factory=list)
    # the points total grouped by lot parameters, in the order the rules applied; the lots'
    # points add up to points_total
    lots: list[LotOutcome] = field(default_factory=list)

    @property
    def points_total(self) -> int:
        return sum(line.points for line in self.lines)

    @property
    def discount_total_minor(self) -> int:
        return sum(line.discount_minor for line in self.lines)


def _line_keys(sku: str, product: Product | None) -> frozenset[tuple[str, str]]:
    """What a line can be named by in a scope (see `_scope_keys`)."""
    keys = [("sku", sku)]
    if product is not None:
        keys += [("category", category) for category in product.category_ids]
        keys += [("brand", product.brand_id)] if product.brand_id else []
        keys += [("list", list_id) for list_id in product.list_ids]
    return frozenset(keys)


@functools.lru_cache(maxsize=4096)
def _scope_keys(scope: Scope) -> frozenset[tuple[str, str]] | None:
    """What a scope names by SKU, category, brand or list, as keys a line in it shares (an
    index lookup instead of `Scope.matches` per line); None for a scope that names nothing
    or restricts by anything else, which `Scope.matches` decides line by line."""
    named_only = dataclasses.replace(scope, skus=(), category_ids=(), brand_ids=(), product_list_ids=())
    if scope.everything or named_only != EVERYTHING:
        return None
    return frozenset(
        [("sku", sku) for sku in scope.skus]
        + [("category", category) for category in scope.category_ids]
        + [("brand", brand) for brand in scope.brand_ids]
        + [("list", list_id) for list_id in scope.product_list_ids]
    )


class _Basket:
    """The receipt as it is being discounted: current amounts, and which lines may take part."""

    def __init__(self, receipt: Receipt, catalogue: Catalogue) -> None:
        self.lines = receipt.lines
        self.products = [catalogue.get(line.sku) for line in receipt.lines]
        self.original = [line.amount_minor for line in receipt.lines]
        self.current = list(self.original)
        self._masks: dict[Scope, list[bool]] = {}
        # the masks by the scope object asked for (rules ask with the same objects every time,
        # and hashing a scope costs more than finding it by identity); the scope is kept so
        # that its id cannot be reused while it is here
        self._masks_by_id: dict[int, tuple[Scope, list[bool]]] = {}
        self._keys: list[frozenset[tuple[str, str]]] | None = None
        # the least each line may cost after discounts, asked for by every discount
        self.minimum = [_minimum_amount(line, product) for line, product in zip(self.lines, self.products, strict=True)]
        # the lines of a mask that have whole units, by the mask asked with (kept, as in _masks_by_id)
        self._whole: dict[int, tuple[list[bool], list[tuple[int, int, int]]]] = {}
        # each effect's discounts on the current amounts (a BEST group weighs a rule, then applies
        # it), by the effect asked with, kept with the amounts they were worked out on; the
        # amounts are never changed in place (apply replaces them)
        self.discounted: dict[tuple[int, DiscountBase], tuple[DiscountEffect, list[int], list[int]]] = {}

    def in_scope(self, scope: Scope) -> list[bool]:
        """Which lines a scope takes in; many rules share a scope, so it is worked out once."""
        known = self._masks_by_id.get(id(scope))
        if known is not None and known[0] is scope:
            return known[1]
        mask = self._masks.get(scope)
        if mask is None:
            wanted = _scope_keys(scope)
            if wanted is None:
                mask = [
                    not line.no_promotions and scope.matches(line.sku, product)
                    for line, product in zip(self.lines, self.products, strict=True)
                ]
            else:
                mask = [
                    not line.no_promotions and not keys.isdisjoint(wanted)
                    for line, keys in zip(self.lines, self.line_keys(), strict=True)
                ]
            self._masks[scope] = mask
        self._masks_by_id[id(scope)] = (scope, mask)
        return mask

    def line_keys(self) -> list[frozenset[tuple[str, str]]]:
        """What each line can be named by in a scope: its SKU, and its product's categories,
        brand and lists."""
        if self._keys is None:
            self._keys = [
                _line_keys(line.sku, product) for line, product in zip(self.lines, self.products, strict=True)
            ]
        return self._keys

    def whole_lines(self, mask: list[bool]) -> list[tuple[int, int, int]]:
        """The lines in `mask` sold by the unit, as (line index, position, units)."""
        known = self._whole.get(id(mask))
        if known is not None and known[0] is mask:
            return known[1]
        whole = [
            (index, line.position, line.quantity_milli // UNIT_MILLI)
            for index, (line, selected) in enumerate(zip(self.lines, mask, strict=True))
            if selected and not line.quantity_milli % UNIT_MILLI
        ]
        self._whole[id(mask)] = (mask, whole)
        return whole

    def base(self, discount_base: DiscountBase) -> list[int]:
        return self.original if discount_base is DiscountBase.ORIGINAL else self.current

    def apply(self, discounts: list[int]) -> None:
        # nothing off keeps the very list, so what was worked out on it stays known (_discounts)
        if any(discounts):
            self.current = [amount - discount for amount, discount in zip(self.current, discounts, strict=True)]


def _units(basket: _Basket, mask: list[bool], base: list[int]) -> list[tuple[int, int, int]]:
    """Every whole unit on the lines in `mask` as (unit price, position, line index), dearest
    first; a line's amount is split over its units with the remainder on its last unit.
    Lines sold by weight (a fractional quantity) have no units."""
    # built with the price negated so that a plain tuple sort orders them (dearest, then by
    # position, then by line: the order the lines were added in)
    units: list[tuple[int, int, int]] = []
    for index, position, count in basket.whole_lines(mask):
        share, remainder = divmod(base[index], count)
        units += [(-share, position, index)] * (count - 1)
        units.append((-share - remainder, position, index))
    units.sort()
    return [(-price, position, index) for price, position, index in units]


def _unit_discounts(size: int, basket: _Basket, units: list[tuple[int, int, int]], free: int, bps: int) -> list[int]:
    """Of each full group of `size` units (dearest first), the cheapest `free` get `bps` off."""
    discounts = [0] * len(basket.lines)
    for start in range(0, len(units) - size + 1, size):
        for price, _, index in units[start + size - free : start + size]:
            discounts[index] += scaled(price, bps)
    return discounts


MIN_PRICE_ATTRIBUTE = "min_price_minor"


def _minimum_amount(line: ReceiptLine, product: Product | None) -> int:
    """The least a line may cost after discounts: its product's `min_price_minor` catalogue
    attribute (a unit price) times the quantity, rounded up; 0 without one."""
    unit_price = product.attributes.get(MIN_PRICE_ATTRIBUTE) if product is not None else None
    if not isinstance(unit_price, int) or isinstance(unit_price, bool) or unit_price <= 0:
        return 0
    return -(-unit_price * line.quantity_milli // UNIT_MILLI)


def _room(basket: _Basket, mask: list[bool]) -> list[int]:
    """How much more each line in `mask` may be discounted: down to zero, or to its minimum price."""
    return [
        max(0, amount - minimum) if selected else 0
        for amount, minimum, selected in zip(basket.current, basket.minimum, mask, strict=True)
    ]


def _discounts(effect: DiscountEffect, basket: _Basket, discount_base: DiscountBase) -> list[int]:
    """The discount per line, never more than what a line in scope still costs (above its
    minimum price); worked out once per effect and amounts."""
    key = (id(effect), discount_base)
    known = basket.discounted.get(key)
    if known is not None and known[0] is effect and known[1] is basket.current:
        return known[2]
    discounts = _fresh_discounts(effect, basket, discount_base)
    basket.discounted[key] = (effect, basket.current, discounts)
    return discounts


def _fresh_discounts(effect: DiscountEffect, basket: _Basket, discount_base: DiscountBase) -> list[int]:
    mask = basket.in_scope(effect.scope)
    caps = _room(basket, mask)
    raw = _raw_discounts(effect, basket, discount_base, mask)
    if all(discount <= cap for discount, cap in zip(raw, caps, strict=True)):
        return raw
    # what does not fit on a line (an amount-off over a cheap line, a percentage of the
    # original amount) moves to other lines in scope so the rule's discount stays whole
    return spread_within(sum(raw), raw, caps)


def _raw_discounts(effect: DiscountEffect, basket: _Basket, discount_base: DiscountBase, mask: list[bool]) -> list[int]:
    base = basket.base(discount_base)
    weights = [amount if selected else 0 for amount, selected in zip(base, mask, strict=True)]
    if isinstance(effect, DiscountPercent):
        return spread(scaled(sum(weights), effect.basis_points), weights)
    if isinstance(effect, DiscountAmount):
        return spread(effect.amount_minor, weights)
    if isinstance(effect, DiscountPercentPerAmount):
        rate = min(sum(weights) // effect.per_minor * effect.basis_points, effect.max_basis_points)
        return spread(scaled(sum(weights), rate), weights)
    if isinstance(effect, NthLineDiscount):
        discounts = [0] * len(basket.lines)
        chosen = [index for index, selected in enumerate(mask) if selected]
        for index in chosen[effect.n - 1 :: effect.n]:
            discounts[index] = min(effect.amount_minor, basket.current[index])
        return discounts
    if isinstance(effect, SetPrice):
        return _set_discounts(effect, basket, mask)
    if isinstance(effect, FixedPrice):
        return [
            max(0, amount - (effect.unit_price_minor * line.quantity_milli + UNIT_MILLI // 2) // UNIT_MILLI)
            if selected
            else 0
            for amount, line, selected in zip(basket.current, basket.lines, mask, strict=True)
        ]
    units = _units(basket, mask, base)
    if isinstance(effect, BuyMPayN):
        return _unit_discounts(effect.buy, basket, units, effect.buy - effect.pay, BASIS_POINTS_DENOMINATOR)
    if isinstance(effect, NthItemDiscount):
        return _unit_discounts(effect.n, basket, units, 1, effect.basis_points)
    if len(units) < max(effect.min_units, 1):
        return [0] * len(basket.lines)
    return _unit_discounts(len(units), basket, units, 1, effect.basis_points)


def _set_discounts(effect: SetPrice, basket: _Basket, mask: list[bool]) -> list[int]:
    """Every whole set costs `price_minor`: the units making the sets are taken from the lines
    in position order, and what they cost over the price is spread over those lines pro rata
    to the part of each line's current amount they make."""
    needed: dict[str, int] = {}
    for sku in effect.skus:
        needed[sku] = needed.get(sku, 0) + 1
    whole = [
        line.quantity_milli // UNIT_MILLI if selected and not line.quantity_milli % UNIT_MILLI else 0
        for line, selected in zip(basket.lines, mask, strict=True)
    ]
    available: dict[str, int] = {}
    for line, units in zip(basket.lines, whole, strict=True):
        available[line.sku] = available.get(line.sku, 0) + units
    sets = min(available.get(sku, 0) // count for sku, count in needed.items())
    weights = [0] * len(basket.lines)
    if sets == 0:
        return weights
    wanted = {sku: count * sets for sku, count in needed.items()}
    for index, (line, units) in enumerate(zip(basket.lines, whole, strict=True)):
        used = min(units, wanted.get(line.sku, 0))
        if used:
            wanted[line.sku] -= used
            weights[index] = basket.current[index] * used // units
    return spread(max(0, sum(weights) - sets * effect.price_minor), weights)


def _points(effect: PointsEffect, basket: _Basket, earned: list[int]) -> list[int]:
    """The points per line; `earned` is what the other (non-multiplier) points effects gave."""
    if isinstance(effect, EarnFixedPoints):
        return spread(
            effect.amount,
            [
                amount if selected else 0
                for amount, selected in zip(basket.current, basket.in_scope(EVERYTHING), strict=True)
            ],
        )
    mask = basket.in_scope(effect.scope)
    if isinstance(effect, EarnPointsMultiplier):
        extra = effect.basis_points - BASIS_POINTS_DENOMINATOR
        return [scaled(points, extra) if selected else 0 for points, selected in zip(earned, mask, strict=True)]
    weights = [amount if selected else 0 for amount, selected in zip(basket.current, mask, strict=True)]
    if isinstance(effect, EarnPointsPercent):
        return spread(scaled(sum(weights), effect.basis_points), weights)
    if isinstance(effect, EarnPointsPerAmount):
        return spread(sum(weights) // effect.per_minor * effect.points, weights)
    if isinstance(effect, EarnPointsPerUnits):
        quantity_milli = sum(line.quantity_milli for line, selected in zip(basket.lines, mask, strict=True) if selected)
        return spread(quantity_milli // (effect.units * UNIT_MILLI) * effect.points, weights)
    points = [0] * len(basket.lines)
    if isinstance(effect, EarnPointsNthLine):
        chosen = [index for index, selected in enumerate(mask) if selected]
        for index in chosen[effect.n - 1 :: effect.n] if effect.every else chosen[effect.n - 1 : effect.n]:
            points[index] = scaled(basket.current[index], effect.basis_points)
        return points
    units = _units(basket, mask, basket.current)
    if units:
        price, _, index = units[-1]
        points[index] = scaled(price, effect.basis_points)
    return points


@dataclass
class _Pick:
    """A rule chosen to apply; its points are known only once every discount is made."""

    source: tuple[str, int, str, str]  # campaign id, version, rule id, receipt text
    effect: Effect
    discounts: list[int]
    coupon_code: str = ""
    points: list[int] = field(default_factory=list)


def _earned(picks: Sequence[_Pick], basket: _Basket) -> list[int]:
    """What the non-multiplier points effects among `picks` earn per line on the basket as it stands."""
    earned = [0] * len(basket.lines)
    for pick in picks:
        if isinstance(pick.effect, POINTS_EFFECTS) and not isinstance(pick.effect, EarnPointsMultiplier):
            earned = [a + b for a, b in zip(earned, _points(pick.effect, basket, earned), strict=True)]
    return earned


def _final_points(picks: Sequence[_Pick], basket: _Basket) -> list[int]:
    """Sets the points of every points pick on the final basket and answers their sum per line.
    A multiplier works on what the other points effects earned, so two multipliers never
    compound: the others are worked out first (once), then the multipliers on their sum."""
    earned = [0] * len(basket.lines)
    for pick in picks:
        if isinstance(pick.effect, POINTS_EFFECTS) and not isinstance(pick.effect, EarnPointsMultiplier):
            pick.points = _points(pick.effect, basket, earned)
            earned = [a + b for a, b in zip(earned, pick.points, strict=True)]
    points = earned
    for pick in picks:
        if isinstance(pick.effect, EarnPointsMultiplier):
            pick.points = _points(pick.effect, basket, earned)
            points = [a + b for a, b in zip(points, pick.points, strict=True)]
    return points


def _worth(effect: Effect, basket: _Basket, discount_base: DiscountBase, picks: Sequence[_Pick]) -> int:
    """What a rule gives the customer on the basket as it stands (a point counts as a minor unit);
    a multiplier is worth its share of what the rules picked so far earn."""
    if isinstance(effect, POINTS_EFFECTS):
        earned = _earned(picks, basket) if isinstance(effect, EarnPointsMultiplier) else []
        return sum(_points(effect, basket, earned))
    if isinstance(effect, RedemptionCap | IssueCoupon | AwardBadge | IncrementCounter):
        return 0
    return sum(_discounts(effect, basket, discount_base))


def _coupon_discounts(benefit: CouponBenefit, basket: _Basket) -> list[int] | None:
    """The coupon's discount per line; None when it does not apply to this receipt."""
    mask = basket.in_scope(benefit.scope)
    eligible = [amount if selected else 0 for amount, selected in zip(basket.current, mask, strict=True)]
    if sum(basket.current) < benefit.min_receipt_total_minor or not any(eligible):
        return None
    if benefit.percent_off_basis_points:
        # spread_within keeps every line at or above its minimum price
        return spread_within(scaled(sum(eligible), benefit.percent_off_basis_points), eligible, _room(basket, mask))
    if benefit.amount_off_minor:
        return spread_within(benefit.amount_off_minor, eligible, _room(basket, mask))
    if benefit.fixed_price_minor is not None:
        return _discounts(FixedPrice(benefit.fixed_price_minor, benefit.scope), basket, DiscountBase.DISCOUNTED)
    if benefit.gift_sku:
        gifts = _units(
            basket,
            [selected and line.sku == benefit.gift_sku for line, selected in zip(basket.lines, mask, strict=True)],
            basket.current,
        )
        if not gifts:
            return None
        discounts = [0] * len(basket.lines)
        price, _, index = gifts[-1]
        discounts[index] = price
        return discounts
    return [0] * len(basket.lines)


def points_lots(picks: Sequence[_Pick], moment: datetime) -> list[LotOutcome]:
    """The points the applied rules earned, grouped by their effects' lot parameters."""
    totals: dict[PointsLot, int] = {}
    for pick in picks:
        earned: int = sum(pick.points)
        if earned and isinstance(pick.effect, POINTS_EFFECTS):
            totals[pick.effect.lot] = totals.get(pick.effect.lot, 0) + earned
    return [
        LotOutcome(
            points,
            lot,
            moment + timedelta(days=lot.activation_delay_days) if lot.activation_delay_days else None,
        )
        for lot, points in totals.items()
    ]


class _Evaluator:
    def __init__(
        self,
        receipt: Receipt,
        subject: Subject,
        coupons: Sequence[PresentedCoupon],
        catalogue: Catalogue,
        local: datetime,
        with_lines: bool,
        refusals: Mapping[str, str],
        counters_read: set[str],
    ) -> None:
        self.counters_read = counters_read
        self.refusals = refusals
        self.receipt = receipt
        self.local = local
        self.subject = subject
        self.coupons = coupons
        self.basket = _Basket(receipt, catalogue)
        self.catalogue = catalogue
        self.with_lines = with_lines
        # what the conditions about to run may read (set once the live campaigns are known)
        self.reads: Reads | None = None
        self._variables: cel.Context | None = None
        # each condition text's outcome on this receipt: whether it holds, or why it failed
        self._outcomes: dict[str, bool | str] = {}
        self.picks: list[_Pick] = []
        self.skipped: list[tuple[str, str]] = []

    def admits(self, campaign: Campaign) -> bool:
        """Whether the campaign is live and its scope admits the receipt; a published
        campaign out of scope is explained, a draft or one out of its period is not."""
        if not campaign.is_live_at(self.receipt.time):
            return False
        refusal = (
            "the campaign runs on member registration, not on receipts"
            if campaign.trigger is not CampaignTrigger.RECEIPT
            else self.refusals.get(campaign.campaign_id)
        )
        refusal = refusal or campaign.scope.refusal(self.receipt, self.subject, self.local)
        if refusal is not None:
            self.skipped.append((campaign.campaign_id, refusal))
        return refusal is None

    def variables(self) -> cel.Context:
        """The conditions' variables, converted to CEL once per receipt (not per condition),
        and only if some condition is to run."""
        if self._variables is None:
            facts = activation(
                self.receipt,
                self.subject,
                self.coupons,
                self.catalogue,
                self.local,
                self.with_lines,
                self.counters_read,
                self.reads,
            )
            self._variables = cel.Context(variables=facts)
        return self._variables

    def outcome(self, program: cel.Program) -> bool | str:
        """Whether a condition holds on this receipt, or why it could not be decided. A
        condition is a pure function of the variables, so a text several rules share runs
        once per receipt."""
        outcome = self._outcomes.get(program.source)
        if outcome is None:
            try:
                outcome = _holds(program, self.variables())
            except ConditionError as error:
                outcome = str(error)
            self._outcomes[program.source] = outcome
        return outcome

    def holds(self, program: cel.Program | None, subject_id: str) -> bool:
        outcome = True if program is None else self.outcome(program)
        if outcome is True:
            return True
        self.skipped.append((subject_id, "condition is false" if outcome is False else f"condition failed: {outcome}"))
        return False

    def candidates(self, group: CompiledGroup) -> list[CompiledRule]:
        """The rules of a group whose conditions hold and that can give something."""
        if not self.holds(group.program, group.group.group_id):
            return []
        chosen = []
        for compiled in group.rules:
            rule = compiled.rule
            if not self.holds(compiled.program, rule.rule_id):
                continue
            if isinstance(rule.effect, POINTS_EFFECTS) and not self.subject.member_id:
                self.skipped.append((rule.rule_id, "anonymous receipts earn no points"))
                continue
            if isinstance(rule.effect, IssueCoupon | AwardBadge) and not self.subject.member_id:
                self.skipped.append((rule.rule_id, "anonymous receipts get no coupons or badges"))
                continue
            if isinstance(rule.effect, IncrementCounter) and not self.subject.member_id:
                self.skipped.append((rule.rule_id, "anonymous receipts keep no counters"))
                continue
            chosen.append(compiled)
        return chosen

    def apply(self, campaign: Campaign, group: RuleGroup, rule: Rule) -> None:
        discounts = [0] * len(self.basket.lines)
        if isinstance(rule.effect, DISCOUNT_EFFECTS):
            discounts = _discounts(rule.effect, self.basket, group.discount_base)
            self.basket.apply(discounts)
        source = (campaign.campaign_id, campaign.version, rule.rule_id, rule.receipt_text)
        self.picks.append(_Pick(source, rule.effect, discounts))

    def run_group(self, campaign: Campaign, compiled: CompiledGroup, rules: list[CompiledRule]) -> None:
        group = compiled.group
        if group.mode is GroupMode.FIRST:
            rules, passed = rules[:1], rules[1:]
            self.skipped.extend((r.rule.rule_id, f"group {group.group_id}: an earlier rule applied") for r in passed)
        elif group.mode is GroupMode.BEST and len(rules) > 1:  # a lone rule is the best unweighed
            best = max(rules, key=lambda r: _worth(r.rule.effect, self.basket, group.discount_base, self.picks))
            self.skipped.extend(
                (r.rule.rule_id, f"group {group.group_id}: {best.rule.rule_id} is worth more")
                for r in rules
                if r is not best
            )
            rules = [best]
        for compiled_rule in rules:
            self.apply(campaign, group, compiled_rule.rule)

    def run_coupons(self) -> list[str]:
        unused = []
        for coupon in self.coupons:
            benefit = coupon.benefit
            discounts = _coupon_discounts(benefit, self.basket)
            if discounts is None or (benefit.points and not self.subject.member_id):
                unused.append(coupon.code)
                continue
            self.basket.apply(discounts)
            effect: Effect = EarnFixedPoints(benefit.points) if benefit.points else DiscountAmount(sum(discounts))
            self.picks.append(_Pick((coupon.campaign_id, 0, "", ""), effect, discounts, coupon.code))
        return unused


def evaluate(
    receipt: Receipt,
    subject: Subject,
    campaigns: list[CompiledCampaign],
    coupons: Sequence[PresentedCoupon] = (),
    catalogue: Catalogue = NO_CATALOGUE,
    default_cap_basis_points: int = 0,
    time_zone: tzinfo = UTC,
    refusals: Mapping[str, str] | None = None,
) -> Evaluation:
    """Evaluates a receipt against the compiled campaigns live at its time (module docstring).
    `refusals` names campaigns to skip and why (a spent budget, uses per member reached).

    Lines are worked on in position order, so the outcome does not depend on the order the
    register sent them in; it is answered in the receipt's order."""
    canonical = dataclasses.replace(receipt, lines=tuple(sorted(receipt.lines, key=lambda line: line.position)))
    moment = receipt.time if receipt.time.tzinfo else receipt.time.replace(tzinfo=UTC)
    with_lines = any(compiled.mentions("lines") for compiled in campaigns)
    counters_read = set().union(*(compiled.counters for compiled in campaigns))
    evaluator = _Evaluator(
        canonical, subject, coupons, catalogue, moment.astimezone(time_zone), with_lines, refusals or {}, counters_read
    )
    live = [compiled for compiled in campaigns if evaluator.admits(compiled.campaign)]
    # receipt.lines is most of the work of converting the variables to CEL: it is left out
    # unless a condition about to run may read it
    evaluator.with_lines = with_lines and any(compiled.reads_lines for compiled in live)
    reads = NOTHING_READ
    for compiled in live:
        reads |= compiled.reads
    evaluator.reads = reads
    ordered = sorted(
        ((group.group.priority, compiled.campaign.campaign_id, index), compiled.campaign, group)
        for compiled in live
        for index, group in enumerate(compiled.groups)
    )
    candidates = [(campaign, group, evaluator.candidates(group)) for _, campaign, group in ordered]
    exclusive = next(
        (group for _, group, rules in candidates if group.group.mode is GroupMode.EXCLUSIVE and rules), None
    )
    for campaign, group, rules in candidates:
        if exclusive is not None and group is not exclusive:
            displaced_by = f"displaced by exclusive group {exclusive.group.group_id}"
            evaluator.skipped.extend((r.rule.rule_id, displaced_by) for r in rules)
            continue
        evaluator.run_group(campaign, group, rules)
    unused = evaluator.run_coupons()

    basket = evaluator.basket
    points = _final_points(evaluator.picks, basket)
    cap = next((pick.effect for pick in evaluator.picks if isinstance(pick.effect, RedemptionCap)), None)
    payable = redemption_cap(basket, cap or RedemptionCap(basis_points=default_cap_basis_points))
    outcomes = {
        line.position: LineOutcome(line.position, original - final, final, line_points, line_payable)
        for line, original, final, line_points, line_payable in zip(
            canonical.lines, basket.original, basket.current, points, payable, strict=True
        )
    }
    return Evaluation(
        lines=[outcomes[line.position] for line in receipt.lines],
        applied=[
            Applied(
                pick.source[0],
                pick.source[1],
                pick.source[2],
                pick.source[3],
                sum(pick.points),
                sum(pick.discounts),
                pick.coupon_code,
                pick.effect.series_id if isinstance(pick.effect, IssueCoupon) else "",
                pick.effect.badge_id if isinstance(pick.effect, AwardBadge) else "",
            )
            for pick in evaluator.picks
        ],
        skipped=evaluator.skipped,
        unused_coupon_codes=unused,
        lots=points_lots(evaluator.picks, moment),
    )


def redemption_cap(basket: _Basket, cap: RedemptionCap) -> list[int]:
    """The most of each line's final amount payable with points."""
    eligible = [
        amount if selected else 0 for amount, selected in zip(basket.current, basket.in_scope(EVERYTHING), strict=True)
    ]
    if cap.all_but_minor is not None:
        return spread_within(max(0, sum(eligible) - cap.all_but_minor), eligible, eligible)
    return [scaled(amount, cap.basis_points or 0) for amount in eligible]


@dataclass(frozen=True)
class Explanation:
    """Why one rule did or did not apply (a simulation's answer)."""

    campaign_id: str
    group_id: str
    rule_id: str
    rule_name: str
    applied: bool
    reason: str
    discount_minor: int
    points: int


def explain(campaigns: Sequence[CompiledCampaign], evaluation: Evaluation, moment: datetime) -> list[Explanation]:
    """An explanation for every rule of `campaigns`, in evaluation order, from what
    `evaluate` recorded: the rule's own outcome, else its group's, else its campaign's."""
    applied = {entry.rule_id: entry for entry in evaluation.applied if entry.rule_id}
    reasons = dict(reversed(evaluation.skipped))  # the first reason recorded for an id wins
    explanations = []
    for compiled in sorted(campaigns, key=lambda compiled: compiled.campaign.campaign_id):
        campaign = compiled.campaign
        for group in sorted(compiled.groups, key=lambda group: group.group.priority):
            for compiled_rule in group.rules:
                rule = compiled_rule.rule
                entry = applied.get(rule.rule_id)
                if entry is not None:
                    reason = ""
                elif not campaign.is_live_at(moment):
                    reason = "the campaign is not live at the receipt's time"
                else:
                    reason = (
                        reasons.get(rule.rule_id)
                        or reasons.get(group.group.group_id)
                        or reasons.get(campaign.campaign_id)
                        or "not evaluated"
                    )
                    if reason == "condition is false" and rule.rule_id in reasons:
                        reason = f"condition is false: {rule.condition}"
                    elif reason == "condition is false":
                        reason = f"the group's condition is false: {group.group.condition}"
                explanations.append(
                    Explanation(
                        campaign.campaign_id,
                        group.group.group_id,
                        rule.rule_id,
                        rule.name,
                        entry is not None,
                        reason,
                        entry.discount_minor if entry else 0,
                        entry.points if entry else 0,
                    )
                )
    return explanations


def limit_refusals(
    campaigns: Sequence[CompiledCampaign], usage: Mapping[str, CampaignUsage], member_uses: Mapping[str, int]
) -> dict[str, str]:
    """The campaigns whose budget is spent or whose uses by this member are reached, and why."""
    refusals = {}
    for compiled in campaigns:
        campaign = compiled.campaign
        refusal = campaign.limits.refusal(
            usage.get(campaign.campaign_id, CampaignUsage()), member_uses.get(campaign.campaign_id, 0)
        )
        if refusal is not None:
            refusals[campaign.campaign_id] = refusal
    return refusals


def triggered_rules(
    campaigns: Sequence[CompiledCampaign], trigger: CampaignTrigger, subject: Subject, moment: datetime
) -> list[tuple[Campaign, Rule]]:
    """The rules an event (`trigger`) fires for `subject`: those of the campaigns live at `moment`
    with that trigger, in scope (segments, tiers), whose conditions hold over the member and an
    empty receipt."""
    empty = Receipt(store_id="", terminal_id="", channel="", time=moment, currency_code="", lines=())
    variables: cel.Context | None = None
    fired = []
    for compiled in sorted(campaigns, key=lambda compiled: compiled.campaign.campaign_id):
        campaign = compiled.campaign
        if campaign.trigger is not trigger or not campaign.is_live_at(moment):
            continue
        if campaign.scope.refusal(empty, subject, moment) is not None:
            continue
        for compiled_rule in compiled.rules:
            if compiled_rule.program is not None:
                if variables is None:
                    variables = cel.Context(variables=activation(empty, subject, (), NO_CATALOGUE, moment, False))
                try:
                    if not _holds(compiled_rule.program, variables):
                        continue
                except ConditionError:
                    continue  # a condition that cannot be decided gives nothing, as on a receipt
            fired.append((campaign, compiled_rule.rule))
    return fired


@dataclass(frozen=True)
class Grant:
    """A reward to hand out through another service, once: `request_id` is derived from the
    event that earned it, so a redelivered event asks again with the same key."""

    request_id: str
    member_id: str
    campaign_id: str
    rule_id: str
    effect: EarnFixedPoints | IssueCoupon | AwardBadge
    reason: str


def grants_for(
    event_id: str, member_id: str, fired: Sequence[tuple[str, Rule]], kinds: tuple[type, ...] = TRIGGERED_EFFECTS
) -> list[Grant]:
    """What `fired` rules (campaign id, rule) hand out to `member_id` for the event `event_id`:
    the rules whose effect is one of `kinds` (on a receipt only coupons and badges, since the
    gateway credits the receipt's points itself; on a trigger fixed points too)."""
    names = {EarnFixedPoints: "points", IssueCoupon: "coupon", AwardBadge: "badge"}
    return [
        Grant(
            f"rules:{event_id}:{rule.rule_id}:{names[type(rule.effect)]}",
            member_id,
            campaign_id,
            rule.rule_id,
            rule.effect,
            rule.name or rule.rule_id,
        )
        for campaign_id, rule in fired
        # the second test only narrows the type: `kinds` is a subset of these three
        if member_id and isinstance(rule.effect, kinds) and isinstance(rule.effect, TRIGGERED_EFFECTS)
    ]


class ConflictKind(StrEnum):
    """What publication checks for (docs/rules.md, "Checks on publish"); the values are stable."""

    EXCLUSIVE_OVERLAP = "EXCLUSIVE_OVERLAP"
    UNREACHABLE_RULE = "UNREACHABLE_RULE"
    DISCOUNT_OVER_100_PERCENT = "DISCOUNT_OVER_100_PERCENT"


@dataclass(frozen=True)
class Conflict:
    kind: ConflictKind
    subject_id: str  # the group or rule of the campaign being published
    other_campaign_id: str
    description: str


def periods_overlap(a: Campaign, b: Campaign) -> bool:
    """Whether two campaigns' periods (start inclusive, end exclusive, None open) share a moment."""
    return (a.end_at is None or b.start_at is None or b.start_at < a.end_at) and (
        b.end_at is None or a.start_at is None or a.start_at < b.end_at
    )


def scopes_overlap(a: CampaignScope, b: CampaignScope) -> bool:
    """Whether some receipt may fall in both scopes: every restriction both set shares a value
    (segments are not compared: one member can be in many segments)."""
    pairs: tuple[tuple[tuple[Any, ...], tuple[Any, ...]], ...] = (
        (a.tiers, b.tiers),
        (a.store_ids, b.store_ids),
        (a.channels, b.channels),
        (a.weekdays, b.weekdays),
        (a.days_of_month, b.days_of_month),
        (a.hours, b.hours),
    )
    return all(not mine or not theirs or set(mine) & set(theirs) for mine, theirs in pairs)


def _always(condition: str) -> bool:
    return condition.strip() in ("", "true")


def publication_conflicts(campaign: Campaign, others: Sequence[Campaign]) -> list[Conflict]:
    """What makes a campaign about to be published misbehave: an exclusive group that may meet
    another campaign's exclusive group on the same receipts (only one can win, by priority),
    rules a FIRST group can never reach behind an always-true rule, and percentages of the
    original amount adding up to more than 100% in one group on one scope."""
    conflicts: list[Conflict] = []
    groups = campaign.all_groups()
    exclusive = [group for group in groups if group.mode is GroupMode.EXCLUSIVE]
    for group in exclusive[1:]:
        conflicts.append(
            Conflict(
                ConflictKind.EXCLUSIVE_OVERLAP,
                group.group_id,
                campaign.campaign_id,
                f"the campaign has more than one exclusive group: {exclusive[0].group_id} and {group.group_id}",
            )
        )
    if exclusive:
        for other in others:
            if (
                other.campaign_id != campaign.campaign_id
                and any(group.mode is GroupMode.EXCLUSIVE for group in other.all_groups())
                and periods_overlap(campaign, other)
                and scopes_overlap(campaign.scope, other.scope)
            ):
                conflicts.append(
                    Conflict(
                        ConflictKind.EXCLUSIVE_OVERLAP,
                        exclusive[0].group_id,
                        other.campaign_id,
                        f"campaign {other.campaign_id} also has an exclusive group over the same period and scope",
                    )
                )
    for group in groups:
        ordered = _by_priority(group.rules)
        if group.mode is GroupMode.FIRST:
            blocker = next((rule for rule in ordered[:-1] if _always(rule.condition)), None)
            if blocker is not None:
                conflicts.extend(
                    Conflict(
                        ConflictKind.UNREACHABLE_RULE,
                        rule.rule_id,
                        "",
                        f"never applies: rule {blocker.rule_id} comes first in FIRST group and always holds",
                    )
                    for rule in ordered[ordered.index(blocker) + 1 :]
                )
        if group.discount_base is DiscountBase.ORIGINAL and group.mode in (GroupMode.ALL, GroupMode.EXCLUSIVE):
            by_scope: dict[Scope, list[Rule]] = {}
            for rule in ordered:
                if isinstance(rule.effect, DiscountPercent):
                    by_scope.setdefault(rule.effect.scope, []).append(rule)
            for rules in by_scope.values():
                total = sum(rule.effect.basis_points for rule in rules if isinstance(rule.effect, DiscountPercent))
                if total > BASIS_POINTS_DENOMINATOR:
                    conflicts.append(
                        Conflict(
                            ConflictKind.DISCOUNT_OVER_100_PERCENT,
                            rules[-1].rule_id,
                            "",
                            f"rules {', '.join(rule.rule_id for rule in rules)} take {total / 100:g}% "
                            "of the original amount on the same lines",
                        )
                    )
    return conflicts
