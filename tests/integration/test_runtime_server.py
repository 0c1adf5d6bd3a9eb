"""ServiceHost over real gRPC: health, reflection, metrics, the error contract, graceful stop."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import QueuePool

from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.runtime.bus import InProcessBus
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.server import ServiceHost
from loyalty.runtime.settings import Settings
from services import suite
from tests import infra

MEMBERS_SERVICE = "loyalty.members.v1.MembersService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Running:
    settings: Settings
    host: ServiceHost
    channel: grpc.aio.Channel


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    settings = infra.suite_settings(tmp_path)
    async with (
        infra.running_suite(settings, ("members",)) as hosts,
        grpc.aio.insecure_channel(settings.address("members")) as channel,
    ):
        yield Running(settings, hosts["members"], channel)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples on a Prometheus endpoint, keyed by name and sorted labels."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


async def test_health_answers_serving_for_the_server_and_its_service(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", MEMBERS_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="loyalty.nothing.v1.Nope"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(running: Running) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=MEMBERS_SERVICE),
    ]
    replies = [reply async for reply in reflection.ServerReflectionInfo(iter(requests), timeout=5)]
    assert len(replies) == 2

    listed = {service.name for service in replies[0].list_services_response.service}
    assert {MEMBERS_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        method.name
        for file in files
        if file.package == "loyalty.members.v1"
        for service in file.service
        if service.name == "MembersService"
        for method in service.method
    }
    assert {"RegisterMember", "GetMember", "IssueCard", "IdentifyMember"} <= methods


async def test_requests_are_counted_and_timed_by_method_and_code(running: Running) -> None:
    stub = members_grpc.MembersServiceStub(running.channel)
    await stub.RegisterMember(
        members.RegisterMemberRequest(request_id="reg-1", phone="+79161234567", first_name="Anna"), timeout=10
    )
    for member_id, expected in (("", grpc.StatusCode.INVALID_ARGUMENT), ("no-such-member", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.GetMember(members.GetMemberRequest(member_id=member_id), timeout=10)
        assert failed.value.code() == expected

    samples = await scrape(running.settings.members.metrics_port)

    def requests(method: str, code: str) -> float:
        key = labels(grpc_service=MEMBERS_SERVICE, grpc_method=method, grpc_code=code)
        return samples.get(("loyalty_grpc_server_requests_total", key), 0.0)

    assert requests("RegisterMember", "OK") == 1
    assert requests("GetMember", "INVALID_ARGUMENT") == 1
    assert requests("GetMember", "NOT_FOUND") == 1
    assert requests("GetMember", "OK") == 0

    def latency(suffix: str, method: str, **extra: str) -> float:
        key = labels(grpc_service=MEMBERS_SERVICE, grpc_method=method, **extra)
        return samples[(f"loyalty_grpc_server_request_duration_seconds_{suffix}", key)]

    assert latency("count", "GetMember") == 2
    assert latency("count", "RegisterMember") == 1
    assert latency("bucket", "GetMember", le="+Inf") == 2
    assert latency("sum", "RegisterMember") > 0
    in_flight_labels = labels(grpc_service=MEMBERS_SERVICE, grpc_method="GetMember")
    in_flight = ("loyalty_grpc_server_in_flight_requests", in_flight_labels)
    assert samples[in_flight] == 0


async def test_invalid_argument_carries_error_info_and_every_bad_field(running: Running) -> None:
    stub = members_grpc.MembersServiceStub(running.channel)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.RegisterMember(
            members.RegisterMemberRequest(request_id="reg-bad", phone="", email="not-an-e-mail", first_name="A" * 101),
            timeout=10,
        )
    remote = read_remote_error(failed.value)
    assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
    assert remote.reason == "INVALID_ARGUMENT"
    assert {violation.field for violation in remote.violations} == {"phone", "email", "first_name"}
    assert all(violation.description for violation in remote.violations)

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetMember(members.GetMemberRequest(member_id="no-such-member"), timeout=10)
    not_found = read_remote_error(missing.value)
    assert (not_found.code, not_found.reason, not_found.violations) == (
        grpc.StatusCode.NOT_FOUND,
        "MEMBER_NOT_FOUND",
        (),
    )


async def test_stop_turns_health_not_serving_before_the_server_goes_away(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path, shutdown_grace_seconds=1.0)
    bus = InProcessBus()
    host = ServiceHost(suite.definition("members"), settings, bus)
    await host.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(settings.address("members")) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=MEMBERS_SERVICE))
            statuses: list[int] = []
            async with asyncio.timeout(15):
                ended_by: grpc.aio.AioRpcError | None = None
                try:
                    async for reply in watch:
                        statuses.append(reply.status)
                        if stopping is None:
                            stopping = asyncio.create_task(host.stop())
                except grpc.aio.AioRpcError as error:
                    ended_by = error  # the server went away under the open stream
                assert stopping is not None, f"the health Watch failed before its first answer: {ended_by!r}"
                await stopping
        assert statuses == [SERVING, NOT_SERVING]

        async with grpc.aio.insecure_channel(settings.address("members")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if stopping is None:
            await host.stop()
        elif not stopping.done():
            await stopping
        await bus.close()


async def test_after_stop_the_grpc_port_and_the_metrics_port_refuse(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path, shutdown_grace_seconds=1.0)
    bus = InProcessBus()
    host = ServiceHost(suite.definition("members"), settings, bus)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(settings.address("members")) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == SERVING
        assert await scrape(settings.members.metrics_port)
    finally:
        await host.stop()
        await bus.close()

    async with grpc.aio.insecure_channel(settings.address("members")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):
        await scrape(settings.members.metrics_port)


async def test_a_service_that_cannot_bind_fails_to_start_and_releases_what_it_opened(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.members.port))
        squatter.listen()
        host = ServiceHost(suite.definition("members"), settings, InProcessBus())
        with pytest.raises(RuntimeError):
            await host.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", settings.members.metrics_port))  # the metrics endpoint was closed again
    pool = host.context.engine.sync_engine.pool
    assert isinstance(pool, QueuePool) and pool.checkedout() == 0
