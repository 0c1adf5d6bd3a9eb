"""Wiring of the rules (promotions) service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.rules.v1 import rules_service_pb2, rules_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.rules import store
from services.rules.api import RulesApi
from services.rules.events import GATEWAY_STREAM, MEMBERS_STREAM, gateway_handler, members_handler
from services.rules.peers import Rewarder
from services.rules.service import CatalogueCache, LiveCampaigns


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    live = LiveCampaigns(context.sessions, default_cap_basis_points=context.settings.points_payment_cap_basis_points)
    api = RulesApi(context.sessions, relay, live, CatalogueCache(context.sessions), context.metrics.registry)
    rules_service_pb2_grpc.add_RulesServiceServicer_to_server(api, server)
    rewarder = Rewarder(context.channels)
    context.subscribe(GATEWAY_STREAM, gateway_handler(context.sessions, rewarder))
    context.subscribe(MEMBERS_STREAM, members_handler(live, rewarder))


DEFINITION = ServiceDefinition(
    name="rules",
    grpc_service_names=[rules_service_pb2.DESCRIPTOR.services_by_name["RulesService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
