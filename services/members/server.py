"""Wiring of the members service."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc

from loyalty.members.v1 import members_service_pb2, members_service_pb2_grpc
from loyalty.runtime.cache import TtlCache
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from services.members import jobs, store
from services.members.api import MembersApi
from services.members.events import GATEWAY_STREAM, gateway_handler
from services.members.peers import Accounts


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    settings = context.settings
    relay = context.start_outbox_relay(store.outbox)
    identities: TtlCache[members_service_pb2.MemberContext] = TtlCache(settings.identify_cache_seconds)

    def members_changed() -> None:
        relay.notify()
        identities.clear()

    context.subscribe(GATEWAY_STREAM, gateway_handler(context.sessions, relay, identities))
    context.run_in_background(
        jobs.run_periodically(
            "emit_cards",
            lambda: jobs.emit_card_batches(context.sessions),
            context.metrics.job_runs,
            relay.notify,
            settings.card_emission_interval_seconds,
        ),
        "emit-cards",
    )
    context.run_in_background(
        jobs.run_periodically(
            "review_tiers",
            lambda: jobs.review_tiers(context.sessions),
            context.metrics.job_runs,
            members_changed,
            settings.tier_job_interval_seconds,
        ),
        "review-tiers",
    )
    context.run_in_background(
        jobs.run_periodically(
            "recompute_profiles",
            lambda: jobs.recompute_profiles(context.sessions),
            context.metrics.job_runs,
            members_changed,
            settings.segment_job_interval_seconds,
        ),
        "recompute-profiles",
    )
    context.run_in_background(
        jobs.run_periodically(
            "announce_birthdays",
            lambda: jobs.announce_birthdays(context.sessions),
            context.metrics.job_runs,
            relay.notify,
            settings.birthday_job_interval_seconds,
        ),
        "announce-birthdays",
    )
    # Without a configured key, tokens are signed with a key of this process alone: enough
    # for the embedded run, where one replica both issues and verifies them.
    configured = settings.qr_token_secret
    secret = configured.get_secret_value().encode() if configured else secrets.token_bytes(32)
    accounts = Accounts(context.channels)
    api = MembersApi(context.sessions, relay, secret, settings.qr_token_ttl_seconds, identities, accounts.merge)
    members_service_pb2_grpc.add_MembersServiceServicer_to_server(api, server)


DEFINITION = ServiceDefinition(
    name="members",
    grpc_service_names=[members_service_pb2.DESCRIPTOR.services_by_name["MembersService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
