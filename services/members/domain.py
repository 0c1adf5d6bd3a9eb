"""Members' rules: identifiers and their normal forms. No I/O here."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

CARD_NUMBER_LENGTH = 13
CARD_NUMBER_PREFIX = "77"
DEFAULT_TIER = "basic"

_PHONE_NOISE = re.compile(r"[\s\-().]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class MemberStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"


class CardStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class Member:
    member_id: str
    phone: str
    email: str | None
    first_name: str
    last_name: str
    status: MemberStatus
    tier: str
    registration_channel: int
    created_at: datetime

    @property
    def account_holder_id(self) -> str:
        return self.member_id


@dataclass(frozen=True)
class Card:
    card_number: str
    member_id: str
    status: CardStatus
    issued_at: datetime


class InvalidIdentifier(ValueError):
    """An identifier that cannot be put into its normal form."""


def normalize_phone(raw: str) -> str:
    """E.164 form of a phone as people type it; a Russian trunk '8' becomes '+7'."""
    digits = _PHONE_NOISE.sub("", raw)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    if len(digits) == 11 and digits[0] == "8" and digits.isdigit():
        digits = "+7" + digits[1:]
    if not digits.startswith("+") or not digits[1:].isdigit() or not 8 <= len(digits) - 1 <= 15:
        raise InvalidIdentifier("expected a phone number in international form, e.g. +79161234567")
    if digits[1] == "0":
        raise InvalidIdentifier("a country code never starts with 0")
    return digits


def normalize_email(raw: str) -> str:
    email = raw.strip().lower()
    if not _EMAIL.fullmatch(email) or len(email) > 254:
        raise InvalidIdentifier("expected an e-mail address such as name@example.com")
    return email


def luhn_check_digit(payload: str) -> str:
    total = 0
    for index, char in enumerate(reversed(payload)):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def is_valid_card_number(number: str) -> bool:
    return number.isdigit() and 8 <= len(number) <= 19 and luhn_check_digit(number[:-1]) == number[-1]


def new_card_number() -> str:
    """A random card number with the program prefix and a Luhn check digit."""
    body_length = CARD_NUMBER_LENGTH - len(CARD_NUMBER_PREFIX) - 1
    payload = CARD_NUMBER_PREFIX + "".join(secrets.choice("0123456789") for _ in range(body_length))
    return payload + luhn_check_digit(payload)
