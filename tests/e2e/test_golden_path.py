"""The golden path through the real gateway over real gRPC, in the embedded shape
(one process, SQLite, in-process bus)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.notifications.v1 import notifications_service_pb2 as notifications
from loyalty.notifications.v1 import notifications_service_pb2_grpc as notifications_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.settings import Settings
from tests import infra


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Settings]:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        yield settings


def receipt(number: str, *amounts: int) -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        store_id="store-1",
        terminal_id="pos-7",
        receipt_number=number,
        currency_code="RUB",
        lines=[
            receipt_pb2.ReceiptLine(position=i, sku=f"SKU-{i}", price_minor=amount, quantity_milli=1000)
            for i, amount in enumerate(amounts, start=1)
        ],
    )


async def test_golden_path(suite: Settings) -> None:
    async with (
        grpc.aio.insecure_channel(suite.address("gateway")) as gateway_channel,
        grpc.aio.insecure_channel(suite.address("members")) as members_channel,
        grpc.aio.insecure_channel(suite.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(suite.address("notifications")) as notifications_channel,
    ):
        member_stub = members_grpc.MembersServiceStub(members_channel)
        registered = await member_stub.RegisterMember(
            members.RegisterMemberRequest(request_id="reg-1", phone="+7 916 555-12-34", first_name="Olga")
        )
        card = await member_stub.IssueCard(
            members.IssueCardRequest(request_id="card-1", member_id=registered.member.member_id)
        )
        rules_stub = rules_grpc.RulesServiceStub(rules_channel)
        campaign = await rules_stub.CreateCampaign(
            rules.CreateCampaignRequest(
                request_id="camp-1",
                campaign=rules.Campaign(
                    name="5% back",
                    rules=[
                        rules.Rule(
                            name="5% of the total",
                            effect=rules.Effect(earn_points_percent=rules.EarnPointsPercent(basis_points=500)),
                            receipt_text="5% back as points",
                        )
                    ],
                ),
            )
        )
        await rules_stub.PublishCampaign(
            rules.PublishCampaignRequest(request_id="pub-1", campaign_id=campaign.campaign.campaign_id)
        )

        gateway = pos_grpc.PosServiceStub(gateway_channel)
        by_card = pos.CustomerIdentifier(card_number=card.card.card_number)
        first = receipt("0001", 10_000, 2_345)
        calculated = await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=first, identifier=by_card))
        assert calculated.points_earned_total == 617  # 5% of 123.45, rounded down
        # spread pro rata, rounded down, the remainder on the last line: 617 * 10000 // 12345 = 499
        assert [line.points_earned for line in calculated.lines] == [499, 118]
        assert calculated.customer.member_id == registered.member.member_id
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

        notification_stub = notifications_grpc.NotificationsServiceStub(notifications_channel)

        async def welcomed() -> bool:
            listed = await notification_stub.ListMessages(
                notifications.ListMessagesRequest(member_id=registered.member.member_id)
            )
            return any("Olga" in message.body for message in listed.messages)

        await infra.wait_until(welcomed, what="the welcome message")


async def test_bad_input_is_rejected_with_the_field(suite: Settings) -> None:
    async with grpc.aio.insecure_channel(suite.address("gateway")) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        bad = receipt("0003", 1000)
        bad.lines[0].quantity_milli = -1
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=bad))
        error = read_remote_error(invalid.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["receipt.lines[0].quantity_milli"]

        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0004")))
        assert "receipt.lines" in [v.field for v in read_remote_error(empty.value).violations]

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await gateway.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(card_number="7700000000016")))
        assert (unknown.value.code(), read_remote_error(unknown.value).reason) == (
            grpc.StatusCode.NOT_FOUND,
            "CARD_NOT_FOUND",
        )

        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await gateway.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(phone="12ab")))
        assert [v.field for v in read_remote_error(malformed.value).violations] == ["identifier.phone"]
