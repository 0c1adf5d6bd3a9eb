"""Campaigns and rules as stored; the only module here that speaks SQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    and_,
    delete,
    func,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.inbox import define_inbox_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime
from services.rules.domain import (
    EVERYONE,
    MAX_CONDITION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_RECEIPT_TEXT_LENGTH,
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
    ExpiryRounding,
    FixedPrice,
    GroupMode,
    IncrementCounter,
    IssueCoupon,
    NthItemDiscount,
    NthLineDiscount,
    PointsLot,
    Product,
    ProductList,
    ProductRecord,
    Purchase,
    RedemptionCap,
    Rule,
    RuleGroup,
    Scope,
    SetPrice,
    category_path,
    given_back,
)


class Base(DeclarativeBase):
    pass


class CampaignRow(Base):
    __tablename__ = "campaigns"

    campaign_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    status: Mapped[str] = mapped_column(String(16), index=True)
    start_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    end_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # When the campaign was last published, paused, resumed or ended.
    status_changed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The campaign's scope (who, where, when); NULL for no restriction.
    scope: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Limits (CampaignLimits); 0 is no limit.
    discount_budget_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    points_budget: Mapped[int] = mapped_column(BigInteger, server_default="0")
    max_uses_per_member: Mapped[int] = mapped_column(Integer, server_default="0")
    # What runs the rules (CampaignTrigger).
    trigger: Mapped[str] = mapped_column(String(32), server_default=CampaignTrigger.RECEIPT.value)
    rules: Mapped[list[RuleRow]] = relationship(order_by="RuleRow.position", cascade="all, delete-orphan")
    groups: Mapped[list[RuleGroupRow]] = relationship(order_by="RuleGroupRow.position", cascade="all, delete-orphan")


class RuleGroupRow(Base):
    __tablename__ = "rule_groups"

    group_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(
        ForeignKey("campaigns.campaign_id", name="fk_rule_groups_campaign_id"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    mode: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    condition: Mapped[str] = mapped_column(String(MAX_CONDITION_LENGTH))
    discount_base: Mapped[str] = mapped_column(String(16))


class RuleRow(Base):
    __tablename__ = "rules"

    rule_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    condition: Mapped[str] = mapped_column(String(MAX_CONDITION_LENGTH))
    effect: Mapped[dict[str, Any]] = mapped_column(JSON)
    receipt_text: Mapped[str] = mapped_column(String(MAX_RECEIPT_TEXT_LENGTH))
    priority: Mapped[int] = mapped_column(Integer)
    # The group the rule belongs to (a rule_groups row of the same campaign); empty for the
    # campaign's default group. No foreign key: the rows of one campaign are written together.
    group_id: Mapped[str] = mapped_column(String(36), server_default="")


class CategoryRow(Base):
    __tablename__ = "categories"

    category_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # No foreign key: the service checks the parent exists and makes no cycle.
    parent_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))


class BrandRow(Base):
    __tablename__ = "brands"

    brand_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))


class ProductRow(Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    price_minor: Mapped[int] = mapped_column(BigInteger)
    category_id: Mapped[str] = mapped_column(String(64))
    brand_id: Mapped[str] = mapped_column(String(64))
    own_brand: Mapped[bool] = mapped_column(Boolean)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON)


class ProductListRow(Base):
    __tablename__ = "product_lists"

    list_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))


class ProductListItemRow(Base):
    __tablename__ = "product_list_items"

    list_id: Mapped[str] = mapped_column(
        ForeignKey("product_lists.list_id", name="fk_product_list_items_list_id"), primary_key=True
    )
    sku: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class StoreRow(Base):
    __tablename__ = "stores"

    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    time_zone: Mapped[str] = mapped_column(String(64))


class MemberPurchaseRow(Base):
    """A member's committed receipt or return, as the gateway announced it; one row per event,
    so a redelivered event changes nothing."""

    __tablename__ = "member_purchases"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64), index=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime())
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    is_return: Mapped[bool] = mapped_column(Boolean)


class CampaignUsageRow(Base):
    """What a campaign's rules gave on committed receipts, counted once per cheque.committed
    event (the inbox keeps a redelivery from counting twice)."""

    __tablename__ = "campaign_usage"

    campaign_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    discount_minor: Mapped[int] = mapped_column(BigInteger)
    points: Mapped[int] = mapped_column(BigInteger)
    receipts: Mapped[int] = mapped_column(BigInteger)
    coupons_issued: Mapped[int] = mapped_column(BigInteger, server_default="0")


class CampaignMemberUseRow(Base):
    """How many committed receipts of a member a campaign applied to."""

    __tablename__ = "campaign_member_uses"

    member_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer)


class MemberCounterRow(Base):
    """A member's counter as the committed receipts (less the wholly returned ones) left it."""

    __tablename__ = "member_counters"

    member_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class CounterReceiptRow(Base):
    """What a committed receipt added to its member's counters, so that returning the whole
    receipt takes exactly that back, once."""

    __tablename__ = "counter_receipts"

    receipt_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64))
    changes: Mapped[dict[str, int]] = mapped_column(JSON)
    paid_minor: Mapped[int] = mapped_column(BigInteger)
    returned_minor: Mapped[int] = mapped_column(BigInteger)
    reverted: Mapped[bool] = mapped_column(Boolean)


class CampaignReceiptRow(Base):
    """What a committed receipt took of a campaign's budgets, so that its returns give it back
    pro rata (and the use, once the whole receipt is returned), exactly once."""

    __tablename__ = "campaign_receipts"

    receipt_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64))
    discount_minor: Mapped[int] = mapped_column(BigInteger)
    points: Mapped[int] = mapped_column(BigInteger)
    paid_minor: Mapped[int] = mapped_column(BigInteger)
    returned_minor: Mapped[int] = mapped_column(BigInteger)
    # what the returns have given back so far, and whether the use is given back
    discount_given_back: Mapped[int] = mapped_column(BigInteger)
    points_given_back: Mapped[int] = mapped_column(BigInteger)
    reverted: Mapped[bool] = mapped_column(Boolean)


class CatalogueVersionRow(Base):
    """One row counting catalogue changes, so every replica knows when its cache is stale."""

    __tablename__ = "catalogue_version"

    singleton: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


_WITH_RULES = (selectinload(CampaignRow.rules), selectinload(CampaignRow.groups))
outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)
inbox = define_inbox_table(Base.metadata)


_EFFECT_KINDS: dict[str, type[Effect]] = {
    "earn_points_percent": EarnPointsPercent,
    "earn_fixed_points": EarnFixedPoints,
    "earn_points_per_amount": EarnPointsPerAmount,
    "earn_points_cheapest_item": EarnPointsCheapestItem,
    "earn_points_nth_line": EarnPointsNthLine,
    "earn_points_multiplier": EarnPointsMultiplier,
    "discount_percent": DiscountPercent,
    "discount_amount": DiscountAmount,
    "fixed_price": FixedPrice,
    "buy_m_pay_n": BuyMPayN,
    "nth_item_discount": NthItemDiscount,
    "cheapest_item_discount": CheapestItemDiscount,
    "redemption_cap": RedemptionCap,
    "issue_coupon": IssueCoupon,
    "award_badge": AwardBadge,
    "increment_counter": IncrementCounter,
    "earn_points_per_units": EarnPointsPerUnits,
    "set_price": SetPrice,
    "nth_line_discount": NthLineDiscount,
    "discount_percent_per_amount": DiscountPercentPerAmount,
}
_EFFECT_NAMES = {kind: name for name, kind in _EFFECT_KINDS.items()}


def _effect_to_json(effect: Effect) -> dict[str, Any]:
    data = {"kind": _EFFECT_NAMES[type(effect)], **dataclasses.asdict(effect)}
    lot = data.get("lot")
    if lot is not None and lot["expire_time"] is not None:
        lot["expire_time"] = lot["expire_time"].isoformat()
    return data


def _scope_from_json(data: dict[str, Any]) -> Scope:
    return Scope(
        skus=tuple(data.get("skus", ())),
        category_ids=tuple(data.get("category_ids", ())),
        brand_ids=tuple(data.get("brand_ids", ())),
        product_list_ids=tuple(data.get("product_list_ids", ())),
        own_brand=data.get("own_brand", False),
        attributes=tuple((name, value) for name, value in data.get("attributes", ())),
    )


def _effect_from_json(data: dict[str, Any]) -> Effect:
    """The effect of a stored rule; rules stored before an effect had lot parameters read
    with the default lot."""
    fields = {name: value for name, value in data.items() if name != "kind"}
    if "scope" in fields:
        fields["scope"] = _scope_from_json(fields["scope"])
    if "skus" in fields:
        fields["skus"] = tuple(fields["skus"])
    if "lot" in fields:
        lot = fields["lot"]
        expire_time = lot.get("expire_time")
        fields["lot"] = PointsLot(
            activation_delay_days=lot.get("activation_delay_days", 0),
            expire_time=datetime.fromisoformat(expire_time) if expire_time else None,
            lifetime_days=lot.get("lifetime_days", 0),
            expiry_rounding=ExpiryRounding(lot.get("expiry_rounding", "")),
            currency=lot.get("currency", ""),
        )
    return _EFFECT_KINDS[data["kind"]](**fields)


def _rule_to_domain(row: RuleRow) -> Rule:
    return Rule(row.rule_id, row.name, row.condition, _effect_from_json(row.effect), row.receipt_text, row.priority)


def _to_domain(row: CampaignRow) -> Campaign:
    return Campaign(
        campaign_id=row.campaign_id,
        name=row.name,
        status=CampaignStatus(row.status),
        start_at=row.start_at,
        end_at=row.end_at,
        version=row.version,
        rules=tuple(_rule_to_domain(rule) for rule in row.rules if not rule.group_id),
        scope=CampaignScope(**{name: tuple(values) for name, values in (row.scope or {}).items()}),
        groups=tuple(
            RuleGroup(
                group.group_id,
                group.name,
                GroupMode(group.mode),
                group.priority,
                group.condition,
                DiscountBase(group.discount_base),
                tuple(_rule_to_domain(rule) for rule in row.rules if rule.group_id == group.group_id),
            )
            for group in row.groups
        ),
        limits=CampaignLimits(row.discount_budget_minor, row.points_budget, row.max_uses_per_member),
        trigger=CampaignTrigger(row.trigger),
    )


def _rule_row(rule: Rule, position: int, group_id: str) -> RuleRow:
    return RuleRow(
        rule_id=rule.rule_id,
        position=position,
        name=rule.name,
        condition=rule.condition,
        effect=_effect_to_json(rule.effect),
        receipt_text=rule.receipt_text,
        priority=rule.priority,
        group_id=group_id,
    )


def _rule_rows(campaign: Campaign) -> list[RuleRow]:
    grouped = [(rule, "") for rule in campaign.rules] + [
        (rule, group.group_id) for group in campaign.groups for rule in group.rules
    ]
    return [_rule_row(rule, position, group_id) for position, (rule, group_id) in enumerate(grouped)]


def _group_rows(campaign: Campaign) -> list[RuleGroupRow]:
    return [
        RuleGroupRow(
            group_id=group.group_id,
            position=position,
            name=group.name,
            mode=group.mode.value,
            priority=group.priority,
            condition=group.condition,
            discount_base=group.discount_base.value,
        )
        for position, group in enumerate(campaign.groups)
    ]


async def add_campaign(session: AsyncSession, campaign: Campaign, now: datetime) -> None:
    session.add(
        CampaignRow(
            campaign_id=campaign.campaign_id,
            name=campaign.name,
            status=campaign.status.value,
            start_at=campaign.start_at,
            end_at=campaign.end_at,
            version=campaign.version,
            created_at=now,
            scope=None if campaign.scope == EVERYONE else dataclasses.asdict(campaign.scope),
            discount_budget_minor=campaign.limits.discount_budget_minor,
            points_budget=campaign.limits.points_budget,
            max_uses_per_member=campaign.limits.max_uses_per_member,
            trigger=campaign.trigger.value,
            rules=_rule_rows(campaign),
            groups=_group_rows(campaign),
        )
    )
    await session.flush()


async def find_campaign(session: AsyncSession, campaign_id: str, for_update: bool = False) -> Campaign | None:
    query = select(CampaignRow).options(*_WITH_RULES).where(CampaignRow.campaign_id == campaign_id)
    if for_update:
        query = query.with_for_update()
    row = await session.scalar(query)
    return _to_domain(row) if row else None


async def mark_published(session: AsyncSession, campaign_id: str, version: int, now: datetime) -> None:
    row = await session.get_one(CampaignRow, campaign_id)
    row.status = CampaignStatus.ACTIVE.value
    row.version = version
    row.published_at = now
    row.status_changed_at = now
    await session.flush()


async def set_status(session: AsyncSession, campaign_id: str, status: CampaignStatus, now: datetime) -> None:
    row = await session.get_one(CampaignRow, campaign_id)
    row.status = status.value
    row.status_changed_at = now
    await session.flush()


async def replace_draft(session: AsyncSession, campaign: Campaign, replace_rules: bool) -> None:
    """Writes a draft's edited fields over its row; its rules and groups are replaced by new
    rows only when `replace_rules` (their ids are new, so nothing collides)."""
    row = await session.scalar(
        select(CampaignRow).options(*_WITH_RULES).where(CampaignRow.campaign_id == campaign.campaign_id)
    )
    assert row is not None  # the service found and locked it in this transaction
    row.name = campaign.name
    row.start_at = campaign.start_at
    row.end_at = campaign.end_at
    row.scope = None if campaign.scope == EVERYONE else dataclasses.asdict(campaign.scope)
    row.discount_budget_minor = campaign.limits.discount_budget_minor
    row.points_budget = campaign.limits.points_budget
    row.max_uses_per_member = campaign.limits.max_uses_per_member
    row.trigger = campaign.trigger.value
    if replace_rules:
        row.rules = _rule_rows(campaign)
        row.groups = _group_rows(campaign)
    await session.flush()


async def list_campaigns(
    session: AsyncSession,
    limit: int,
    after: Cursor | None,
    statuses: Collection[CampaignStatus],
    scheduled: bool,
    trigger: CampaignTrigger | None,
    name_contains: str,
    now: datetime,
) -> list[tuple[Campaign, datetime]]:
    """Campaigns newest first (creation time, then id), starting after the cursor, each with
    its creation time. With `scheduled` (an active campaign whose start is after `now`), an
    ACTIVE in `statuses` means one already started; no statuses and not `scheduled` means
    every status."""
    query = select(CampaignRow).options(*_WITH_RULES)
    if statuses or scheduled:
        started = or_(CampaignRow.start_at.is_(None), CampaignRow.start_at <= now)
        matches = [CampaignRow.status == status.value for status in statuses if status is not CampaignStatus.ACTIVE]
        if CampaignStatus.ACTIVE in statuses:
            matches.append(and_(CampaignRow.status == CampaignStatus.ACTIVE.value, started))
        if scheduled:
            matches.append(and_(CampaignRow.status == CampaignStatus.ACTIVE.value, not_(started)))
        query = query.where(or_(*matches))
    if trigger is not None:
        query = query.where(CampaignRow.trigger == trigger.value)
    if name_contains:
        query = query.where(func.lower(CampaignRow.name).contains(name_contains.lower(), autoescape=True))
    if after is not None:
        query = query.where(
            or_(
                CampaignRow.created_at < after.time,
                and_(CampaignRow.created_at == after.time, CampaignRow.campaign_id < after.item_id),
            )
        )
    query = query.order_by(CampaignRow.created_at.desc(), CampaignRow.campaign_id.desc()).limit(limit)
    return [(_to_domain(row), row.created_at) for row in await session.scalars(query)]


async def active_campaigns(session: AsyncSession) -> list[Campaign]:
    rows = await session.scalars(
        select(CampaignRow).options(*_WITH_RULES).where(CampaignRow.status == CampaignStatus.ACTIVE.value)
    )
    return [_to_domain(row) for row in rows]


async def campaigns_with_status(
    session: AsyncSession,
    statuses: Iterable[CampaignStatus],
    starts_before: datetime | None = None,
    ends_after: datetime | None = None,
) -> list[Campaign]:
    """Campaigns in `statuses` whose period meets [ends_after, starts_before) when given."""
    query = (
        select(CampaignRow)
        .options(*_WITH_RULES)
        .where(CampaignRow.status.in_([status.value for status in statuses]))
        .order_by(CampaignRow.start_at, CampaignRow.campaign_id)
    )
    if starts_before is not None:
        query = query.where((CampaignRow.start_at.is_(None)) | (CampaignRow.start_at < starts_before))
    if ends_after is not None:
        query = query.where((CampaignRow.end_at.is_(None)) | (CampaignRow.end_at > ends_after))
    return [_to_domain(row) for row in await session.scalars(query)]


async def last_publication(session: AsyncSession) -> datetime | None:
    """When any campaign was last published or changed status: tells a replica its cache is stale."""
    latest: datetime | None = await session.scalar(
        select(func.max(func.coalesce(CampaignRow.status_changed_at, CampaignRow.published_at)))
    )
    return latest


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert


async def _upsert(session: AsyncSession, row_type: type[Base], key: str, rows: list[dict[str, Any]]) -> None:
    statement = _insert(session)(row_type)
    columns = [name for name in rows[0] if name != key]
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[key], set_={name: getattr(statement.excluded, name) for name in columns}
        ),
        rows,
    )


async def bump_catalogue_version(session: AsyncSession) -> None:
    statement = _insert(session)(CatalogueVersionRow).values(singleton=1, version=1)
    await session.execute(
        statement.on_conflict_do_update(index_elements=["singleton"], set_={"version": CatalogueVersionRow.version + 1})
    )


async def catalogue_version(session: AsyncSession) -> int:
    version: int | None = await session.scalar(select(CatalogueVersionRow.version))
    return version or 0


async def put_category(session: AsyncSession, category: Category) -> None:
    await _upsert(session, CategoryRow, "category_id", [dataclasses.asdict(category)])


async def category_parents(session: AsyncSession) -> dict[str, str]:
    rows = await session.execute(select(CategoryRow.category_id, CategoryRow.parent_id))
    return {category_id: parent_id for category_id, parent_id in rows}


async def brand_ids(session: AsyncSession) -> set[str]:
    return set(await session.scalars(select(BrandRow.brand_id)))


async def put_brand(session: AsyncSession, brand: Brand) -> None:
    await _upsert(session, BrandRow, "brand_id", [dataclasses.asdict(brand)])


async def put_product_list(session: AsyncSession, product_list: ProductList) -> None:
    await _upsert(session, ProductListRow, "list_id", [{"list_id": product_list.list_id, "name": product_list.name}])
    await session.execute(delete(ProductListItemRow).where(ProductListItemRow.list_id == product_list.list_id))
    if product_list.skus:
        await session.execute(
            _insert(session)(ProductListItemRow),
            [{"list_id": product_list.list_id, "sku": sku} for sku in product_list.skus],
        )


async def upsert_products(session: AsyncSession, products: Iterable[ProductRecord]) -> None:
    rows = [{**dataclasses.asdict(product), "attributes": dict(product.attributes)} for product in products]
    if rows:
        await _upsert(session, ProductRow, "sku", rows)


def _record(row: ProductRow) -> ProductRecord:
    return ProductRecord(
        row.sku, row.name, row.price_minor, row.category_id, row.brand_id, row.own_brand, dict(row.attributes)
    )


async def find_product(session: AsyncSession, sku: str) -> ProductRecord | None:
    row = await session.get(ProductRow, sku)
    return _record(row) if row else None


async def product_facts(session: AsyncSession, skus: Iterable[str], parents: dict[str, str]) -> dict[str, Product]:
    """What the rules know of each SKU that is in the catalogue."""
    wanted = sorted(set(skus))
    rows = (await session.scalars(select(ProductRow).where(ProductRow.sku.in_(wanted)))).all()
    memberships: dict[str, set[str]] = {}
    for sku, list_id in await session.execute(
        select(ProductListItemRow.sku, ProductListItemRow.list_id).where(ProductListItemRow.sku.in_(wanted))
    ):
        memberships.setdefault(sku, set()).add(list_id)
    return {
        row.sku: Product(
            row.sku,
            category_path(row.category_id, parents),
            row.brand_id,
            row.own_brand,
            frozenset(memberships.get(row.sku, ())),
            dict(row.attributes),
        )
        for row in rows
    }


async def put_store(session: AsyncSession, store_id: str, time_zone: str) -> None:
    await _upsert(session, StoreRow, "store_id", [{"store_id": store_id, "time_zone": time_zone}])


async def store_time_zones(session: AsyncSession) -> dict[str, str]:
    rows = await session.execute(select(StoreRow.store_id, StoreRow.time_zone))
    return {store_id: time_zone for store_id, time_zone in rows}


async def record_purchase(session: AsyncSession, event_id: str, member_id: str, purchase: Purchase) -> None:
    await session.execute(
        _insert(session)(MemberPurchaseRow)
        .values(
            event_id=event_id,
            member_id=member_id,
            occurred_at=purchase.time,
            amount_minor=purchase.amount_minor,
            is_return=purchase.is_return,
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
    )


async def member_purchases(session: AsyncSession, member_id: str) -> tuple[Purchase, ...]:
    rows = await session.execute(
        select(MemberPurchaseRow.occurred_at, MemberPurchaseRow.amount_minor, MemberPurchaseRow.is_return)
        .where(MemberPurchaseRow.member_id == member_id)
        .order_by(MemberPurchaseRow.occurred_at)
    )
    return tuple(Purchase(occurred_at, amount, is_return) for occurred_at, amount, is_return in rows)


async def count_usage(
    session: AsyncSession, campaign_id: str, discount_minor: int, points: int, coupons_issued: int = 0
) -> None:
    statement = _insert(session)(CampaignUsageRow).values(
        campaign_id=campaign_id,
        discount_minor=discount_minor,
        points=points,
        receipts=1,
        coupons_issued=coupons_issued,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["campaign_id"],
            set_={
                "discount_minor": CampaignUsageRow.discount_minor + statement.excluded.discount_minor,
                "points": CampaignUsageRow.points + statement.excluded.points,
                "receipts": CampaignUsageRow.receipts + 1,
                "coupons_issued": CampaignUsageRow.coupons_issued + statement.excluded.coupons_issued,
            },
        )
    )


async def count_member_use(session: AsyncSession, campaign_id: str, member_id: str) -> None:
    statement = _insert(session)(CampaignMemberUseRow).values(campaign_id=campaign_id, member_id=member_id, uses=1)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["member_id", "campaign_id"], set_={"uses": CampaignMemberUseRow.uses + 1}
        )
    )


async def campaign_usage(session: AsyncSession, campaign_ids: Iterable[str]) -> dict[str, CampaignUsage]:
    rows = await session.scalars(select(CampaignUsageRow).where(CampaignUsageRow.campaign_id.in_(sorted(campaign_ids))))
    return {
        row.campaign_id: CampaignUsage(row.discount_minor, row.points, row.receipts, coupons_issued=row.coupons_issued)
        for row in rows
    }


async def campaign_participants(session: AsyncSession, campaign_id: str) -> int:
    """The members a campaign applied to on at least one committed receipt not wholly returned."""
    count = await session.scalar(
        select(func.count())
        .select_from(CampaignMemberUseRow)
        .where(CampaignMemberUseRow.campaign_id == campaign_id, CampaignMemberUseRow.uses > 0)
    )
    return int(count or 0)


async def member_uses(session: AsyncSession, member_id: str, campaign_ids: Iterable[str]) -> dict[str, int]:
    rows = await session.execute(
        select(CampaignMemberUseRow.campaign_id, CampaignMemberUseRow.uses).where(
            CampaignMemberUseRow.member_id == member_id, CampaignMemberUseRow.campaign_id.in_(sorted(campaign_ids))
        )
    )
    return {campaign_id: uses for campaign_id, uses in rows}


async def rule_effects(session: AsyncSession, rule_ids: Iterable[str]) -> dict[str, Rule]:
    """The rules by id (a published rule never changes: publishing freezes the campaign)."""
    rows = await session.scalars(select(RuleRow).where(RuleRow.rule_id.in_(sorted(set(rule_ids)))))
    return {row.rule_id: _rule_to_domain(row) for row in rows}


async def add_to_counters(session: AsyncSession, member_id: str, changes: dict[str, int]) -> None:
    """Adds to (or, negative, takes from) the member's counters in one atomic statement each,
    so concurrent receipts of a member never lose an increment."""
    for counter, by in sorted(changes.items()):
        statement = _insert(session)(MemberCounterRow).values(member_id=member_id, counter=counter, value=by)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["member_id", "counter"], set_={"value": MemberCounterRow.value + by}
            )
        )


async def record_counter_receipt(
    session: AsyncSession, receipt_key: str, member_id: str, changes: dict[str, int], paid_minor: int
) -> bool:
    """Remembers what a committed receipt added; False when it was already recorded."""
    statement = (
        _insert(session)(CounterReceiptRow)
        .values(
            receipt_key=receipt_key,
            member_id=member_id,
            changes=changes,
            paid_minor=paid_minor,
            returned_minor=0,
            reverted=False,
        )
        .on_conflict_do_nothing(index_elements=["receipt_key"])
    )
    result = await session.execute(statement)
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def counter_receipt_returned(
    session: AsyncSession, receipt_key: str, returned_minor: int, cancelled: bool
) -> tuple[str, dict[str, int]] | None:
    """Adds a return to a recorded receipt; answers its member and changes when the receipt is
    now wholly returned (cancelled, or returns reaching what was paid) and was not before.
    Conditional updates rather than a read then a write: the first takes the row (or, on
    SQLite, the database) lock, so of two concurrent returns exactly one flips `reverted`."""
    pending = (CounterReceiptRow.receipt_key == receipt_key) & ~CounterReceiptRow.reverted
    await session.execute(
        update(CounterReceiptRow)
        .where(pending)
        .values(returned_minor=CounterReceiptRow.returned_minor + returned_minor)
    )
    whole = pending if cancelled else pending & (CounterReceiptRow.returned_minor >= CounterReceiptRow.paid_minor)
    flipped = await session.execute(update(CounterReceiptRow).where(whole).values(reverted=True))
    if not flipped.rowcount:  # type: ignore[attr-defined]
        return None
    row = await session.get_one(CounterReceiptRow, receipt_key)
    return row.member_id, dict(row.changes)


async def record_campaign_receipt(
    session: AsyncSession,
    receipt_key: str,
    campaign_id: str,
    member_id: str,
    discount_minor: int,
    points: int,
    paid_minor: int,
) -> None:
    """Remembers what a committed receipt took of a campaign (once per receipt and campaign)."""
    await session.execute(
        _insert(session)(CampaignReceiptRow)
        .values(
            receipt_key=receipt_key,
            campaign_id=campaign_id,
            member_id=member_id,
            discount_minor=discount_minor,
            points=points,
            paid_minor=paid_minor,
            returned_minor=0,
            discount_given_back=0,
            points_given_back=0,
            reverted=False,
        )
        .on_conflict_do_nothing(index_elements=["receipt_key", "campaign_id"])
    )


@dataclasses.dataclass(frozen=True)
class GiveBack:
    """What one return gives back to one campaign."""

    campaign_id: str
    member_id: str
    discount_minor: int
    points: int
    use: bool


async def campaign_receipt_returned(
    session: AsyncSession, receipt_key: str, returned_minor: int, cancelled: bool
) -> list[GiveBack]:
    """Adds a return to the receipt's campaign rows and answers what it gives back to each.
    The first statement is an update, so it takes the rows' (or SQLite's database) lock and
    concurrent returns of one receipt are worked out one after the other."""
    pending = (CampaignReceiptRow.receipt_key == receipt_key) & ~CampaignReceiptRow.reverted
    await session.execute(
        update(CampaignReceiptRow)
        .where(pending)
        .values(returned_minor=CampaignReceiptRow.returned_minor + returned_minor)
    )
    rows = await session.scalars(select(CampaignReceiptRow).where(pending).order_by(CampaignReceiptRow.campaign_id))
    given = []
    for row in rows:
        whole = cancelled or row.returned_minor >= row.paid_minor
        discount = given_back(row.discount_minor, row.returned_minor, row.paid_minor, whole)
        points = given_back(row.points, row.returned_minor, row.paid_minor, whole)
        given.append(
            GiveBack(
                row.campaign_id,
                row.member_id,
                discount - row.discount_given_back,
                points - row.points_given_back,
                whole,
            )
        )
        row.discount_given_back, row.points_given_back, row.reverted = discount, points, whole
    await session.flush()
    return given


async def give_back_usage(session: AsyncSession, give_back: GiveBack) -> None:
    """Takes a return's share off a campaign's usage (and the receipt and the member's use once
    the whole receipt is returned)."""
    await session.execute(
        update(CampaignUsageRow)
        .where(CampaignUsageRow.campaign_id == give_back.campaign_id)
        .values(
            discount_minor=CampaignUsageRow.discount_minor - give_back.discount_minor,
            points=CampaignUsageRow.points - give_back.points,
            receipts=CampaignUsageRow.receipts - int(give_back.use),
        )
    )
    if give_back.use and give_back.member_id:
        await session.execute(
            update(CampaignMemberUseRow)
            .where(
                CampaignMemberUseRow.campaign_id == give_back.campaign_id,
                CampaignMemberUseRow.member_id == give_back.member_id,
                CampaignMemberUseRow.uses > 0,
            )
            .values(uses=CampaignMemberUseRow.uses - 1)
        )


async def member_counters(session: AsyncSession, member_id: str) -> dict[str, int]:
    rows = await session.execute(
        select(MemberCounterRow.counter, MemberCounterRow.value).where(MemberCounterRow.member_id == member_id)
    )
    return {counter: value for counter, value in rows.tuples()}
