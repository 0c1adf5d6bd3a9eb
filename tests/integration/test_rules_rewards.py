"""Campaign budgets and uses per member, coupons and badges earned on receipts, and welcome
campaigns on registration: through the real rules service (SQLite and PostgreSQL), with the
real rewards and accounts services where rewards are handed out, and the gateway's and the
members service's events published on the bus as they publish them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from pydantic import SecretStr

from loyalty.accounts.v1 import accounts_service_pb2 as accounts_pb
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.rewards.v1 import rewards_service_pb2 as rewards_pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime.bus import Event
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import to_timestamp, utcnow
from tests import infra

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub
    from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceAsyncStub
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def receipt(total_minor: int, number: str = "1") -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        store_id="store-1",
        terminal_id="pos-1",
        receipt_number=number,
        currency_code="RUB",
        receipt_time=to_timestamp(NOW),
        lines=[receipt_pb2.ReceiptLine(position=1, sku="A", price_minor=total_minor, quantity_milli=1000)],
    )


def committed(member_id: str, applied: list[pb.AppliedPromotion], event_id: str = "") -> Event:
    """A cheque.committed event as the gateway publishes it for a receipt evaluated to `applied`."""
    number = uuid.uuid4().hex[:8]
    return Event(
        event_id=event_id or str(uuid.uuid4()),
        event_type="cheque.committed",
        source="gateway",
        key=f"pos-1:{number}",
        occurred_at=NOW,
        payload={
            "partner_id": "partner-1",
            "terminal_id": "pos-1",
            "receipt_number": number,
            "store_id": "store-1",
            "receipt_time": NOW.isoformat(),
            "currency_code": "RUB",
            "member_id": member_id,
            "holder_id": member_id,
            "total_minor": 10_000,
            "discount_minor": sum(a.discount_minor for a in applied),
            "paid_minor": 10_000 - sum(a.discount_minor for a in applied),
            "points": sum(a.points for a in applied),
            "points_paid": 0,
            "coupons_redeemed": 0,
            "applied_promotions": [
                {
                    "campaign_id": a.campaign_id,
                    "rule_id": a.rule_id,
                    "by_coupon": bool(a.coupon_code),
                    "discount_minor": a.discount_minor,
                    "points": a.points,
                }
                for a in applied
            ],
            "offline": False,
        },
        trace_context={},
    )


def registered(member_id: str, event_id: str = "") -> Event:
    return Event(
        event_id=event_id or str(uuid.uuid4()),
        event_type="member.registered",
        source="members",
        key=member_id,
        occurred_at=utcnow(),
        payload={"member_id": member_id, "phone": "", "email": "", "first_name": "Ann", "status": "active", "tier": ""},
        trace_context={},
    )


async def publish(stub: RulesServiceAsyncStub, campaign: pb.Campaign) -> pb.Campaign:
    created = await stub.CreateCampaign(pb.CreateCampaignRequest(request_id=str(uuid.uuid4()), campaign=campaign))
    published = await stub.PublishCampaign(
        pb.PublishCampaignRequest(request_id=str(uuid.uuid4()), campaign_id=created.campaign.campaign_id)
    )
    return published.campaign


async def evaluate(
    stub: RulesServiceAsyncStub, member_id: str, total_minor: int = 10_000
) -> pb.EvaluateReceiptResponse:
    return await stub.EvaluateReceipt(
        pb.EvaluateReceiptRequest(receipt=receipt(total_minor), subject=pb.Subject(member_id=member_id))
    )


async def reasons(stub: RulesServiceAsyncStub, member_id: str) -> dict[str, str]:
    simulated = await stub.SimulateReceipt(
        pb.SimulateReceiptRequest(receipt=receipt(10_000), subject=pb.Subject(member_id=member_id))
    )
    return {explanation.campaign_id: explanation.reason for explanation in simulated.explanations}


async def test_budgets_and_uses_per_member_are_counted_from_committed_receipts(
    tmp_path: Path, database_url: str
) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rules",)) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(channel)
        bus = hosts["rules"].bus
        rule = pb.Rule(name="10% off", effect=pb.Effect(discount_percent=pb.DiscountPercent(basis_points=1000)))
        budgeted = await publish(
            stub,
            pb.Campaign(name="budget 15.00", rules=[rule], limits=pb.CampaignLimits(discount_budget_minor=1500)),
        )
        bonus = pb.Rule(name="100 points", effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=100)))
        twice = await publish(
            stub, pb.Campaign(name="twice a member", rules=[bonus], limits=pb.CampaignLimits(max_uses_per_member=2))
        )
        assert twice.limits.max_uses_per_member == 2, "the limits are kept"

        first = await evaluate(stub, "m-1")
        assert (first.discount_total_minor, first.points_total) == (1000, 100)
        assert (await reasons(stub, "m-1")) == {budgeted.campaign_id: "", twice.campaign_id: ""}

        delivered_twice = committed("m-1", list(first.applied_promotions))
        for event in (delivered_twice, delivered_twice, committed("m-2", list(first.applied_promotions))):
            await bus.publish("gateway", event)

        async def both_counted() -> bool:
            usage = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=budgeted.campaign_id))).usage
            return usage.receipts >= 2

        await infra.wait_until(both_counted, "two committed receipts counted")
        usage = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=budgeted.campaign_id))).usage
        assert (usage.discount_minor, usage.points, usage.receipts) == (2000, 0, 2), "the redelivery counted once"
        points = (await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=twice.campaign_id))).usage
        assert (points.points, points.receipts) == (200, 2)

        async def budget_spent() -> bool:
            return (await evaluate(stub, "m-3")).discount_total_minor == 0

        await infra.wait_until(budget_spent, "the spent budget to stop the discount")
        assert (await reasons(stub, "m-3"))[budgeted.campaign_id] == "the discount budget is spent (2000 of 1500)"
        assert (await evaluate(stub, "m-1")).points_total == 100, "m-1 has used the bonus once of twice"

        await bus.publish("gateway", committed("m-1", [a for a in first.applied_promotions if a.points]))

        async def used_up() -> bool:
            return (await evaluate(stub, "m-1")).points_total == 0

        await infra.wait_until(used_up, "m-1's second use to end the bonus for m-1")
        assert (await reasons(stub, "m-1"))[twice.campaign_id] == "the member has used the campaign 2 times (at most 2)"
        assert (await evaluate(stub, "m-2")).points_total == 100, "uses are per member"

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(
                pb.CreateCampaignRequest(
                    request_id="bad",
                    campaign=pb.Campaign(name="x", rules=[rule], limits=pb.CampaignLimits(points_budget=-1)),
                )
            )
        assert [v.field for v in read_remote_error(refused.value).violations] == ["campaign.limits.points_budget"]


async def create_series(rewards: RewardsServiceAsyncStub, name: str) -> str:
    created = await rewards.CreateCouponSeries(
        rewards_pb.CreateCouponSeriesRequest(
            request_id=str(uuid.uuid4()),
            name=name,
            kind=rewards_pb.COUPON_SERIES_KIND_UNIQUE,
            benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=1000),
            uses_per_code=1,
        )
    )
    return created.series.series_id


async def coupon_owners(rewards: RewardsServiceAsyncStub, series_id: str) -> list[str]:
    listed = await rewards.ListCoupons(rewards_pb.ListCouponsRequest(series_id=series_id, page_size=500))
    return sorted(coupon.member_id for coupon in listed.coupons)


async def test_coupons_and_badges_are_reported_and_handed_out_once_per_committed_receipt(
    tmp_path: Path, database_url: str
) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rules", "rewards")) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(settings.address("rewards")) as rewards_channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(rules_channel)
        rewards: RewardsServiceAsyncStub = RewardsServiceStub(rewards_channel)
        bus = hosts["rules"].bus
        series_id = await create_series(rewards, "10% off the next purchase")
        badge = await rewards.CreateBadge(
            rewards_pb.CreateBadgeRequest(request_id="badge", name="Big basket", description="Spent 500.00 at once")
        )
        badge_id = badge.badge.badge_id
        campaign = await publish(
            stub,
            pb.Campaign(
                name="big baskets",
                rules=[
                    pb.Rule(
                        name="coupon over 500.00",
                        condition="receipt.total_minor >= 50000",
                        effect=pb.Effect(issue_coupon=pb.IssueCoupon(series_id=series_id)),
                        receipt_text="You got 10% off your next purchase",
                    ),
                    pb.Rule(
                        name="badge over 500.00",
                        condition="receipt.total_minor >= 50000",
                        effect=pb.Effect(award_badge=pb.AwardBadge(badge_id=badge_id)),
                        priority=1,
                    ),
                ],
            ),
        )
        assert campaign.rules[0].effect.issue_coupon.series_id == series_id

        big = await evaluate(stub, "m-1", 60_000)
        assert [(a.coupon_series_id, a.badge_id, a.discount_minor, a.points) for a in big.applied_promotions] == [
            (series_id, "", 0, 0),
            ("", badge_id, 0, 0),
        ]
        assert big.applied_promotions[0].receipt_text == "You got 10% off your next purchase"
        assert not (await evaluate(stub, "m-1", 10_000)).applied_promotions, "the condition is read"
        assert not (await evaluate(stub, "", 60_000)).applied_promotions, "anonymous receipts get no coupons"

        redelivered = committed("m-1", list(big.applied_promotions))
        for event in (redelivered, redelivered, committed("m-2", list(big.applied_promotions))):
            await bus.publish("gateway", event)

        async def m2_served() -> bool:
            return "m-2" in await coupon_owners(rewards, series_id)

        await infra.wait_until(m2_served, "the coupon of the receipt after the redelivered one")
        assert await coupon_owners(rewards, series_id) == ["m-1", "m-2"], "the redelivered receipt issued one coupon"
        badges = await rewards.ListMemberBadges(rewards_pb.ListMemberBadgesRequest(member_id="m-1"))
        assert [award.badge.badge_id for award in badges.awards] == [badge_id]


async def balance(accounts: AccountsServiceAsyncStub, holder_id: str) -> int:
    answer = await accounts.GetBalance(accounts_pb.GetBalanceRequest(holder_id=holder_id))
    return answer.balance.active + answer.balance.pending


async def welcome_campaign(stub: RulesServiceAsyncStub, series_id: str) -> pb.Campaign:
    """DOMAIN.md's worked example: 500 points and a 10% coupon on registration."""
    return await publish(
        stub,
        pb.Campaign(
            name="welcome",
            trigger=pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED,
            rules=[
                pb.Rule(name="welcome points", effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=500))),
                pb.Rule(name="welcome coupon", effect=pb.Effect(issue_coupon=pb.IssueCoupon(series_id=series_id))),
            ],
        ),
    )


async def test_a_welcome_campaign_gives_500_points_and_a_coupon_once_on_registration(
    tmp_path: Path, database_url: str
) -> None:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("accounts", "rules", "rewards")) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(settings.address("rewards")) as rewards_channel,
        grpc.aio.insecure_channel(settings.address("accounts")) as accounts_channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(rules_channel)
        rewards: RewardsServiceAsyncStub = RewardsServiceStub(rewards_channel)
        accounts: AccountsServiceAsyncStub = AccountsServiceStub(accounts_channel)
        bus = hosts["rules"].bus
        series_id = await create_series(rewards, "Welcome 10%")
        campaign = await welcome_campaign(stub, series_id)
        assert campaign.trigger == pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED

        on_receipt = await evaluate(stub, "m-1")
        assert (on_receipt.points_total, list(on_receipt.applied_promotions)) == (0, []), "not a receipt campaign"
        assert (await reasons(stub, "m-1"))[campaign.campaign_id] == (
            "the campaign runs on member registration, not on receipts"
        )

        twice = registered("m-1")
        for event in (twice, twice, registered("m-2")):
            await bus.publish("members", event)

        async def m2_welcomed() -> bool:
            return await balance(accounts, "m-2") == 500 and "m-2" in await coupon_owners(rewards, series_id)

        await infra.wait_until(m2_welcomed, "the registration after the redelivered one")
        assert await balance(accounts, "m-1") == 500, "a redelivered registration credits once"
        assert await coupon_owners(rewards, series_id) == ["m-1", "m-2"]
        entries = await accounts.ListEntries(accounts_pb.ListEntriesRequest(holder_id="m-1"))
        assert [(e.amount, e.source_ref) for e in entries.entries] == [(500, f"campaign:{campaign.campaign_id}")]


async def test_an_event_triggered_campaign_is_refused_what_needs_a_receipt(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with (
        infra.running_suite(settings, ("rules",)),
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(channel)
        bad: dict[str, Any] = {
            "name": "welcome",
            "trigger": pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED,
            "rules": [pb.Rule(effect=pb.Effect(discount_percent=pb.DiscountPercent(basis_points=1000)))],
            "groups": [pb.RuleGroup(rules=[pb.Rule(effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=1)))])],
            "scope": pb.CampaignScope(store_ids=["store-1"]),
            "limits": pb.CampaignLimits(discount_budget_minor=100),
        }
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(pb.CreateCampaignRequest(request_id="bad", campaign=pb.Campaign(**bad)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(v.field for v in read_remote_error(refused.value).violations) == [
            "campaign.groups",
            "campaign.limits",
            "campaign.rules[0].effect",
            "campaign.scope",
        ]


async def test_a_referral_campaign_rewards_the_referrer_and_welcome_points_keep_their_expiry(
    tmp_path: Path, database_url: str
) -> None:
    """DOMAIN.md: "500 points (valid until 31 August) on registration"; and points for the
    member whose referral code a friend registered with."""
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    until = datetime(2027, 8, 31, 21, tzinfo=UTC)  # the end of 31 August in Moscow
    async with (
        infra.running_suite(settings, ("accounts", "rules")) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(settings.address("accounts")) as accounts_channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(rules_channel)
        accounts: AccountsServiceAsyncStub = AccountsServiceStub(accounts_channel)
        bus = hosts["rules"].bus
        lot = pb.PointsLot(expire_time=to_timestamp(until))
        welcome = pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=500, lot=lot))
        await publish(
            stub,
            pb.Campaign(
                name="welcome",
                trigger=pb.CAMPAIGN_TRIGGER_MEMBER_REGISTERED,
                rules=[
                    pb.Rule(name="500", effect=welcome),
                    pb.Rule(
                        name="+50 to those who told their birthday",
                        condition="member.days_to_birthday >= 0",
                        effect=pb.Effect(
                            earn_fixed_points=pb.EarnFixedPoints(
                                amount=50, lot=pb.PointsLot(expire_time=to_timestamp(datetime(2028, 1, 1, tzinfo=UTC)))
                            )
                        ),
                    ),
                ],
            ),
        )
        for_a_friend = pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=300))
        referral = await publish(
            stub,
            pb.Campaign(
                name="bring a friend",
                trigger=pb.CAMPAIGN_TRIGGER_MEMBER_REFERRED,
                rules=[pb.Rule(name="300 for a friend", effect=for_a_friend)],
            ),
        )
        assert referral.trigger == pb.CAMPAIGN_TRIGGER_MEMBER_REFERRED

        invited = registered("friend-1")
        invited.payload["referrer_id"] = "host-1"
        invited.payload["birth_date"] = "1990-05-01"  # conditions of registration campaigns see it
        for event in (invited, invited, registered("loner-1")):
            await bus.publish("members", event)

        async def all_credited() -> bool:
            return (
                await balance(accounts, "loner-1") == 500
                and await balance(accounts, "friend-1") == 550
                and await balance(accounts, "host-1") == 300
            )

        await infra.wait_until(all_credited, "welcome points for both and the referral points once")
        entries = await accounts.ListEntries(accounts_pb.ListEntriesRequest(holder_id="host-1"))
        assert [(e.amount, e.source_ref) for e in entries.entries] == [(300, f"campaign:{referral.campaign_id}")]
        forecast = await accounts.GetExpiryForecast(
            accounts_pb.GetExpiryForecastRequest(first_month="2027-08", months=1)
        )
        assert [(line.month, line.points) for line in forecast.lines] == [("2027-08", 1000)], "both welcomes"

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(
                pb.CreateCampaignRequest(
                    request_id="scoped referral",
                    campaign=pb.Campaign(
                        name="x",
                        trigger=pb.CAMPAIGN_TRIGGER_MEMBER_REFERRED,
                        rules=[pb.Rule(effect=for_a_friend)],
                        scope=pb.CampaignScope(tiers=["gold"]),
                    ),
                )
            )
        assert [v.field for v in read_remote_error(refused.value).violations] == ["campaign.scope"]
