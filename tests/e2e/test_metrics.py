"""The business and pipeline figures SREs watch move with what the suite does."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.runtime.settings import Settings
from tests import infra
from tests.e2e.scenario import receipt, set_up_program


async def sample(settings: Settings, service: str, name: str, **labels: str) -> float:
    """The value of one sample on a service's /metrics, 0 when it is not there yet."""
    url = f"http://127.0.0.1:{settings.service(service).metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


async def test_receipts_points_and_events_are_counted(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        program = await set_up_program(settings)
        async with infra.gateway_channel(settings) as channel:
            gateway = pos_grpc.PosServiceStub(channel)
            by_card = pos.CustomerIdentifier(card_number=program.card_number)
            first = receipt("m-1", 10_000)
            await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=first, identifier=by_card))
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=first, identifier=by_card))
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=first, identifier=by_card))  # a retry
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("m-2")))  # no lines

        assert (
            await sample(settings, "gateway", "loyalty_receipts_total", operation="calculate", outcome="completed") == 1
        )
        assert await sample(settings, "gateway", "loyalty_receipts_total", operation="commit", outcome="completed") == 2
        assert await sample(settings, "gateway", "loyalty_receipts_total", operation="commit", outcome="rejected") == 1
        assert await sample(settings, "accounts", "loyalty_points_accrued_total", currency="BONUS") == 500, (
            "the retried commit must not count twice"
        )
        assert await sample(settings, "rules", "loyalty_rule_evaluation_seconds_count") == 2

        async def member_event_flowed() -> bool:
            published = await sample(settings, "members", "loyalty_events_published_total", stream="members")
            handled = await sample(
                settings, "notifications", "loyalty_events_consumed_total", stream="members", outcome="handled"
            )
            return published == 1 and handled == 1

        await infra.wait_until(member_event_flowed, what="member.registered published and handled once")
        assert await sample(settings, "members", "loyalty_outbox_pending_events") == 0


async def test_redeemed_outstanding_and_live_campaigns_are_reported(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        program = await set_up_program(settings)
        async with (
            infra.gateway_channel(settings) as gateway_channel,
            grpc.aio.insecure_channel(settings.address("accounts")) as accounts_channel,
        ):
            by_card = pos.CustomerIdentifier(card_number=program.card_number)
            await pos_grpc.PosServiceStub(gateway_channel).CommitCheque(
                pos.CommitChequeRequest(receipt=receipt("m-3", 100_000), identifier=by_card)
            )
            ledger = AccountsServiceStub(accounts_channel)
            placed = await ledger.PlaceHold(
                accounts.PlaceHoldRequest(request_id="h-1", holder_id=program.member_id, amount=1_200)
            )
            await ledger.CaptureHold(accounts.CaptureHoldRequest(request_id="c-1", hold_id=placed.hold.hold_id))
            await ledger.CaptureHold(accounts.CaptureHoldRequest(request_id="c-1", hold_id=placed.hold.hold_id))
            await ledger.RedeemPoints(
                accounts.RedeemPointsRequest(request_id="r-1", holder_id=program.member_id, amount=300)
            )
        assert await sample(settings, "accounts", "loyalty_points_redeemed_total", currency="BONUS") == 1_500
        assert await sample(settings, "rules", "loyalty_active_campaigns") == 1

        async def liability_reported() -> bool:
            return await sample(settings, "accounts", "loyalty_points_outstanding", currency="BONUS") == 3_500

        await infra.wait_until(liability_reported, what="5000 accrued - 1500 redeemed outstanding")
