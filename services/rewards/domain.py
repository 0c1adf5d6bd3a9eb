"""Rewards' rules: coupon codes, coupon terms and whether a coupon applies. No I/O here."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

# Digits and capitals without the look-alikes 0/O, 1/I/L, so a code read aloud or
# typed from paper comes out right.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 10
# Events and logs name a coupon by this many trailing characters, never by its code:
# the code is a bearer secret.
CODE_SUFFIX_LENGTH = 4
MIN_DISCOUNT_BASIS_POINTS = 1
MAX_DISCOUNT_BASIS_POINTS = 10_000

_CODE_SEPARATORS = re.compile(r"[\s\-]")


class CouponStatus(StrEnum):
    ACTIVE = "active"
    REDEEMED = "redeemed"


class Rejection(StrEnum):
    """Why a presented coupon cannot be applied."""

    NOT_FOUND = "not_found"
    OTHER_MEMBER = "other_member"
    ALREADY_USED = "already_used"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Coupon:
    code: str
    member_id: str | None
    """The owner of a personal coupon; None for a bearer coupon anyone may present."""
    discount_basis_points: int
    status: CouponStatus
    valid_from: datetime
    valid_until: datetime | None
    """End of validity, exclusive; None means no end."""
    created_at: datetime

    @property
    def code_suffix(self) -> str:
        return code_suffix(self.code)


def new_coupon_code() -> str:
    """A random code of CODE_LENGTH characters from CODE_ALPHABET (about 49 bits)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(raw: str) -> str:
    """A code as a customer or cashier typed it, in the form it is stored: no spaces or dashes, upper case."""
    return _CODE_SEPARATORS.sub("", raw).upper()


def code_suffix(code: str) -> str:
    """The part of a code that may appear in events and logs."""
    return code[-CODE_SUFFIX_LENGTH:]


def is_valid_discount(basis_points: int) -> bool:
    return MIN_DISCOUNT_BASIS_POINTS <= basis_points <= MAX_DISCOUNT_BASIS_POINTS


def is_valid_window(valid_from: datetime, valid_until: datetime | None) -> bool:
    """A validity window must not be empty: its end, when it has one, comes after its start."""
    return valid_until is None or valid_until > valid_from


def validate(coupon: Coupon | None, member_id: str, now: datetime) -> Rejection | None:
    """Why ``coupon`` cannot be applied now on a receipt of ``member_id`` ("" when anonymous), or None.

    Ownership is decided before state, so presenting someone else's personal coupon
    tells nothing about whether it is used or expired.
    """
    if coupon is None:
        return Rejection.NOT_FOUND
    if coupon.member_id is not None and coupon.member_id != member_id:
        return Rejection.OTHER_MEMBER
    if coupon.status is CouponStatus.REDEEMED:
        return Rejection.ALREADY_USED
    if now < coupon.valid_from:
        return Rejection.NOT_YET_VALID
    if coupon.valid_until is not None and now >= coupon.valid_until:
        return Rejection.EXPIRED
    return None
