"""Metrics, traces and logs, set up the same way for every service.

Each service gets its own Prometheus registry and its own tracer provider, so
the embedded run (six services in one process) still exports each service's
figures on its own port and under its own ``service.name``.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import TextIO
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from pythonjsonlogger.json import JsonFormatter

QUIET_LIBRARIES = ("aiosqlite", "asyncpg", "sqlalchemy.engine", "sqlalchemy.pool")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _TraceContextFilter(logging.Filter):
    """Stamps every record with the active span's trace and span ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        record.span_id = format(context.span_id, "016x") if context.is_valid else ""
        return True


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Sends every log record to `stream` (standard error by default), as JSON lines or text."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_TraceContextFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # These libraries log statements with their parameters (phones, e-mails) below
    # WARNING; personal data must never reach a log, whatever the level.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


@dataclass
class PipelineMetrics:
    """How events flow: the outbox behind a service, and the streams it consumes."""

    outbox_pending: Gauge
    outbox_oldest_age: Gauge
    events_published: Counter
    events_consumed: Counter
    consumer_lag: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> PipelineMetrics:
        return cls(
            outbox_pending=Gauge(
                "loyalty_outbox_pending_events", "Outbox events not yet published.", registry=registry
            ),
            outbox_oldest_age=Gauge(
                "loyalty_outbox_oldest_pending_age_seconds",
                "Age of the oldest unpublished outbox event; 0 when none is waiting.",
                registry=registry,
            ),
            events_published=Counter(
                "loyalty_events_published", "Events published from the outbox.", ["stream"], registry=registry
            ),
            events_consumed=Counter(
                "loyalty_events_consumed",
                "Event deliveries to this service's handlers, by outcome (handled, failed, dead_lettered).",
                ["stream", "outcome"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                "loyalty_consumer_lag_seconds",
                "Time from an event's occurrence to its handling, for the last event handled.",
                ["stream"],
                registry=registry,
            ),
        )


@dataclass
class ServerMetrics:
    """The request and pipeline metrics every service exports, and the registry its
    business metrics join."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_flight: Gauge
    pipeline: PipelineMetrics
    job_runs: Counter

    @classmethod
    def create(cls) -> ServerMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            pipeline=PipelineMetrics.create(registry),
            job_runs=Counter(
                "loyalty_job_runs",
                "Runs of periodic jobs by task and outcome (ok, failed).",
                ["task", "outcome"],
                registry=registry,
            ),
            requests=Counter(
                "loyalty_grpc_server_requests",
                "gRPC requests handled, by service, method and status code.",
                ["grpc_service", "grpc_method", "grpc_code"],
                registry=registry,
            ),
            latency=Histogram(
                "loyalty_grpc_server_request_duration_seconds",
                "Time to handle a gRPC request.",
                ["grpc_service", "grpc_method"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            in_flight=Gauge(
                "loyalty_grpc_server_in_flight_requests",
                "gRPC requests being handled now.",
                ["grpc_service", "grpc_method"],
                registry=registry,
            ),
        )


class MetricsEndpoint:
    """The HTTP server that exposes one registry at /metrics."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def create_tracer_provider(service_name: str, otlp_endpoint: str | None) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"loyalty-{service_name}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    return provider
