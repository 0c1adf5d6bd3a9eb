"""Server bootstrap: the one way every service starts, serves and stops.

A service module describes itself with a ``ServiceDefinition``; ``ServiceHost``
builds everything heavy inside ``start()`` (engine, migrations, metrics
endpoint, tracer, gRPC server with health and reflection, background tasks)
and tears it down in ``stop()``: health turns NOT_SERVING first, then in-flight
calls drain within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.runtime import db
from loyalty.runtime.bus import Event, EventBus, Handler, InProcessBus, RedisStreamsBus
from loyalty.runtime.clients import Channels
from loyalty.runtime.interceptors import ServerInterceptor
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.settings import Settings
from loyalty.runtime.telemetry import MetricsEndpoint, ServerMetrics, create_tracer_provider

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """What a service's wiring gets: its settings, database, bus, peers and metrics."""

    name: str
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    bus: EventBus
    channels: Channels
    metrics: ServerMetrics
    tracer_provider: TracerProvider
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def run_in_background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=f"{self.name}:{name}"))

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        """Registers something the service opened in its wiring (a client, a pool) to close
        when the service stops, after its background tasks."""
        self.closers.append(close)

    def start_outbox_relay(self, outbox: Table) -> OutboxRelay:
        """Publishes this service's outbox to its own stream (named after the service)."""
        relay = OutboxRelay(
            self.sessions,
            outbox,
            self.bus,
            self.name,
            self.name,
            self.settings.outbox_poll_seconds,
            self.metrics.pipeline,
        )
        self.run_in_background(relay.run(), "outbox-relay")
        return relay

    def subscribe(self, stream: str, handler: Handler) -> None:
        """Consumes another service's stream in this service's consumer group. Each event is
        handled in a consumer span that continues the publisher's trace."""
        tracer = self.tracer_provider.get_tracer("loyalty.runtime.bus")
        consumed = self.metrics.pipeline.events_consumed

        async def traced(event: Event) -> None:
            with tracer.start_as_current_span(
                f"{stream} process",
                context=propagate.extract(event.trace_context),
                kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.message.id": event.event_id, "loyalty.event_type": event.event_type},
            ):
                try:
                    await handler(event)
                except Exception:
                    consumed.labels(stream, "failed").inc()
                    raise
            consumed.labels(stream, "handled").inc()
            lag = (datetime.now(UTC) - event.occurred_at).total_seconds()
            self.metrics.pipeline.consumer_lag.labels(stream).set(max(lag, 0.0))

        def dead_lettered(_event: Event) -> None:
            consumed.labels(stream, "dead_lettered").inc()

        self.run_in_background(
            self.bus.consume(
                stream,
                group=self.name,
                consumer=self.settings.instance_name,
                handler=traced,
                on_dead_letter=dead_lettered,
            ),
            name=f"consume:{stream}",
        )


@dataclass(frozen=True)
class ServiceDefinition:
    """How to stand up one service: its name, schema, migrations and wiring."""

    name: str
    grpc_service_names: Sequence[str]
    metadata: MetaData
    migrations_dir: Path
    wire: Callable[[ServiceContext, grpc.aio.Server], Awaitable[None]]


class ServiceHost:
    """One running service: a gRPC server and everything it owns."""

    def __init__(self, definition: ServiceDefinition, settings: Settings, bus: EventBus) -> None:
        self.definition = definition
        self.settings = settings
        self.bus = bus
        self.port: int = 0
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._context: ServiceContext | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None

    @property
    def context(self) -> ServiceContext:
        if self._context is None:
            raise RuntimeError(f"{self.definition.name} is not started")
        return self._context

    async def start(self) -> None:
        """Starts everything the service owns; on any failure, releases what was started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        name, settings = self.definition.name, self.settings
        config = settings.service(name)
        metrics = ServerMetrics.create()
        if config.metrics_port:
            self._metrics_endpoint = MetricsEndpoint(metrics.registry, settings.bind_host, config.metrics_port)
        tracer_provider = create_tracer_provider(name, settings.otlp_endpoint)
        engine = db.create_engine(settings.database_url(name))
        self._context = ServiceContext(
            name=name,
            settings=settings,
            engine=engine,
            sessions=db.create_session_factory(engine),
            bus=self.bus,
            channels=Channels(settings, tracer_provider),
            metrics=metrics,
            tracer_provider=tracer_provider,
        )
        if settings.auto_migrate:
            await db.migrate(engine, self.definition.migrations_dir)
        server = grpc.aio.server(
            interceptors=[
                # Health checks are not traced: they are noise, and the instrumentation
                # cannot wrap the Watch stream (a coroutine, not an async generator).
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider=tracer_provider,
                    filter_=filters.negate(filters.service_name(health.SERVICE_NAME)),
                ),
                ServerInterceptor(metrics),
            ],
            options=[("grpc.so_reuseport", 0)],
        )
        self._server = server
        await self.definition.wire(self._context, server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self.definition.grpc_service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{settings.bind_host}:{config.port}")
        await server.start()
        for service_name in ("", *self.definition.grpc_service_names):
            await self._health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s:%d", name, settings.bind_host, self.port)

    async def stop(self) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_seconds)
        if self._context is not None:
            for task in self._context.tasks:
                task.cancel()
            for task in self._context.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for close in self._context.closers:
                with contextlib.suppress(Exception):
                    await close()
            await self._context.channels.close()
            await self._context.engine.dispose()
            self._context.tracer_provider.shutdown()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        log.info("%s stopped", self.definition.name)


def create_bus(settings: Settings) -> EventBus:
    if settings.event_bus == "redis":
        return RedisStreamsBus(
            settings.redis_url.get_secret_value(), settings.stream_prefix, settings.stream_max_length
        )
    return InProcessBus()


async def run_until_signalled(
    hosts: Sequence[ServiceHost], bus: EventBus, on_ready: Callable[[], Awaitable[None]]
) -> None:
    """Starts the hosts, waits for SIGINT/SIGTERM, then stops them in reverse order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started: list[ServiceHost] = []
    try:
        for host in hosts:
            await host.start()
            started.append(host)
        await on_ready()
        await stop.wait()
        log.info("shutting down")
    finally:
        for host in reversed(started):
            await host.stop()
        await bus.close()
