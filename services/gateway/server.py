"""Wiring of the gateway: the POS API, its keys, and the saga that completes receipts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from loyalty.gateway.v1 import api_key_service_pb2, api_key_service_pb2_grpc, pos_service_pb2, pos_service_pb2_grpc
from loyalty.runtime.cache import TtlCache
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.ratelimit import create_rate_limiter
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.gateway import store
from services.gateway.api import ApiKeyApi, PosApi
from services.gateway.auth import ApiKeys, pepper_of
from services.gateway.metrics import GatewayMetrics
from services.gateway.peers import Peers
from services.gateway.saga import Saga
from services.gateway.service import PointOfSale


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    settings = context.settings
    relay = context.start_outbox_relay(store.outbox)
    metrics = GatewayMetrics.create(context.metrics.registry)
    peers = Peers(context.channels)
    saga = Saga(
        context.sessions,
        peers,
        relay,
        metrics,
        context.metrics.job_runs,
        timedelta(seconds=settings.saga_resume_seconds),
    )
    point_of_sale = PointOfSale(
        context.sessions,
        peers,
        saga,
        metrics,
        settings.program_currency,
        settings.calculate_budget_seconds,
        settings.hold_ttl_seconds,
        TtlCache(settings.member_cache_seconds, max_entries=10_000),
    )
    limiter = create_rate_limiter(settings)
    context.on_stop(limiter.close)
    keys = ApiKeys(
        context.sessions,
        limiter,
        settings.api_key_rate_limit,
        settings.api_key_rate_window_seconds,
        settings.api_key_cache_seconds,
        pepper_of(settings),
    )
    context.run_in_background(saga.run_resumer(settings.saga_resume_seconds), "resume-receipts")
    pos_service_pb2_grpc.add_PosServiceServicer_to_server(PosApi(point_of_sale, keys), server)
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(
        ApiKeyApi(keys, IdempotentCalls(context.sessions, store.idempotency_keys), admin_token), server
    )


DEFINITION = ServiceDefinition(
    name="gateway",
    grpc_service_names=[
        pos_service_pb2.DESCRIPTOR.services_by_name["PosService"].full_name,
        api_key_service_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
    ],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
