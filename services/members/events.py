"""What the members service consumes: the gateway's receipts and returns, one transaction
per event, for purchase statistics and tiers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, Handler
from loyalty.runtime.cache import TtlCache
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import utcnow
from services.members import service

GATEWAY_STREAM = "gateway"


def gateway_handler(
    sessions: async_sessionmaker[AsyncSession], relay: OutboxRelay, identities: TtlCache[Any]
) -> Handler:
    """Handles each gateway event in its own transaction with its inbox record.

    A failure (including losing the inbox race to a concurrent duplicate) raises, so the
    bus delivers the event again; the inbox then makes the repeat a no-op. A counted
    purchase may change the member's tier, so their cached identifications are dropped.
    """

    async def handle(event: Event) -> None:
        async with sessions() as session, session.begin():
            member_id = await service.handle_gateway_event(session, event, utcnow())
        if member_id is not None:
            identities.forget(member_id)
            relay.notify()

    return handle
