"""Wiring of the rewards service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from loyalty.rewards.v1 import rewards_service_pb2, rewards_service_pb2_grpc
from loyalty.runtime.ratelimit import RateLimiter, create_rate_limiter
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.rewards import store
from services.rewards.api import RewardsApi
from services.rewards.events import GATEWAY_STREAM, gateway_handler
from services.rewards.jobs import CodeGenerationRunner


async def _close_when_stopped(limiter: RateLimiter) -> None:
    """Holds the limiter open while the service runs; the host cancels this task on stop."""
    try:
        await asyncio.Event().wait()
    finally:
        await limiter.close()


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    context.subscribe(GATEWAY_STREAM, gateway_handler(context.sessions))
    limiter = create_rate_limiter(context.settings)
    context.run_in_background(_close_when_stopped(limiter), "rate-limiter")
    codes = CodeGenerationRunner(context.sessions)
    context.run_in_background(codes.run(), "code-generation")
    rewards_service_pb2_grpc.add_RewardsServiceServicer_to_server(
        RewardsApi(context.sessions, relay.notify, limiter, codes.notify), server
    )


DEFINITION = ServiceDefinition(
    name="rewards",
    grpc_service_names=[rewards_service_pb2.DESCRIPTOR.services_by_name["RewardsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
