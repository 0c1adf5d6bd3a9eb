"""Wiring of the members service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.members.v1 import members_service_pb2, members_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.members import store
from services.members.api import MembersApi


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    members_service_pb2_grpc.add_MembersServiceServicer_to_server(MembersApi(context.sessions, relay), server)


DEFINITION = ServiceDefinition(
    name="members",
    grpc_service_names=[members_service_pb2.DESCRIPTOR.services_by_name["MembersService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
