"""Rule groups, discount effects, coupons and the redemption cap through the real RulesService
over gRPC, stored in SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.runtime.errors import read_remote_error
from tests.integration.test_rules_store import rules_stub


def discount_rule(name: str, effect: pb.Effect, condition: str = "", priority: int = 0) -> pb.Rule:
    return pb.Rule(name=name, condition=condition, effect=effect, receipt_text=f"{name}!", priority=priority)


PROMOTIONS = pb.Campaign(
    name="spring",
    rules=[discount_rule("points", pb.Effect(earn_points_percent=pb.EarnPointsPercent(basis_points=500)))],
    groups=[
        pb.RuleGroup(
            name="three for two on soap",
            mode=pb.RULE_GROUP_MODE_ALL,
            priority=1,
            rules=[
                discount_rule(
                    "3 for 2",
                    pb.Effect(buy_m_pay_n=pb.BuyMPayN(buy_quantity=3, pay_quantity=2, scope=pb.Scope(skus=["SOAP"]))),
                )
            ],
        ),
        pb.RuleGroup(
            name="the better of two",
            mode=pb.RULE_GROUP_MODE_BEST,
            priority=2,
            discount_base=pb.DISCOUNT_BASE_ORIGINAL,
            rules=[
                discount_rule("10%", pb.Effect(discount_percent=pb.DiscountPercent(basis_points=1000)), priority=1),
                discount_rule("5.00 off", pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=500)), priority=2),
            ],
        ),
        pb.RuleGroup(
            name="caps",
            mode=pb.RULE_GROUP_MODE_FIRST,
            priority=3,
            rules=[
                discount_rule(
                    "gold pays 99%",
                    pb.Effect(redemption_cap=pb.RedemptionCap(basis_points=9900)),
                    'member.tier == "gold"',
                )
            ],
        ),
    ],
)


def receipt(*lines: receipt_pb2.ReceiptLine) -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        store_id="store-1", terminal_id="pos-1", receipt_number="1", currency_code="RUB", lines=lines
    )


async def test_groups_discounts_coupons_and_the_cap_over_grpc(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        created = (await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=PROMOTIONS))).campaign
        assert [len(g.rules) for g in created.groups] == [1, 2, 1]
        assert all(g.group_id for g in created.groups)
        fetched = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=created.campaign_id))).campaign
        assert fetched == created, "groups, modes, bases, scopes and every effect read back as written"
        published = await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign_id)
        )
        assert published.campaign.groups == created.groups, "publication keeps the groups as they were"

        lines = (
            receipt_pb2.ReceiptLine(position=1, sku="SOAP", price_minor=1000, quantity_milli=3000),
            receipt_pb2.ReceiptLine(position=2, sku="MILK", price_minor=2000, quantity_milli=1000),
            receipt_pb2.ReceiptLine(position=3, sku="BEER", price_minor=3000, quantity_milli=1000, no_promotions=True),
        )
        coupons = [
            coupon_pb2.PresentedCoupon(
                code="MILK-100",
                series_id="S1",
                benefit=coupon_pb2.CouponBenefit(amount_off_minor=100, skus=["MILK"]),
            ),
            coupon_pb2.PresentedCoupon(
                code="BIG", series_id="S2", benefit=coupon_pb2.CouponBenefit(points=10, min_receipt_total_minor=100_000)
            ),
        ]
        answer = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(
                receipt=receipt(*lines), subject=pb.Subject(member_id="m-1", tier="basic"), coupons=coupons
            )
        )
        # SOAP 3000 -> 2000 (3 for 2); then best of 10% of the original 5000 = 500 vs 500 off:
        # equal, the first by priority (10%): 300 on SOAP (2000 left), 200 on MILK; coupon 100 on MILK.
        assert [(out.discount_minor, out.final_amount_minor) for out in answer.lines] == [
            (1300, 1700),
            (300, 1700),
            (0, 3000),
        ]
        assert [out.points for out in answer.lines] == [85, 85, 0], "5% of the final amounts"
        assert [out.max_points_payment_minor for out in answer.lines] == [850, 850, 0], "the program's 50%"
        assert [(a.receipt_text, a.discount_minor, a.points, a.coupon_code) for a in answer.applied_promotions] == [
            ("points!", 0, 170, ""),
            ("3 for 2!", 1000, 0, ""),
            ("10%!", 500, 0, ""),
            ("", 100, 0, "MILK-100"),
        ]
        assert list(answer.unused_coupon_codes) == ["BIG"]
        assert (answer.discount_total_minor, answer.points_total) == (1600, 170)

        gold = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(receipt=receipt(*lines), subject=pb.Subject(member_id="m-2", tier="gold"))
        )
        assert [out.max_points_payment_minor for out in gold.lines] == [1683, 1782, 0], "no coupon: MILK stays at 18.00"


async def test_bad_effects_and_groups_are_refused_naming_every_field(tmp_path: Path, database_url: str) -> None:
    bad_effects = {
        "discount_percent.basis_points": pb.Effect(discount_percent=pb.DiscountPercent(basis_points=10_001)),
        "discount_amount.amount_minor": pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=0)),
        "fixed_price.unit_price_minor": pb.Effect(fixed_price=pb.FixedPrice(unit_price_minor=-1)),
        "buy_m_pay_n.pay_quantity": pb.Effect(buy_m_pay_n=pb.BuyMPayN(buy_quantity=3, pay_quantity=3)),
        "nth_item_discount.n": pb.Effect(nth_item_discount=pb.NthItemDiscount(n=1, basis_points=100)),
        "cheapest_item_discount.basis_points": pb.Effect(cheapest_item_discount=pb.CheapestItemDiscount()),
        "redemption_cap.basis_points": pb.Effect(redemption_cap=pb.RedemptionCap(basis_points=10_001)),
    }
    request = pb.CreateCampaignRequest(
        request_id="bad",
        campaign=pb.Campaign(
            name="bad",
            groups=[
                pb.RuleGroup(
                    name="g",
                    condition="receipt.total_minor >",
                    rules=[discount_rule("r", effect) for effect in bad_effects.values()],
                ),
                pb.RuleGroup(name="empty"),
            ],
        ),
    )
    async with rules_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(request)
    remote = read_remote_error(refused.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in remote.violations] == [
        "campaign.groups[0].condition",
        *(f"campaign.groups[0].rules[{index}].effect.{field}" for index, field in enumerate(bad_effects)),
        "campaign.groups[1].rules",
    ]
    assert remote.violations[0].description.startswith("not a valid condition")
    assert "1:22" in remote.violations[0].description, "the position of the error in the expression"


async def test_a_campaign_scope_is_validated_stored_and_read_in_the_store_time_zone(
    tmp_path: Path, database_url: str
) -> None:
    scope = pb.CampaignScope(
        tiers=["gold"],
        store_ids=["msk-1"],
        channels=[receipt_pb2.SALES_CHANNEL_POS],
        weekdays=[1],
        hours=[15],
    )
    rule = discount_rule("happy hour", pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=100)))
    async with rules_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.CreateCampaign(
                pb.CreateCampaignRequest(
                    request_id="bad",
                    campaign=pb.Campaign(
                        name="bad",
                        rules=[rule],
                        scope=pb.CampaignScope(weekdays=[0], days_of_month=[32], hours=[24], channels=[99]),  # type: ignore[list-item]  # an unknown channel number
                    ),
                )
            )
        assert [v.field for v in read_remote_error(invalid.value).violations] == [
            "campaign.scope.weekdays",
            "campaign.scope.days_of_month",
            "campaign.scope.hours",
            "campaign.scope.channels",
        ]
        with pytest.raises(grpc.aio.AioRpcError) as zone:
            await stub.PutStore(
                pb.PutStoreRequest(request_id="s0", store=pb.Store(store_id="msk-1", time_zone="Mars/Olympus"))
            )
        assert [v.field for v in read_remote_error(zone.value).violations] == ["store.time_zone"]
        await stub.PutStore(
            pb.PutStoreRequest(request_id="s1", store=pb.Store(store_id="msk-1", time_zone="Europe/Moscow"))
        )

        created = await stub.CreateCampaign(
            pb.CreateCampaignRequest(request_id="c", campaign=pb.Campaign(name="happy", rules=[rule], scope=scope))
        )
        assert created.campaign.scope == scope
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign.campaign_id))

        async def discount(store_id: str, tier: str) -> int:
            at_noon_utc = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=1000, quantity_milli=1000))
            at_noon_utc.store_id = store_id
            at_noon_utc.receipt_time.FromJsonString("2026-03-02T12:30:00Z")  # a Monday, 15:30 in Moscow
            answer = await stub.EvaluateReceipt(
                pb.EvaluateReceiptRequest(receipt=at_noon_utc, subject=pb.Subject(member_id="m", tier=tier))
            )
            return answer.discount_total_minor

        assert await discount("msk-1", "gold") == 100
        assert await discount("msk-1", "silver") == 0
        assert await discount("spb-1", "gold") == 0


async def test_simulate_includes_drafts_and_explains_every_rule(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        live = await stub.CreateCampaign(
            pb.CreateCampaignRequest(
                request_id="live",
                campaign=pb.Campaign(
                    name="live",
                    rules=[discount_rule("live 1.00", pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=100)))],
                ),
            )
        )
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=live.campaign.campaign_id))
        draft = await stub.CreateCampaign(
            pb.CreateCampaignRequest(
                request_id="draft",
                campaign=pb.Campaign(
                    name="draft",
                    groups=[
                        pb.RuleGroup(
                            name="after the live campaign",
                            priority=1,
                            rules=[
                                discount_rule(
                                    "big receipts",
                                    pb.Effect(discount_percent=pb.DiscountPercent(basis_points=1000)),
                                    "receipt.total_minor >= 5000",
                                )
                            ],
                        )
                    ],
                ),
            )
        )
        draft_id = draft.campaign.campaign_id
        the_receipt = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=6000, quantity_milli=1000))

        both = await stub.SimulateReceipt(
            pb.SimulateReceiptRequest(
                receipt=the_receipt, subject=pb.Subject(member_id="m"), draft_campaign_ids=[draft_id]
            )
        )
        assert both.result.discount_total_minor == 100 + 590
        assert sorted((e.rule_name, e.applied, e.discount_minor) for e in both.explanations) == [
            ("big receipts", True, 590),
            ("live 1.00", True, 100),
        ]
        small = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=1000, quantity_milli=1000))
        drafts_only = await stub.SimulateReceipt(
            pb.SimulateReceiptRequest(receipt=small, draft_campaign_ids=[draft_id], drafts_only=True)
        )
        assert drafts_only.result.discount_total_minor == 0
        assert [(e.campaign_id, e.applied, e.reason) for e in drafts_only.explanations] == [
            (draft_id, False, "condition is false: receipt.total_minor >= 5000")
        ]
        evaluated = await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=the_receipt))
        assert evaluated.discount_total_minor == 100, "a simulation publishes nothing"

        with pytest.raises(grpc.aio.AioRpcError) as published:
            await stub.SimulateReceipt(
                pb.SimulateReceiptRequest(receipt=small, draft_campaign_ids=[live.campaign.campaign_id])
            )
        assert read_remote_error(published.value).reason == "CAMPAIGN_NOT_DRAFT"


async def test_a_campaign_is_paused_resumed_and_ended(tmp_path: Path, database_url: str) -> None:
    rule = discount_rule("1.00 off", pb.Effect(discount_amount=pb.DiscountAmount(amount_minor=100)))
    the_receipt = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=1000, quantity_milli=1000))
    async with rules_stub(tmp_path, database_url) as stub:
        created = await stub.CreateCampaign(
            pb.CreateCampaignRequest(request_id="c", campaign=pb.Campaign(name="c", rules=[rule]))
        )
        campaign_id = created.campaign.campaign_id

        async def change(verb: str, request_id: str) -> pb.Campaign:
            if verb == "pause":
                paused = await stub.PauseCampaign(
                    pb.PauseCampaignRequest(request_id=request_id, campaign_id=campaign_id)
                )
                return paused.campaign
            if verb == "resume":
                resumed = await stub.ResumeCampaign(
                    pb.ResumeCampaignRequest(request_id=request_id, campaign_id=campaign_id)
                )
                return resumed.campaign
            ended = await stub.EndCampaign(pb.EndCampaignRequest(request_id=request_id, campaign_id=campaign_id))
            return ended.campaign

        async def refused(verb: str, request_id: str) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await change(verb, request_id)
            return read_remote_error(error.value).reason

        async def discount() -> int:
            return (await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=the_receipt))).discount_total_minor

        assert await refused("pause", "pause-draft") == "CAMPAIGN_STATUS_CONFLICT"
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=campaign_id))
        assert await discount() == 100
        assert (await change("pause", "pause-1")).status == pb.CAMPAIGN_STATUS_PAUSED
        assert await discount() == 0, "a paused campaign stops applying at once on this replica"
        assert (await change("pause", "pause-1")).status == pb.CAMPAIGN_STATUS_PAUSED, "a retry answers the first"
        assert await refused("pause", "pause-2") == "CAMPAIGN_STATUS_CONFLICT"
        assert (await change("resume", "resume-1")).status == pb.CAMPAIGN_STATUS_ACTIVE
        assert await discount() == 100
        assert (await change("end", "end-1")).status == pb.CAMPAIGN_STATUS_ENDED
        assert await discount() == 0
        assert await refused("resume", "resume-2") == "CAMPAIGN_STATUS_CONFLICT"

        future = pb.Campaign(name="later", rules=[rule])
        future.start_time.FromJsonString("2999-01-01T00:00:00Z")
        later = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="later", campaign=future))
        published = await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id="p-later", campaign_id=later.campaign.campaign_id)
        )
        assert published.campaign.status == pb.CAMPAIGN_STATUS_SCHEDULED
