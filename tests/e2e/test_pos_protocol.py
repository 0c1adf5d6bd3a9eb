"""The POS receipt protocol end to end over real gRPC, every service on its own PostgreSQL
database and events on Redis Streams: calculate with coupons and points, commit, returns,
cancels, offline uploads, terminal keys, and what happens when a service is down."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.client.pos import PosClient, pos_channel
from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import api_key_service_pb2 as keys_pb
from loyalty.gateway.v1 import api_key_service_pb2_grpc as keys_grpc
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime.errors import Unavailable, read_remote_error
from loyalty.runtime.server import ServiceHost
from loyalty.runtime.settings import ServiceConfig, Settings
from loyalty.runtime.timeutil import to_timestamp
from services import cluster, suite
from services.gateway.peers import Peers
from services.members.domain import luhn_check_digit
from tests import infra
from tests.e2e.scenario import Program, issue_coupon, receipt, set_up_program

BUDGET_SECONDS = 2.0


@dataclass
class Suite:
    """The running platform as one test sees it: its own member and its own terminal."""

    settings: Settings
    hosts: dict[str, ServiceHost]
    program: Program
    client: PosClient
    terminal: str

    async def restart(self, name: str) -> None:
        host = ServiceHost(suite.definition(name), self.settings, self.hosts["gateway"].bus)
        await host.start()
        self.hosts[name] = host

    async def balance(self) -> int:
        return (await self.client.identify(self.by_card)).available_points

    @property
    def by_card(self) -> pos.CustomerIdentifier:
        return pos.CustomerIdentifier(card_number=self.program.card_number)

    def receipt(self, number: str, *amounts: int) -> receipt_pb2.Receipt:
        return receipt(number, *amounts, terminal=self.terminal)


@dataclass
class Running:
    settings: Settings
    hosts: dict[str, ServiceHost]
    client: PosClient


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    """One suite for the module (six PostgreSQL databases take a while to migrate); each
    test gets a member and a terminal of its own."""
    prefix = f"loyalty_pos_{uuid.uuid4().hex[:8]}"
    urls = await cluster.create_databases(infra.POSTGRES_ADMIN_DSN, prefix)
    groups = {
        name: ServiceConfig(port=infra.free_port(), metrics_port=infra.free_port(), database_url=SecretStr(urls[name]))
        for name in suite.START_ORDER
    }
    settings = infra.suite_settings(
        tmp_path_factory.mktemp("pos"),
        **groups,
        event_bus="redis",
        redis_url=SecretStr(infra.REDIS_URL),
        stream_prefix=prefix,
        saga_resume_seconds=0.3,
        calculate_budget_seconds=BUDGET_SECONDS,
        api_key_rate_limit=100_000,
        shutdown_grace_seconds=0.5,
    )
    try:
        async with infra.running_suite(settings) as hosts:
            key = await infra.create_api_key(settings)
            async with PosClient(settings.address("gateway"), key, timeout_seconds=10) as client:
                yield Running(settings, hosts, client)
    finally:
        await cluster.drop_databases(infra.POSTGRES_ADMIN_DSN, prefix)
        await infra.flush_redis_prefix(prefix)


@pytest.fixture
async def platform(running: Running) -> Suite:
    phone = f"+7916{random.randrange(10**7):07d}"
    program = await set_up_program(running.settings, phone=phone)
    return Suite(running.settings, running.hosts, program, running.client, f"pos-{uuid.uuid4().hex[:8]}")


async def coupon_state(settings: Settings, code: str, member_id: str) -> tuple[bool, int]:
    async with grpc.aio.insecure_channel(settings.address("rewards")) as channel:
        answer = await rewards_grpc.RewardsServiceStub(channel).ValidateCoupon(
            rewards.ValidateCouponRequest(code=code, member_id=member_id)
        )
    return answer.valid, answer.rejection


def reference(sale: receipt_pb2.Receipt) -> pos.ReceiptReference:
    return pos.ReceiptReference(terminal_id=sale.terminal_id, receipt_number=sale.receipt_number)


async def test_a_sale_with_a_coupon_and_points_then_two_partial_returns(platform: Suite) -> None:
    client, by_card = platform.client, platform.by_card
    first = platform.receipt("1001", 40_000)
    await client.commit(first, by_card)  # 5% of 400.00: 2,000 points to pay with later
    assert await platform.balance() == 2_000

    code = await issue_coupon(platform.settings, platform.program.member_id)
    sale = platform.receipt("1002", 10_000, 20_000)
    sale.lines[0].quantity_milli = 2000
    sale.lines[0].amount_minor = 10_000
    calculated = await client.calculate(sale, by_card, coupon_codes=[code], points_to_pay=1_500)
    assert not calculated.degradations
    [coupon] = calculated.coupons
    assert (coupon.outcome, coupon.discount_minor) == (pos.COUPON_OUTCOME_APPLIED, 3_000)
    assert calculated.discount_total_minor == 3_000
    assert calculated.points_to_pay == 1_500
    assert sum(line.points_paid for line in calculated.lines) == 1_500
    assert calculated.amount_due_minor == 30_000 - 3_000 - 1_500
    assert calculated.customer.available_points == 500, "the held points are no longer available"
    assert all(line.points_paid <= line.max_points_payment for line in calculated.lines)

    committed = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_500)
    assert committed.state == pos.CHEQUE_STATE_COMPLETED
    assert (committed.points_paid, list(committed.coupon_codes)) == (1_500, [code])
    # 5% of what was paid with money: (27,000 - 1,500) * 5% = 1,275
    assert committed.points_earned_total == 1_275
    assert await platform.balance() == 2_000 - 1_500 + 1_275
    assert (await coupon_state(platform.settings, code, platform.program.member_id))[0] is False

    half_of_line_1 = await client.return_cheque(
        "ret-1", reference(sale), [pos.ReturnLine(position=1, quantity_milli=1000)], store_id="store-1"
    )
    assert half_of_line_1.state == pos.CHEQUE_STATE_PARTIALLY_RETURNED
    rest = await client.return_cheque("ret-2", reference(sale), store_id="store-1")
    assert rest.state == pos.CHEQUE_STATE_RETURNED
    assert half_of_line_1.points_taken_back + rest.points_taken_back == 1_275
    assert half_of_line_1.points_refunded + rest.points_refunded == 1_500
    assert half_of_line_1.amount_refund_minor + rest.amount_refund_minor == 27_000 - 1_500
    assert list(rest.coupons_reinstated) == [code]
    assert await platform.balance() == 2_000, "back to before the sale"
    assert (await coupon_state(platform.settings, code, platform.program.member_id))[0] is True

    again = await client.return_cheque("ret-2", reference(sale), store_id="store-1")
    assert again.points_taken_back == rest.points_taken_back, "a retried return answers the first time"
    with pytest.raises(grpc.aio.AioRpcError) as nothing_left:
        await client.return_cheque("ret-3", reference(sale), store_id="store-1")
    assert read_remote_error(nothing_left.value).reason == "RECEIPT_ALREADY_RETURNED"
    assert await platform.balance() == 2_000


async def test_concurrent_partial_returns_never_exceed_the_original(platform: Suite) -> None:
    sale = platform.receipt("2001", 30_000)
    sale.lines[0].quantity_milli = 3000
    sale.lines[0].amount_minor = 30_000
    await platform.client.commit(sale, platform.by_card)
    two_units = [pos.ReturnLine(position=1, quantity_milli=2000)]
    outcomes = await asyncio.gather(
        *(platform.client.return_cheque(f"race-{n}", reference(sale), two_units) for n in range(4)),
        return_exceptions=True,
    )
    succeeded = [o for o in outcomes if isinstance(o, pos.ReturnChequeResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(succeeded) == 1 and len(refused) == 3
    assert {read_remote_error(error).reason for error in refused} == {"RETURN_EXCEEDS_RECEIPT"}
    assert await platform.balance() == 1_500 - succeeded[0].points_taken_back == 500


async def test_a_commit_retried_five_times_accrues_once(platform: Suite) -> None:
    sale = platform.receipt("3001", 10_000, 10_000)
    answers = [await platform.client.commit(sale, platform.by_card) for _ in range(5)]
    answers += await asyncio.gather(*(platform.client.commit(sale, platform.by_card) for _ in range(5)))
    assert {answer.points_earned_total for answer in answers} == {1_000}
    assert len({answer.commit_time.ToNanoseconds() for answer in answers}) == 1
    assert await platform.balance() == 1_000


async def test_cancelling_a_calculation_frees_the_points_and_the_coupon(platform: Suite) -> None:
    client, by_card = platform.client, platform.by_card
    await client.commit(platform.receipt("4001", 40_000), by_card)
    code = await issue_coupon(platform.settings, platform.program.member_id)
    calculated = await client.calculate(
        platform.receipt("4002", 10_000), by_card, coupon_codes=[code], points_to_pay=700
    )
    assert calculated.points_to_pay == 700 and await platform.balance() == 1_300
    cancelled = await client.cancel_calculation("cancel-4002", calculated.calculation_id)
    assert (cancelled.state, cancelled.points_refunded) == (pos.CHEQUE_STATE_CANCELLED, 700)
    assert await platform.balance() == 2_000

    async def coupon_free() -> bool:
        return (await coupon_state(platform.settings, code, platform.program.member_id))[0]

    await infra.wait_until(coupon_free, "the coupon reservation released")
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await client.commit(platform.receipt("4002", 10_000), by_card, calculated.calculation_id, points_paid=700)
    assert read_remote_error(late.value).reason == "CALCULATION_CANCELLED"


async def test_cancelling_a_committed_receipt_reverses_it(platform: Suite) -> None:
    sale = platform.receipt("5001", 20_000)
    await platform.client.commit(sale, platform.by_card)
    assert await platform.balance() == 1_000
    cancelled = await platform.client.cancel_receipt("cancel-5001", reference(sale))
    assert (cancelled.state, cancelled.points_taken_back) == (pos.CHEQUE_STATE_CANCELLED, 1_000)
    assert await platform.balance() == 0
    retried = await platform.client.cancel_receipt("cancel-5001", reference(sale))
    assert retried.points_taken_back == 1_000 and await platform.balance() == 0


async def test_the_saga_resumes_after_a_service_dies_between_steps(platform: Suite) -> None:
    """Points are captured, then the rewards service is down for the coupon step: the
    receipt is durable at once and completes exactly once when rewards is back."""
    client, by_card = platform.client, platform.by_card
    await client.commit(platform.receipt("6001", 40_000), by_card)
    code = await issue_coupon(platform.settings, platform.program.member_id)
    sale = platform.receipt("6002", 10_000)
    calculated = await client.calculate(sale, by_card, coupon_codes=[code], points_to_pay=1_000)
    await platform.hosts["rewards"].stop()
    committed = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
    assert committed.state == pos.CHEQUE_STATE_COMMITTED, "durable; the coupon step is owed"
    assert await platform.balance() == 1_000, "the capture step ran, the accrual waits behind the coupon"

    await platform.restart("rewards")

    async def completed() -> bool:
        answer = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
        return answer.state == pos.CHEQUE_STATE_COMPLETED

    await infra.wait_until(completed, "the resumed saga", seconds=20)
    # 2,000 - 1,000 paid + 5% of (9,000 - 1,000) = 400 earned
    assert await platform.balance() == 1_400
    assert (await coupon_state(platform.settings, code, platform.program.member_id))[1] == (
        rewards.COUPON_REJECTION_ALREADY_USED
    )
    await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
    assert await platform.balance() == 1_400, "nothing applied twice"


async def test_with_the_rules_service_down_the_register_still_gets_an_answer_in_budget(platform: Suite) -> None:
    client, by_card = platform.client, platform.by_card
    await platform.hosts["rules"].stop()
    sale = platform.receipt("7001", 10_000)
    started = time.monotonic()
    calculated = await client.calculate(sale, by_card)
    elapsed = time.monotonic() - started
    assert pos.DEGRADATION_PROMOTIONS_UNAVAILABLE in calculated.degradations
    assert [line.final_amount_minor for line in calculated.lines] == [10_000]
    assert calculated.points_earned_total == 0
    # The budget bounds the gateway's waiting; the margin is for the call itself, not a
    # performance claim (see docs/performance.md for measured figures).
    assert elapsed < BUDGET_SECONDS + 1.0

    committed = await client.commit(sale, by_card, calculated.calculation_id)
    assert committed.state == pos.CHEQUE_STATE_COMMITTED
    await platform.restart("rules")

    async def accrued() -> bool:
        return await platform.balance() == 500

    await infra.wait_until(accrued, "points earned once the rules are back", seconds=20)
    again = await client.commit(sale, by_card, calculated.calculation_id)
    assert (again.state, again.points_earned_total) == (pos.CHEQUE_STATE_COMPLETED, 500)


async def test_offline_receipts_commit_in_order_once_and_a_bad_one_does_not_stop_the_rest(platform: Suite) -> None:
    bad = platform.receipt("8002", 1_000)
    bad.currency_code = "EUR"
    cheques = [
        pos.OfflineCheque(receipt=platform.receipt("8001", 10_000), identifier=platform.by_card),
        pos.OfflineCheque(receipt=bad, identifier=platform.by_card),
        pos.OfflineCheque(receipt=platform.receipt("8003", 20_000), identifier=platform.by_card),
    ]
    uploaded = await platform.client.upload_offline(cheques)
    assert [result.receipt.receipt_number for result in uploaded.results] == ["8001", "8002", "8003"]
    assert [result.points_earned_total for result in uploaded.results] == [500, 0, 1_000]
    assert uploaded.results[1].error_reason == "INVALID_ARGUMENT"
    again = await platform.client.upload_offline(cheques)
    assert [result.state for result in again.results] == [result.state for result in uploaded.results]
    assert await platform.balance() == 1_500


async def test_a_terminal_key_is_scoped_to_its_partner_and_stores(platform: Suite) -> None:
    settings = platform.settings
    sale = platform.receipt("9001", 10_000)
    await platform.client.commit(sale, platform.by_card)
    other_partner = await infra.create_api_key(settings, partner_id="partner-2")
    async with PosClient(settings.address("gateway"), other_partner) as intruder:
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await intruder.return_cheque("steal-1", reference(sale))
        assert (foreign.value.code(), read_remote_error(foreign.value).reason) == (
            grpc.StatusCode.NOT_FOUND,
            "RECEIPT_NOT_FOUND",
        )
        with pytest.raises(grpc.aio.AioRpcError) as foreign_cancel:
            await intruder.cancel_receipt("steal-2", reference(sale))
        assert foreign_cancel.value.code() == grpc.StatusCode.NOT_FOUND
        # The same terminal and number are a different receipt for another partner.
        theirs = await intruder.commit(sale)
        assert theirs.state == pos.CHEQUE_STATE_COMPLETED and theirs.points_earned_total == 0
    assert await platform.balance() == 500

    store_bound = await infra.create_api_key(settings, store_ids=("store-2",))
    async with PosClient(settings.address("gateway"), store_bound) as elsewhere:
        with pytest.raises(grpc.aio.AioRpcError) as out_of_scope:
            await elsewhere.calculate(platform.receipt("9002", 1_000))
        assert (out_of_scope.value.code(), read_remote_error(out_of_scope.value).reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "STORE_NOT_IN_KEY_SCOPE",
        )

    async with grpc.aio.insecure_channel(settings.address("gateway")) as bare:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await pos_grpc.PosServiceStub(bare).Identify(pos.IdentifyRequest(identifier=platform.by_card))
        assert read_remote_error(missing.value).reason == "API_KEY_MISSING"
    for wrong in ("not-a-key", store_bound[:-2] + "xx"):
        async with pos_channel(settings.address("gateway"), wrong) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pos_grpc.PosServiceStub(channel).Identify(pos.IdentifyRequest(identifier=platform.by_card))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_is_refused_and_the_admin_api_needs_its_token(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path, api_key_cache_seconds=0, api_key_rate_limit=3)
    async with infra.running_suite(settings, names=("gateway",)):
        secret = await infra.create_api_key(settings)
        key_id = secret.split("_")[1]
        async with grpc.aio.insecure_channel(settings.address("gateway")) as channel:
            admin = keys_grpc.ApiKeyServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as no_token:
                await admin.ListApiKeys(keys_pb.ListApiKeysRequest())
            assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = (("authorization", f"Bearer {infra.ADMIN_TOKEN}"),)
            listed = await admin.ListApiKeys(keys_pb.ListApiKeysRequest(partner_id=infra.PARTNER), metadata=token)
            assert [key.key_id for key in listed.api_keys] == [key_id]
            assert secret not in str(listed), "secrets are never listed"
            async with pos_channel(settings.address("gateway"), secret) as pos_channel_:
                stub = pos_grpc.PosServiceStub(pos_channel_)
                history = pos.ListCustomerHistoryRequest(identifier=pos.CustomerIdentifier(card_number="1"))
                calls = [stub.ListCustomerHistory(history) for _ in range(4)]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                limited = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
                exhausted = [e for e in limited if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
                assert len(exhausted) == 1, "the fourth call in the window is over the limit of 3"
                status = rpc_status.from_call(exhausted[0])  # type: ignore[arg-type]
                retry = error_details_pb2.RetryInfo()
                assert status is not None and any(detail.Unpack(retry) for detail in status.details)
                assert retry.retry_delay.seconds >= 1
                await admin.RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=key_id), metadata=token)
                with pytest.raises(grpc.aio.AioRpcError) as revoked:
                    await stub.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(card_number="1")))
                assert (revoked.value.code(), read_remote_error(revoked.value).reason) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "API_KEY_INVALID",
                )


@pytest.mark.parametrize(
    ("break_receipt", "field"),
    [
        (lambda r: setattr(r.lines[0], "quantity_milli", -1000), "receipt.lines[0].quantity_milli"),
        (lambda r: setattr(r.lines[0], "amount_minor", 99_999), "receipt.lines[0].amount_minor"),
        (lambda r: setattr(r.lines[1], "position", 1), "receipt.lines[1].position"),
        (lambda r: setattr(r, "currency_code", "USD"), "receipt.currency_code"),
    ],
    ids=["negative-quantity", "amount-above-price", "duplicate-position", "unknown-currency"],
)
async def test_a_malformed_receipt_names_the_field_and_writes_nothing(
    platform: Suite, break_receipt: object, field: str
) -> None:
    sale = platform.receipt("9901", 10_000, 5_000)
    break_receipt(sale)  # type: ignore[operator]
    for call in (platform.client.calculate(sale, platform.by_card), platform.client.commit(sale, platform.by_card)):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await call
        error = read_remote_error(invalid.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in {violation.field for violation in error.violations}
    committed = await platform.client.commit(platform.receipt("9901", 10_000, 5_000), platform.by_card)
    assert committed.points_earned_total == 750, "the number was never taken by the malformed receipt"


async def test_a_customer_registered_at_the_register_earns_and_sees_their_history(platform: Suite) -> None:
    phone = f"+7926{random.randrange(10**7):07d}"
    card = "770000001234" + luhn_check_digit("770000001234")
    registered = await platform.client.register(f"reg-{phone}", phone, first_name="Ivan", card_number=card)
    assert registered.created and registered.customer.member_id
    again = await platform.client.register(f"reg-{phone}", phone, first_name="Ivan", card_number=card)
    assert (again.created, again.customer.member_id) == (True, registered.customer.member_id), "a retry replays"
    known = await platform.client.register(f"reg-again-{phone}", phone, first_name="Ivan")
    assert (known.created, known.customer.member_id) == (False, registered.customer.member_id)
    by_new_card = pos.CustomerIdentifier(card_number=card)
    sale = platform.receipt("9501", 20_000)
    await platform.client.commit(sale, by_new_card)
    await platform.client.return_cheque("ret-9501", reference(sale), [pos.ReturnLine(position=1, quantity_milli=500)])
    history = await platform.client.history(pos.CustomerIdentifier(phone=phone))
    assert history.customer.member_id == registered.customer.member_id
    assert [(item.kind, item.points) for item in history.items] == [
        (pos.HISTORY_KIND_REVERSAL, -500),
        (pos.HISTORY_KIND_ACCRUAL, 1_000),
    ]
    assert history.customer.available_points == 500
    first_page = await platform.client.history(pos.CustomerIdentifier(phone=phone), page_size=1)
    second_page = await platform.client.history(
        pos.CustomerIdentifier(phone=phone), page_size=1, page_token=first_page.next_page_token
    )
    assert [item.points for item in [*first_page.items, *second_page.items]] == [-500, 1_000]


async def test_a_qr_token_identifies_and_a_blocked_card_does_not(platform: Suite) -> None:
    async with grpc.aio.insecure_channel(platform.settings.address("members")) as channel:
        stub = members_grpc.MembersServiceStub(channel)
        token = await stub.IssueQrToken(members.IssueQrTokenRequest(member_id=platform.program.member_id))
        by_qr = pos.CustomerIdentifier(qr_token=token.qr_token)
        sale = platform.receipt("9601", 10_000)
        committed = await platform.client.commit(sale, by_qr)
        assert committed.customer.member_id == platform.program.member_id
        assert committed.points_earned_total == 500
        await stub.BlockCard(
            members.BlockCardRequest(
                request_id=f"block-{uuid.uuid4()}", card_number=platform.program.card_number, reason="lost"
            )
        )
    # The gateway may reuse an identification of this card for member_cache_seconds.
    await asyncio.sleep(platform.settings.member_cache_seconds)
    with pytest.raises(grpc.aio.AioRpcError) as blocked:
        await platform.client.calculate(platform.receipt("9602", 10_000), platform.by_card)
    assert (blocked.value.code(), read_remote_error(blocked.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CARD_BLOCKED",
    )
    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await platform.client.identify(pos.CustomerIdentifier(qr_token=token.qr_token[:-3] + "abc"))
    assert forged.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


async def test_a_household_earns_into_and_pays_from_one_pooled_account(platform: Suite) -> None:
    partner_phone = f"+7903{random.randrange(10**7):07d}"
    partner = await set_up_program(platform.settings, phone=partner_phone)
    async with grpc.aio.insecure_channel(platform.settings.address("members")) as channel:
        stub = members_grpc.MembersServiceStub(channel)
        household = await stub.CreateHousehold(
            members.CreateHouseholdRequest(
                request_id=f"hh-{uuid.uuid4()}", owner_member_id=platform.program.member_id, name="Family"
            )
        )
        await stub.JoinHousehold(
            members.JoinHouseholdRequest(
                request_id=f"join-{uuid.uuid4()}",
                household_id=household.household.household_id,
                member_id=partner.member_id,
            )
        )
    by_partner_card = pos.CustomerIdentifier(card_number=partner.card_number)
    await platform.client.commit(platform.receipt("9701", 20_000), platform.by_card)
    await platform.client.commit(platform.receipt("9702", 40_000), by_partner_card)
    assert await platform.balance() == 3_000, "both purchases earn into the family pool"
    calculated = await platform.client.calculate(platform.receipt("9703", 10_000), by_partner_card, points_to_pay=3_000)
    assert calculated.points_to_pay == 3_000
    assert calculated.customer.available_points == await platform.balance() == 0
    assert calculated.customer.member_id == partner.member_id


async def test_a_gift_card_pays_from_two_registers_without_going_negative_and_refunds_at_most_what_it_paid(
    platform: Suite,
) -> None:
    async with grpc.aio.insecure_channel(platform.settings.address("rewards")) as channel:
        stub = rewards_grpc.RewardsServiceStub(channel)
        batch = await stub.IssueGiftCards(
            rewards.IssueGiftCardsRequest(request_id=f"gc-{uuid.uuid4()}", count=1, currency_code="RUB")
        )
        number = batch.cards[0].card_number
        await stub.ActivateGiftCard(
            rewards.ActivateGiftCardRequest(
                request_id=f"sell-{uuid.uuid4()}",
                card_number=number,
                amount_minor=100_000,
                pin="4321",
                receipt_ref="receipt:gift-card-sale",
            )
        )
    balance = await platform.client.gift_card_balance(number, pin="4321", terminal_id=platform.terminal)
    assert (balance.balance_minor, balance.active) == (100_000, True)
    first, second = platform.receipt("9801", 70_000), platform.receipt("9802", 70_000)
    outcomes = await asyncio.gather(
        platform.client.pay_with_gift_card("9801:gift", number, 70_000, reference(first), pin="4321"),
        platform.client.pay_with_gift_card("9802:gift", number, 70_000, reference(second), pin="4321"),
        return_exceptions=True,
    )
    paid = [o for o in outcomes if isinstance(o, pos.PayWithGiftCardResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(paid) == 1 and paid[0].balance_minor == 30_000
    assert [read_remote_error(error).reason for error in refused] == ["GIFT_CARD_INSUFFICIENT_BALANCE"]
    paid_receipt = first if outcomes[0] is paid[0] else second
    retried = await platform.client.pay_with_gift_card(
        f"{paid_receipt.receipt_number}:gift", number, 70_000, reference(paid_receipt), pin="4321"
    )
    assert retried.balance_minor == 30_000, "a retried payment takes nothing twice"

    refunded = await platform.client.refund_gift_card("refund-1", number, 50_000, reference(paid_receipt))
    assert refunded.balance_minor == 80_000
    with pytest.raises(grpc.aio.AioRpcError) as too_much:
        await platform.client.refund_gift_card("refund-2", number, 30_000, reference(paid_receipt))
    assert too_much.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as wrong_pin:
        await platform.client.pay_with_gift_card("9803:gift", number, 1_000, reference(first), pin="0000")
    assert read_remote_error(wrong_pin.value).reason == "GIFT_CARD_WRONG_PIN"
    assert (await platform.client.gift_card_balance(number, pin="4321")).balance_minor == 80_000


# DOMAIN.md: "every 5th purchase over 500 -> +100 points that expire on 31 December", in stores
# of its own so the other tests' receipts are untouched; in "store-lot" every receipt gets it.
NEW_YEARS_EVE = datetime(datetime.now(UTC).year, 12, 31, 23, 59, 59, tzinfo=UTC)
UNTIL_NEW_YEAR = rules.PointsLot(expire_time=to_timestamp(NEW_YEARS_EVE))
EVERY_FIFTH = rules.Campaign(
    name="every 5th purchase over 500",
    rules=[
        rules.Rule(
            name="count purchases over 500",
            condition='receipt.store_id == "store-fifth" && receipt.total_minor >= 50000',
            effect=rules.Effect(increment_counter=rules.IncrementCounter(counter="big_purchases", by=1)),
        ),
        rules.Rule(
            name="+100 on the 5th",
            condition='receipt.store_id == "store-fifth" && receipt.total_minor >= 50000'
            " && member.counters.big_purchases % 5 == 4",
            effect=rules.Effect(earn_fixed_points=rules.EarnFixedPoints(amount=100, lot=UNTIL_NEW_YEAR)),
            receipt_text="+100 until New Year",
        ),
        rules.Rule(
            name="+100 on every receipt",
            condition='receipt.store_id == "store-lot"',
            effect=rules.Effect(earn_fixed_points=rules.EarnFixedPoints(amount=100, lot=UNTIL_NEW_YEAR)),
        ),
    ],
)


async def publish_every_fifth(settings: Settings) -> None:
    """Publishes EVERY_FIFTH once for the module (both calls are idempotent by request id)."""
    async with grpc.aio.insecure_channel(settings.address("rules")) as channel:
        stub = rules_grpc.RulesServiceStub(channel)
        created = await stub.CreateCampaign(rules.CreateCampaignRequest(request_id="camp-fifth", campaign=EVERY_FIFTH))
        await stub.PublishCampaign(
            rules.PublishCampaignRequest(request_id="pub-fifth", campaign_id=created.campaign.campaign_id)
        )


async def test_an_account_blocked_between_calculation_and_commit_pays_at_once_and_earns_once_unblocked(
    platform: Suite,
) -> None:
    """The hold was placed while the account was open and the goods are gone: the capture
    goes through; the points the receipt earns wait for the block to be lifted."""
    client, by_card, member_id = platform.client, platform.by_card, platform.program.member_id
    await client.commit(platform.receipt("7101", 40_000), by_card)
    sale = platform.receipt("7102", 10_000)
    calculated = await client.calculate(sale, by_card, points_to_pay=1_000)
    async with grpc.aio.insecure_channel(platform.settings.address("accounts")) as channel:
        stub = accounts_grpc.AccountsServiceStub(channel)
        await stub.BlockAccount(
            accounts.BlockAccountRequest(request_id=f"b-{member_id}", holder_id=member_id, actor="desk", reason="x")
        )
        committed = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
        assert committed.state == pos.CHEQUE_STATE_COMMITTED, "durable; the accrual is owed"
        assert await platform.balance() == 1_000
        held, _ = await ledger(platform.settings, member_id)
        assert (held.blocked, held.held, held.active) == (True, 0, 1_000), "captured despite the block, not held"
        await asyncio.sleep(1.0)
        again = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
        assert again.state == pos.CHEQUE_STATE_COMMITTED and await platform.balance() == 1_000, (
            "no accrual while blocked"
        )
        await stub.UnblockAccount(
            accounts.UnblockAccountRequest(request_id=f"u-{member_id}", holder_id=member_id, actor="desk", reason="ok")
        )

    async def completed() -> bool:
        answer = await client.commit(sale, by_card, calculated.calculation_id, points_paid=1_000)
        return answer.state == pos.CHEQUE_STATE_COMPLETED

    await infra.wait_until(completed, "the saga resumed once the account is unblocked", seconds=20)
    assert await platform.balance() == 1_450, "2,000 - 1,000 paid + 5% of (10,000 - 1,000) earned, each once"


async def ledger(settings: Settings, holder_id: str) -> tuple[accounts.Balance, list[accounts.Entry]]:
    """The holder's balance (with its next expiries) and entries, from the accounts service."""
    async with grpc.aio.insecure_channel(settings.address("accounts")) as channel:
        stub = accounts_grpc.AccountsServiceStub(channel)
        balance = (await stub.GetBalance(accounts.GetBalanceRequest(holder_id=holder_id))).balance
        entries = (await stub.ListEntries(accounts.ListEntriesRequest(holder_id=holder_id, page_size=100))).entries
    return balance, list(entries)


def expiring(balance: accounts.Balance, day: datetime) -> int:
    return sum(expiry.amount for expiry in balance.next_expiries if expiry.day == day.date().isoformat())


async def test_the_fifth_purchase_over_500_earns_a_lot_that_expires_on_31_december(platform: Suite) -> None:
    await publish_every_fifth(platform.settings)
    client, by_card, member_id = platform.client, platform.by_card, platform.program.member_id

    def sale(number: str) -> receipt_pb2.Receipt:
        bought = platform.receipt(number, 60_000)
        bought.store_id = "store-fifth"
        return bought

    for number in ("1", "2", "3", "4"):
        assert (await client.commit(sale(number), by_card)).points_earned_total == 3_000  # 5% of 600.00
    fifth = sale("5")

    async def counted_four() -> bool:
        return (await client.calculate(fifth, by_card)).points_earned_total == 3_100

    # the counter moves when the rules service reads cheque.committed off the stream
    await infra.wait_until(counted_four, "four purchases counted", seconds=20)
    calculated = await client.calculate(fifth, by_card)
    assert "+100 until New Year" in calculated.receipt_messages
    committed = await client.commit(fifth, by_card, calculated.calculation_id)
    assert (committed.state, committed.points_earned_total) == (pos.CHEQUE_STATE_COMPLETED, 3_100)

    balance, entries = await ledger(platform.settings, member_id)
    ref = f"receipt:{infra.PARTNER}:{platform.terminal}:5"
    assert sorted(entry.amount for entry in entries if entry.source_ref == ref) == [100, 3_000], "one entry a lot"
    assert balance.available == 4 * 3_000 + 3_100
    assert expiring(balance, NEW_YEARS_EVE) == 100, "only the promo lot expires on 31 December"

    half = pos.ReturnLine(position=1, quantity_milli=500)
    returned = await client.return_cheque("ret-fifth", reference(fifth), [half])
    assert returned.points_taken_back == 1_550
    balance, entries = await ledger(platform.settings, member_id)
    reversals = [entry.amount for entry in entries if entry.kind == accounts.ENTRY_KIND_REVERSAL]
    assert sorted(reversals) == [-1_500, -50], "half of each lot"
    assert balance.available == 4 * 3_000 + 3_100 - 1_550
    assert expiring(balance, NEW_YEARS_EVE) == 50

    await client.return_cheque("ret-fifth-2", reference(fifth), [half])
    balance, entries = await ledger(platform.settings, member_id)
    assert sorted(entry.amount for entry in entries if entry.kind == accounts.ENTRY_KIND_REVERSAL) == [
        -1_500,
        -1_500,
        -50,
        -50,
    ], "two halves take back each lot whole, never more"
    assert balance.available == 4 * 3_000
    assert expiring(balance, NEW_YEARS_EVE) == 0


async def test_a_saga_failing_between_two_lot_accruals_accrues_each_lot_once(
    platform: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second lot's accrual fails once after the first was credited: the resumed saga
    credits the second and does not credit the first again."""
    await publish_every_fifth(platform.settings)
    accrue = Peers.accrue
    calls: list[tuple[str, str]] = []  # (request id, "credited" or "failed"), in order

    async def second_lot_fails_once(
        peers: Peers, request: accounts.AccruePointsRequest
    ) -> accounts.AccruePointsResponse:
        if request.request_id.endswith(":accrue_points:1") and not calls.count((request.request_id, "failed")):
            calls.append((request.request_id, "failed"))
            raise Unavailable("ACCOUNTS_UNAVAILABLE", "injected failure between two lot accruals")
        accrued = await accrue(peers, request)
        calls.append((request.request_id, "credited"))
        return accrued

    monkeypatch.setattr(Peers, "accrue", second_lot_fails_once)
    sale = platform.receipt("7001", 40_000)
    sale.store_id = "store-lot"
    committed = await platform.client.commit(sale, platform.by_card)
    assert committed.state == pos.CHEQUE_STATE_COMMITTED, "durable; the second lot is owed"
    first_lot = f"cheque:{infra.PARTNER}:{platform.terminal}:7001:accrue_points"
    assert calls[:2] == [(first_lot, "credited"), (f"{first_lot}:1", "failed")], "a failure between the lots"

    async def completed() -> bool:
        return (await platform.client.commit(sale, platform.by_card)).state == pos.CHEQUE_STATE_COMPLETED

    await infra.wait_until(completed, "the resumed saga", seconds=20)
    balance, entries = await ledger(platform.settings, platform.program.member_id)
    assert calls.count((first_lot, "credited")) >= 2, "the resumed saga sent the first lot again"
    assert sorted(entry.amount for entry in entries if entry.kind == accounts.ENTRY_KIND_ACCRUAL) == [100, 2_000]
    assert balance.available == 2_100, "each lot credited exactly once"
    assert expiring(balance, NEW_YEARS_EVE) == 100
