"""The cluster shape: each service its own process, its own PostgreSQL database, events
on Redis Streams — the golden path, a crash mid-receipt, and graceful shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.runtime.settings import Settings
from services import cluster, suite
from tests import infra
from tests.e2e.scenario import golden_path, issue_coupon, receipt, set_up_program

RESUME_SECONDS = 0.5


@dataclass
class Cluster:
    settings: Settings
    processes: cluster.ServiceProcesses


@pytest.fixture
async def running_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    prefix = f"loyalty_e2e_{uuid.uuid4().hex[:8]}"
    settings = infra.suite_settings(
        tmp_path, event_bus="redis", redis_url=SecretStr(infra.REDIS_URL), stream_prefix=prefix
    )
    ports = {}
    for name in suite.START_ORDER:
        ports[f"LOYALTY_{name.upper()}__PORT"] = str(settings.service(name).port)
        ports[f"LOYALTY_{name.upper()}__METRICS_PORT"] = str(settings.service(name).metrics_port)
    database_urls = await cluster.create_databases(infra.POSTGRES_ADMIN_DSN, prefix)
    environment = cluster.cluster_environment(
        database_urls,
        infra.REDIS_URL,
        {
            **ports,
            "LOYALTY_STREAM_PREFIX": prefix,
            "LOYALTY_SAGA_RESUME_SECONDS": str(RESUME_SECONDS),
            "LOYALTY_OUTBOX_POLL_SECONDS": "0.1",
            "LOYALTY_LOG_FORMAT": "text",
            "LOYALTY_LOG_LEVEL": "WARNING",
            "LOYALTY_ADMIN_TOKEN": infra.ADMIN_TOKEN,
            # Cold processes on a busy CI box: the budget's effect is tested in test_pos_protocol.
            "LOYALTY_CALCULATE_BUDGET_SECONDS": "5",
        },
    )
    processes = cluster.ServiceProcesses(environment)
    processes.start()
    try:
        async with asyncio.timeout(60):
            await cluster.wait_serving({name: settings.address(name) for name in suite.START_ORDER})
        yield Cluster(settings, processes)
    finally:
        processes.stop()
        await cluster.drop_databases(infra.POSTGRES_ADMIN_DSN, prefix)
        await infra.flush_redis_prefix(prefix)


def _pids(processes: cluster.ServiceProcesses) -> Iterator[int]:
    return (process.pid for process in processes.processes.values())


async def test_golden_path_across_processes_on_postgres_and_redis(running_cluster: Cluster) -> None:
    assert len(set(_pids(running_cluster.processes))) == 6
    await golden_path(running_cluster.settings)


async def test_sigterm_stops_every_service_cleanly(running_cluster: Cluster) -> None:
    await set_up_program(running_cluster.settings)
    codes = await asyncio.to_thread(running_cluster.processes.stop)
    assert codes == dict.fromkeys(suite.START_ORDER, 0)


async def test_a_receipt_committed_while_the_ledger_is_down_is_credited_once_it_is_back(
    running_cluster: Cluster,
) -> None:
    settings, processes = running_cluster.settings, running_cluster.processes
    program = await set_up_program(settings)
    processes.kill("accounts")
    async with infra.gateway_channel(settings) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        by_card = pos.CustomerIdentifier(card_number=program.card_number)
        commit = pos.CommitChequeRequest(receipt=receipt("0300", 40_000), identifier=by_card)
        committed = await gateway.CommitCheque(commit, timeout=15)
        assert committed.state == pos.CHEQUE_STATE_COMMITTED, "durable, with the points owed"
        assert committed.points_earned_total == 2000
        assert committed.customer.balance_unavailable, "unknown, not zero"
        degraded = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
        assert (degraded.customer.member_id, degraded.customer.balance_unavailable) == (program.member_id, True)

        processes.start(["accounts"])
        async with asyncio.timeout(60):
            await cluster.wait_serving({"accounts": settings.address("accounts")})

        async def credited() -> bool:
            answer = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
            return not answer.customer.balance_unavailable and answer.customer.available_points == 2000

        await infra.wait_until(credited, what="the resumed saga to credit the points", seconds=20)
        retried = await gateway.CommitCheque(commit)
        assert retried.state == pos.CHEQUE_STATE_COMPLETED
        await asyncio.sleep(RESUME_SECONDS * 3)
        answer = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
        assert answer.customer.available_points == 2000, "the resumer and the retry must not credit twice"


async def test_a_gateway_killed_mid_saga_finishes_the_receipt_exactly_once_after_restart(
    running_cluster: Cluster,
) -> None:
    """Points are captured, the coupon step cannot run (rewards is down), and the gateway is
    SIGKILLed with the receipt half done. Restarted, it finishes the receipt from its own
    durable record: the points are captured once, earned once, the coupon redeemed once."""
    settings, processes = running_cluster.settings, running_cluster.processes
    program = await set_up_program(settings)
    code = await issue_coupon(settings, program.member_id)
    by_card = pos.CustomerIdentifier(card_number=program.card_number)
    async with infra.gateway_channel(settings) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0400", 40_000), identifier=by_card))
        sale = receipt("0401", 10_000)
        calculated = await gateway.CalculateCheque(
            pos.CalculateChequeRequest(receipt=sale, identifier=by_card, coupon_codes=[code], points_to_pay=1_000)
        )
        assert calculated.points_to_pay == 1_000 and calculated.discount_total_minor == 1_000
        processes.kill("rewards")
        commit = pos.CommitChequeRequest(
            receipt=sale, identifier=by_card, calculation_id=calculated.calculation_id, points_paid=1_000
        )
        committed = await gateway.CommitCheque(commit, timeout=15)
        assert committed.state == pos.CHEQUE_STATE_COMMITTED
        processes.kill("gateway")

    processes.start(["gateway", "rewards"])
    async with asyncio.timeout(60):
        await cluster.wait_serving({name: settings.address(name) for name in ("gateway", "rewards")})
    async with infra.gateway_channel(settings) as channel:
        gateway = pos_grpc.PosServiceStub(channel)

        async def completed() -> bool:
            answer = await gateway.CommitCheque(commit)
            return answer.state == pos.CHEQUE_STATE_COMPLETED

        await infra.wait_until(completed, what="the restarted gateway to finish the receipt", seconds=30)
        await asyncio.sleep(RESUME_SECONDS * 3)
        answer = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
        # 2,000 earned before; 1,000 paid; 5% of (9,000 - 1,000 paid with points) = 400 earned
        assert answer.customer.available_points == 1_400
    async with grpc.aio.insecure_channel(settings.address("rewards")) as channel:
        state = await rewards_grpc.RewardsServiceStub(channel).ValidateCoupon(
            rewards.ValidateCouponRequest(code=code, member_id=program.member_id)
        )
    assert (state.valid, state.rejection) == (False, rewards.COUPON_REJECTION_ALREADY_USED)
