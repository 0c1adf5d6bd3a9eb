"""Wiring of the notifications service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.notifications.v1 import notifications_service_pb2, notifications_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.notifications import store
from services.notifications.api import NotificationsApi
from services.notifications.events import MEMBERS_STREAM, members_handler


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    context.subscribe(MEMBERS_STREAM, members_handler(context.sessions))
    notifications_service_pb2_grpc.add_NotificationsServiceServicer_to_server(
        NotificationsApi(context.sessions), server
    )


DEFINITION = ServiceDefinition(
    name="notifications",
    grpc_service_names=[notifications_service_pb2.DESCRIPTOR.services_by_name["NotificationsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
