"""Wiring of the rewards service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.rewards.v1 import rewards_service_pb2, rewards_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.rewards import store
from services.rewards.api import RewardsApi


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    rewards_service_pb2_grpc.add_RewardsServiceServicer_to_server(RewardsApi(context.sessions, relay), server)


DEFINITION = ServiceDefinition(
    name="rewards",
    grpc_service_names=[rewards_service_pb2.DESCRIPTOR.services_by_name["RewardsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
