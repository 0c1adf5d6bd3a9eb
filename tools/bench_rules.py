"""The promotion engine's speed: a 100,000-product catalogue import and EvaluateReceipt latency.

    .venv/bin/python tools/bench_rules.py --rules 50
    .venv/bin/python tools/bench_rules.py --rules 200 --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/x

Starts the rules service in this process (SQLite in a scratch folder unless --database-url
names an existing, empty database), then:
- imports --products products in one ImportProducts stream (batches of 5,000) and times it;
- creates and publishes campaigns holding --rules live rules: mixed discounts and points in
  groups of every non-exclusive mode, each rule with a CEL condition, scoped by category,
  brand or product list;
- times ``domain.evaluate`` in process on a 20-line receipt (the compiled rules, catalogue
  facts at hand: the engine alone; wall and CPU time), and the EvaluateReceipt call over
  loopback gRPC (one call at a time: the service's latency, not its throughput), reporting
  p50/p99; with --profile N, profiles the in-process calls and prints the top N costs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from pydantic import SecretStr

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime.server import ServiceHost, create_bus
from loyalty.runtime.settings import ServiceConfig, Settings
from services.rules import api, service
from services.rules.domain import compile_campaign, evaluate
from services.rules.server import DEFINITION

BATCH = 5000
CATEGORIES = 50
BRANDS = 20
LINES = 20
MODES = (pb.RULE_GROUP_MODE_ALL, pb.RULE_GROUP_MODE_FIRST, pb.RULE_GROUP_MODE_BEST)


def product(index: int) -> pb.Product:
    return pb.Product(
        sku=f"SKU-{index:06d}",
        name=f"product {index}",
        price_minor=100 + index % 5000,
        category_id=f"cat-{index % CATEGORIES}",
        brand_id=f"brand-{index % BRANDS}",
        own_brand=index % 7 == 0,
        attributes={"volume_ml": pb.AttributeValue(int_value=index % 1000)},
    )


def rule(index: int) -> pb.Rule:
    category = pb.Scope(category_ids=[f"cat-{index % CATEGORIES}", "food"])
    effects = (
        pb.Effect(earn_points_percent=pb.EarnPointsPercent(basis_points=100 + index, scope=category)),
        pb.Effect(discount_percent=pb.DiscountPercent(basis_points=500, scope=category)),
        pb.Effect(
            discount_amount=pb.DiscountAmount(amount_minor=300, scope=pb.Scope(brand_ids=[f"brand-{index % BRANDS}"]))
        ),
        pb.Effect(buy_m_pay_n=pb.BuyMPayN(buy_quantity=3, pay_quantity=2, scope=pb.Scope(product_list_ids=["promo"]))),
        pb.Effect(nth_item_discount=pb.NthItemDiscount(n=2, basis_points=5000, scope=category)),
        pb.Effect(cheapest_item_discount=pb.CheapestItemDiscount(basis_points=10000, min_units=5)),
        pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=50)),
    )
    conditions = (
        f"receipt.total_minor >= {1000 * (index % 10)}",
        f'member.tier == "gold" || "seg-{index % 5}" in member.segments',
        f'receipt.lines.exists(l, l.brand_id == "brand-{index % BRANDS}" && l.quantity_milli >= 1000)',
        f"receipt.line_count >= {index % 15} && receipt.hour >= 8",
        f'"cat-{index % CATEGORIES}" in receipt.category_ids && "brand-{index % BRANDS}" in receipt.brand_ids',
    )
    return pb.Rule(
        name=f"rule {index}",
        condition=conditions[index % len(conditions)],
        effect=effects[index % len(effects)],
        receipt_text=f"promotion {index}",
        priority=index,
    )


def campaigns(rule_count: int) -> list[pb.Campaign]:
    """Campaigns of 5 groups of 2 rules each, group modes cycling."""
    rules = [rule(index) for index in range(rule_count)]
    made = []
    for start in range(0, rule_count, 10):
        chunk = rules[start : start + 10]
        groups = [
            pb.RuleGroup(
                name=f"group {start + offset}",
                mode=MODES[(start + offset) % 3],
                priority=start + offset,
                rules=chunk[offset : offset + 2],
            )
            for offset in range(0, len(chunk), 2)
        ]
        made.append(pb.Campaign(name=f"campaign {start // 10}", groups=groups))
    return made


def receipt(products: int) -> receipt_pb2.Receipt:
    step = products // LINES
    return receipt_pb2.Receipt(
        store_id="store-1",
        terminal_id="pos-1",
        receipt_number="1",
        currency_code="RUB",
        lines=[
            receipt_pb2.ReceiptLine(
                position=position,
                sku=f"SKU-{position * step:06d}",
                price_minor=1000 + 37 * position,
                quantity_milli=1000 * (1 + position % 3),
            )
            for position in range(1, LINES + 1)
        ],
    )


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1e6:,.0f} µs, p99 {cuts[98] * 1e6:,.0f} µs ({len(samples)} calls)"


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings.model_validate(
            {
                "data_dir": Path(scratch),
                "log_level": "WARNING",
                "rules": ServiceConfig(port=0, metrics_port=0),
            }
        )
        if args.database_url:
            settings.rules.database_url = SecretStr(args.database_url)
        bus = create_bus(settings)
        host = ServiceHost(DEFINITION, settings, bus)
        await host.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
                await measure(RulesServiceStub(channel), host, args)
        finally:
            await host.stop()
            await bus.close()


async def measure(stub: RulesServiceStub, host: ServiceHost, args: argparse.Namespace) -> None:
    await stub.PutCategory(pb.PutCategoryRequest(request_id="food", category=pb.Category(category_id="food")))
    for index in range(CATEGORIES):
        category = pb.Category(category_id=f"cat-{index}", parent_id="food")
        await stub.PutCategory(pb.PutCategoryRequest(request_id=f"cat-{index}", category=category))
    for index in range(BRANDS):
        await stub.PutBrand(pb.PutBrandRequest(request_id=f"b-{index}", brand=pb.Brand(brand_id=f"brand-{index}")))

    async def batches() -> AsyncIterator[pb.ImportProductsRequest]:
        for start in range(0, args.products, BATCH):
            yield pb.ImportProductsRequest(
                products=[product(i) for i in range(start, min(start + BATCH, args.products))]
            )

    started = time.perf_counter()
    imported = await stub.ImportProducts(batches())
    import_seconds = time.perf_counter() - started
    step = args.products // LINES
    promo = pb.ProductList(list_id="promo", skus=[f"SKU-{i * step:06d}" for i in range(0, LINES + 1, 2)])
    await stub.PutProductList(pb.PutProductListRequest(request_id="promo", product_list=promo))

    for index, campaign in enumerate(campaigns(args.rules)):
        created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id=f"c-{index}", campaign=campaign))
        await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id=f"p-{index}", campaign_id=created.campaign.campaign_id)
        )

    the_receipt = receipt(args.products)
    the_receipt.receipt_time.FromDatetime(datetime(2026, 3, 2, 12, tzinfo=UTC))
    subject = pb.Subject(member_id="member-1", tier="gold", segments=["seg-1"])
    request = pb.EvaluateReceiptRequest(receipt=the_receipt, subject=subject)
    first = await stub.EvaluateReceipt(request)

    sessions = host.context.sessions
    live = service.LiveCampaigns(sessions)
    compiled = [compile_campaign(c.campaign) for c in await live.current()]
    catalogue = await service.CatalogueCache(sessions).lookup([line.sku for line in the_receipt.lines])
    domain_receipt = api.receipt_from_proto(the_receipt)
    domain_subject = api.subject_from_proto(subject)
    in_process = []
    # the CPU time of this thread too: on a machine others load, wall time also counts waiting for a core
    in_process_cpu = []
    for _ in range(args.calls):
        started, started_cpu = time.perf_counter(), time.thread_time()
        evaluate(domain_receipt, domain_subject, compiled, (), catalogue, 5000)
        in_process_cpu.append(time.thread_time() - started_cpu)
        in_process.append(time.perf_counter() - started)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(
            lambda: [evaluate(domain_receipt, domain_subject, compiled, (), catalogue, 5000) for _ in range(args.calls)]
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)

    over_grpc = []
    for _ in range(args.calls):
        started = time.perf_counter()
        await stub.EvaluateReceipt(request)
        over_grpc.append(time.perf_counter() - started)

    print(
        f"catalogue import: {imported.imported_count:,} products in {import_seconds:.1f} s "
        f"({imported.imported_count / import_seconds:,.0f}/s, one ImportProducts stream)"
    )
    print(
        f"live rules: {sum(len(g.rules) for c in compiled for g in c.groups)} in {len(compiled)} campaigns; "
        f"receipt: {LINES} lines; applied on it: {len(first.applied_promotions)} rules, "
        f"discount {first.discount_total_minor}, points {first.points_total}"
    )
    print(f"in-process evaluate: {percentiles(in_process)}")
    print(f"in-process evaluate, CPU time: {percentiles(in_process_cpu)}")
    print(f"gRPC EvaluateReceipt: {percentiles(over_grpc)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=50, help="live rules (a multiple of 10)")
    parser.add_argument("--products", type=int, default=100_000, help="catalogue size to import")
    parser.add_argument("--calls", type=int, default=2000, help="evaluations timed per figure")
    parser.add_argument("--database-url", help="the rules database (default: SQLite in a scratch folder)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile the in-process calls and print the top N costs",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
