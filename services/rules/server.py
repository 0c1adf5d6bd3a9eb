"""Wiring of the rules (promotions) service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.rules.v1 import rules_service_pb2, rules_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.rules import store
from services.rules.api import RulesApi
from services.rules.service import LiveCampaigns


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    api = RulesApi(context.sessions, relay, LiveCampaigns(context.sessions), context.metrics.registry)
    rules_service_pb2_grpc.add_RulesServiceServicer_to_server(api, server)


DEFINITION = ServiceDefinition(
    name="rules",
    grpc_service_names=[rules_service_pb2.DESCRIPTOR.services_by_name["RulesService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
