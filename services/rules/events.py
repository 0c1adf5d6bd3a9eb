"""What the rules service consumes: the gateway's receipts (purchase statistics, budgets and
uses, coupons and badges earned) and the members' registrations (welcome campaigns)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event, Handler
from services.rules import service
from services.rules.peers import Rewarder

GATEWAY_STREAM = "gateway"
MEMBERS_STREAM = "members"


def gateway_handler(sessions: async_sessionmaker[AsyncSession], rewarder: Rewarder) -> Handler:
    """Counts each gateway event in its own transaction (the inbox makes a repeat a no-op),
    then hands out what a committed receipt earned. A failure raises, so the bus delivers the
    event again; the rewards' request ids come from the event, so nothing is given twice."""

    async def handle(event: Event) -> None:
        async with sessions() as session, session.begin():
            grants = await service.handle_gateway_event(session, event)
        await rewarder.grant(grants)

    return handle


def members_handler(live: service.LiveCampaigns, rewarder: Rewarder) -> Handler:
    """Runs the campaigns triggered by members events (registration, referral, birthday,
    profile completed); nothing is written here, the peers' idempotency keys make a
    redelivery harmless."""

    async def handle(event: Event) -> None:
        await rewarder.grant(await service.member_event_grants(live, event))

    return handle
