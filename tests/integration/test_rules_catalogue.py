"""The catalogue through the real RulesService over gRPC (SQLite and PostgreSQL): the category
tree, brands, lists, a streamed all-or-nothing product import, and rules that act on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import read_remote_error
from services.rules import service
from services.rules.domain import Product, ProductRecord
from tests import infra
from tests.integration.test_rules_store import rules_stub


def product(sku: str, category: str = "", brand: str = "", **attributes: pb.AttributeValue) -> pb.Product:
    return pb.Product(
        sku=sku, name=f"product {sku}", price_minor=100, category_id=category, brand_id=brand, attributes=attributes
    )


async def stream(*batches: list[pb.Product]) -> AsyncIterator[pb.ImportProductsRequest]:
    for batch in batches:
        yield pb.ImportProductsRequest(products=batch)


async def test_the_catalogue_feeds_scopes_and_conditions(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        for request_id, category in [
            ("c1", pb.Category(category_id="food", name="Food")),
            ("c2", pb.Category(category_id="dairy", parent_id="food", name="Dairy")),
            ("c3", pb.Category(category_id="cheese", parent_id="dairy", name="Cheese")),
            ("c4", pb.Category(category_id="household", name="Household")),
        ]:
            await stub.PutCategory(pb.PutCategoryRequest(request_id=request_id, category=category))
        with pytest.raises(grpc.aio.AioRpcError) as cycle:
            await stub.PutCategory(
                pb.PutCategoryRequest(request_id="c5", category=pb.Category(category_id="food", parent_id="cheese"))
            )
        assert read_remote_error(cycle.value).reason == "CATEGORY_CYCLE"
        with pytest.raises(grpc.aio.AioRpcError) as orphan:
            await stub.PutCategory(
                pb.PutCategoryRequest(request_id="c6", category=pb.Category(category_id="x", parent_id="nowhere"))
            )
        assert read_remote_error(orphan.value).reason == "CATEGORY_NOT_FOUND"
        await stub.PutBrand(pb.PutBrandRequest(request_id="b1", brand=pb.Brand(brand_id="alpine", name="Alpine")))

        imported = await stub.ImportProducts(
            stream(
                [product("BRIE", "cheese", "alpine", fat=pb.AttributeValue(int_value=60))],
                [product("MILK", "dairy"), product("SOAP", "household", organic=pb.AttributeValue(bool_value=True))],
            )
        )
        assert imported.imported_count == 3

        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ImportProducts(stream([product("OK-1")], [product("OK-2"), pb.Product(sku="", price_minor=-1)]))
        assert [v.field for v in read_remote_error(invalid.value).violations] == [
            "products[2].sku",
            "products[2].price_minor",
        ]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ImportProducts(stream([product("OK-3"), product("BAD", "no-such-category")]))
        assert read_remote_error(unknown.value).reason == "UNKNOWN_REFERENCE"
        for sku in ("OK-1", "OK-3"):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetProduct(pb.GetProductRequest(sku=sku))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND, "a refused import writes nothing"

        await stub.PutProductList(
            pb.PutProductListRequest(
                request_id="l1", product_list=pb.ProductList(list_id="favourites", name="Fav", skus=["SOAP", "MILK"])
            )
        )
        brie = await stub.GetProduct(pb.GetProductRequest(sku="BRIE"))
        assert list(brie.category_ids) == ["cheese", "dairy", "food"]
        assert brie.product.attributes["fat"].int_value == 60
        assert brie.product.brand_id == "alpine"
        assert list((await stub.GetProduct(pb.GetProductRequest(sku="SOAP"))).list_ids) == ["favourites"]

        campaign = pb.Campaign(
            name="catalogue",
            rules=[
                pb.Rule(
                    name="10% off food",
                    effect=pb.Effect(
                        discount_percent=pb.DiscountPercent(basis_points=1000, scope=pb.Scope(category_ids=["food"]))
                    ),
                ),
                pb.Rule(
                    name="5.00 off favourites with fat cheese",
                    condition='receipt.lines.exists(l, "fat" in l.attributes && l.attributes.fat >= 50)',
                    effect=pb.Effect(
                        discount_amount=pb.DiscountAmount(
                            amount_minor=500, scope=pb.Scope(product_list_ids=["favourites"])
                        )
                    ),
                    priority=1,
                ),
            ],
        )
        created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="camp", campaign=campaign))
        await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id="pub", campaign_id=created.campaign.campaign_id)
        )

        def line(position: int, sku: str, price: int) -> receipt_pb2.ReceiptLine:
            return receipt_pb2.ReceiptLine(position=position, sku=sku, price_minor=price, quantity_milli=1000)

        answer = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(
                receipt=receipt_pb2.Receipt(
                    store_id="s",
                    terminal_id="t",
                    receipt_number="1",
                    currency_code="RUB",
                    lines=[line(1, "BRIE", 3000), line(2, "MILK", 1000), line(3, "SOAP", 2000), line(4, "??", 500)],
                ),
                subject=pb.Subject(member_id="m"),
            )
        )
        # 10% on BRIE and MILK (food); 5.00 over MILK (900 left) and SOAP (2000) pro rata
        assert [out.discount_minor for out in answer.lines] == [300, 100 + 155, 345, 0]


async def test_the_cache_sees_a_change_made_elsewhere_after_refresh(database_url: str) -> None:
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        cache = service.CatalogueCache(sessions, refresh_seconds=3600)
        assert await cache.lookup(["A"]) == {}

        async def batches() -> AsyncIterator[list[ProductRecord]]:
            yield [ProductRecord("A", "a", 1, "", "", True, {"n": 1})]

        async with sessions() as session, session.begin():
            assert await service.import_products(session, batches()) == 1
        assert await cache.lookup(["A"]) == {}, "a miss is remembered until the next refresh"
        cache.invalidate()
        assert await cache.lookup(["A", "B"]) == {"A": Product("A", (), "", True, frozenset(), {"n": 1})}
