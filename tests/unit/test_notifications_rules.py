"""Notifications' delivery rules: consent, quiet hours, frequency cap, retries, the cascade's
verdict, birthdays, the contact projection, throttling, built-in texts and triggers."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from loyalty.runtime.errors import InvalidArgument
from services.notifications import domain, service
from services.notifications.domain import (
    AttemptResult,
    Category,
    Channel,
    Contact,
    MessageState,
    Outcome,
    Policy,
    Reason,
)
from services.notifications.jobs import ChannelThrottle

ALL = frozenset(Channel)


def policy(**changes: object) -> Policy:
    values: dict[str, object] = {
        "quiet_start": time(21),
        "quiet_end": time(9),
        "default_time_zone": "Europe/Moscow",
        "frequency_cap": 2,
        "frequency_window": timedelta(hours=24),
        "transactional_needs_consent": False,
        "max_attempts": 3,
        "retry_base": timedelta(seconds=30),
        "retry_max": timedelta(minutes=5),
    }
    values.update(changes)
    return Policy(**values)  # type: ignore[arg-type]


def anna(**changes: object) -> Contact:
    values: dict[str, object] = {
        "member_id": "m-1",
        "first_name": "Anna",
        "phone": "+79990000001",
        "email": "anna@example.test",
        "consents": {"sms": True, "email": False},
    }
    values.update(changes)
    return Contact(**values)  # type: ignore[arg-type]


def test_marketing_needs_consent_and_transactional_needs_it_by_policy() -> None:
    rules = policy()
    refusal = domain.channel_refusal
    assert refusal(anna(), Channel.SMS, Category.MARKETING, rules, ALL) is None
    assert refusal(anna(), Channel.EMAIL, Category.MARKETING, rules, ALL) is Reason.NO_CONSENT
    assert refusal(anna(), Channel.VIBER, Category.MARKETING, rules, ALL) is Reason.NO_CONSENT
    assert refusal(anna(), Channel.VIBER, Category.TRANSACTIONAL, rules, ALL) is None
    assert refusal(anna(), Channel.EMAIL, Category.TRANSACTIONAL, rules, ALL) is None
    strict = policy(transactional_needs_consent=True)
    assert refusal(anna(), Channel.VIBER, Category.TRANSACTIONAL, strict, ALL) is Reason.NO_CONSENT
    assert refusal(anna(), Channel.SMS, Category.TRANSACTIONAL, strict, ALL) is None


def test_a_channel_needs_an_address_and_a_provider() -> None:
    rules = policy()
    consenting = anna(consents={channel.value: True for channel in Channel})
    assert domain.channel_refusal(consenting, Channel.PUSH, Category.MARKETING, rules, ALL) is Reason.NO_ADDRESS
    assert domain.channel_refusal(consenting, Channel.TELEGRAM, Category.MARKETING, rules, ALL) is Reason.NO_ADDRESS
    only_email = frozenset({Channel.EMAIL})
    assert domain.channel_refusal(consenting, Channel.SMS, Category.MARKETING, rules, only_email) is Reason.NO_PROVIDER
    assert domain.member_refusal(None) is Reason.UNKNOWN_MEMBER
    assert domain.member_refusal(anna(status="blocked")) is Reason.MEMBER_BLOCKED
    assert domain.member_refusal(anna()) is None


@pytest.mark.parametrize(
    ("local", "expected_end"),
    [
        (datetime(2025, 3, 8, 22, 30), datetime(2025, 3, 9, 9, 0)),
        (datetime(2025, 3, 9, 3, 0), datetime(2025, 3, 9, 9, 0)),
        (datetime(2025, 3, 8, 21, 0), datetime(2025, 3, 9, 9, 0)),
        (datetime(2025, 3, 8, 9, 0), None),
        (datetime(2025, 3, 8, 20, 59), None),
    ],
)
def test_quiet_hours_wrap_midnight_in_the_members_zone(local: datetime, expected_end: datetime | None) -> None:
    zone = ZoneInfo("Asia/Vladivostok")
    now = local.replace(tzinfo=zone).astimezone(UTC)
    end = domain.quiet_until(now, zone, policy())
    assert end == (expected_end.replace(tzinfo=zone).astimezone(UTC) if expected_end else None)


def test_quiet_hours_within_a_day_and_switched_off() -> None:
    zone = ZoneInfo("UTC")
    lunch = policy(quiet_start=time(13), quiet_end=time(15))
    assert domain.quiet_until(datetime(2025, 1, 1, 14, tzinfo=UTC), zone, lunch) == datetime(2025, 1, 1, 15, tzinfo=UTC)
    assert domain.quiet_until(datetime(2025, 1, 1, 15, tzinfo=UTC), zone, lunch) is None
    assert domain.quiet_until(datetime(2025, 1, 1, 23, tzinfo=UTC), zone, policy(quiet_start=None)) is None


def test_the_zone_is_the_members_then_the_programs() -> None:
    rules = policy()
    assert domain.zone_of(anna(time_zone="Asia/Tokyo"), rules) == ZoneInfo("Asia/Tokyo")
    assert domain.zone_of(anna(time_zone="Not/AZone"), rules) == ZoneInfo("Europe/Moscow")
    assert domain.zone_of(anna(), rules) == ZoneInfo("Europe/Moscow")


def test_the_frequency_cap_stops_marketing_only() -> None:
    rules = policy(frequency_cap=2)
    assert not domain.is_capped(Category.MARKETING, 1, rules)
    assert domain.is_capped(Category.MARKETING, 2, rules)
    assert not domain.is_capped(Category.TRANSACTIONAL, 50, rules)
    assert not domain.is_capped(Category.MARKETING, 50, policy(frequency_cap=0))


def test_retries_back_off_exponentially_up_to_the_maximum() -> None:
    rules = policy()
    assert [domain.retry_delay(n, rules).total_seconds() for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 240, 300]


NOW = datetime(2025, 3, 8, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("outcomes", "attempts", "state", "retry"),
    [
        ([Outcome.DELIVERED], 1, MessageState.DELIVERED, None),
        ([Outcome.TRANSIENT, Outcome.ACCEPTED], 2, MessageState.SENT, None),
        ([Outcome.UNDELIVERED, Outcome.UNDELIVERED], 2, MessageState.FAILED, None),
        ([Outcome.UNDELIVERED, Outcome.TRANSIENT], 2, MessageState.QUEUED, NOW + timedelta(seconds=60)),
        ([Outcome.TRANSIENT], 3, MessageState.DEAD, None),
    ],
)
def test_a_round_over_the_cascade_ends_in_a_state(
    outcomes: list[Outcome], attempts: int, state: MessageState, retry: datetime | None
) -> None:
    results = [AttemptResult(Channel.SMS, outcome) for outcome in outcomes]
    verdict = domain.after_round(results, attempts, NOW, policy(max_attempts=3))
    assert (verdict.state, verdict.retry_at) == (state, retry)


def test_birthdays_in_the_members_zone_and_on_29_february() -> None:
    rules = policy()
    tokyo = anna(birth_date="1990-03-09", time_zone="Asia/Tokyo")
    # 16:00 UTC on 8 March is already 9 March in Tokyo.
    assert domain.is_birthday(tokyo, datetime(2025, 3, 8, 16, tzinfo=UTC), rules)
    assert not domain.is_birthday(tokyo, datetime(2025, 3, 8, 14, tzinfo=UTC), rules)
    assert domain.birthday_in("2000-02-29", 2025) == date(2025, 2, 28)
    assert domain.birthday_in("2000-02-29", 2024) == date(2024, 2, 29)
    assert domain.birthday_in("", 2025) is None


def test_member_events_fill_the_contact_and_missing_keys_keep_what_was_known() -> None:
    early = domain.merge_contact(None, "m-1", {"member_id": "m-1", "first_name": "Anna", "channel": 1})
    assert early == Contact("m-1", first_name="Anna")
    full = domain.merge_contact(
        early,
        "m-1",
        {
            "phone": "+79990000001",
            "email": "anna@example.test",
            "time_zone": "Asia/Tokyo",
            "telegram_chat_id": 42,
            "consents": {"sms": True, "email": 0},
        },
    )
    assert (full.first_name, full.phone, full.telegram_chat_id, full.time_zone) == (
        "Anna",
        "+79990000001",
        "42",
        "Asia/Tokyo",
    )
    assert full.consents == {"sms": True, "email": False}
    assert domain.merge_contact(full, "m-1", {"first_name": "Anne"}).consents == full.consents


def test_the_token_bucket_spaces_sends_at_the_rate() -> None:
    bucket = domain.TokenBucket(rate=2.0)
    assert bucket.wait(0.0) == 0.0
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.0) == pytest.approx(1.0)
    assert bucket.wait(10.0) == 0.0


def test_templates_are_looked_for_in_the_locale_its_language_then_the_default() -> None:
    assert domain.template_locales("pt-BR", "ru") == ["pt-BR", "pt", "ru", "en"]
    assert domain.template_locales("", "en") == ["en"]


@pytest.mark.parametrize("event_type", domain.TRIGGER_EVENTS)
@pytest.mark.parametrize("channel", list(Channel))
def test_every_built_in_text_renders_with_its_events_sample(event_type: str, channel: Channel) -> None:
    template = domain.default_template(event_type, channel, "en")
    assert template is not None
    assert domain.template_problems(template) == {}
    assert domain.render(template, domain.sample_context(event_type)).body


def test_triggers_are_checked_field_by_field() -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_trigger(
            "cheque.committed", True, "Bad Key", [Channel.SMS, None, Channel.SMS], timedelta(-1), None
        )
    assert [violation.field for violation in rejected.value.violations] == [
        "trigger.event_type",
        "trigger.template_key",
        "trigger.channels[1]",
        "trigger.channels",
        "trigger.delay",
        "trigger.category",
    ]
    accepted = service.parse_trigger("tier.changed", False, "", [Channel.EMAIL], timedelta(hours=1), Category.MARKETING)
    assert (accepted.template_key, accepted.channels, accepted.enabled) == ("tier.changed", (Channel.EMAIL,), False)


def test_mass_sends_are_checked_and_duplicates_dropped() -> None:
    with pytest.raises(InvalidArgument) as rejected:
        service.parse_mass_send("promo", [], [""])
    assert [violation.field for violation in rejected.value.violations] == [
        "template_key",
        "channels",
        "member_ids[0]",
    ]
    parsed = service.parse_mass_send("promo.spring", [Channel.SMS], ["m-1", "m-2", "m-1"])
    assert parsed.member_ids == ("m-1", "m-2")


def sent_message(channel: Channel = Channel.SMS) -> domain.Message:
    return domain.Message(
        message_id="msg-1",
        member_id="m-1",
        event_type="points.accrued",
        event_id="e-1",
        category=Category.TRANSACTIONAL,
        template_key="points.accrued",
        channels=(Channel.SMS, Channel.EMAIL),
        channel=channel,
        subject="",
        body="hi",
        state=MessageState.SENT,
        created_at=NOW,
        occurred_at=NOW,
        next_attempt_at=NOW,
        sent_at=NOW,
    )


def test_a_late_report_delivers_moves_on_or_fails_and_repeats_change_nothing() -> None:
    later = NOW + timedelta(minutes=5)
    delivered = domain.after_report(sent_message(), True, "", later)
    assert (delivered.state, delivered.delivered_at) == (MessageState.DELIVERED, later)
    assert domain.after_report(delivered, True, "", later + timedelta(minutes=1)) == delivered
    moved = domain.after_report(sent_message(), False, "unreachable", later)
    assert (moved.state, moved.cascade_from, moved.reason, moved.next_attempt_at) == (
        MessageState.QUEUED,
        1,
        "sms: unreachable",
        later,
    )
    failed = domain.after_report(sent_message(Channel.EMAIL), False, "", later)
    assert (failed.state, failed.reason) == (MessageState.FAILED, "email: undelivered")
    assert domain.after_report(failed, False, "", later) == failed
    with pytest.raises(domain.NotSent):
        domain.after_report(moved, True, "", later)


async def test_the_throttle_paces_each_channel_on_its_own() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    throttle = ChannelThrottle({Channel.SMS: 4.0, Channel.EMAIL: 1.0}, clock=lambda: 100.0, sleep=sleep)
    for channel in (Channel.SMS, Channel.SMS, Channel.EMAIL, Channel.SMS, Channel.PUSH):
        await throttle(channel)
    assert waits == [pytest.approx(0.25), pytest.approx(0.5)]
