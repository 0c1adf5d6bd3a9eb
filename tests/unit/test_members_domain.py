"""Identifiers and their normal forms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.members.domain import (
    InvalidIdentifier,
    is_valid_card_number,
    luhn_check_digit,
    new_card_number,
    normalize_email,
    normalize_phone,
)


@pytest.mark.parametrize(
    ("typed", "normal"),
    [
        ("+7 916 123-45-67", "+79161234567"),
        ("8 (916) 123-45-67", "+79161234567"),
        ("89161234567", "+79161234567"),
        ("+44 20 7946 0958", "+442079460958"),
        ("0049 30 901820", "+4930901820"),
    ],
)
def test_phones_take_their_e164_form(typed: str, normal: str) -> None:
    assert normalize_phone(typed) == normal


@pytest.mark.parametrize("typed", ["", "12", "9161234567", "+7 916 ABC", "+0123456789", "+1234567890123456"])
def test_what_is_not_a_phone_is_refused(typed: str) -> None:
    with pytest.raises(InvalidIdentifier):
        normalize_phone(typed)


def test_emails_are_lower_cased_and_checked() -> None:
    assert normalize_email("  Anna.Smirnova@Example.COM ") == "anna.smirnova@example.com"
    for bad in ["anna", "anna@", "@example.com", "anna@example", "a b@example.com", "anna@exam ple.com"]:
        with pytest.raises(InvalidIdentifier):
            normalize_email(bad)


def test_luhn_check_digit_matches_known_numbers() -> None:
    assert luhn_check_digit("7992739871") == "3"  # the textbook example 79927398713
    assert is_valid_card_number("79927398713")
    assert not is_valid_card_number("79927398710")
    assert not is_valid_card_number("7992739871a")


@given(st.integers(min_value=0, max_value=9))
def test_a_single_mistyped_digit_is_always_caught(wrong_digit: int) -> None:
    number = new_card_number()
    position = 5
    if int(number[position]) == wrong_digit:
        return
    mistyped = number[:position] + str(wrong_digit) + number[position + 1 :]
    assert is_valid_card_number(number)
    assert not is_valid_card_number(mistyped)


def test_generated_card_numbers_are_valid_and_distinct() -> None:
    numbers = {new_card_number() for _ in range(2000)}
    assert len(numbers) == 2000
    assert all(is_valid_card_number(n) and n.startswith("77") and len(n) == 13 for n in numbers)
