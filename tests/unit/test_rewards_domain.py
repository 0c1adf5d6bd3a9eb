"""Rewards' rules: coupon codes, terms and the reason a coupon is refused."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.rewards.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    Coupon,
    CouponStatus,
    Rejection,
    code_suffix,
    is_valid_discount,
    is_valid_window,
    new_coupon_code,
    normalize_code,
    validate,
)

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
END = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)


def coupon(member_id: str | None = "member-1", **changes: object) -> Coupon:
    base = Coupon(
        code="ABCDEFGH23",
        member_id=member_id,
        discount_basis_points=1000,
        status=CouponStatus.ACTIVE,
        valid_from=START,
        valid_until=END,
        created_at=START - timedelta(days=1),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_alphabet_has_no_look_alike_characters() -> None:
    assert not set("0O1IL") & set(CODE_ALPHABET)
    assert len(set(CODE_ALPHABET)) == len(CODE_ALPHABET) == 31


def test_codes_have_the_length_and_alphabet_and_do_not_repeat() -> None:
    codes = [new_coupon_code() for _ in range(20_000)]
    assert all(len(code) == CODE_LENGTH for code in codes)
    assert set("".join(codes)) == set(CODE_ALPHABET), "every allowed character occurs, and nothing else"
    assert len(set(codes)) == len(codes)


def test_code_characters_are_roughly_uniform() -> None:
    counts = Counter("".join(new_coupon_code() for _ in range(10_000)))
    expected = 10_000 * CODE_LENGTH / len(CODE_ALPHABET)
    assert all(0.8 * expected < count < 1.2 * expected for count in counts.values()), counts


def test_a_typed_code_is_normalized_and_only_its_suffix_is_shown() -> None:
    assert normalize_code(" abcde-fgh 23 ") == "ABCDEFGH23"
    assert normalize_code("") == ""
    assert code_suffix("ABCDEFGH23") == "GH23"
    assert coupon().code_suffix == "GH23"


@pytest.mark.parametrize(
    ("basis_points", "valid"), [(-5, False), (0, False), (1, True), (10_000, True), (10_001, False)]
)
def test_discount_is_between_one_basis_point_and_the_whole_receipt(basis_points: int, valid: bool) -> None:
    assert is_valid_discount(basis_points) is valid


def test_a_validity_window_must_not_be_empty() -> None:
    assert is_valid_window(START, None)
    assert is_valid_window(START, START + TICK)
    assert not is_valid_window(START, START)
    assert not is_valid_window(START, START - TICK)


def test_a_good_coupon_is_accepted_from_its_first_moment_to_just_before_its_end() -> None:
    assert validate(coupon(), "member-1", START) is None
    assert validate(coupon(), "member-1", END - TICK) is None


def test_a_missing_coupon_is_not_found() -> None:
    assert validate(None, "member-1", START) is Rejection.NOT_FOUND
    assert validate(None, "", START) is Rejection.NOT_FOUND


def test_a_coupon_is_not_yet_valid_until_its_start() -> None:
    assert validate(coupon(), "member-1", START - TICK) is Rejection.NOT_YET_VALID


def test_a_coupon_expires_at_its_end_which_is_exclusive() -> None:
    assert validate(coupon(), "member-1", END) is Rejection.EXPIRED
    assert validate(coupon(), "member-1", END + timedelta(days=300)) is Rejection.EXPIRED


def test_a_coupon_without_an_end_never_expires() -> None:
    assert validate(coupon(valid_until=None), "member-1", START + timedelta(days=36_500)) is None


def test_a_redeemed_coupon_is_already_used() -> None:
    assert validate(coupon(status=CouponStatus.REDEEMED), "member-1", START) is Rejection.ALREADY_USED


def test_a_personal_coupon_belongs_to_its_member_only() -> None:
    assert validate(coupon(), "member-2", START) is Rejection.OTHER_MEMBER
    anonymous = validate(coupon(), "", START)
    assert anonymous is Rejection.OTHER_MEMBER, "an anonymous receipt cannot use it either"


def test_someone_elses_coupon_reveals_nothing_about_its_state() -> None:
    used_and_expired = coupon(status=CouponStatus.REDEEMED)
    assert validate(used_and_expired, "member-2", END) is Rejection.OTHER_MEMBER
    assert validate(coupon(), "member-2", START - TICK) is Rejection.OTHER_MEMBER


def test_a_bearer_coupon_is_valid_for_anyone_and_anonymous_receipts() -> None:
    bearer = coupon(member_id=None)
    assert validate(bearer, "member-2", START) is None
    assert validate(bearer, "", START) is None
    assert validate(replace(bearer, status=CouponStatus.REDEEMED), "", START) is Rejection.ALREADY_USED
