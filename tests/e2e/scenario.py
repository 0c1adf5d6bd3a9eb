"""The golden path as one scenario, run against any suite (embedded or cluster)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc

from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.notifications.v1 import notifications_service_pb2 as notifications
from loyalty.notifications.v1 import notifications_service_pb2_grpc as notifications_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime.settings import Settings
from tests import infra


def receipt(number: str, *amounts: int, terminal: str = "pos-7") -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        store_id="store-1",
        terminal_id=terminal,
        receipt_number=number,
        currency_code="RUB",
        lines=[
            receipt_pb2.ReceiptLine(position=i, sku=f"SKU-{i}", price_minor=amount, quantity_milli=1000)
            for i, amount in enumerate(amounts, start=1)
        ],
    )


@dataclass(frozen=True)
class Program:
    member_id: str
    card_number: str


async def set_up_program(settings: Settings, phone: str = "+7 916 555-12-34") -> Program:
    """Registers a member with a phone, issues a card, publishes '5% of the receipt as points'."""
    async with (
        grpc.aio.insecure_channel(settings.address("members")) as members_channel,
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
    ):
        member_stub = members_grpc.MembersServiceStub(members_channel)
        registered = await member_stub.RegisterMember(
            members.RegisterMemberRequest(request_id=f"reg-{phone}", phone=phone, first_name="Olga")
        )
        card = await member_stub.IssueCard(
            members.IssueCardRequest(request_id=f"card-{phone}", member_id=registered.member.member_id)
        )
        rules_stub = rules_grpc.RulesServiceStub(rules_channel)
        campaign = await rules_stub.CreateCampaign(
            rules.CreateCampaignRequest(
                request_id="camp-5",
                campaign=rules.Campaign(
                    name="5% back",
                    rules=[
                        rules.Rule(
                            name="5% of the total",
                            condition="receipt.total_minor > 0",
                            effect=rules.Effect(earn_points_percent=rules.EarnPointsPercent(basis_points=500)),
                            receipt_text="5% back as points",
                        )
                    ],
                ),
            )
        )
        await rules_stub.PublishCampaign(
            rules.PublishCampaignRequest(request_id="pub-5", campaign_id=campaign.campaign.campaign_id)
        )
    return Program(registered.member.member_id, card.card.card_number)


async def golden_path(settings: Settings) -> None:
    """Every step of the foundation's golden path, with what each must answer."""
    program = await set_up_program(settings)
    async with (
        infra.gateway_channel(settings) as gateway_channel,
        grpc.aio.insecure_channel(settings.address("rewards")) as rewards_channel,
        grpc.aio.insecure_channel(settings.address("notifications")) as notifications_channel,
    ):
        gateway = pos_grpc.PosServiceStub(gateway_channel)
        by_card = pos.CustomerIdentifier(card_number=program.card_number)
        first = receipt("0001", 10_000, 2_345)
        calculated = await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=first, identifier=by_card))
        assert calculated.points_earned_total == 617  # 5% of 123.45, rounded down
        # spread pro rata, rounded down, with the remainder on the last line: 617 * 10000 // 12345 = 499
        assert [line.points_earned for line in calculated.lines] == [499, 118]
        assert calculated.customer.member_id == program.member_id
        assert calculated.receipt_messages == ["5% back as points"]

        commit = pos.CommitChequeRequest(receipt=first, identifier=by_card, calculation_id=calculated.calculation_id)
        committed = await gateway.CommitCheque(commit)
        assert committed.state == pos.CHEQUE_STATE_COMPLETED
        assert committed.customer.available_points == 617
        again = await gateway.CommitCheque(commit)
        assert again.customer.available_points == 617, "a retried commit must not accrue twice"
        assert again.commit_time == committed.commit_time

        by_phone = pos.CustomerIdentifier(phone="89165551234")
        second = receipt("0002", 20_000)
        by_phone_calc = await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=second, identifier=by_phone))
        assert by_phone_calc.points_earned_total == 1000
        await gateway.CommitCheque(pos.CommitChequeRequest(receipt=second, identifier=by_phone))
        identified = await gateway.Identify(pos.IdentifyRequest(identifier=by_phone))
        assert identified.customer.available_points == 1617

        rewards_stub = rewards_grpc.RewardsServiceStub(rewards_channel)
        series = await rewards_stub.CreateCouponSeries(
            rewards.CreateCouponSeriesRequest(
                request_id="series-1",
                name="10% off",
                kind=rewards.COUPON_SERIES_KIND_UNIQUE,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=1000),
                uses_per_code=1,
            )
        )
        coupon = await rewards_stub.IssueCoupon(
            rewards.IssueCouponRequest(
                request_id="coupon-1", member_id=program.member_id, series_id=series.series.series_id
            )
        )
        valid = await rewards_stub.ValidateCoupon(
            rewards.ValidateCouponRequest(code=coupon.coupon.code, member_id=program.member_id)
        )
        assert valid.valid
        foreign = await rewards_stub.ValidateCoupon(
            rewards.ValidateCouponRequest(code=coupon.coupon.code, member_id="someone-else")
        )
        assert (foreign.valid, foreign.rejection) == (False, rewards.COUPON_REJECTION_OTHER_MEMBER)

        notification_stub = notifications_grpc.NotificationsServiceStub(notifications_channel)

        async def welcomed() -> bool:
            listed = await notification_stub.ListMessages(
                notifications.ListMessagesRequest(member_id=program.member_id)
            )
            return any("Olga" in message.body for message in listed.messages)

        await infra.wait_until(welcomed, what="the welcome message from member.registered")


async def issue_coupon(settings: Settings, member_id: str, percent_basis_points: int = 1000) -> str:
    async with grpc.aio.insecure_channel(settings.address("rewards")) as channel:
        stub = rewards_grpc.RewardsServiceStub(channel)
        series = await stub.CreateCouponSeries(
            rewards.CreateCouponSeriesRequest(
                request_id=f"series-{uuid.uuid4()}",
                name="percent off",
                kind=rewards.COUPON_SERIES_KIND_UNIQUE,
                benefit=coupon_pb2.CouponBenefit(percent_off_basis_points=percent_basis_points),
                uses_per_code=1,
            )
        )
        issued = await stub.IssueCoupon(
            rewards.IssueCouponRequest(
                request_id=f"coupon-{uuid.uuid4()}", member_id=member_id, series_id=series.series.series_id
            )
        )
        return issued.coupon.code
