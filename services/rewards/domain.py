"""Rewards' rules: coupon series and codes, whether a coupon applies, gift cards. No I/O here."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from loyalty.runtime.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted, Violations

# Digits and capitals without the look-alikes 0/O, 1/I/L, so a code read aloud or
# typed from paper comes out right.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 10
AMBIGUOUS_CHARACTERS = frozenset("0O1IL")
MIN_CODE_LENGTH = 6
MAX_CODE_LENGTH = 32
# Generated codes must come from at least 2^40 possibilities: a guesser trying codes at
# the wrong-code limit then finds a live one only by luck, and a million codes of one
# series rarely collide while they are generated.
MIN_CODE_SPACE_BITS = 40
# Codes chosen by people (a mass code like SUMMER10, a partner's codes): letters and digits.
_CHOSEN_CODE = re.compile(r"[A-Z0-9]{4,32}")
# Events and logs name a coupon by this many trailing characters, never by its code:
# the code is a bearer secret.
CODE_SUFFIX_LENGTH = 4
MAX_TERMINAL_ID_LENGTH = 64

# How long a reservation holds a coupon when the register does not say, and at most.
DEFAULT_RESERVATION_SECONDS = 15 * 60
MAX_RESERVATION_SECONDS = 24 * 3600
# Guessing codes: a terminal that presents this many unknown codes (coupons or gift
# cards) within the window is refused every lookup until the window closes.
WRONG_CODE_LIMIT = 10
WRONG_CODE_WINDOW_SECONDS = 60.0
# Guessing a gift card's PIN: this many wrong PINs for one card within the window lock
# the card's PIN checks until the window closes, whichever registers try.
WRONG_PIN_LIMIT = 5
WRONG_PIN_WINDOW_SECONDS = 15 * 60.0

GIFT_CARD_NUMBER_LENGTH = 16
MIN_PIN_LENGTH = 4
MAX_PIN_LENGTH = 12
_PIN = re.compile(r"[0-9]+")
# scrypt work factors for PIN hashes (RFC 7914 interactive parameters, n=2^14).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1

_CODE_SEPARATORS = re.compile(r"[\s\-]")


class SeriesKind(StrEnum):
    MASS = "mass"
    """One shared code many customers present."""
    UNIQUE = "unique"
    """A code per coupon: personal, generated or imported."""


class CouponStatus(StrEnum):
    ACTIVE = "active"
    REDEEMED = "redeemed"
    """Used up: redeemed as many times as the series allows."""


class Rejection(StrEnum):
    """Why a presented coupon cannot be applied."""

    NOT_FOUND = "not_found"
    OTHER_MEMBER = "other_member"
    ALREADY_USED = "already_used"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    NOT_APPLICABLE = "not_applicable"
    """The receipt does not meet the coupon's terms (its total is too low)."""
    MEMBER_REQUIRED = "member_required"
    """The series limits uses per member and the receipt is anonymous."""
    MEMBER_LIMIT_REACHED = "member_limit_reached"
    RESERVED = "reserved"
    """Held by live reservations for other receipts, as many as it has uses left."""


class ReservationStatus(StrEnum):
    """A reservation's stored state; whether an ACTIVE one still holds depends on the clock."""

    ACTIVE = "active"
    REDEEMED = "redeemed"
    RELEASED = "released"
    RETURNED = "returned"
    """Redeemed, then its receipt was returned and the coupon reinstated."""


def too_many_wrong_codes(retry_after_seconds: float) -> DomainError:
    return ResourceExhausted(
        "TOO_MANY_WRONG_CODES",
        "too many unknown codes from this terminal; try again later",
        retry_after_seconds,
    )


def too_many_wrong_pins(retry_after_seconds: float) -> DomainError:
    return ResourceExhausted(
        "TOO_MANY_WRONG_PINS", "too many wrong PINs for this gift card; try again later", retry_after_seconds
    )


@dataclass(frozen=True)
class Series:
    """The terms shared by the coupons of a series."""

    series_id: str
    name: str
    kind: SeriesKind
    campaign_id: str | None
    benefit: bytes
    """The serialized loyalty.common.v1.CouponBenefit: the rules service applies it;
    rewards keeps it with the series and hands it on with each coupon."""
    min_receipt_total_minor: int
    """The benefit's threshold, kept beside it so validation can refuse a small receipt."""
    uses_per_code: int
    """How many times one code may be redeemed; 0 means without limit."""
    uses_per_member: int
    """How many coupons of the series one member may redeem; 0 means without limit."""
    valid_from: datetime
    valid_until: datetime | None
    validity_days: int
    """A coupon is valid this many days from its issue (within the series' window); 0: the window."""
    mass_code: str | None
    code_alphabet: str
    code_length: int
    created_at: datetime

    def coupon_window(self, issued_at: datetime) -> tuple[datetime, datetime | None]:
        """When a coupon issued at ``issued_at`` is valid: the series' window, narrowed to
        ``validity_days`` from the later of its issue and the series' start."""
        start = max(self.valid_from, issued_at)
        if not self.validity_days:
            return start, self.valid_until
        end = start + timedelta(days=self.validity_days)
        return start, end if self.valid_until is None else min(end, self.valid_until)

    def has_ended(self, now: datetime) -> bool:
        return self.valid_until is not None and now >= self.valid_until


@dataclass(frozen=True)
class Coupon:
    code: str
    series: Series
    member_id: str | None
    """The owner of a personal coupon; None for a bearer coupon anyone may present."""
    partner_id: str | None
    """The partner distributing an imported promo code."""
    status: CouponStatus
    uses: int
    """Redemptions so far (returns give them back)."""
    valid_from: datetime
    valid_until: datetime | None
    """End of validity, exclusive; None means no end."""
    created_at: datetime

    @property
    def code_suffix(self) -> str:
        return code_suffix(self.code)

    def uses_after(self, redeemed: int) -> tuple[int, CouponStatus]:
        """The count and status after ``redeemed`` more redemptions (negative: returned)."""
        uses = self.uses + redeemed
        limit = self.series.uses_per_code
        return uses, CouponStatus.REDEEMED if limit and uses >= limit else CouponStatus.ACTIVE


@dataclass(frozen=True)
class Reservation:
    """A coupon held for one receipt until it is redeemed, released or lapses."""

    reservation_id: str
    code: str
    series_id: str
    member_id: str | None
    receipt_ref: str
    status: ReservationStatus
    expires_at: datetime
    """The reservation stops holding the coupon at this moment (exclusive)."""
    created_at: datetime

    def is_live(self, now: datetime) -> bool:
        """Whether it still holds its coupon: active and not yet lapsed."""
        return self.status is ReservationStatus.ACTIVE and now < self.expires_at


@dataclass(frozen=True)
class Usage:
    """The other uses of a coupon a decision must weigh."""

    holders: Sequence[Reservation] = ()
    """The coupon's reservations that may hold it (active ones; the clock decides if they still do)."""
    member_uses: int = 0
    """The member's redemptions in the series plus their live reservations for other receipts."""


def new_code(alphabet: str = CODE_ALPHABET, length: int = CODE_LENGTH) -> str:
    """A code drawn uniformly from every ``length``-character string over ``alphabet``,
    by the operating system's CSPRNG (one draw per code, then base conversion)."""
    number = secrets.randbelow(len(alphabet) ** length)
    characters = []
    for _ in range(length):
        number, digit = divmod(number, len(alphabet))
        characters.append(alphabet[digit])
    return "".join(characters)


def check_code_format(alphabet: str, length: int, violations: Violations) -> None:
    """A series' generated codes: unambiguous capitals and digits, and enough of them."""
    if not re.fullmatch(r"[A-Z0-9]+", alphabet):
        violations.add("code_alphabet", "capital letters and digits only")
    elif AMBIGUOUS_CHARACTERS & set(alphabet):
        violations.add("code_alphabet", "must not contain the look-alikes 0, O, 1, I, L")
    elif len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
        violations.add("code_alphabet", "at least two characters, each once")
    elif not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        violations.add("code_length", f"from {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH}")
    elif length * math.log2(len(alphabet)) < MIN_CODE_SPACE_BITS:
        violations.add(
            "code_length", f"too short for this alphabet: codes need at least 2^{MIN_CODE_SPACE_BITS} possibilities"
        )


def is_chosen_code(code: str) -> bool:
    """Whether a person-chosen code (mass or partner) has a storable form: 4..32 letters and digits."""
    return bool(_CHOSEN_CODE.fullmatch(code))


def mask_code(code: str) -> str:
    """A code as it may appear in logs: only its last characters."""
    return "*" * max(len(code) - CODE_SUFFIX_LENGTH, 0) + code_suffix(code)


def normalize_code(raw: str) -> str:
    """A code as a customer or cashier typed it, in the form it is stored: no spaces or dashes, upper case."""
    return _CODE_SEPARATORS.sub("", raw).upper()


def code_suffix(code: str) -> str:
    """The part of a code that may appear in events and logs."""
    return code[-CODE_SUFFIX_LENGTH:]


def is_valid_window(valid_from: datetime, valid_until: datetime | None) -> bool:
    """A validity window must not be empty: its end, when it has one, comes after its start."""
    return valid_until is None or valid_until > valid_from


def validate(
    coupon: Coupon | None,
    member_id: str,
    now: datetime,
    usage: Usage = Usage(),
    receipt_ref: str = "",
    receipt_total_minor: int | None = None,
) -> Rejection | None:
    """Why ``coupon`` cannot be applied now on the receipt ``receipt_ref`` of ``member_id``
    ("" when anonymous), or None.

    Ownership is decided before state, so presenting someone else's personal coupon
    tells nothing about whether it is used or expired. A live reservation for
    ``receipt_ref`` itself does not block ("" matches no receipt); reservations for other
    receipts block once they take every use the coupon has left.
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
    series = coupon.series
    if receipt_total_minor is not None and receipt_total_minor < series.min_receipt_total_minor:
        return Rejection.NOT_APPLICABLE
    if series.uses_per_member:
        if not member_id:
            return Rejection.MEMBER_REQUIRED
        if usage.member_uses >= series.uses_per_member:
            return Rejection.MEMBER_LIMIT_REACHED
    held_elsewhere = sum(
        1 for held in usage.holders if held.is_live(now) and (not receipt_ref or held.receipt_ref != receipt_ref)
    )
    if series.uses_per_code and coupon.uses + held_elsewhere >= series.uses_per_code:
        return Rejection.RESERVED
    return None


def validate_reservation(
    coupon: Coupon | None,
    member_id: str,
    receipt_ref: str,
    usage: Usage,
    now: datetime,
    receipt_total_minor: int | None,
) -> Rejection | None:
    """``validate`` for a new reservation: every live reservation counts, and a receipt
    already holding the coupon cannot reserve it again (one receipt, one reservation)."""
    rejection = validate(coupon, member_id, now, usage, "", receipt_total_minor)
    if rejection is None and any(held.is_live(now) and held.receipt_ref == receipt_ref for held in usage.holders):
        return Rejection.RESERVED
    return rejection


_REFUSALS = {
    Rejection.OTHER_MEMBER: "the coupon is another member's",
    Rejection.ALREADY_USED: "the coupon was already redeemed",
    Rejection.NOT_YET_VALID: "the coupon is not valid yet",
    Rejection.EXPIRED: "the coupon's validity has ended",
    Rejection.NOT_APPLICABLE: "the receipt does not meet the coupon's terms",
    Rejection.MEMBER_REQUIRED: "the coupon needs an identified member",
    Rejection.MEMBER_LIMIT_REACHED: "the member has used this series' coupons as often as it allows",
    Rejection.RESERVED: "the coupon is reserved for another receipt",
}


def refusal(rejection: Rejection) -> DomainError:
    """The error a mutation raises for a coupon that cannot be used: COUPON_<REJECTION>."""
    reason = f"COUPON_{rejection.name}"
    if rejection is Rejection.NOT_FOUND:
        return NotFound(reason, "no coupon has this code")
    return FailedPrecondition(reason, _REFUSALS[rejection])


def check_reservation(reservation: Reservation | None, now: datetime) -> Reservation:
    """The reservation, if it still holds its coupon; otherwise the refusal why not."""
    if reservation is None:
        raise NotFound("RESERVATION_NOT_FOUND", "no such reservation")
    if reservation.status in (ReservationStatus.REDEEMED, ReservationStatus.RETURNED):
        raise FailedPrecondition("COUPON_ALREADY_USED", "the coupon was already redeemed through this reservation")
    if reservation.status is ReservationStatus.RELEASED:
        raise FailedPrecondition("RESERVATION_RELEASED", "the reservation was released")
    if not reservation.is_live(now):
        raise FailedPrecondition("RESERVATION_EXPIRED", "the reservation lapsed; reserve the coupon again")
    return reservation


def check_reinstatable(
    coupon: Coupon | None, redeemed_on: Reservation | None, receipt_ref: str, now: datetime
) -> Reservation:
    """The reservation to mark returned, if the return of ``receipt_ref`` can give the use
    back; otherwise the refusal why not.

    ``redeemed_on`` is the reservation through which the coupon was redeemed on
    ``receipt_ref`` (None when it was not).
    """
    if coupon is None:
        raise NotFound("COUPON_NOT_FOUND", "no coupon has this code")
    if coupon.uses == 0:
        raise FailedPrecondition("COUPON_NOT_REDEEMED", "the coupon is not redeemed")
    if redeemed_on is None or redeemed_on.receipt_ref != receipt_ref:
        raise FailedPrecondition("COUPON_REDEEMED_ON_OTHER_RECEIPT", "the coupon was not redeemed on this receipt")
    if coupon.valid_until is not None and now >= coupon.valid_until:
        raise FailedPrecondition("COUPON_EXPIRED", "the coupon's validity has ended; it stays used")
    return redeemed_on


def reservation_ttl(ttl_seconds: int) -> timedelta:
    """How long a reservation lasts; 0 means DEFAULT_RESERVATION_SECONDS."""
    return timedelta(seconds=ttl_seconds or DEFAULT_RESERVATION_SECONDS)


def wrong_code_key(terminal_id: str) -> str:
    """The rate-limit key of a terminal's unknown codes; registers without an id share one."""
    return f"rewards:wrong-code:{terminal_id}"


def wrong_pin_key(card_number: str) -> str:
    """The rate-limit key of a gift card's wrong PINs: per card, whichever terminal tries."""
    return f"rewards:wrong-pin:{card_number}"


class GiftCardStatus(StrEnum):
    INACTIVE = "inactive"
    """Issued, not sold: holds nothing."""
    ACTIVE = "active"


class GiftCardState(StrEnum):
    """A card's state as of a moment: an active card past its end is expired."""

    INACTIVE = "inactive"
    ACTIVE = "active"
    EXPIRED = "expired"


class GiftCardEntryKind(StrEnum):
    ACTIVATION = "activation"
    SPEND = "spend"
    REFUND = "refund"


@dataclass(frozen=True)
class GiftCard:
    card_number: str
    batch_id: str
    currency_code: str
    status: GiftCardStatus
    balance_minor: int
    """The sum of the card's entries; never negative."""
    pin_hash: str | None
    validity_days: int
    """Days it stays spendable after activation; 0 means it never expires."""
    expires_at: datetime | None
    created_at: datetime
    activated_at: datetime | None = None

    def state(self, now: datetime) -> GiftCardState:
        if self.status is GiftCardStatus.INACTIVE:
            return GiftCardState.INACTIVE
        if self.expires_at is not None and now >= self.expires_at:
            return GiftCardState.EXPIRED
        return GiftCardState.ACTIVE

    @property
    def masked_number(self) -> str:
        return mask_code(self.card_number)


@dataclass(frozen=True)
class GiftCardEntry:
    """One line of a card's ledger; entries are only ever added."""

    card_number: str
    kind: GiftCardEntryKind
    amount_minor: int
    """Signed: positive loads the card, negative spends from it."""
    balance_after_minor: int
    receipt_ref: str
    created_at: datetime


@dataclass(frozen=True)
class ReceiptSpending:
    """What one receipt took from one card and what was already put back."""

    spent_minor: int = 0
    refunded_minor: int = 0


def gift_card_not_found() -> DomainError:
    return NotFound("GIFT_CARD_NOT_FOUND", "no gift card has this number")


def check_activation(card: GiftCard | None, now: datetime) -> GiftCard:
    if card is None:
        raise gift_card_not_found()
    if card.status is not GiftCardStatus.INACTIVE:
        raise FailedPrecondition("GIFT_CARD_ALREADY_ACTIVE", "the gift card was already activated")
    return card


def activation_expiry(card: GiftCard, now: datetime) -> datetime | None:
    return now + timedelta(days=card.validity_days) if card.validity_days else None


def check_spend(card: GiftCard, amount_minor: int, now: datetime) -> int:
    """The balance after paying ``amount_minor`` from the card, or the refusal why it cannot pay."""
    state = card.state(now)
    if state is GiftCardState.INACTIVE:
        raise FailedPrecondition("GIFT_CARD_NOT_ACTIVE", "the gift card was not activated (sold)")
    if state is GiftCardState.EXPIRED:
        raise FailedPrecondition("GIFT_CARD_EXPIRED", "the gift card's validity has ended")
    if amount_minor > card.balance_minor:
        raise FailedPrecondition(
            "GIFT_CARD_INSUFFICIENT_BALANCE",
            "the gift card holds less than the amount",
            {"balance_minor": str(card.balance_minor)},
        )
    return card.balance_minor - amount_minor


def check_refund(card: GiftCard, amount_minor: int, spending: ReceiptSpending, now: datetime) -> int:
    """The balance after putting ``amount_minor`` back for a receipt, or the refusal why not:
    a receipt gets back at most what it spent from this card."""
    if card.state(now) is GiftCardState.EXPIRED:
        raise FailedPrecondition("GIFT_CARD_EXPIRED", "the gift card's validity has ended; refund by other means")
    if amount_minor > spending.spent_minor - spending.refunded_minor:
        raise FailedPrecondition(
            "GIFT_CARD_REFUND_EXCEEDS_SPEND",
            "the receipt did not spend that much from this card",
            {"refundable_minor": str(spending.spent_minor - spending.refunded_minor)},
        )
    return card.balance_minor + amount_minor


def is_valid_pin(pin: str) -> bool:
    return MIN_PIN_LENGTH <= len(pin) <= MAX_PIN_LENGTH and bool(_PIN.fullmatch(pin))


def hash_pin(pin: str) -> str:
    """A salted scrypt hash of a PIN: the PIN itself is never stored."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${salt.hex()}${digest.hex()}"


def pin_matches(pin: str, pin_hash: str) -> bool:
    _scheme, salt, digest = pin_hash.split("$")
    candidate = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(salt), n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def wrong_pin() -> DomainError:
    return FailedPrecondition("GIFT_CARD_WRONG_PIN", "the PIN does not match the gift card's")


@dataclass(frozen=True)
class Badge:
    badge_id: str
    name: str
    description: str
    created_at: datetime


@dataclass(frozen=True)
class BadgeAward:
    badge: Badge
    member_id: str
    awarded_at: datetime


@dataclass(frozen=True)
class ChipProgram:
    """A chip (sticker) collection: chips earned per amount paid, exchanged for a coupon."""

    chip_program_id: str
    name: str
    currency_code: str
    spend_per_chip_minor: int
    chips_per_exchange: int
    exchange_series_id: str
    created_at: datetime

    def chips_for(self, paid_minor: int, currency_code: str) -> int:
        """Chips a committed receipt earns: one per whole ``spend_per_chip_minor`` paid in the
        collection's currency (a receipt in another currency earns none)."""
        if currency_code != self.currency_code or paid_minor <= 0:
            return 0
        return paid_minor // self.spend_per_chip_minor


def check_exchange(program: ChipProgram, chips: int) -> int:
    """The member's chips after one exchange, or CHIPS_INSUFFICIENT."""
    if chips < program.chips_per_exchange:
        raise FailedPrecondition(
            "CHIPS_INSUFFICIENT",
            "the member has fewer chips than an exchange takes",
            {"chips": str(chips), "chips_per_exchange": str(program.chips_per_exchange)},
        )
    return chips - program.chips_per_exchange
