"""The benchmark's dataset: members with cards and phones, a catalogue, ~50 live rules, coupons
and funded points accounts.

Which path writes what, and why:
- members, cards and segment memberships: COPY straight into the members database, rows shaped
  by the members store's own table models (``services.members.store``), because no RPC creates
  members in bulk (EmitCardBatch emits unbound card stock; binding it is one IssueCard per member);
- segments, the catalogue, stores, campaigns and rules: the public gRPC APIs (ImportProducts is
  the rules service's bulk path);
- coupons: ImportPromoCodes (10,000 chosen codes per call), so the load knows every code, plus
  one mass code;
- points for members who pay with points: AccruePoints calls for a pool of members (the ledger
  has no bulk accrual RPC; the rate is reported as the mass-accrual figure).

Everything is derived from a member's index, so the load generator needs no list of ids.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from sqlalchemy import Table

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.common.v1 import coupon_pb2
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from services.members import store as members_store
from services.members.domain import batch_card_number

COPY_CHUNK = 50_000
PRODUCT_BATCH = 5_000
PROMO_CODE_BATCH = 10_000
TOP_CATEGORIES = 10
SUBCATEGORIES = 10
BRANDS = 50
PRODUCT_LISTS = 5
PRODUCT_LIST_SIZE = 200
STORES = 20
SEGMENTS = (("students", 20), ("families", 10), ("vip", 50))  # code, one member in N
TIERS = (("gold", 10), ("silver", 4))  # code, one member in N (checked in order); the rest basic
FUNDED_POINTS = 1_000_000
STORE_TIME_ZONE = "Europe/Moscow"


@dataclass(frozen=True)
class Scale:
    """How big the dataset is."""

    members: int = 1_000_000
    products: int = 50_000
    coupons: int = 20_000
    funded_members: int = 10_000


# Identifiers derived from indexes ---------------------------------------------------------


def member_id_of(index: int) -> str:
    return str(uuid.UUID(int=index + 1))


def phone_of(index: int) -> str:
    """+79 and nine digits: a valid Russian mobile number for up to 10^9 members."""
    return f"+79{index:09d}"


def card_of(index: int) -> str:
    return batch_card_number("77", index, 11)


def tier_of(index: int) -> str:
    for code, every in TIERS:
        if index % every == 0:
            return code
    return "basic"


def segments_of(index: int) -> list[str]:
    return [code for code, every in SEGMENTS if index % every == 1]


def sku_of(index: int) -> str:
    return f"SKU-{index:07d}"


def price_of(product: int) -> int:
    """Shelf price in minor units: 0.50 to 2,000.49, deterministic per product."""
    return 50 + (product * 7919) % 200_000


def category_of(product: int) -> str:
    top = product % TOP_CATEGORIES
    return f"cat-{top}-{(product // TOP_CATEGORIES) % SUBCATEGORIES}"


def brand_of(product: int) -> str:
    return f"brand-{product % BRANDS}"


def store_of(index: int) -> str:
    return f"store-{index % STORES:03d}"


def promo_code_of(tag: str, index: int) -> str:
    return f"BN{tag}{index:08d}".upper()


# One shared code for every run: the program (which names it) is published once per dataset.
MASS_CODE = "BENCHMASS"


def funded(index: int, scale: Scale) -> bool:
    return index < scale.funded_members


# Bulk rows through the store models -------------------------------------------------------


def model_records(table: Table, rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """COPY records for a store model's table: the given values, each other column its model
    default (or NULL), so a column added with a default keeps the load working."""
    columns = [column.name for column in table.columns]
    defaults: dict[str, Any] = {}
    for column in table.columns:
        default = column.default
        defaults[column.name] = default.arg if default is not None and default.is_scalar else None  # type: ignore[attr-defined]
    records = [tuple(row.get(name, defaults[name]) for name in columns) for row in rows]
    return columns, records


async def copy_rows(connection: asyncpg.Connection, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
    columns, records = model_records(table, rows)
    await connection.copy_records_to_table(table.name, records=records, columns=columns)


def chunks(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


async def count_members(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM members"))
    finally:
        await connection.close()


async def load_members(dsn: str, count: int, progress: bool = True) -> float:
    """Members 0..count-1 with one active card each, tiers and segment memberships, by COPY;
    returns the seconds it took. The segments must exist (create_segments)."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    connection = await asyncpg.connect(dsn)
    member_table: Table = members_store.MemberRow.__table__  # type: ignore[assignment]
    card_table: Table = members_store.CardRow.__table__  # type: ignore[assignment]
    segment_table: Table = members_store.SegmentMemberRow.__table__  # type: ignore[assignment]
    try:
        for indexes in chunks(count, COPY_CHUNK):
            async with connection.transaction():
                await copy_rows(
                    connection,
                    member_table,
                    (
                        {
                            "member_id": member_id_of(index),
                            "phone": phone_of(index),
                            "first_name": "Bench",
                            "last_name": f"Member{index}",
                            "status": "active",
                            "tier": tier_of(index),
                            "registration_channel": members.REGISTRATION_CHANNEL_POS,
                            "created_at": now,
                        }
                        for index in indexes
                    ),
                )
                await copy_rows(
                    connection,
                    card_table,
                    (
                        {
                            "card_number": card_of(index),
                            "member_id": member_id_of(index),
                            "status": "active",
                            "issued_at": now,
                        }
                        for index in indexes
                    ),
                )
                await copy_rows(
                    connection,
                    segment_table,
                    (
                        {"segment_code": code, "member_id": member_id_of(index)}
                        for index in indexes
                        for code in segments_of(index)
                    ),
                )
            if progress and indexes.stop % (COPY_CHUNK * 20) == 0:
                print(f"  members: {indexes.stop:,} of {count:,}", flush=True)
        await connection.execute("ANALYZE members; ANALYZE cards; ANALYZE segment_members")
    finally:
        await connection.close()
    return time.perf_counter() - started


# The program through the public APIs ------------------------------------------------------


async def create_segments(members_address: str) -> None:
    """The segments the rules target; they must exist before their memberships are loaded."""
    async with grpc.aio.insecure_channel(members_address) as channel:
        stub = members_grpc.MembersServiceStub(channel)
        for code, _every in SEGMENTS:
            await stub.CreateSegment(
                members.CreateSegmentRequest(request_id=f"bench:segment:{code}", code=code, name=code.title())
            )


def product(index: int) -> rules.Product:
    return rules.Product(
        sku=sku_of(index),
        name=f"product {index}",
        price_minor=price_of(index),
        category_id=category_of(index),
        brand_id=brand_of(index),
        own_brand=index % 7 == 0,
        attributes={"volume_ml": rules.AttributeValue(int_value=index % 1000)},
    )


def list_skus(list_index: int, products: int) -> list[str]:
    return [sku_of((list_index * PRODUCT_LIST_SIZE + offset) % products) for offset in range(PRODUCT_LIST_SIZE)]


async def _product_batches(products: int) -> AsyncIterator[rules.ImportProductsRequest]:
    for indexes in chunks(products, PRODUCT_BATCH):
        yield rules.ImportProductsRequest(products=[product(index) for index in indexes])


async def load_catalogue(rules_address: str, products: int) -> float:
    """Stores, a two-level category tree, brands, products (one ImportProducts stream) and
    product lists; returns the seconds it took."""
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(rules_address) as channel:
        stub = rules_grpc.RulesServiceStub(channel)
        for index in range(STORES):
            store = rules.Store(store_id=store_of(index), time_zone=STORE_TIME_ZONE)
            await stub.PutStore(rules.PutStoreRequest(request_id=f"bench:store:{index}", store=store))
        for top in range(TOP_CATEGORIES):
            parent = f"cat-{top}"
            await stub.PutCategory(
                rules.PutCategoryRequest(
                    request_id=f"bench:category:{parent}", category=rules.Category(category_id=parent, name=parent)
                )
            )
            for sub in range(SUBCATEGORIES):
                child = rules.Category(category_id=f"{parent}-{sub}", parent_id=parent, name=f"{parent}-{sub}")
                await stub.PutCategory(
                    rules.PutCategoryRequest(request_id=f"bench:category:{child.category_id}", category=child)
                )
        for index in range(BRANDS):
            brand = rules.Brand(brand_id=f"brand-{index}", name=f"Brand {index}")
            await stub.PutBrand(rules.PutBrandRequest(request_id=f"bench:brand:{index}", brand=brand))
        await stub.ImportProducts(_product_batches(products), timeout=3600)
        for index in range(PRODUCT_LISTS):
            product_list = rules.ProductList(
                list_id=f"list-{index}", name=f"List {index}", skus=list_skus(index, products)
            )
            await stub.PutProductList(
                rules.PutProductListRequest(request_id=f"bench:list:{index}", product_list=product_list)
            )
    return time.perf_counter() - started


def _earn(basis_points: int, scope: rules.Scope | None = None) -> rules.Effect:
    return rules.Effect(earn_points_percent=rules.EarnPointsPercent(basis_points=basis_points, scope=scope))


def _discount(basis_points: int, scope: rules.Scope | None = None) -> rules.Effect:
    return rules.Effect(discount_percent=rules.DiscountPercent(basis_points=basis_points, scope=scope))


def _rule(name: str, effect: rules.Effect, condition: str = "", priority: int = 100) -> rules.Rule:
    return rules.Rule(name=name, condition=condition, effect=effect, receipt_text=name, priority=priority)


def _lists(index: int) -> rules.Scope:
    return rules.Scope(product_list_ids=[f"list-{index}"])


def program() -> list[rules.Campaign]:
    """About fifty live rules over the mechanics the rules service offers: base and tier
    earning, a tier redemption cap, segment and store offers, happy hours, weekends, category
    offers competing in a BEST group, brand points, multi-buys on product lists, an exclusive
    clearance and a rule triggered by a coupon."""
    base = rules.Campaign(
        name="Base: 1% back",
        rules=[
            _rule("1% back as points", _earn(100)),
            _rule(
                "100 points on receipts over 5,000",
                rules.Effect(earn_fixed_points=rules.EarnFixedPoints(amount=100)),
                "receipt.total_minor >= 500000",
            ),
        ],
    )
    tiers = rules.Campaign(
        name="Tiers",
        groups=[
            rules.RuleGroup(
                name="tier earning",
                mode=rules.RULE_GROUP_MODE_FIRST,
                priority=10,
                rules=[
                    _rule("gold: 5% back", _earn(500), 'member.tier == "gold"', 1),
                    _rule("silver: 3% back", _earn(300), 'member.tier == "silver"', 2),
                ],
            ),
            rules.RuleGroup(
                name="tier redemption caps",
                mode=rules.RULE_GROUP_MODE_FIRST,
                priority=11,
                rules=[
                    _rule(
                        "gold pays up to 99% with points",
                        rules.Effect(redemption_cap=rules.RedemptionCap(basis_points=9900)),
                        'member.tier == "gold"',
                        1,
                    ),
                    _rule(
                        "silver pays all but 1.00 with points",
                        rules.Effect(redemption_cap=rules.RedemptionCap(all_but_minor=100)),
                        'member.tier == "silver"',
                        2,
                    ),
                ],
            ),
        ],
    )
    students = rules.Campaign(
        name="Students: 5% off groceries",
        scope=rules.CampaignScope(segments=["students"]),
        rules=[_rule("students 5% off", _discount(500, rules.Scope(category_ids=["cat-0", "cat-1"])))],
    )
    vip = rules.Campaign(
        name="VIP: 10% back on the favourites",
        scope=rules.CampaignScope(segments=["vip"]),
        rules=[_rule("vip favourites 10% back", _earn(1000, _lists(4)))],
    )
    happy_hours = rules.Campaign(
        name="Happy hours",
        scope=rules.CampaignScope(hours=[13, 14, 15, 16, 17]),
        rules=[
            _rule("happy hours: 10% off cat-2", _discount(1000, rules.Scope(category_ids=["cat-2"]))),
            _rule("happy hours: 2% back on cat-3", _earn(200, rules.Scope(category_ids=["cat-3"]))),
        ],
    )
    category_offers = rules.Campaign(
        name="Category offers",
        groups=[
            rules.RuleGroup(
                name="best category offer",
                mode=rules.RULE_GROUP_MODE_BEST,
                priority=20,
                condition="receipt.total_minor >= 100000",
                rules=[
                    _rule(
                        f"{3 + top}% off cat-{top}",
                        _discount(300 + top * 100, rules.Scope(category_ids=[f"cat-{top}"])),
                    )
                    for top in range(TOP_CATEGORIES)
                ],
            )
        ],
    )
    brand_points = rules.Campaign(
        name="Brand points",
        rules=[
            _rule(
                f"2% back on brand-{index}",
                _earn(200, rules.Scope(brand_ids=[f"brand-{index}"])),
                "receipt.line_count >= 3",
            )
            for index in range(20)
        ],
    )
    multi_buy = rules.Campaign(
        name="Multi-buys",
        groups=[
            rules.RuleGroup(
                name="multi-buys",
                mode=rules.RULE_GROUP_MODE_ALL,
                priority=30,
                discount_base=rules.DISCOUNT_BASE_ORIGINAL,
                rules=[
                    _rule(
                        "3 for 2 on list 0",
                        rules.Effect(buy_m_pay_n=rules.BuyMPayN(buy_quantity=3, pay_quantity=2, scope=_lists(0))),
                    ),
                    _rule(
                        "every 2nd half price on list 1",
                        rules.Effect(nth_item_discount=rules.NthItemDiscount(n=2, basis_points=5000, scope=_lists(1))),
                    ),
                    _rule(
                        "cheapest free from 10 units on list 2",
                        rules.Effect(
                            cheapest_item_discount=rules.CheapestItemDiscount(
                                basis_points=10000, min_units=10, scope=_lists(2)
                            )
                        ),
                    ),
                    _rule(
                        "list 3 at 99.00",
                        rules.Effect(fixed_price=rules.FixedPrice(unit_price_minor=9900, scope=_lists(3))),
                    ),
                    _rule(
                        "500 off receipts over 10,000",
                        rules.Effect(discount_amount=rules.DiscountAmount(amount_minor=50000)),
                        "receipt.total_minor >= 1000000",
                    ),
                ],
            )
        ],
    )
    weekend = rules.Campaign(
        name="Weekend double points",
        scope=rules.CampaignScope(weekdays=[6, 7]),
        rules=[_rule("weekend: 1% more back", _earn(100))],
    )
    coupon_points = rules.Campaign(
        name="Coupon bonus",
        rules=[
            _rule(
                "500 points with the mass coupon",
                rules.Effect(earn_fixed_points=rules.EarnFixedPoints(amount=500)),
                f'"{MASS_CODE}" in receipt.coupon_codes',
            )
        ],
    )
    clearance = rules.Campaign(
        name="Clearance",
        groups=[
            rules.RuleGroup(
                name="clearance",
                mode=rules.RULE_GROUP_MODE_EXCLUSIVE,
                priority=1,
                condition=f'receipt.lines.exists(l, l.sku == "{sku_of(1)}")',
                rules=[_rule("half price clearance", _discount(5000, rules.Scope(skus=[sku_of(1)])))],
            )
        ],
    )
    stores = rules.Campaign(
        name="New stores",
        scope=rules.CampaignScope(store_ids=[store_of(index) for index in range(5)]),
        rules=[
            _rule("new store: 1% more back", _earn(100)),
            _rule(
                "new store: 200 points over 3,000",
                rules.Effect(earn_fixed_points=rules.EarnFixedPoints(amount=200)),
                "receipt.total_minor >= 300000",
            ),
        ],
    )
    return [
        base,
        tiers,
        students,
        vip,
        happy_hours,
        category_offers,
        brand_points,
        multi_buy,
        weekend,
        coupon_points,
        clearance,
        stores,
    ]


def rule_count(campaigns: Sequence[rules.Campaign]) -> int:
    return sum(len(campaign.rules) + sum(len(group.rules) for group in campaign.groups) for campaign in campaigns)


async def publish_program(rules_address: str) -> int:
    """Creates and publishes the campaigns (fixed request ids: a reused dataset keeps its one
    program); returns how many rules are live."""
    campaigns = program()
    async with grpc.aio.insecure_channel(rules_address) as channel:
        stub = rules_grpc.RulesServiceStub(channel)
        for index, campaign in enumerate(campaigns):
            created = await stub.CreateCampaign(
                rules.CreateCampaignRequest(request_id=f"bench:campaign:{index}", campaign=campaign)
            )
            await stub.PublishCampaign(
                rules.PublishCampaignRequest(
                    request_id=f"bench:publish:{index}", campaign_id=created.campaign.campaign_id
                )
            )
    return rule_count(campaigns)


async def load_coupons(rewards_address: str, tag: str, count: int) -> float:
    """A unique-code series of 5% off with `count` chosen codes, and a mass code worth 100.00
    off receipts over 2,000.00; returns the seconds it took."""
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(rewards_address) as channel:
        stub = rewards_grpc.RewardsServiceStub(channel)
        series = await stub.CreateCouponSeries(
            rewards.CreateCouponSeriesRequest(
                request_id=f"bench:{tag}:series:unique",
                name="bench: 5% off",
                kind=rewards.COUPON_SERIES_KIND_UNIQUE,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=500),
                uses_per_code=1,
            )
        )
        for indexes in chunks(count, PROMO_CODE_BATCH):
            await stub.ImportPromoCodes(
                rewards.ImportPromoCodesRequest(
                    request_id=f"bench:{tag}:codes:{indexes.start}",
                    series_id=series.series.series_id,
                    partner_id="bench",
                    codes=[promo_code_of(tag, index) for index in indexes],
                ),
                timeout=600,
            )
        await stub.CreateCouponSeries(
            rewards.CreateCouponSeriesRequest(
                request_id="bench:series:mass",
                name="bench: 100.00 off over 2,000.00",
                kind=rewards.COUPON_SERIES_KIND_MASS,
                benefit=coupon_pb2.CouponBenefit(amount_off_minor=10_000, min_receipt_total_minor=200_000),
                uses_per_code=0,
                mass_code=MASS_CODE,
            )
        )
    return time.perf_counter() - started


async def fund_accounts(accounts_address: str, tag: str, count: int, concurrency: int = 16) -> float:
    """Credits FUNDED_POINTS to members 0..count-1 with AccruePoints; returns the seconds."""
    started = time.perf_counter()
    queue = iter(range(count))
    async with grpc.aio.insecure_channel(accounts_address) as channel:
        stub = accounts_grpc.AccountsServiceStub(channel)

        async def worker() -> None:
            for index in queue:
                await stub.AccruePoints(
                    accounts.AccruePointsRequest(
                        request_id=f"bench:{tag}:fund:{index}",
                        holder_id=member_id_of(index),
                        amount=FUNDED_POINTS,
                        source=accounts.ACCRUAL_SOURCE_MASS_JOB,
                        source_ref=f"bench:{tag}",
                        reason="benchmark funding",
                    ),
                    timeout=60,
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started
