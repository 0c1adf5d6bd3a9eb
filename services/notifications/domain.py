"""Notifications' rules: templates and how they render. No I/O here.

Templates are written by staff and run on member data, so they render in
Jinja2's sandbox: attributes such as ``__class__`` are refused, a name the
context does not have is an error rather than an empty string, and the output
is bounded. Only e-mail bodies are HTML; every other part renders with
autoescaping off so an SMS never shows ``&amp;``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from jinja2 import StrictUndefined
from jinja2 import Template as CompiledTemplate
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

WELCOME_EVENT = "member.registered"
DEFAULT_LOCALE = "en"
PROGRAM_NAME = "Loyalty"

MAX_EVENT_TYPE_LENGTH = 100
MAX_LOCALE_LENGTH = 16
MAX_SUBJECT_SOURCE_LENGTH = 1_000
MAX_BODY_SOURCE_LENGTH = 20_000
MAX_RENDERED_LENGTH = 100_000
COMPILED_TEMPLATE_CACHE = 256

_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"


class MessageState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    SUPPRESSED = "suppressed"


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
    message_id: str
    member_id: str
    event_type: str
    event_id: str
    channel: Channel
    subject: str
    body: str
    state: MessageState
    created_at: datetime


DEFAULT_TEMPLATES: Mapping[tuple[str, Channel, str], Template] = {
    (WELCOME_EVENT, Channel.SMS, DEFAULT_LOCALE): Template(
        event_type=WELCOME_EVENT,
        channel=Channel.SMS,
        locale=DEFAULT_LOCALE,
        subject="",
        body="Welcome to the program, {{ member.first_name or 'friend' }}!",
    ),
}


def default_template(event_type: str, channel: Channel, locale: str) -> Template | None:
    """The built-in template used until staff upsert their own."""
    return DEFAULT_TEMPLATES.get((event_type, channel, locale))


class InvalidTemplate(ValueError):
    """A template part that does not compile or does not render."""

    def __init__(self, part: TemplatePart, description: str) -> None:
        super().__init__(f"{part}: {description}")
        self.part = part
        self.description = description


def message_context(
    *, member_id: str, first_name: str, event_type: str, event_id: str, occurred_at: datetime
) -> dict[str, Any]:
    """Everything a template may refer to; any other name fails the render."""
    return {
        "member": {"id": member_id, "first_name": first_name},
        "event": {"type": event_type, "id": event_id, "occurred_at": occurred_at},
        "program": {"name": PROGRAM_NAME},
    }


def sample_context(event_type: str) -> dict[str, Any]:
    """Stand-in data a new template must render with before it is accepted."""
    return message_context(
        member_id="00000000-0000-4000-8000-000000000000",
        first_name="Anna",
        event_type=event_type,
        event_id="00000000-0000-4000-8000-000000000001",
        occurred_at=datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
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
