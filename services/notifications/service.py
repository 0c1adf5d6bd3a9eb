"""Notifications' use cases, each given the session of its unit of work."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.runtime.bus import Event
from loyalty.runtime.errors import FailedPrecondition, NotFound, Violations
from loyalty.runtime.inbox import first_delivery
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.settings import Settings
from loyalty.runtime.timeutil import utcnow
from services.notifications import store
from services.notifications.domain import (
    BIRTHDAY_EVENT,
    COUPON_ISSUED_EVENT,
    DEFAULT_TEXTS,
    MASS_SEND_EVENT,
    MAX_DELAY,
    MAX_MASS_RECIPIENTS,
    POINTS_ACCRUED_EVENT,
    TIER_CHANGED_EVENT,
    TRIGGER_EVENTS,
    UNKNOWN_MEMBER_GRACE,
    AttemptResult,
    Category,
    Channel,
    Contact,
    InvalidTemplate,
    MassSend,
    MassSendState,
    Message,
    MessageState,
    NotSent,
    Outcome,
    Policy,
    Reason,
    Rendered,
    Template,
    Trigger,
    after_report,
    after_round,
    birthday_in,
    channel_refusal,
    default_template,
    default_trigger,
    erased_contact,
    is_birthday,
    is_capped,
    is_valid_event_type,
    is_valid_locale,
    mass_send_state,
    member_refusal,
    merge_contact,
    message_context,
    quiet_until,
    render,
    sample_context,
    template_locales,
    template_problems,
    zone_of,
)
from services.notifications.providers import Envelope, Provider

log = logging.getLogger(__name__)

MEMBER_EVENTS_WITH_CONTACT = ("member.registered", "member.updated")
MEMBER_ERASED_EVENT = "member.erased"
# Birthday messages get a made-up event id per member and year, so a year's greeting is
# queued once however often the job runs.
BIRTHDAY_NAMESPACE = uuid.UUID("6f1c4a52-2f52-4f0e-9a51-6b7a3c1f0b1d")


@dataclass(frozen=True)
class Delivery:
    """What every use case that queues or sends needs to know about the program's setup."""

    policy: Policy
    configured: frozenset[Channel]
    default_locale: str
    program_name: str

    @classmethod
    def from_settings(cls, settings: Settings, configured: frozenset[Channel]) -> Delivery:
        config = settings.messaging
        return cls(
            policy=Policy(
                quiet_start=config.quiet_hours_start,
                quiet_end=config.quiet_hours_end,
                default_time_zone=config.default_time_zone,
                frequency_cap=config.frequency_cap,
                frequency_window=timedelta(hours=config.frequency_window_hours),
                transactional_needs_consent=config.transactional_needs_consent,
                max_attempts=config.max_attempts,
                retry_base=timedelta(seconds=config.retry_base_seconds),
                retry_max=timedelta(seconds=config.retry_max_seconds),
            ),
            configured=configured,
            default_locale=config.default_locale,
            program_name=config.program_name,
        )


def parse_template(event_type: str, channel: Channel | None, locale: str, subject: str, body: str) -> Template:
    """A template fit to store: well-formed keys, and parts that compile and render with sample data."""
    violations = Violations()
    violations.check(is_valid_event_type(event_type), "template.event_type", "an event type such as member.registered")
    violations.check(channel is not None, "template.channel", "required")
    violations.check(is_valid_locale(locale), "template.locale", "a locale such as en or pt-BR")
    violations.raise_if_any()
    assert channel is not None
    template = Template(event_type, channel, locale, subject, body)
    for part, problem in template_problems(template).items():
        violations.add(f"template.{part}", problem)
    violations.raise_if_any()
    return template


async def upsert_template(session: AsyncSession, template: Template) -> Template:
    await store.upsert_template(session, template)
    return template


async def preview(session: AsyncSession, template: Template, member_id: str, delivery: Delivery) -> Rendered:
    """The template rendered for a member of the projection, or for the sample member."""
    context = sample_context(template.event_type)
    if member_id:
        contact = await store.find_contact(session, member_id)
        if contact is None:
            raise NotFound("MEMBER_NOT_FOUND", f"no contact details for member {member_id!r}")
        context = message_context(
            contact=contact,
            event_type=template.event_type,
            event_id=context["event"]["id"],
            occurred_at=context["event"]["occurred_at"],
            data=context["event"]["data"],
            program_name=delivery.program_name,
        )
    try:
        return render(template, context)
    except InvalidTemplate as error:
        violations = Violations()
        violations.add(f"template.{error.part}", error.description)
        violations.raise_if_any()
        raise


def parse_trigger(
    event_type: str,
    enabled: bool,
    template_key: str,
    channels: Sequence[Channel | None],
    delay: timedelta,
    category: Category | None,
) -> Trigger:
    violations = Violations()
    violations.check(default_trigger(event_type) is not None, "trigger.event_type", f"one of {_trigger_names()}")
    violations.check(
        not template_key or is_valid_event_type(template_key), "trigger.template_key", "a key such as member.registered"
    )
    violations.check(bool(channels), "trigger.channels", "at least one channel")
    for index, channel in enumerate(channels):
        violations.check(channel is not None, f"trigger.channels[{index}]", "required")
    violations.check(len(set(channels)) == len(channels), "trigger.channels", "each channel once")
    violations.check(timedelta(0) <= delay <= MAX_DELAY, "trigger.delay", f"between 0 and {MAX_DELAY.days} days")
    violations.check(category is not None, "trigger.category", "required")
    violations.raise_if_any()
    assert category is not None
    return Trigger(
        event_type=event_type,
        enabled=enabled,
        template_key=template_key or event_type,
        channels=tuple(channel for channel in channels if channel is not None),
        delay=delay,
        category=category,
    )


def _trigger_names() -> str:
    return ", ".join(TRIGGER_EVENTS)


async def update_trigger(session: AsyncSession, trigger: Trigger) -> Trigger:
    await store.upsert_trigger(session, trigger)
    return trigger


async def effective_trigger(session: AsyncSession, event_type: str) -> Trigger | None:
    """The stored configuration of a trigger, or its built-in default."""
    return await store.find_trigger(session, event_type) or default_trigger(event_type)


async def list_triggers(session: AsyncSession) -> list[Trigger]:
    stored = {trigger.event_type: trigger for trigger in await store.list_triggers(session)}
    return [stored.get(event_type) or _default(event_type) for event_type in TRIGGER_EVENTS]


def _default(event_type: str) -> Trigger:
    trigger = default_trigger(event_type)
    assert trigger is not None
    return trigger


@dataclass(frozen=True)
class MessagesQuery:
    member_id: str
    page_size: int
    after: Cursor | None


def parse_messages_query(member_id: str, requested_size: int, page_token: str) -> MessagesQuery:
    violations = Violations()
    violations.check(bool(member_id), "member_id", "required")
    size = page_size(requested_size, violations)
    after = Cursor.decode(page_token, scope=member_id, violations=violations)
    violations.raise_if_any()
    return MessagesQuery(member_id, size, after)


@dataclass(frozen=True)
class MessagesPage:
    messages: list[Message]
    next_page_token: str


async def list_messages(session: AsyncSession, query: MessagesQuery) -> MessagesPage:
    """One page of a member's messages, newest first; the token is empty on the last page."""
    found = await store.list_messages(session, query.member_id, query.page_size + 1, query.after)
    messages = found[: query.page_size]
    token = ""
    if len(found) > query.page_size:
        last = messages[-1]
        token = Cursor(query.member_id, last.created_at, last.message_id).encode()
    return MessagesPage(messages, token)


def recipient(event: Event) -> str:
    """Who an event's message goes to: its member, else the points account's holder."""
    payload = event.payload
    return str(payload.get("member_id") or payload.get("holder_id") or "")


async def handle_event(session: AsyncSession, consumer: str, event: Event, delivery: Delivery) -> Message | None:
    """Reacts once to an event of a stream notifications follows: keeps the contact
    projection current and queues the trigger's message. A redelivery does nothing."""
    if not await first_delivery(session, store.inbox, consumer, event.event_id):
        return None
    member_id = recipient(event)
    if not member_id:
        return None
    if event.event_type == MEMBER_ERASED_EVENT:
        await store.save_contact(session, erased_contact(member_id))
        await store.suppress_queued(session, member_id, Reason.MEMBER_ERASED)
        return None
    if event.event_type in MEMBER_EVENTS_WITH_CONTACT:
        current = await store.find_contact(session, member_id)
        await store.save_contact(session, merge_contact(current, member_id, event.payload))
        if current is None:
            # Messages that overtook the registration wait for it (see _attempt_round): go now.
            await store.release_awaiting_contact(session, member_id, utcnow())
    elif event.event_type == TIER_CHANGED_EVENT:
        current = await store.find_contact(session, member_id)
        if current is not None:
            await store.save_contact(session, replace(current, tier=str(event.payload.get("new_tier") or "")))
    if event.event_type == POINTS_ACCRUED_EVENT and event.payload.get("source") == "staff":
        # Staff credits are announced by their points.adjusted event.
        return None
    if event.event_type == COUPON_ISSUED_EVENT and not event.payload.get("member_id"):
        return None
    trigger = await effective_trigger(session, event.event_type)
    if trigger is None or not trigger.enabled:
        return None
    return await queue_message(
        session, delivery, trigger, member_id, event.event_id, event.occurred_at, event.payload, utcnow()
    )


async def queue_message(
    session: AsyncSession,
    delivery: Delivery,
    trigger: Trigger,
    member_id: str,
    event_id: str,
    occurred_at: datetime,
    data: Mapping[str, Any],
    now: datetime,
) -> Message | None:
    """Renders a trigger's message for its first usable channel and queues it, delayed as the
    trigger says; suppressed at once when no channel can carry it (it is kept, with the text
    it would have had, for the record). None when this event already has its message."""
    contact = await store.find_contact(session, member_id)
    # A member not known yet gets no channel (the message waits for them): no template needed.
    templates = await _templates(session, trigger.template_key, trigger.channels, contact, delivery) if contact else {}
    message = Message(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        event_type=trigger.event_type,
        event_id=event_id,
        category=trigger.category,
        template_key=trigger.template_key,
        channels=trigger.channels,
        channel=trigger.channels[0],
        subject="",
        body="",
        state=MessageState.QUEUED,
        created_at=now,
        occurred_at=occurred_at,
        next_attempt_at=now + trigger.delay,
        data=dict(data),
    )
    choice = choose_channel(message, contact, templates, delivery)
    if choice is Reason.UNKNOWN_MEMBER:
        # The registration may still be on its way; the dispatcher looks again.
        return message if await store.add_message(session, message) else None
    if isinstance(choice, Reason):
        message = replace(message, state=MessageState.SUPPRESSED, reason=choice.value)
        for channel, template in templates.items():
            rendered = _render(message, template, contact or Contact(member_id), delivery)
            if rendered is not None:
                message = replace(message, channel=channel, subject=rendered.subject, body=rendered.body)
                break
    else:
        channel, rendered = choice
        message = replace(message, channel=channel, subject=rendered.subject, body=rendered.body)
    return message if await store.add_message(session, message) else None


async def _templates(
    session: AsyncSession,
    template_key: str,
    channels: Sequence[Channel],
    contact: Contact | None,
    delivery: Delivery,
) -> dict[Channel, Template]:
    """The best template for each channel of the cascade in the member's locale, in cascade order."""
    locales = template_locales(contact.locale if contact else "", delivery.default_locale)
    stored = await store.find_templates(session, template_key, channels, locales)
    found: dict[Channel, Template] = {}
    for channel in channels:
        for locale in locales:
            template = stored.get((channel, locale))
            if template is not None:
                found[channel] = template
                break
        else:
            fallback = default_template(template_key, channel, locales[-1])
            if fallback is not None:
                found[channel] = fallback
    return found


def _render(message: Message, template: Template, contact: Contact, delivery: Delivery) -> Rendered | None:
    context = message_context(
        contact=contact,
        event_type=message.event_type,
        event_id=message.event_id,
        occurred_at=message.occurred_at,
        data=message.data,
        program_name=delivery.program_name,
    )
    try:
        return render(template, context)
    except InvalidTemplate as error:
        # Checked with sample data when stored, a template can still fail on real data
        # (e.g. `member.first_name[0]` with no name); the channel is then passed over.
        log.warning(
            "%s template %s failed for message %s: %s", template.channel, template.event_type, message.message_id, error
        )
        built_in = default_template(template.event_type, template.channel, template.locale)
        if built_in is None or built_in == template:
            return None
        return _render(message, built_in, contact, delivery)


def choose_channel(
    message: Message,
    contact: Contact | None,
    templates: Mapping[Channel, Template],
    delivery: Delivery,
    skip: frozenset[Channel] = frozenset(),
) -> tuple[Channel, Rendered] | Reason:
    """The first channel of the cascade that can carry the message, rendered for it; else why
    not (the reason of the first channel passed over)."""
    refused = member_refusal(contact)
    if refused is not None:
        return refused
    assert contact is not None
    first_reason: Reason | None = None
    for channel in message.channels:
        if channel in skip:
            continue
        reason = channel_refusal(contact, channel, message.category, delivery.policy, delivery.configured)
        template = templates.get(channel)
        rendered = None if reason or template is None else _render(message, template, contact, delivery)
        if rendered is not None:
            return channel, rendered
        first_reason = first_reason or reason or Reason.NO_TEMPLATE
    return first_reason or Reason.NO_TEMPLATE


async def queue_birthdays(session: AsyncSession, delivery: Delivery, now: datetime) -> int:
    """Queues a birthday greeting for every member whose birthday it is now in their own time
    zone; each member's greeting is queued once a year. Returns how many were queued."""
    trigger = await effective_trigger(session, BIRTHDAY_EVENT)
    if trigger is None or not trigger.enabled:
        return 0
    days = {(now + timedelta(days=shift)).date() for shift in (-1, 0, 1)}
    month_days = {day.strftime("%m-%d") for day in days}
    # A 29 February birthday is kept on the 28th in other years.
    if any(birthday_in("2000-02-29", day.year) == day for day in days):
        month_days.add("02-29")
    queued = 0
    for contact in await store.contacts_born_on(session, sorted(month_days)):
        if not is_birthday(contact, now, delivery.policy):
            continue
        year = now.astimezone(zone_of(contact, delivery.policy)).year
        event_id = str(uuid.uuid5(BIRTHDAY_NAMESPACE, f"{contact.member_id}:{year}"))
        data = {"member_id": contact.member_id}
        if await queue_message(session, delivery, trigger, contact.member_id, event_id, now, data, now) is not None:
            queued += 1
    return queued


@dataclass(frozen=True)
class MassSendRequest:
    template_key: str
    channels: tuple[Channel, ...]
    member_ids: tuple[str, ...]


def parse_mass_send(
    template_key: str, channels: Sequence[Channel | None], member_ids: Sequence[str]
) -> MassSendRequest:
    violations = Violations()
    violations.check(is_valid_event_type(template_key), "template_key", "a template key such as promo.spring")
    violations.check(bool(channels), "channels", "at least one channel")
    for index, channel in enumerate(channels):
        violations.check(channel is not None, f"channels[{index}]", "required")
    violations.check(len(set(channels)) == len(channels), "channels", "each channel once")
    violations.check(bool(member_ids), "member_ids", "at least one member")
    violations.check(
        len(member_ids) <= MAX_MASS_RECIPIENTS, "member_ids", f"at most {MAX_MASS_RECIPIENTS}; split larger segments"
    )
    for index, member_id in enumerate(member_ids):
        violations.check(0 < len(member_id) <= 36, f"member_ids[{index}]", "a member id")
    violations.raise_if_any()
    return MassSendRequest(
        template_key,
        tuple(channel for channel in channels if channel is not None),
        tuple(dict.fromkeys(member_ids)),
    )


async def create_mass_send(session: AsyncSession, request: MassSendRequest, now: datetime) -> MassSend:
    """Queues one marketing message per member; the dispatcher renders and sends them at each
    channel's pace."""
    if request.template_key not in DEFAULT_TEXTS and not await store.has_templates(session, request.template_key):
        raise FailedPrecondition("TEMPLATE_NOT_FOUND", f"no {request.template_key!r} template for these channels")
    mass_send = MassSend(
        mass_send_id=str(uuid.uuid4()),
        template_key=request.template_key,
        channels=request.channels,
        state=MassSendState.RUNNING,
        recipients=len(request.member_ids),
        created_at=now,
    )
    await store.add_mass_send(session, mass_send)
    await store.add_messages(
        session,
        [
            Message(
                message_id=str(uuid.uuid4()),
                member_id=member_id,
                event_type=MASS_SEND_EVENT,
                event_id=mass_send.mass_send_id,
                category=Category.MARKETING,
                template_key=request.template_key,
                channels=request.channels,
                channel=request.channels[0],
                subject="",
                body="",
                state=MessageState.QUEUED,
                created_at=now,
                occurred_at=now,
                next_attempt_at=now,
                data={"mass_send_id": mass_send.mass_send_id},
                mass_send_id=mass_send.mass_send_id,
            )
            for member_id in request.member_ids
        ],
    )
    return mass_send


@dataclass(frozen=True)
class MassSendProgress:
    mass_send: MassSend
    state: MassSendState
    by_state: Mapping[MessageState, int]


async def get_mass_send(session: AsyncSession, mass_send_id: str) -> MassSendProgress:
    mass_send = await store.find_mass_send(session, mass_send_id)
    if mass_send is None:
        raise NotFound("MASS_SEND_NOT_FOUND", f"no mass send {mass_send_id!r}")
    by_state = await store.mass_send_progress(session, mass_send_id)
    return MassSendProgress(mass_send, mass_send_state(mass_send.state, by_state.get(MessageState.QUEUED, 0)), by_state)


async def set_mass_send_paused(session: AsyncSession, mass_send_id: str, paused: bool) -> MassSendProgress:
    """Pauses (its queued messages wait) or resumes a mass send."""
    await get_mass_send(session, mass_send_id)
    await store.set_mass_send_state(session, mass_send_id, MassSendState.PAUSED if paused else MassSendState.RUNNING)
    return await get_mass_send(session, mass_send_id)


async def statistics(
    session: AsyncSession, since: datetime | None, until: datetime | None
) -> list[store.StatisticsRow]:
    return await store.statistics(session, since, until)


async def deliver(
    sessions: async_sessionmaker[AsyncSession],
    providers: Mapping[Channel, Provider],
    delivery: Delivery,
    throttle: Callable[[Channel], Awaitable[None]],
    message: Message,
    claim_id: str,
    now: datetime,
) -> Message:
    """Walks a claimed message down its cascade: the first channel that can carry it is
    tried, and on a refusal or a provider failure the next one, until one takes it. Member,
    quiet hours and frequency cap are checked first, against the contact as it is now."""
    policy = delivery.policy
    templates: dict[Channel, Template] = {}
    sent_recently = 0
    async with sessions() as session:
        contact = await store.find_contact(session, message.member_id)
        # A message for a member not known (yet) waits or is suppressed: neither needs a template.
        if contact is not None:
            templates = await _templates(session, message.template_key, message.channels, contact, delivery)
            sent_recently = await store.sent_since(session, message.member_id, now - policy.frequency_window)
    outcome = await _attempt_round(providers, delivery, throttle, message, contact, templates, sent_recently, now)
    async with sessions() as session, session.begin():
        if not await store.save_progress(session, outcome, claim_id):
            log.warning("message %s was claimed by another dispatcher meanwhile", message.message_id)
    return outcome


async def _attempt_round(
    providers: Mapping[Channel, Provider],
    delivery: Delivery,
    throttle: Callable[[Channel], Awaitable[None]],
    message: Message,
    contact: Contact | None,
    templates: Mapping[Channel, Template],
    sent_recently: int,
    now: datetime,
) -> Message:
    policy = delivery.policy
    if contact is None and not message.mass_send_id and now - message.created_at < UNKNOWN_MEMBER_GRACE:
        # One wait to the end of the grace, not a poll every retry delay (with members
        # imported in bulk, every points message polled 20 times kept a core busy): the
        # member's first contact event releases the message at once.
        return replace(
            message, next_attempt_at=message.created_at + UNKNOWN_MEMBER_GRACE, reason=Reason.UNKNOWN_MEMBER.value
        )
    refused = member_refusal(contact)
    if refused is not None or contact is None:
        return replace(message, state=MessageState.SUPPRESSED, reason=(refused or Reason.UNKNOWN_MEMBER).value)
    quiet_end = quiet_until(now, zone_of(contact, policy), policy)
    if quiet_end is not None:
        # Quiet hours delay a message, never drop it.
        return replace(message, next_attempt_at=quiet_end, reason="")
    if is_capped(message.category, sent_recently, policy):
        return replace(message, state=MessageState.SUPPRESSED, reason=Reason.FREQUENCY_CAPPED.value)
    attempts: list[AttemptResult] = []
    tried: set[Channel] = set()
    detail = ""
    while True:
        refused_before = message.channels[: message.cascade_from]
        choice = choose_channel(message, contact, templates, delivery, frozenset((*tried, *refused_before)))
        if isinstance(choice, Reason):
            if not attempts:
                return replace(message, state=MessageState.SUPPRESSED, reason=choice.value)
            break
        channel, rendered = choice
        await throttle(channel)
        envelope = Envelope(
            message.message_id, message.attempts + 1, contact.address(channel), rendered.subject, rendered.body
        )
        result = await providers[channel].send(envelope)
        message = replace(
            message, channel=channel, subject=rendered.subject, body=rendered.body, attempts=message.attempts + 1
        )
        attempts.append(AttemptResult(channel, result.outcome))
        if result.outcome in (Outcome.DELIVERED, Outcome.ACCEPTED):
            break
        log.info("message %s: %s %s (%s)", message.message_id, channel, result.outcome, result.detail)
        tried.add(channel)
        detail = f"{channel}: {result.detail or result.outcome}"
    verdict = after_round(attempts, message.attempts, now, policy)
    sent_at = now if verdict.state in (MessageState.SENT, MessageState.DELIVERED) else None
    return replace(
        message,
        state=verdict.state,
        reason="" if sent_at else detail[:64],
        next_attempt_at=verdict.retry_at or message.next_attempt_at,
        sent_at=sent_at,
        delivered_at=now if verdict.state is MessageState.DELIVERED else None,
    )


async def report_delivery(session: AsyncSession, message_id: str, delivered: bool, detail: str) -> Message:
    """Records a provider's late delivery report on a sent message."""
    message = await store.find_message(session, message_id, for_update=True)
    if message is None:
        raise NotFound("MESSAGE_NOT_FOUND", f"no message {message_id!r}")
    try:
        reported = after_report(message, delivered, detail, utcnow())
    except NotSent as error:
        raise FailedPrecondition("MESSAGE_NOT_SENT", f"message {message_id!r} is {error}, not sent") from error
    if reported != message:
        await store.save_message(session, reported)
    return reported
