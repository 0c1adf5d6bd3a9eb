"""The points effects (per each N of money, cheapest item, n-th line, multiplier) through the
real RulesService over gRPC, stored in SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.db import create_engine
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import to_timestamp
from services.rules import service, store
from services.rules.api import usage_to_proto
from services.rules.domain import DiscountPercent, EarnPointsPercent, IncrementCounter, IssueCoupon, Rule
from tests import infra
from tests.integration.test_rules_promotions import discount_rule, receipt
from tests.integration.test_rules_store import draft, rules_stub

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

POINTS = pb.Campaign(
    name="points week",
    rules=[
        discount_rule(
            "10 per 100.00",
            pb.Effect(earn_points_per_amount=pb.EarnPointsPerAmount(points=10, per_minor=10_000)),
            priority=1,
        ),
        discount_rule(
            "half the cheapest soap",
            pb.Effect(
                earn_points_cheapest_item=pb.EarnPointsCheapestItem(basis_points=5000, scope=pb.Scope(skus=["SOAP"]))
            ),
            priority=2,
        ),
        discount_rule(
            "10% on the second line",
            pb.Effect(earn_points_nth_line=pb.EarnPointsNthLine(n=2, basis_points=1000)),
            priority=3,
        ),
        discount_rule(
            "double for gold",
            pb.Effect(earn_points_multiplier=pb.EarnPointsMultiplier(basis_points=20_000)),
            'member.tier == "gold"',
            priority=4,
        ),
    ],
)


def read_back(effect: pb.Effect) -> pb.Effect:
    """The effect as the service answers it: with an (empty) scope always present."""
    answered = pb.Effect()
    answered.CopyFrom(effect)
    kind = answered.WhichOneof("kind")
    assert kind is not None
    getattr(answered, kind).scope.SetInParent()
    return answered


async def test_points_effects_are_stored_and_earn_exact_points_over_grpc(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        created = (await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=POINTS))).campaign
        fetched = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=created.campaign_id))).campaign
        assert fetched == created
        assert [read_back(rule.effect) for rule in POINTS.rules] == [rule.effect for rule in fetched.rules]
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign_id))

        lines = (
            receipt_pb2.ReceiptLine(position=1, sku="MILK", price_minor=15_000, quantity_milli=1000),
            receipt_pb2.ReceiptLine(position=2, sku="SOAP", price_minor=300, quantity_milli=2000),
            receipt_pb2.ReceiptLine(position=3, sku="SOAP", price_minor=250, quantity_milli=1000),
        )
        basic = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(receipt=receipt(*lines), subject=pb.Subject(member_id="m-1", tier="basic"))
        )
        # 158.50 holds one 100.00: 10 points pro rata (9 on MILK, the remainder on the last line);
        # the cheapest soap unit costs 2.50: 125; the second line (6.00) earns 10%: 60.
        assert [line.points for line in basic.lines] == [9, 60, 126]
        names = {rule.rule_id: rule.name for rule in created.rules}
        assert [(names[a.rule_id], a.points) for a in basic.applied_promotions] == [
            ("10 per 100.00", 10),
            ("half the cheapest soap", 125),
            ("10% on the second line", 60),
        ]
        assert basic.points_total == 195

        gold = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(receipt=receipt(*lines), subject=pb.Subject(member_id="m-2", tier="gold"))
        )
        assert [line.points for line in gold.lines] == [18, 120, 252]
        assert [a.points for a in gold.applied_promotions] == [10, 125, 60, 195]
        assert gold.points_total == 390


async def test_bad_points_effects_are_refused_naming_every_field(tmp_path: Path, database_url: str) -> None:
    bad_effects = {
        "earn_points_per_amount.points": pb.Effect(earn_points_per_amount=pb.EarnPointsPerAmount(per_minor=100)),
        "earn_points_per_amount.per_minor": pb.Effect(earn_points_per_amount=pb.EarnPointsPerAmount(points=1)),
        "earn_points_cheapest_item.basis_points": pb.Effect(earn_points_cheapest_item=pb.EarnPointsCheapestItem()),
        "earn_points_nth_line.n": pb.Effect(earn_points_nth_line=pb.EarnPointsNthLine(basis_points=100)),
        "earn_points_multiplier.basis_points": pb.Effect(
            earn_points_multiplier=pb.EarnPointsMultiplier(basis_points=10_000)
        ),
    }
    request = pb.CreateCampaignRequest(
        request_id="bad",
        campaign=pb.Campaign(name="bad", rules=[discount_rule("r", effect) for effect in bad_effects.values()]),
    )
    async with rules_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(request)
    remote = read_remote_error(refused.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in remote.violations] == [
        f"campaign.rules[{index}].effect.{field}" for index, field in enumerate(bad_effects)
    ]


# counters: DOMAIN.md "every 5th purchase over 500 -> +100 points"

EVERY_FIFTH = pb.Campaign(
    name="every 5th purchase over 500",
    rules=[
        discount_rule(
            "count purchases over 500",
            pb.Effect(increment_counter=pb.IncrementCounter(counter="big_purchases", by=1)),
            "receipt.total_minor >= 50000",
        ),
        discount_rule(
            "+100 on the 5th",
            pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=100)),
            "receipt.total_minor >= 50000 && member.counters.big_purchases % 5 == 4",
        ),
    ],
)


def gateway_event(event_type: str, number: str, payload: dict[str, Any]) -> Event:
    return Event(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        source="gateway",
        key=f"pos-1:{number}",
        occurred_at=NOW,
        payload={"partner_id": "partner-1", "terminal_id": "pos-1", "receipt_number": number, **payload},
        trace_context={},
    )


def committed(number: str, member_id: str, answer: pb.EvaluateReceiptResponse) -> Event:
    """cheque.committed as the gateway publishes it for a receipt evaluated to `answer`."""
    total = sum(line.final_amount_minor + line.discount_minor for line in answer.lines)
    return gateway_event(
        "cheque.committed",
        number,
        {
            "member_id": member_id,
            "receipt_time": NOW.isoformat(),
            "total_minor": total,
            "paid_minor": total - answer.discount_total_minor,
            "applied_promotions": [
                {
                    "campaign_id": a.campaign_id,
                    "rule_id": a.rule_id,
                    "by_coupon": bool(a.coupon_code),
                    "discount_minor": a.discount_minor,
                    "points": a.points,
                }
                for a in answer.applied_promotions
            ],
        },
    )


def returned(number: str, member_id: str, returned_minor: int, cancelled: bool = False) -> Event:
    return gateway_event(
        "cheque.returned",
        number,
        {"member_id": member_id, "returned_minor": returned_minor, "cancelled": cancelled, "return_id": number},
    )


async def test_every_fifth_purchase_over_500_earns_100_points_counted_at_commit_and_reverted_on_return(
    tmp_path: Path, database_url: str
) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    engine = create_engine(database_url)
    async with (
        infra.running_suite(settings, ("rules",)) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(channel)
        bus = hosts["rules"].bus
        created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=EVERY_FIFTH))
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign.campaign_id))

        async def counter() -> int:
            async with engine.connect() as connection:
                value = await connection.scalar(
                    text("SELECT value FROM member_counters WHERE member_id = 'm-1' AND counter = 'big_purchases'")
                )
            return int(value or 0)

        async def buy(number: str, total_minor: int, counted: int) -> pb.EvaluateReceiptResponse:
            """Evaluates a receipt, commits it, and waits until the counter reads `counted`."""
            line = receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=total_minor, quantity_milli=1000)
            answer = await stub.EvaluateReceipt(
                pb.EvaluateReceiptRequest(receipt=receipt(line), subject=pb.Subject(member_id="m-1"))
            )
            await bus.publish("gateway", committed(number, "m-1", answer))

            async def reached() -> bool:
                return await counter() == counted

            await infra.wait_until(reached, f"the counter at {counted} after receipt {number}")
            return answer

        async def settle(event: Event, expected: int) -> None:
            await bus.publish("gateway", event)

            async def reached() -> bool:
                return await counter() == expected

            await infra.wait_until(reached, f"the counter at {expected} after {event.event_type}")

        points = [(await buy(str(n), 60_000, n)).points_total for n in range(1, 5)]
        assert points == [0, 0, 0, 0]
        small = await buy("small", 40_000, 4)
        assert (small.points_total, len(small.applied_promotions)) == (0, 0), "under 500.00: neither counted nor paid"
        fifth = await buy("5", 60_000, 5)
        assert fifth.points_total == 100, "the 5th purchase over 500 earns 100"
        sixth = await buy("6", 60_000, 6)
        assert sixth.points_total == 0

        # a redelivered commit counts nothing more (the event id is in the inbox)
        again = committed("6", "m-1", sixth)
        await bus.publish("gateway", again)
        await bus.publish("gateway", again)
        await settle(returned("6", "m-1", 20_000), 6)
        assert await counter() == 6, "a redelivery and a partial return keep the count"
        await settle(returned("6", "m-1", 40_000), 5)  # now wholly returned: 20,000 + 40,000 = paid
        await settle(returned("6", "m-1", 1, cancelled=True), 5)  # already taken back, never twice
        await settle(returned("2", "m-1", 0, cancelled=True), 4)  # a cancelled receipt
        # with receipts 6 and 2 taken back, four purchases count: the next one is the 5th again
        assert [(await buy(str(n), 60_000, n - 2)).points_total for n in (7, 8, 9)] == [100, 0, 0]
    await engine.dispose()


async def test_parallel_commits_and_returns_of_one_member_change_the_counter_exactly(database_url: str) -> None:
    """Ten receipts of one member committed at once add ten (the upsert adds atomically), and
    two cancellations of one receipt delivered at once take it back once."""
    campaign = dataclasses.replace(
        draft("stamps"), rules=(Rule("stamp", "stamp", "", IncrementCounter("stamps", 2), "", 0),)
    )
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_campaign(session, campaign)
        async with sessions() as session, session.begin():
            await service.publish_campaign(session, "stamps")
        stamp = pb.EvaluateReceiptResponse(
            applied_promotions=[pb.AppliedPromotion(campaign_id="stamps", rule_id="stamp")],
            lines=[pb.LineResult(position=1, final_amount_minor=1000)],
        )

        async def deliver(event: Event) -> None:
            async with sessions() as session, session.begin():
                await service.handle_gateway_event(session, event)

        await asyncio.gather(*(deliver(committed(str(n), "m-1", stamp)) for n in range(10)))
        async with sessions() as session:
            assert await service.member_counters(session, "m-1") == {"stamps": 20}
        await asyncio.gather(*(deliver(returned("3", "m-1", 0, cancelled=True)) for _ in range(2)))
        await asyncio.gather(*(deliver(returned("4", "m-1", 500)) for _ in range(2)))  # 500 + 500 = paid
        async with sessions() as session:
            assert await service.member_counters(session, "m-1") == {"stamps": 16}


async def test_campaign_statistics_count_committed_receipts_participants_discounts_points_and_coupons(
    database_url: str,
) -> None:
    campaign = dataclasses.replace(
        draft("stats"),
        rules=(
            Rule("off", "10% off", "", DiscountPercent(1000), "", 0),
            Rule("earn", "5%", "", EarnPointsPercent(500), "", 1),
            Rule("coupon", "a coupon", "", IssueCoupon("series-1"), "", 2),
        ),
    )

    def answer(discount: int, points: int, member: bool = True) -> pb.EvaluateReceiptResponse:
        applied = [
            pb.AppliedPromotion(campaign_id="stats", rule_id="off", discount_minor=discount),
            pb.AppliedPromotion(campaign_id="stats", rule_id="earn", points=points),
            pb.AppliedPromotion(campaign_id="stats", coupon_code="C-1", discount_minor=777),  # a coupon's, not ours
        ]
        if member:
            applied.append(pb.AppliedPromotion(campaign_id="stats", rule_id="coupon"))
        return pb.EvaluateReceiptResponse(applied_promotions=applied, discount_total_minor=discount)

    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_campaign(session, campaign)
            await service.publish_campaign(session, "stats")

        async def deliver(event: Event) -> None:
            async with sessions() as session, session.begin():
                await service.handle_gateway_event(session, event)

        twice = committed("1", "m-1", answer(1000, 450))
        for event in (
            twice,
            twice,
            committed("2", "m-1", answer(500, 225)),
            committed("3", "m-2", answer(2000, 900)),
            committed("4", "", answer(300, 0, member=False)),
        ):
            await deliver(event)
        async with sessions() as session:
            usage = await service.campaign_usage(session, "stats")
        assert usage_to_proto(usage) == pb.CampaignUsage(
            discount_minor=3800, points=1575, receipts=4, participants=2, coupons_issued=3
        )


# lot parameters and the effects added for the mechanics catalogue

NEW_YEAR = datetime(2026, 12, 31, 21, tzinfo=UTC)
LOTS_AND_SETS = pb.Campaign(
    name="bundles and promo points",
    rules=[
        discount_rule(
            "breakfast set for 35.00",
            pb.Effect(set_price=pb.SetPrice(skus=["MILK", "CHEESE"], price_minor=3500)),
            priority=1,
        ),
        discount_rule(
            "1.00 off every 3rd line",
            pb.Effect(nth_line_discount=pb.NthLineDiscount(n=3, amount_minor=100)),
            priority=2,
        ),
        discount_rule(
            "1% per 20.00, at most 2%",
            pb.Effect(
                discount_percent_per_amount=pb.DiscountPercentPerAmount(
                    basis_points=100, per_minor=2000, max_basis_points=200
                )
            ),
            '"cash" in receipt.payment_types',
            priority=3,
        ),
        discount_rule(
            "+100 until New Year",
            pb.Effect(
                earn_fixed_points=pb.EarnFixedPoints(
                    amount=10_000, lot=pb.PointsLot(expire_time=to_timestamp(NEW_YEAR))
                )
            ),
            priority=4,
        ),
        discount_rule(
            "+1 per 2 units in 2 weeks, promo currency",
            pb.Effect(
                earn_points_per_units=pb.EarnPointsPerUnits(
                    points=100,
                    units=2,
                    lot=pb.PointsLot(
                        activation_delay_days=14,
                        lifetime_days=30,
                        expiry_rounding=pb.POINTS_EXPIRY_ROUNDING_MONTH_END,
                        currency="PROMO",
                    ),
                )
            ),
            priority=5,
        ),
        discount_rule(
            "10% own brand and 500 ml, every 2nd line",
            pb.Effect(
                earn_points_nth_line=pb.EarnPointsNthLine(
                    n=2,
                    basis_points=1000,
                    every=True,
                    scope=pb.Scope(own_brand=True, attributes={"volume_ml": pb.AttributeValue(int_value=500)}),
                )
            ),
            priority=6,
        ),
    ],
)


async def test_new_effects_and_lots_are_stored_and_evaluated_over_grpc(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        created = (await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=LOTS_AND_SETS))).campaign
        fetched = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=created.campaign_id))).campaign
        assert fetched == created
        written = [rule.effect for rule in LOTS_AND_SETS.rules]
        assert [rule.effect.WhichOneof("kind") for rule in fetched.rules] == [e.WhichOneof("kind") for e in written]
        assert fetched.rules[0].effect == written[0], "a set price has no scope of its own"
        assert fetched.rules[3].effect == written[3]
        assert fetched.rules[4].effect.earn_points_per_units.lot == written[4].earn_points_per_units.lot
        assert fetched.rules[5].effect.earn_points_nth_line.scope == written[5].earn_points_nth_line.scope
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign_id))

        lines = (
            receipt_pb2.ReceiptLine(position=1, sku="MILK", price_minor=1000, quantity_milli=2000),
            receipt_pb2.ReceiptLine(position=2, sku="CHEESE", price_minor=3000, quantity_milli=1000),
            receipt_pb2.ReceiptLine(position=3, sku="BREAD", price_minor=700, quantity_milli=1000),
        )
        the_receipt = receipt(*lines)
        the_receipt.receipt_time.FromDatetime(NOW)
        the_receipt.payments.add(type=receipt_pb2.PAYMENT_TYPE_CASH, amount_minor=5700)
        answer = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(receipt=the_receipt, subject=pb.Subject(member_id="m-1"))
        )
        # set: 10.00 + 30.00 -> 35.00 is 5.00 off, 1:3 -> 1.25 and 3.75; the 3rd line 1.00 off;
        # then, paid in cash, 2% (51.00 left holds two 20.00 steps) = 1.02, spread 18.75 : 26.25 : 6.00
        assert [line.discount_minor for line in answer.lines] == [125 + 37, 375 + 52, 100 + 13]
        assert answer.discount_total_minor == 702
        # +100 in its own lot until New Year; 4 units make two steps of 2: 200 in PROMO, active
        # 14 days after the receipt; the nth-line rule's scope matches no line (no catalogue here)
        assert [(lot.points, lot.currency) for lot in answer.points_lots] == [(10_000, ""), (200, "PROMO")]
        assert answer.points_lots[0].expire_time.ToDatetime(tzinfo=UTC) == NEW_YEAR
        assert not answer.points_lots[0].HasField("activate_time")
        promo_lot = answer.points_lots[1]
        assert promo_lot.activate_time.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
        assert (promo_lot.lifetime_days, promo_lot.expiry_rounding) == (30, pb.POINTS_EXPIRY_ROUNDING_MONTH_END)
        assert sum(lot.points for lot in answer.points_lots) == answer.points_total == 10_200

        card = receipt(*lines)
        card.payments.add(type=receipt_pb2.PAYMENT_TYPE_BANK_CARD, amount_minor=5700, card_bin="41111111")
        by_card = await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=card, subject=pb.Subject()))
        assert [line.discount_minor for line in by_card.lines] == [125, 375, 100], "no cash, no stepped %"
        assert list(by_card.points_lots) == [], "anonymous receipts earn no points"


async def test_bad_lots_and_new_effects_are_refused_naming_every_field(tmp_path: Path, database_url: str) -> None:
    bad_effects = {
        "earn_fixed_points.lot.expire_time": pb.Effect(
            earn_fixed_points=pb.EarnFixedPoints(
                amount=1, lot=pb.PointsLot(expire_time=to_timestamp(NEW_YEAR), lifetime_days=10)
            )
        ),
        "earn_points_percent.lot.currency": pb.Effect(
            earn_points_percent=pb.EarnPointsPercent(basis_points=1, lot=pb.PointsLot(currency="promo"))
        ),
        "earn_points_per_units.units": pb.Effect(earn_points_per_units=pb.EarnPointsPerUnits(points=1)),
        "set_price.skus": pb.Effect(set_price=pb.SetPrice(skus=["MILK"], price_minor=100)),
        "nth_line_discount.amount_minor": pb.Effect(nth_line_discount=pb.NthLineDiscount(n=2)),
        "discount_percent_per_amount.max_basis_points": pb.Effect(
            discount_percent_per_amount=pb.DiscountPercentPerAmount(basis_points=100, per_minor=100)
        ),
    }
    request = pb.CreateCampaignRequest(
        request_id="bad",
        campaign=pb.Campaign(name="bad", rules=[discount_rule("r", effect) for effect in bad_effects.values()]),
    )
    async with rules_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(request)
    remote = read_remote_error(refused.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in remote.violations] == [
        f"campaign.rules[{index}].effect.{field}" for index, field in enumerate(bad_effects)
    ]


async def test_returns_give_budgets_back_pro_rata_and_the_use_once_wholly_returned(database_url: str) -> None:
    campaign = dataclasses.replace(
        draft("budget"),
        rules=(
            Rule("off", "10% off", "", DiscountPercent(1000), "", 0),
            Rule("earn", "5%", "", EarnPointsPercent(500), "", 1),
        ),
    )
    answer = pb.EvaluateReceiptResponse(
        applied_promotions=[
            pb.AppliedPromotion(campaign_id="budget", rule_id="off", discount_minor=1000),
            pb.AppliedPromotion(campaign_id="budget", rule_id="earn", points=450),
        ],
        lines=[pb.LineResult(position=1, final_amount_minor=9000, discount_minor=1000)],
        discount_total_minor=1000,
    )
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_campaign(session, campaign)
            await service.publish_campaign(session, "budget")

        async def deliver(event: Event) -> None:
            async with sessions() as session, session.begin():
                await service.handle_gateway_event(session, event)

        async def usage_and_uses(member_id: str) -> tuple[int, int, int, int]:
            async with sessions() as session:
                usage = await service.campaign_usage(session, "budget")
                uses = await store.member_uses(session, member_id, ["budget"])
            return usage.discount_minor, usage.points, usage.receipts, uses.get("budget", 0)

        await deliver(committed("1", "m-1", answer))
        await deliver(committed("2", "m-2", answer))
        assert await usage_and_uses("m-1") == (2000, 900, 2, 1)
        # a third of the 90.00 paid comes back: a third of the discount and of the points
        await deliver(returned("1", "m-1", 3000))
        assert await usage_and_uses("m-1") == (2000 - 333, 900 - 150, 2, 1)
        # the rest in two returns at once: the whole receipt is back, exactly once
        await asyncio.gather(deliver(returned("1", "m-1", 3000)), deliver(returned("1", "m-1", 3000)))
        assert await usage_and_uses("m-1") == (1000, 450, 1, 0)
        await deliver(returned("1", "m-1", 0, cancelled=True))
        assert await usage_and_uses("m-1") == (1000, 450, 1, 0), "nothing is given back twice"
        async with sessions() as session:
            assert (await service.campaign_usage(session, "budget")).participants == 1, "m-1 no longer takes part"
        await deliver(returned("2", "m-2", 0, cancelled=True))
        assert await usage_and_uses("m-2") == (0, 0, 0, 0)


async def test_conditions_read_the_card_type_attributes_and_birthday_sent_with_the_subject(
    tmp_path: Path, database_url: str
) -> None:
    campaign = pb.Campaign(
        name="who",
        rules=[
            discount_rule(
                "platinum", pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=1)), 'member.card_type == "platinum"'
            ),
            discount_rule(
                "dog owners",
                pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=10)),
                '"survey_pet" in member.attributes && member.attributes.survey_pet == "dog"',
            ),
            discount_rule(
                "birthday week",
                pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=100)),
                "member.days_to_birthday <= 3 || member.days_since_birthday <= 3",
            ),
        ],
    )
    async with rules_stub(tmp_path, database_url) as stub:
        created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="c", campaign=campaign))
        await stub.PublishCampaign(pb.PublishCampaignRequest(request_id="p", campaign_id=created.campaign.campaign_id))
        the_receipt = receipt(receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=1000, quantity_milli=1000))
        the_receipt.receipt_time.FromDatetime(NOW)  # 2 March

        async def points(subject: pb.Subject) -> int:
            answer = await stub.EvaluateReceipt(pb.EvaluateReceiptRequest(receipt=the_receipt, subject=subject))
            return answer.points_total

        dog = {"survey_pet": pb.AttributeValue(string_value="dog")}
        assert (
            await points(pb.Subject(member_id="m", card_type="platinum", attributes=dog, birth_date="1990-02-28"))
            == 111
        )
        assert await points(pb.Subject(member_id="m", card_type="basic", birth_date="1990-03-10")) == 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await points(pb.Subject(member_id="m", birth_date="28.02.1990"))
        assert [v.field for v in read_remote_error(refused.value).violations] == ["subject.birth_date"]
