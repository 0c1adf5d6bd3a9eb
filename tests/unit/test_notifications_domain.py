"""Notifications' rules: rendering, the built-in welcome, the sandbox, template checks, the page cursor."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from loyalty.runtime.errors import InvalidArgument
from loyalty.runtime.paging import Cursor
from services.notifications import domain, service
from services.notifications.domain import Channel, InvalidTemplate, Template, TemplatePart

OCCURRED = datetime(2025, 3, 8, 9, 30, tzinfo=UTC)


def context(first_name: str = "Anna") -> dict[str, object]:
    return domain.message_context(
        contact=domain.Contact("m-1", first_name=first_name, phone="+79990000001"),
        event_type="member.registered",
        event_id="e-1",
        occurred_at=OCCURRED,
        data={"referral_code": "R1"},
    )


def sms(body: str, subject: str = "") -> Template:
    return Template("member.registered", Channel.SMS, "en", subject, body)


def field_violations(error: InvalidArgument) -> dict[str, str]:
    return {violation.field: violation.description for violation in error.violations}


def test_renders_member_event_and_program() -> None:
    template = sms(
        "{{ program.name }}: hi {{ member.first_name }} ({{ member.id }}), {{ event.type }} "
        "{{ event.id }} on {{ event.occurred_at.strftime('%d.%m') }}"
    )
    rendered = domain.render(template, context())
    assert rendered.body == "Loyalty: hi Anna (m-1), member.registered e-1 on 08.03"
    assert rendered.subject == ""


def test_default_welcome_greets_by_name_or_as_friend() -> None:
    welcome = domain.default_template("member.registered", Channel.SMS, "en")
    assert welcome is not None
    assert domain.render(welcome, context("Anna")).body == "Welcome to the program, Anna!"
    assert domain.render(welcome, context("")).body == "Welcome to the program, friend!"
    assert domain.default_template("member.registered", Channel.SMS, "ru") is None
    assert domain.template_problems(welcome) == {}


def test_only_email_bodies_are_html_escaped() -> None:
    name = "Tom & <Jerry>"
    assert domain.render(sms("Hi {{ member.first_name }}"), context(name)).body == "Hi Tom & <Jerry>"
    email = Template(
        "member.registered",
        Channel.EMAIL,
        "en",
        "Hi {{ member.first_name }}",
        "<p>{{ member.first_name }}</p>",
    )
    rendered = domain.render(email, context(name))
    assert rendered.body == "<p>Tom &amp; &lt;Jerry&gt;</p>"
    assert rendered.subject == "Hi Tom & <Jerry>"


@pytest.mark.parametrize(
    "body",
    [
        "{{ member.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ member.first_name.__class__.__base__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ '{0.__class__}'.format(member) }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    ],
)
def test_sandbox_escapes_are_refused(body: str) -> None:
    with pytest.raises(InvalidTemplate) as refused:
        domain.render(sms(body), context())
    assert refused.value.part is TemplatePart.BODY
    assert "not allowed" in refused.value.description
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_template("member.registered", Channel.SMS, "en", "", body)
    assert list(field_violations(rejected.value)) == ["template.body"]


def test_unsafe_subject_is_reported_on_the_subject() -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_template("member.registered", Channel.EMAIL, "en", "{{ member.__class__ }}", "Hello")
    assert list(field_violations(rejected.value)) == ["template.subject"]


@pytest.mark.parametrize(
    ("subject", "body", "field", "words"),
    [
        ("", "Hello {{ member.first_name ", "template.body", "syntax error on line 1"),
        ("", "{% if member.first_name %}Hello", "template.body", "syntax error"),
        ("{% for %}", "Hello", "template.subject", "syntax error"),
        # Contact details are not in the context: a message never quotes a phone number.
        ("", "Hello {{ member.phone }}", "template.body", "unknown name"),
        ("", "{{ event.data.no_such_key }}", "template.body", "unknown name"),
        ("", "{{ 1 / 0 }}", "template.body", "ZeroDivisionError"),
        ("", "   ", "template.body", "required"),
        ("", "{{ 'x' * 200000 }}", "template.body", "renders to more than"),
    ],
)
def test_templates_that_do_not_compile_or_render_are_rejected_on_their_field(
    subject: str, body: str, field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_template("member.registered", Channel.SMS, "en", subject, body)
    violations = field_violations(rejected.value)
    assert list(violations) == [field]
    assert words in violations[field]


def test_template_keys_are_checked_before_the_template_is_rendered() -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_template("Member Registered", None, "", "", "{{ member.__class__ }}")
    assert list(field_violations(rejected.value)) == [
        "template.event_type",
        "template.channel",
        "template.locale",
    ]


def test_email_needs_a_subject_and_sms_does_not() -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_template("member.registered", Channel.EMAIL, "en", "", "Hello")
    assert field_violations(rejected.value) == {"template.subject": "required"}
    accepted = service.parse_template("points.expiring", Channel.SMS, "pt-BR", "", "Hi {{ member.first_name }}")
    assert accepted.locale == "pt-BR"


def test_messages_query_defaults_caps_and_rejects() -> None:
    assert service.parse_messages_query("m-1", 0, "").page_size == 50
    assert service.parse_messages_query("m-1", 10_000, "").page_size == 500
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_messages_query("", -1, "garbage")
    assert list(field_violations(rejected.value)) == ["member_id", "page_size", "page_token"]
    foreign = Cursor("m-2", OCCURRED, "x").encode()
    with pytest.raises(InvalidArgument) as wrong_member:
        service.parse_messages_query("m-1", 0, foreign)
    assert list(field_violations(wrong_member.value)) == ["page_token"]
