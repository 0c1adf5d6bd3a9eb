"""Wiring of the notifications service."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.notifications.v1 import notifications_service_pb2, notifications_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.notifications import store
from services.notifications.api import NotificationsApi
from services.notifications.events import STREAMS, stream_handler
from services.notifications.jobs import run_birthdays, run_dispatcher
from services.notifications.providers import configured_channels
from services.notifications.service import Delivery


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    settings = context.settings
    delivery = Delivery.from_settings(settings, configured_channels(settings))
    for stream in STREAMS:
        context.subscribe(stream, stream_handler(context.sessions, stream, delivery))
    context.run_in_background(
        run_dispatcher(context.sessions, settings, delivery, context.metrics.job_runs),
        "dispatch-messages",
    )
    context.run_in_background(
        run_birthdays(
            context.sessions, delivery, settings.messaging.birthday_interval_seconds, context.metrics.job_runs
        ),
        "birthdays",
    )
    notifications_service_pb2_grpc.add_NotificationsServiceServicer_to_server(
        NotificationsApi(context.sessions, delivery), server
    )


DEFINITION = ServiceDefinition(
    name="notifications",
    grpc_service_names=[notifications_service_pb2.DESCRIPTOR.services_by_name["NotificationsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
