"""Members' rules without I/O: tier qualification, QR tokens, batch numbers, event payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.members.cache import TtlCache
from services.members.domain import (
    CONSENT_CHANNELS,
    Consent,
    ExpiredToken,
    InvalidToken,
    Member,
    MemberStatus,
    TierDefinition,
    batch_card_numbers,
    evaluate_tier,
    is_valid_card_number,
    is_valid_time_zone,
    member_payload,
    merge_consents,
    months_before,
    ranges_overlap,
    sign_qr_token,
    verify_qr_token,
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
