"""What the rewards service consumes: the gateway's committed receipts (chips), one transaction per event."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, Handler
from services.rewards import service

GATEWAY_STREAM = "gateway"


def gateway_handler(sessions: async_sessionmaker[AsyncSession]) -> Handler:
    """Handles each gateway event in its own transaction with its inbox record.

    A failure (including losing the inbox race to a concurrent duplicate) raises, so the
    bus delivers the event again; the inbox then makes the repeat a no-op.
    """

    async def handle(event: Event) -> None:
        async with sessions() as session, session.begin():
            await service.handle_gateway_event(session, event)

    return handle
