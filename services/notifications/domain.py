"""Notifications' rules: templates, triggers, the channel cascade, consent, quiet hours,
the frequency cap and the delivery state machine. No I/O here.

Templates are written by staff and run on member data, so they render in
Jinja2's sandbox: attributes such as ``__class__`` are refused, a name the
context does not have is an error rather than an empty string, and the output
is bounded. Only e-mail bodies are HTML; every other part renders with
autoescaping off so an SMS never shows ``&amp;``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import StrictUndefined
from jinja2 import Template as CompiledTemplate
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

WELCOME_EVENT = "member.registered"
POINTS_ACCRUED_EVENT = "points.accrued"
POINTS_EXPIRING_EVENT = "points.expiring"
POINTS_ADJUSTED_EVENT = "points.adjusted"
TIER_CHANGED_EVENT = "tier.changed"
COUPON_ISSUED_EVENT = "coupon.issued"
BIRTHDAY_EVENT = "member.birthday"
MASS_SEND_EVENT = "mass.send"
DEFAULT_LOCALE = "en"
PROGRAM_NAME = "Loyalty"

MAX_EVENT_TYPE_LENGTH = 100
MAX_LOCALE_LENGTH = 16
MAX_SUBJECT_SOURCE_LENGTH = 1_000
MAX_BODY_SOURCE_LENGTH = 20_000
MAX_RENDERED_LENGTH = 100_000
MAX_DELAY = timedelta(days=30)
COMPILED_TEMPLATE_CACHE = 256

_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    VIBER = "viber"
    TELEGRAM = "telegram"


class Category(StrEnum):
    """Marketing needs the member's consent for the channel; transactional by policy."""

    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"


class MessageState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    DEAD = "dead"


class Reason(StrEnum):
    """Why a channel was passed over or a message suppressed; stable codes for reports."""

    NO_CONSENT = "NO_CONSENT"
    NO_ADDRESS = "NO_ADDRESS"
    NO_PROVIDER = "NO_PROVIDER"
    NO_TEMPLATE = "NO_TEMPLATE"
    UNKNOWN_MEMBER = "UNKNOWN_MEMBER"
    MEMBER_BLOCKED = "MEMBER_BLOCKED"
    MEMBER_ERASED = "MEMBER_ERASED"
    FREQUENCY_CAPPED = "FREQUENCY_CAPPED"


class Outcome(StrEnum):
    """What a provider answered for one attempt."""

    DELIVERED = "delivered"  # the provider confirms delivery
    ACCEPTED = "accepted"  # taken for delivery; no confirmation (yet)
    UNDELIVERED = "undelivered"  # refused for this recipient: retrying the channel is pointless
    TRANSIENT = "transient"  # the provider failed; the same channel may work later


class TemplatePart(StrEnum):
    SUBJECT = "subject"
    BODY = "body"


_SOURCE_LIMITS = {TemplatePart.SUBJECT: MAX_SUBJECT_SOURCE_LENGTH, TemplatePart.BODY: MAX_BODY_SOURCE_LENGTH}


@dataclass(frozen=True)
class Template:
    """What to say for an event on a channel in a locale; subject and body are Jinja2 sources."""

    event_type: str
    channel: Channel
    locale: str
    subject: str
    body: str


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


@dataclass(frozen=True)
class Message:
    """One notification to one member for one event, and where its delivery stands.

    ``channels`` is the cascade; ``channel`` the one it was last rendered for or sent on.
    ``data`` is the event's payload, kept so the message renders again on the next channel."""

    message_id: str
    member_id: str
    event_type: str
    event_id: str
    category: Category
    template_key: str
    channels: tuple[Channel, ...]
    channel: Channel
    subject: str
    body: str
    state: MessageState
    created_at: datetime
    occurred_at: datetime
    next_attempt_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    attempts: int = 0
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    mass_send_id: str = ""
    # Channels before this position refused the recipient in a delivery report; they are
    # not tried again.
    cascade_from: int = 0


@dataclass(frozen=True)
class Contact:
    """Notifications' own copy of what it needs about a member, fed by the members stream."""

    member_id: str
    first_name: str = ""
    last_name: str = ""
    phone: str = ""
    email: str = ""
    locale: str = ""
    time_zone: str = ""
    birth_date: str = ""
    push_token: str = ""
    telegram_chat_id: str = ""
    status: str = "active"
    tier: str = ""
    consents: Mapping[str, bool] = field(default_factory=dict)

    def address(self, channel: Channel) -> str:
        return {
            Channel.EMAIL: self.email,
            Channel.SMS: self.phone,
            Channel.VIBER: self.phone,
            Channel.PUSH: self.push_token,
            Channel.TELEGRAM: self.telegram_chat_id,
        }[channel]


CONTACT_FIELDS = (
    "first_name",
    "last_name",
    "phone",
    "email",
    "locale",
    "time_zone",
    "birth_date",
    "push_token",
    "telegram_chat_id",
    "status",
    "tier",
)


ERASED = "erased"
# A member's points and coupons travel on other streams than their registration and can
# overtake it: a triggered message for a member not known yet waits this long for them.
UNKNOWN_MEMBER_GRACE = timedelta(minutes=10)


def erased_contact(member_id: str) -> Contact:
    """What is kept of an erased member: the id and the fact, so nothing is sent again."""
    return Contact(member_id, status=ERASED)


def merge_contact(current: Contact | None, member_id: str, payload: Mapping[str, Any]) -> Contact:
    """The contact after a members event: keys the event carries win, missing keys keep what
    was known (early member.registered events carry only the name). Erasure is final."""
    if current is not None and current.status == ERASED:
        return current
    contact = current or Contact(member_id)
    changes: dict[str, Any] = {
        name: str(payload[name] or "") for name in CONTACT_FIELDS if name in payload and payload[name] is not None
    }
    consents = payload.get("consents")
    if isinstance(consents, Mapping):
        changes["consents"] = {str(channel): bool(given) for channel, given in consents.items()}
    return replace(contact, **changes)


@dataclass(frozen=True)
class Trigger:
    """How one event type becomes a message: on/off, which templates, the cascade, a delay."""

    event_type: str
    enabled: bool
    template_key: str
    channels: tuple[Channel, ...]
    delay: timedelta
    category: Category


# Cheapest first: a push or a chat message costs nothing, SMS costs the most.
DEFAULT_CASCADE = (Channel.PUSH, Channel.TELEGRAM, Channel.VIBER, Channel.EMAIL, Channel.SMS)

_DEFAULT_CATEGORIES = {
    WELCOME_EVENT: Category.TRANSACTIONAL,
    POINTS_ACCRUED_EVENT: Category.TRANSACTIONAL,
    POINTS_EXPIRING_EVENT: Category.TRANSACTIONAL,
    POINTS_ADJUSTED_EVENT: Category.TRANSACTIONAL,
    TIER_CHANGED_EVENT: Category.TRANSACTIONAL,
    COUPON_ISSUED_EVENT: Category.MARKETING,
    BIRTHDAY_EVENT: Category.MARKETING,
}
TRIGGER_EVENTS = tuple(_DEFAULT_CATEGORIES)


def default_trigger(event_type: str) -> Trigger | None:
    """The built-in behaviour of a trigger nobody configured; None for events that trigger nothing."""
    category = _DEFAULT_CATEGORIES.get(event_type)
    if category is None:
        return None
    return Trigger(event_type, True, event_type, DEFAULT_CASCADE, timedelta(0), category)


@dataclass(frozen=True)
class MessageText:
    subject: str
    body: str


# Built-in texts, used on every channel until staff save their own templates.
DEFAULT_TEXTS: Mapping[str, MessageText] = {
    WELCOME_EVENT: MessageText(
        "Welcome to {{ program.name }}", "Welcome to the program, {{ member.first_name or 'friend' }}!"
    ),
    POINTS_ACCRUED_EVENT: MessageText(
        "You earned points",
        "You earned {{ event.data.amount }} points. Thank you for shopping with {{ program.name }}!",
    ),
    POINTS_EXPIRING_EVENT: MessageText(
        "Points about to expire", "{{ event.data.amount }} of your points expire on {{ event.data.expire_at[:10] }}."
    ),
    POINTS_ADJUSTED_EVENT: MessageText(
        "Your points balance changed", "Your points balance was adjusted by {{ event.data.amount }}."
    ),
    TIER_CHANGED_EVENT: MessageText("Your new tier", "Your tier is now {{ event.data.new_tier }}."),
    COUPON_ISSUED_EVENT: MessageText(
        "A coupon for you", "A new coupon is waiting for you: the one whose code ends in {{ event.data.code_suffix }}."
    ),
    BIRTHDAY_EVENT: MessageText("Happy birthday!", "Happy birthday, {{ member.first_name or 'friend' }}!"),
}


def default_template(event_type: str, channel: Channel, locale: str) -> Template | None:
    """The built-in template used until staff upsert their own."""
    text = DEFAULT_TEXTS.get(event_type)
    if text is None or locale != DEFAULT_LOCALE:
        return None
    return Template(event_type, channel, locale, text.subject if channel is Channel.EMAIL else "", text.body)


def template_locales(locale: str, default_locale: str) -> list[str]:
    """Locales to look for a template in, best first: pt-BR, then pt, then the default."""
    candidates = [locale, locale.split("-")[0], default_locale, DEFAULT_LOCALE]
    return list(dict.fromkeys(candidate for candidate in candidates if candidate))


class InvalidTemplate(ValueError):
    """A template part that does not compile or does not render."""

    def __init__(self, part: TemplatePart, description: str) -> None:
        super().__init__(f"{part}: {description}")
        self.part = part
        self.description = description


def message_context(
    *,
    contact: Contact,
    event_type: str,
    event_id: str,
    occurred_at: datetime,
    data: Mapping[str, Any],
    program_name: str = PROGRAM_NAME,
) -> dict[str, Any]:
    """Everything a template may refer to; any other name fails the render. Contact details
    (phone, e-mail, tokens) are left out: a message never needs to quote them."""
    return {
        "member": {
            "id": contact.member_id,
            "first_name": contact.first_name,
            "last_name": contact.last_name,
            "tier": contact.tier,
            "locale": contact.locale,
            "birth_date": contact.birth_date,
        },
        "event": {"type": event_type, "id": event_id, "occurred_at": occurred_at, "data": dict(data)},
        "program": {"name": program_name},
    }


# What each trigger's event carries, as templates see it in event.data.
SAMPLE_DATA: Mapping[str, Mapping[str, Any]] = {
    WELCOME_EVENT: {"member_id": "m-1", "first_name": "Anna", "referral_code": "FRIEND1"},
    POINTS_ACCRUED_EVENT: {"holder_id": "m-1", "currency": "BONUS", "amount": 150, "source": "receipt"},
    POINTS_EXPIRING_EVENT: {
        "holder_id": "m-1",
        "currency": "BONUS",
        "amount": 40,
        "expire_at": "2024-02-01T00:00:00+00:00",
    },
    POINTS_ADJUSTED_EVENT: {"holder_id": "m-1", "currency": "BONUS", "amount": 100, "reason": "goodwill"},
    TIER_CHANGED_EVENT: {"member_id": "m-1", "old_tier": "silver", "new_tier": "gold"},
    COUPON_ISSUED_EVENT: {"member_id": "m-1", "code_suffix": "7K2Q", "series_id": "s-1", "campaign_id": ""},
    BIRTHDAY_EVENT: {"member_id": "m-1"},
}


def sample_context(event_type: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Stand-in data a new template must render with before it is accepted."""
    return message_context(
        contact=Contact(
            member_id="00000000-0000-4000-8000-000000000000",
            first_name="Anna",
            last_name="Smith",
            locale=DEFAULT_LOCALE,
            birth_date="1990-03-08",
            tier="silver",
        ),
        event_type=event_type,
        event_id="00000000-0000-4000-8000-000000000001",
        occurred_at=datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
        data=SAMPLE_DATA.get(event_type, {}) if data is None else data,
    )


def template_problems(template: Template) -> dict[TemplatePart, str]:
    """Why each part of a template would be refused: it must compile and render with sample data."""
    problems: dict[TemplatePart, str] = {}
    context = sample_context(template.event_type)
    for part in TemplatePart:
        source, limit = _source(template, part), _SOURCE_LIMITS[part]
        required = part is TemplatePart.BODY or template.channel is Channel.EMAIL
        if required and not source.strip():
            problems[part] = "required"
        elif len(source) > limit:
            problems[part] = f"at most {limit} characters"
        else:
            try:
                _render_part(template, part, context)
            except InvalidTemplate as error:
                problems[part] = error.description
    return problems


def render(template: Template, context: Mapping[str, Any]) -> Rendered:
    """The template's subject and body for one recipient; raises ``InvalidTemplate``."""
    return Rendered(
        subject=_render_part(template, TemplatePart.SUBJECT, context),
        body=_render_part(template, TemplatePart.BODY, context),
    )


def is_valid_event_type(event_type: str) -> bool:
    return len(event_type) <= MAX_EVENT_TYPE_LENGTH and bool(_EVENT_TYPE.fullmatch(event_type))


def is_valid_locale(locale: str) -> bool:
    return len(locale) <= MAX_LOCALE_LENGTH and bool(_LOCALE.fullmatch(locale))


def _source(template: Template, part: TemplatePart) -> str:
    return template.subject if part is TemplatePart.SUBJECT else template.body


# Sandboxed environments are cheap to hold and safe to share: they keep no
# per-render state. One per escaping mode, so a compiled template is reusable.
_ENVIRONMENTS = {escape: SandboxedEnvironment(undefined=StrictUndefined, autoescape=escape) for escape in (False, True)}


@functools.lru_cache(maxsize=COMPILED_TEMPLATE_CACHE)
def _compile(source: str, autoescape: bool) -> CompiledTemplate:
    return _ENVIRONMENTS[autoescape].from_string(source)


def _render_part(template: Template, part: TemplatePart, context: Mapping[str, Any]) -> str:
    autoescape = template.channel is Channel.EMAIL and part is TemplatePart.BODY
    try:
        compiled = _compile(_source(template, part), autoescape)
    except TemplateSyntaxError as error:
        raise InvalidTemplate(part, f"syntax error on line {error.lineno}: {error.message}") from error
    chunks: list[str] = []
    size = 0
    try:
        for chunk in compiled.generate(context):
            size += len(chunk)
            if size > MAX_RENDERED_LENGTH:
                raise InvalidTemplate(part, f"renders to more than {MAX_RENDERED_LENGTH} characters")
            chunks.append(chunk)
    except InvalidTemplate:
        raise
    except SecurityError as error:
        raise InvalidTemplate(part, f"not allowed: {error}") from error
    except UndefinedError as error:
        raise InvalidTemplate(part, f"unknown name: {error}") from error
    except Exception as error:
        # Staff-written code can fail in any way Python can (1/0, 'a' + 1, ...);
        # whatever it is, it is a fault of the template, never of the service.
        raise InvalidTemplate(part, f"fails to render: {type(error).__name__}: {error}") from error
    return "".join(chunks)


@dataclass(frozen=True)
class Policy:
    """The program's delivery rules, from settings."""

    quiet_start: time | None
    quiet_end: time | None
    default_time_zone: str
    frequency_cap: int
    frequency_window: timedelta
    transactional_needs_consent: bool
    max_attempts: int
    retry_base: timedelta
    retry_max: timedelta


def channel_refusal(
    contact: Contact, channel: Channel, category: Category, policy: Policy, configured: frozenset[Channel]
) -> Reason | None:
    """Why this channel can't carry this message to this member, or None when it can."""
    if channel not in configured:
        return Reason.NO_PROVIDER
    if not contact.address(channel):
        return Reason.NO_ADDRESS
    # Consents arrive as granted or not (the members service does not tell "refused" from
    # "never asked"), so a transactional message under the lenient policy does not look.
    needs_consent = category is Category.MARKETING or policy.transactional_needs_consent
    if needs_consent and contact.consents.get(channel.value) is not True:
        return Reason.NO_CONSENT
    return None


def member_refusal(contact: Contact | None) -> Reason | None:
    """Why nothing at all may go to this member."""
    if contact is None:
        return Reason.UNKNOWN_MEMBER
    if contact.status == ERASED:
        return Reason.MEMBER_ERASED
    if contact.status == "blocked":
        return Reason.MEMBER_BLOCKED
    return None


def zone_of(contact: Contact, policy: Policy) -> ZoneInfo:
    for name in (contact.time_zone, policy.default_time_zone):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def quiet_until(now: datetime, zone: ZoneInfo, policy: Policy) -> datetime | None:
    """When quiet hours end, if ``now`` falls in them in the member's zone; else None.

    Quiet hours may wrap midnight (21:00-09:00) or not (13:00-15:00)."""
    start, end = policy.quiet_start, policy.quiet_end
    if start is None or end is None or start == end:
        return None
    local = now.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    wraps = start > end
    quiet = (clock >= start or clock < end) if wraps else (start <= clock < end)
    if not quiet:
        return None
    end_day = local.date() + timedelta(days=1) if wraps and clock >= start else local.date()
    return datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)


def is_capped(category: Category, sent_in_window: int, policy: Policy) -> bool:
    """Marketing stops at the cap; transactional messages (points, tiers) always go."""
    return category is Category.MARKETING and policy.frequency_cap > 0 and sent_in_window >= policy.frequency_cap


def retry_delay(attempts: int, policy: Policy) -> timedelta:
    """Exponential backoff: base, 2x base, 4x base, ... capped."""
    delay: timedelta = policy.retry_base * (2 ** max(attempts - 1, 0))
    return min(delay, policy.retry_max)


@dataclass(frozen=True)
class AttemptResult:
    """One attempt on one channel, as the cascade sees it."""

    channel: Channel
    outcome: Outcome


@dataclass(frozen=True)
class Verdict:
    """Where a message goes after a round over its cascade."""

    state: MessageState
    retry_at: datetime | None = None


def after_round(attempts: Sequence[AttemptResult], total_attempts: int, now: datetime, policy: Policy) -> Verdict:
    """The message's state once the cascade stopped: the last attempt succeeded, or every
    usable channel failed. A provider failure (not a refusal of the recipient) is retried
    from the top of the cascade with backoff until the attempts run out."""
    last = attempts[-1]
    if last.outcome is Outcome.DELIVERED:
        return Verdict(MessageState.DELIVERED)
    if last.outcome is Outcome.ACCEPTED:
        return Verdict(MessageState.SENT)
    if not any(attempt.outcome is Outcome.TRANSIENT for attempt in attempts):
        return Verdict(MessageState.FAILED)
    if total_attempts >= policy.max_attempts:
        return Verdict(MessageState.DEAD)
    return Verdict(MessageState.QUEUED, now + retry_delay(total_attempts, policy))


class NotSent(ValueError):
    """A delivery report about a message that was never handed to a provider."""


def after_report(message: Message, delivered: bool, detail: str, now: datetime) -> Message:
    """A sent message after its provider's later report: delivered, or undelivered, which
    queues it for the next channel of its cascade (failed when there is none). A repeated
    report changes nothing."""
    if message.state is MessageState.DELIVERED or (message.state is MessageState.FAILED and not delivered):
        return message
    if message.state is not MessageState.SENT:
        raise NotSent(message.state.value)
    if delivered:
        return replace(message, state=MessageState.DELIVERED, delivered_at=now)
    reason = f"{message.channel}: {detail or 'undelivered'}"[:64]
    following = (
        message.channels.index(message.channel) + 1 if message.channel in message.channels else len(message.channels)
    )
    if following >= len(message.channels):
        return replace(message, state=MessageState.FAILED, reason=reason)
    return replace(message, state=MessageState.QUEUED, reason=reason, cascade_from=following, next_attempt_at=now)


def birthday_in(birth_date: str, year: int) -> date | None:
    """The day a member born on ``birth_date`` (YYYY-MM-DD) celebrates in ``year``; 29 February
    falls on the 28th in other years."""
    try:
        born = date.fromisoformat(birth_date)
    except ValueError:
        return None
    try:
        return born.replace(year=year)
    except ValueError:
        return date(year, 2, 28)


def is_birthday(contact: Contact, now: datetime, policy: Policy) -> bool:
    today = now.astimezone(zone_of(contact, policy)).date()
    return birthday_in(contact.birth_date, today.year) == today


@dataclass
class TokenBucket:
    """Messages per second on one channel: how long to wait before the next send."""

    rate: float
    capacity: float = 1.0
    tokens: float = 1.0
    updated: float = 0.0

    def wait(self, now: float) -> float:
        """Takes a token at ``now`` (seconds, monotonic); returns how long the sender must
        wait first (0 when a token was free)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class MassSendState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"


MAX_MASS_RECIPIENTS = 10_000


@dataclass(frozen=True)
class MassSend:
    """One marketing message to a list of members; its messages carry its id."""

    mass_send_id: str
    template_key: str
    channels: tuple[Channel, ...]
    state: MassSendState
    recipients: int
    created_at: datetime


def mass_send_state(stored: MassSendState, queued: int) -> MassSendState:
    """A running send with nothing left queued is complete; a paused one stays paused."""
    if stored is MassSendState.RUNNING and queued == 0:
        return MassSendState.COMPLETED
    return stored
