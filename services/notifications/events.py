"""What the notifications service consumes: the members stream, one transaction per event."""

from __future__ import annotations

from opentelemetry import propagate, trace
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, Handler
from services.notifications import service

MEMBERS_STREAM = "members"


def members_handler(sessions: async_sessionmaker[AsyncSession], tracer_provider: trace.TracerProvider) -> Handler:
    """Handles each members event in its own transaction with its inbox record.

    A failure (including losing the inbox race to a concurrent duplicate) raises,
    so the bus delivers the event again; the inbox then makes the repeat a no-op.
    """
    tracer = tracer_provider.get_tracer(__name__)

    async def handle(event: Event) -> None:
        with tracer.start_as_current_span(
            f"{MEMBERS_STREAM} process",
            context=propagate.extract(event.trace_context),
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.message.id": event.event_id, "loyalty.event_type": event.event_type},
        ):
            async with sessions() as session, session.begin():
                await service.handle_members_event(session, event)

    return handle
