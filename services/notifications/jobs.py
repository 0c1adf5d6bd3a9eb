"""Notifications' background work: the dispatcher that sends due messages, and the daily
birthday greetings. Both are safe with several replicas: a message is claimed by one
dispatcher at a time (SKIP LOCKED on PostgreSQL, SQLite's single writer), and a birthday
greeting has one id per member and year."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.settings import MessagingConfig, Settings
from loyalty.runtime.timeutil import utcnow
from services.notifications import service, store
from services.notifications.domain import Channel, TokenBucket
from services.notifications.providers import Provider, open_providers

log = logging.getLogger(__name__)


class ChannelThrottle:
    """Messages per second per channel, for this replica: a sender waits its turn."""

    def __init__(
        self,
        rates: Mapping[Channel, float],
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._buckets = {channel: TokenBucket(rate) for channel, rate in rates.items()}
        self._clock = clock or asyncio.get_running_loop().time
        self._sleep = sleep

    @classmethod
    def from_settings(cls, config: MessagingConfig) -> ChannelThrottle:
        return cls(
            {
                Channel.EMAIL: config.email_rate_per_second,
                Channel.SMS: config.sms.rate_per_second,
                Channel.PUSH: config.push.rate_per_second,
                Channel.VIBER: config.viber.rate_per_second,
                Channel.TELEGRAM: config.telegram.rate_per_second,
            }
        )

    async def __call__(self, channel: Channel) -> None:
        bucket = self._buckets.get(channel)
        if bucket is not None:
            wait = bucket.wait(self._clock())
            if wait > 0:
                await self._sleep(wait)


async def dispatch_due(
    sessions: async_sessionmaker[AsyncSession],
    providers: Mapping[Channel, Provider],
    delivery: service.Delivery,
    throttle: ChannelThrottle,
    config: MessagingConfig,
) -> int:
    """Claims the messages that are due and takes each down its cascade; returns how many."""
    now = utcnow()
    claim_id = str(uuid.uuid4())
    async with sessions() as session, session.begin():
        claimed = await store.claim_due(
            session, now, config.dispatch_batch, claim_id, now + timedelta(seconds=config.claim_seconds)
        )
    for message in claimed:
        try:
            await service.deliver(sessions, providers, delivery, throttle, message, claim_id, utcnow())
        except Exception:
            # The claim runs out and another pass tries again; one bad message must not
            # hold up the rest of the batch.
            log.exception("delivering message %s failed", message.message_id)
    return len(claimed)


async def run_dispatcher(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, delivery: service.Delivery, job_runs: Counter
) -> None:
    """Sends due messages until cancelled; a full batch is followed by the next at once."""
    config = settings.messaging
    throttle = ChannelThrottle.from_settings(config)
    async with open_providers(settings) as providers:
        while True:
            handled = 0
            try:
                handled = await dispatch_due(sessions, providers, delivery, throttle, config)
            except Exception:
                log.exception("dispatching messages failed; will retry")
                job_runs.labels("dispatch_messages", "failed").inc()
            else:
                job_runs.labels("dispatch_messages", "ok").inc()
            if handled < config.dispatch_batch:
                await asyncio.sleep(config.dispatch_interval_seconds)


async def queue_birthdays(sessions: async_sessionmaker[AsyncSession], delivery: service.Delivery, now: datetime) -> int:
    async with sessions() as session, session.begin():
        return await service.queue_birthdays(session, delivery, now)


async def run_birthdays(
    sessions: async_sessionmaker[AsyncSession], delivery: service.Delivery, interval_seconds: float, job_runs: Counter
) -> None:
    """Looks for birthdays every interval; several runs a day queue each greeting once."""
    while True:
        try:
            await queue_birthdays(sessions, delivery, utcnow())
        except Exception:
            log.exception("queueing birthday greetings failed; will retry")
            job_runs.labels("birthdays", "failed").inc()
        else:
            job_runs.labels("birthdays", "ok").inc()
        await asyncio.sleep(interval_seconds)
