"""Notifications' use cases, each given the session of its unit of work."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.bus import Event
from loyalty.runtime.errors import Violations
from loyalty.runtime.inbox import first_delivery
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.timeutil import utcnow
from services.notifications import store
from services.notifications.domain import (
    DEFAULT_LOCALE,
    WELCOME_EVENT,
    Channel,
    InvalidTemplate,
    Message,
    MessageState,
    Template,
    default_template,
    is_valid_event_type,
    is_valid_locale,
    message_context,
    render,
    template_problems,
)

log = logging.getLogger(__name__)

MEMBERS_CONSUMER = "notifications.members"
WELCOME_CHANNEL = Channel.SMS


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


async def handle_members_event(session: AsyncSession, event: Event) -> Message | None:
    """Reacts once to an event of the members stream; a redelivery or an unknown type does nothing."""
    if not await first_delivery(session, store.inbox, MEMBERS_CONSUMER, event.event_id):
        return None
    if event.event_type != WELCOME_EVENT:
        return None
    return await _queue_message(session, event, str(event.payload["member_id"]), WELCOME_CHANNEL)


async def _queue_message(session: AsyncSession, event: Event, member_id: str, channel: Channel) -> Message | None:
    stored = await store.find_template(session, event.event_type, channel, DEFAULT_LOCALE)
    fallback = default_template(event.event_type, channel, DEFAULT_LOCALE)
    context = message_context(
        member_id=member_id,
        first_name=str(event.payload.get("first_name") or ""),
        event_type=event.event_type,
        event_id=event.event_id,
        occurred_at=event.occurred_at,
    )
    candidates = [template for template in (stored, fallback) if template is not None]
    rendered = None
    for template in candidates:
        try:
            rendered = render(template, context)
            break
        except InvalidTemplate as error:
            # Checked with sample data when stored, a template can still fail on real
            # data (e.g. `member.first_name[0]` with no name); the built-in text is next.
            log.warning("%s template for %s failed on event %s: %s", channel, event.event_type, event.event_id, error)
    if rendered is None:
        log.warning("no usable %s template for %s; no message for event %s", channel, event.event_type, event.event_id)
        return None
    message = Message(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        event_type=event.event_type,
        event_id=event.event_id,
        channel=channel,
        subject=rendered.subject,
        body=rendered.body,
        state=MessageState.QUEUED,
        created_at=utcnow(),
    )
    await store.add_message(session, message)
    return message
