"""Rules' use cases, and the cache of compiled live campaigns the hot path reads."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.errors import FailedPrecondition, NotFound
from loyalty.runtime.outbox import add_event
from loyalty.runtime.timeutil import utcnow
from services.rules import store
from services.rules.domain import (
    Campaign,
    CampaignStatus,
    CompiledCampaign,
    Evaluation,
    Receipt,
    Subject,
    compile_campaign,
    evaluate,
)


async def create_campaign(session: AsyncSession, draft: Campaign) -> Campaign:
    await store.add_campaign(session, draft, utcnow())
    return draft


async def get_campaign(session: AsyncSession, campaign_id: str) -> Campaign:
    campaign = await store.find_campaign(session, campaign_id)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    return campaign


async def publish_campaign(session: AsyncSession, campaign_id: str) -> Campaign:
    campaign = await store.find_campaign(session, campaign_id, for_update=True)
    if campaign is None:
        raise NotFound("CAMPAIGN_NOT_FOUND", f"no campaign {campaign_id!r}")
    if campaign.status is not CampaignStatus.DRAFT:
        raise FailedPrecondition("CAMPAIGN_ALREADY_PUBLISHED", "a published campaign cannot be published again")
    compile_campaign(campaign)
    await store.mark_published(session, campaign_id, campaign.version + 1, utcnow())
    await add_event(session, store.outbox, "campaign.published", key=campaign_id, payload={"campaign_id": campaign_id})
    return await get_campaign(session, campaign_id)


def new_campaign_id() -> str:
    return str(uuid.uuid4())


class LiveCampaigns:
    """Compiled campaigns, rebuilt only when a publication happened since the last build.

    A replica checks the newest publication time at most every ``refresh_seconds``,
    so a campaign published on another replica goes live here within that delay,
    and a receipt never recompiles a condition.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], refresh_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self._refresh_seconds = refresh_seconds
        self._compiled: list[CompiledCampaign] = []
        self._built_from: datetime | None = None
        self._checked_at = float("-inf")

    def live_count(self, moment: datetime) -> int:
        """How many of the compiled campaigns apply at `moment` (no database read)."""
        return sum(compiled.campaign.is_live_at(moment) for compiled in self._compiled)

    def invalidate(self) -> None:
        self._checked_at = float("-inf")

    async def current(self) -> list[CompiledCampaign]:
        if time.monotonic() - self._checked_at >= self._refresh_seconds:
            async with self._sessions() as session:
                latest = await store.last_publication(session)
                if latest != self._built_from:
                    campaigns = await store.active_campaigns(session)
                    self._compiled = [compile_campaign(campaign) for campaign in campaigns]
                    self._built_from = latest
            self._checked_at = time.monotonic()
        return self._compiled

    async def evaluate(self, receipt: Receipt, subject: Subject) -> Evaluation:
        return evaluate(receipt, subject, await self.current())
