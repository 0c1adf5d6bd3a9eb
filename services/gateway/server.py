"""Wiring of the gateway: the POS API and the saga that completes committed receipts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from loyalty.gateway.v1 import pos_service_pb2, pos_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.gateway import store
from services.gateway.api import PosApi
from services.gateway.metrics import GatewayMetrics
from services.gateway.peers import Peers
from services.gateway.service import PointOfSale


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    resume_seconds = context.settings.saga_resume_seconds
    point_of_sale = PointOfSale(
        context.sessions,
        Peers(context.channels),
        relay,
        GatewayMetrics.create(context.metrics.registry),
        context.metrics.job_runs,
        timedelta(seconds=resume_seconds),
    )
    context.run_in_background(point_of_sale.run_resumer(resume_seconds), "resume-receipts")
    pos_service_pb2_grpc.add_PosServiceServicer_to_server(PosApi(point_of_sale), server)


DEFINITION = ServiceDefinition(
    name="gateway",
    grpc_service_names=[pos_service_pb2.DESCRIPTOR.services_by_name["PosService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
