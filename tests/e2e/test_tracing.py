"""One trace follows a receipt across gRPC hops, and an event across the bus."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from tests import infra
from tests.e2e.scenario import receipt, set_up_program


def _spans_of(exporter: InMemorySpanExporter, service: str, kind: SpanKind) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.resource.attributes["service.name"] == f"loyalty-{service}" and span.kind == kind
    ]


def _one(exporter: InMemorySpanExporter, service: str, kind: SpanKind, name_end: str) -> ReadableSpan:
    matching = [span for span in _spans_of(exporter, service, kind) if span.name.endswith(name_end)]
    assert len(matching) == 1, f"expected one {kind.name} span {name_end} in {service}, got {len(matching)}"
    return matching[0]


async def test_a_receipt_is_one_trace_across_services_and_an_event_continues_its_trace(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    exporter = InMemorySpanExporter()
    async with infra.running_suite(settings) as hosts:
        for host in hosts.values():
            host.context.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        program = await set_up_program(settings, phone="+79160001122")

        async def consumed() -> bool:
            return bool(_spans_of(exporter, "notifications", SpanKind.CONSUMER))

        await infra.wait_until(consumed, what="the notifications consumer span")
        registered = _one(exporter, "members", SpanKind.SERVER, "/RegisterMember")
        welcome = _one(exporter, "notifications", SpanKind.CONSUMER, "process")
        assert welcome.context.trace_id == registered.context.trace_id, "the event carries the trace"

        exporter.clear()
        async with infra.gateway_channel(settings) as channel:
            await pos_grpc.PosServiceStub(channel).CommitCheque(
                pos.CommitChequeRequest(
                    receipt=receipt("t-1", 10_000),
                    identifier=pos.CustomerIdentifier(card_number=program.card_number),
                )
            )

    commit = _one(exporter, "gateway", SpanKind.SERVER, "/CommitCheque")
    identify = _one(exporter, "members", SpanKind.SERVER, "/IdentifyMember")
    accrue = _one(exporter, "accounts", SpanKind.SERVER, "/AccruePoints")
    accrue_call = _one(exporter, "gateway", SpanKind.CLIENT, "/AccruePoints")
    assert {identify.context.trace_id, accrue.context.trace_id} == {commit.context.trace_id}
    assert accrue.parent is not None and accrue.parent.span_id == accrue_call.context.span_id
