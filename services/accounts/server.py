"""Wiring of the accounts (points ledger) service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.accounts.v1 import accounts_service_pb2, accounts_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.accounts import store
from services.accounts.api import AccountsApi


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    api = AccountsApi(context.sessions, relay, context.settings.default_point_currency, context.metrics.registry)
    accounts_service_pb2_grpc.add_AccountsServiceServicer_to_server(api, server)


DEFINITION = ServiceDefinition(
    name="accounts",
    grpc_service_names=[accounts_service_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
