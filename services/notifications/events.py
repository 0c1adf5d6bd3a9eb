"""What the notifications service consumes: the members, accounts and rewards streams, one
transaction per event."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, Handler
from services.notifications import service

# Members feed the contact projection and the welcome, tier and erasure reactions;
# accounts the points messages; rewards the coupon messages.
STREAMS = ("members", "accounts", "rewards")


def consumer_name(stream: str) -> str:
    return f"notifications.{stream}"


def stream_handler(sessions: async_sessionmaker[AsyncSession], stream: str, delivery: service.Delivery) -> Handler:
    """Handles each event of a stream in its own transaction with its inbox record.

    A failure (including losing the inbox race to a concurrent duplicate) raises,
    so the bus delivers the event again; the inbox then makes the repeat a no-op.
    """
    consumer = consumer_name(stream)

    async def handle(event: Event) -> None:
        async with sessions() as session, session.begin():
            await service.handle_event(session, consumer, event, delivery)

    return handle
