"""Members' rules without I/O: tier qualification, QR tokens, batch numbers, event payloads."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty.runtime.cache import TtlCache
from services.members.domain import (
    CONSENT_CHANNELS,
    AttributeDefinition,
    AttributeScalar,
    AttributeType,
    CalendarPeriod,
    Consent,
    ExpiredToken,
    InvalidIdentifier,
    InvalidToken,
    Member,
    MemberStatus,
    TierDefinition,
    TierMetric,
    attribute_value_error,
    batch_card_numbers,
    birthday_candidates,
    birthday_falls_on,
    calendar_period_start,
    decode_attribute,
    encode_attribute,
    evaluate_tier,
    is_valid_card_number,
    is_valid_time_zone,
    local_date,
    member_payload,
    merge_consents,
    merge_newer_consents,
    months_before,
    new_referral_code,
    normalize_referral_code,
    profile_complete,
    ranges_overlap,
    sign_qr_token,
    verify_qr_token,
    window_start,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SILVER = TierDefinition("silver", "Silver", 1, 10_000, 0, 0, 0)
GOLD = TierDefinition("gold", "Gold", 2, 50_000, 6, 30, 90)


def decide(
    current: str, expires: datetime | None, silver: int, gold: int, last: datetime | None = NOW
) -> tuple[str, datetime | None, str | None] | None:
    """The decision as (tier, end, reason), None when nothing changes."""
    decision = evaluate_tier(current, expires, [SILVER, GOLD], {"silver": silver, "gold": gold}, last, NOW)
    return None if decision is None else (decision.tier, decision.expires_at, decision.reason)


def test_the_best_qualifying_tier_is_taken_at_once_with_its_duration() -> None:
    assert decide("basic", None, 60_000, 60_000) == ("gold", NOW + timedelta(days=30), "qualified")
    assert decide("basic", None, 9_999, 0) is None
    assert decide("basic", None, 10_000, 0) == ("silver", None, "qualified")


def test_requalifying_moves_the_end_without_a_change() -> None:
    assert decide("gold", NOW + timedelta(days=3), 60_000, 60_000) == ("gold", NOW + timedelta(days=30), None)


def test_a_tier_with_a_duration_holds_until_it_lapses() -> None:
    assert decide("gold", NOW + timedelta(days=3), 20_000, 20_000) is None
    assert decide("gold", NOW - timedelta(seconds=1), 20_000, 20_000) == ("silver", None, "expired")


def test_a_tier_without_a_duration_lasts_while_qualified() -> None:
    assert decide("silver", None, 5_000, 5_000) == ("basic", None, "not_qualified")


def test_inactivity_drops_a_tier_before_it_lapses() -> None:
    assert decide("gold", NOW + timedelta(days=20), 60_000, 60_000, last=NOW - timedelta(days=91)) == (
        "silver",
        None,
        "inactive",
    )


def test_months_are_calendar_months() -> None:
    assert months_before(datetime(2026, 8, 31, tzinfo=UTC), 6) == datetime(2026, 2, 28, tzinfo=UTC)
    assert months_before(datetime(2026, 3, 15, tzinfo=UTC), 15) == datetime(2024, 12, 15, tzinfo=UTC)


def test_a_qr_token_verifies_only_unchanged_and_in_time() -> None:
    token = sign_qr_token(b"key", "member-1", NOW + timedelta(minutes=2))
    assert verify_qr_token(b"key", token, NOW) == "member-1"
    with pytest.raises(ExpiredToken):
        verify_qr_token(b"key", token, NOW + timedelta(minutes=2))
    with pytest.raises(InvalidToken):
        verify_qr_token(b"other key", token, NOW)
    with pytest.raises(InvalidToken):
        verify_qr_token(b"key", token.replace("member-1", "member-2"), NOW)
    with pytest.raises(InvalidToken):
        verify_qr_token(b"key", "garbage", NOW)


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=300))
def test_batch_numbers_are_valid_and_distinct(first: int, count: int) -> None:
    numbers = list(batch_card_numbers("77", first, count, 10))
    assert len(set(numbers)) == count
    assert all(len(number) == 13 and is_valid_card_number(number) for number in numbers)


def test_ranges_overlap_only_when_they_share_a_number() -> None:
    assert ranges_overlap(0, 10, 9, 5)
    assert not ranges_overlap(0, 10, 10, 5)
    assert not ranges_overlap(10, 5, 0, 10)


def test_time_zones_must_be_known() -> None:
    assert is_valid_time_zone("Europe/Moscow")
    assert not is_valid_time_zone("Mars/Olympus")
    assert not is_valid_time_zone("../etc/passwd")


def test_the_profile_payload_names_every_channel() -> None:
    member = Member(
        "m-1",
        "+79161234567",
        None,
        "Anna",
        "",
        MemberStatus.BLOCKED,
        "gold",
        1,
        NOW,
        consents=merge_consents(
            [Consent("email", True, NOW, "web")],
            [Consent("sms", True, NOW, "pos"), Consent("email", False, NOW, "app")],
        ),
    )
    payload = member_payload(member)
    assert payload["consents"] == {"sms": True, "email": False, "push": False, "viber": False, "telegram": False}
    assert set(payload["consents"]) == set(CONSENT_CHANNELS)
    assert (payload["email"], payload["status"], payload["tier"]) == ("", "blocked", "gold")


def test_the_cache_forgets_by_age_by_member_and_beyond_its_size() -> None:
    now = [0.0]
    cache: TtlCache[str] = TtlCache(10, max_entries=2, clock=lambda: now[0])
    cache.put(("card", "1"), "m-1", "anna by card")
    cache.put(("phone", "+7"), "m-1", "anna by phone")
    assert cache.get(("card", "1")) == "anna by card"
    cache.forget("m-1")
    assert cache.get(("card", "1")) is None and cache.get(("phone", "+7")) is None
    for index in range(3):
        cache.put(("card", str(index)), f"m-{index}", "someone")
    assert [cache.get(("card", str(index))) for index in range(3)] == [None, "someone", "someone"]
    now[0] = 10.0
    assert cache.get(("card", "2")) is None
    disabled: TtlCache[str] = TtlCache(0)
    disabled.put("key", "m-1", "value")
    assert disabled.get("key") is None


@pytest.mark.parametrize(
    ("period", "start"),
    [
        (CalendarPeriod.YEAR, datetime(2026, 1, 1, tzinfo=UTC)),
        (CalendarPeriod.QUARTER, datetime(2026, 10, 1, tzinfo=UTC)),
        (CalendarPeriod.MONTH, datetime(2026, 11, 1, tzinfo=UTC)),
    ],
)
def test_a_calendar_window_starts_at_midnight_of_its_first_day(period: CalendarPeriod, start: datetime) -> None:
    tier = TierDefinition("gold", "Gold", 2, 0, 0, 0, 0, calendar_period=period)
    assert window_start(tier, NOW) == start
    assert calendar_period_start(CalendarPeriod.QUARTER, datetime(2026, 3, 31, 23, 59, tzinfo=UTC)) == datetime(
        2026, 1, 1, tzinfo=UTC
    )


def test_a_points_tier_compares_points_not_spend() -> None:
    points_tier = TierDefinition("silver", "Silver", 1, 1, 0, 0, 0, metric=TierMetric.POINTS, points_threshold=500)
    # The progress given per tier is in the tier's own metric.
    assert evaluate_tier("basic", None, [points_tier], {"silver": 499}, NOW, NOW) is None
    decision = evaluate_tier("basic", None, [points_tier], {"silver": 500}, NOW, NOW)
    assert decision is not None and (decision.tier, decision.reason) == ("silver", "qualified")


@pytest.mark.parametrize(
    ("kind", "value", "valid"),
    [
        (AttributeType.INT, 3, True),
        (AttributeType.INT, True, False),
        (AttributeType.INT, "3", False),
        (AttributeType.BOOL, False, True),
        (AttributeType.BOOL, 0, False),
        (AttributeType.DATE, "2015-06-20", True),
        (AttributeType.DATE, "2015-6-20", False),
        (AttributeType.DATE, "2015-02-30", False),
        (AttributeType.ENUM, "dog", True),
        (AttributeType.ENUM, "Dog", False),
        (AttributeType.STRING, "x" * 500, True),
        (AttributeType.STRING, "x" * 501, False),
        (AttributeType.STRING, "tab\there", False),
        (AttributeType.STRING, 5, False),
    ],
)
def test_attribute_values_must_be_of_their_type(kind: AttributeType, value: AttributeScalar, valid: bool) -> None:
    definition = AttributeDefinition("a", "A", kind, ("cat", "dog") if kind is AttributeType.ENUM else ())
    assert (attribute_value_error(definition, value) is None) is valid


@given(st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=50)))
def test_attribute_values_survive_their_stored_form(value: AttributeScalar) -> None:
    decoded = decode_attribute(*encode_attribute(value))
    assert decoded == value and type(decoded) is type(value)


def test_referral_codes_are_read_as_people_type_them() -> None:
    code = new_referral_code()
    assert normalize_referral_code(f" {code[:4].lower()}-{code[4:]} ") == code
    for wrong in ("ABCD", "ABCDEFGH1", "ABCDEFG0", "ABCDEFGI"):
        with pytest.raises(InvalidIdentifier):
            normalize_referral_code(wrong)


def test_a_merge_keeps_per_channel_the_newer_consent() -> None:
    old, new = NOW - timedelta(days=1), NOW
    survivor = (Consent("sms", True, old, "pos"), Consent("push", True, new, "app"))
    duplicate = (
        Consent("sms", False, new, "web"),
        Consent("push", False, old, "web"),
        Consent("email", True, old, "web"),
    )
    merged, taken = merge_newer_consents(survivor, duplicate)
    assert {(c.channel, c.granted) for c in merged} == {("sms", False), ("push", True), ("email", True)}
    assert taken == 2


def test_a_birthday_falls_on_its_day_and_29_february_on_28_february_in_other_years() -> None:
    assert birthday_falls_on("1990-06-15", date(2026, 6, 15))
    assert not birthday_falls_on("1990-06-15", date(2026, 6, 14))
    assert not birthday_falls_on("", date(2026, 6, 15))
    assert birthday_falls_on("2000-02-29", date(2027, 2, 28))
    assert not birthday_falls_on("2000-02-29", date(2028, 2, 28)), "a leap year has the day itself"
    assert birthday_falls_on("2000-02-29", date(2028, 2, 29))
    assert not birthday_falls_on("2000-02-28", date(2028, 2, 29))


def test_birthday_candidates_cover_every_time_zone_and_the_29th_with_the_28th() -> None:
    assert birthday_candidates(datetime(2026, 6, 14, 22, 30, tzinfo=UTC)) == ("06-13", "06-14", "06-15")
    assert birthday_candidates(datetime(2027, 3, 1, 1, 0, tzinfo=UTC)) == ("02-28", "02-29", "03-01", "03-02")
    # the furthest time zones (UTC+14, UTC-12) stay within the three days
    moment = datetime(2026, 6, 14, 23, 59, tzinfo=UTC)
    assert local_date(moment, "Pacific/Kiritimati").strftime("%m-%d") in birthday_candidates(moment)
    assert local_date(moment.replace(hour=0, minute=0), "Etc/GMT+12").strftime("%m-%d") in birthday_candidates(
        moment.replace(hour=0, minute=0)
    )
    assert local_date(moment, "") == local_date(moment, "Not/AZone") == moment.date(), "UTC when unknown"


def test_a_profile_is_complete_with_both_names_an_email_and_a_birth_date() -> None:
    full = Member(
        "m", "+7", "a@example.com", "Anna", "Ivanova", MemberStatus.ACTIVE, "basic", 1, NOW, birth_date="1990-01-01"
    )
    assert profile_complete(full)
    assert not profile_complete(dataclasses.replace(full, email=None))
    assert not profile_complete(dataclasses.replace(full, last_name="  "))
    assert not profile_complete(dataclasses.replace(full, birth_date=""))
