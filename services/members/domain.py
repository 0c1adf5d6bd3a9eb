"""Members' rules: identifiers and their normal forms, profiles, cards, QR tokens and tier
qualification. No I/O here."""

from __future__ import annotations

import base64
import calendar
import dataclasses
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cel

CARD_NUMBER_LENGTH = 13
CARD_NUMBER_PREFIX = "77"
DEFAULT_TIER = "basic"
DEFAULT_CARD_TYPE = "standard"
MAX_CARD_NUMBER_LENGTH = 19
CONSENT_CHANNELS = ("sms", "email", "push", "viber", "telegram")

_PHONE_NOISE = re.compile(r"[\s\-().]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class MemberStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"


class CardStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"
    REPLACED = "replaced"
    EXPIRED = "expired"
    UNISSUED = "unissued"


class Participation(StrEnum):
    PERSONAL = "personal"
    FAMILY = "family"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Consent:
    channel: str
    granted: bool
    updated_at: datetime
    source: str


@dataclass(frozen=True)
class Member:
    member_id: str
    phone: str | None
    email: str | None
    first_name: str
    last_name: str
    status: MemberStatus
    tier: str
    registration_channel: int
    created_at: datetime
    time_zone: str = ""
    locale: str = ""
    birth_date: str = ""
    push_token: str = ""
    telegram_chat_id: str = ""
    household_id: str | None = None
    block_reason: str = ""
    erased_at: datetime | None = None
    tier_expires_at: datetime | None = None
    consents: tuple[Consent, ...] = field(default_factory=tuple)
    # The survivor this member was merged into as a duplicate.
    merged_into: str | None = None
    # Set by the RFM job once the member has bought something.
    rfm: Rfm | None = None
    # Custom attributes by code, typed by their definitions.
    attributes: Mapping[str, AttributeScalar] = field(default_factory=dict)
    # The member's own code to invite others with; None after erasure.
    referral_code: str | None = None
    # The member whose referral code this one registered with.
    referred_by: str | None = None
    referred_count: int = 0

    @property
    def account_holder_id(self) -> str:
        """Points are kept under the household while the member is in one (a pooled account)."""
        return self.household_id or self.member_id

    @property
    def participation(self) -> Participation:
        if self.phone is None:
            return Participation.ANONYMOUS
        return Participation.FAMILY if self.household_id else Participation.PERSONAL


def member_payload(member: Member) -> dict[str, Any]:
    """The payload of member.registered and member.updated, as the notifications service reads it."""
    granted = {consent.channel: consent.granted for consent in member.consents}
    return {
        "member_id": member.member_id,
        "phone": member.phone or "",
        "email": member.email or "",
        "first_name": member.first_name,
        "last_name": member.last_name,
        "locale": member.locale,
        "time_zone": member.time_zone,
        "birth_date": member.birth_date,
        "push_token": member.push_token,
        "telegram_chat_id": member.telegram_chat_id,
        "status": member.status.value,
        "tier": member.tier,
        "consents": {channel: granted.get(channel, False) for channel in CONSENT_CHANNELS},
        "attributes": dict(member.attributes),
    }


def merge_consents(current: Sequence[Consent], changes: Sequence[Consent]) -> tuple[Consent, ...]:
    """The consents after `changes`: a channel given is replaced, the others are kept."""
    by_channel = {consent.channel: consent for consent in current}
    by_channel.update({consent.channel: consent for consent in changes})
    return tuple(by_channel[channel] for channel in CONSENT_CHANNELS if channel in by_channel)


def merge_newer_consents(survivor: Sequence[Consent], duplicate: Sequence[Consent]) -> tuple[tuple[Consent, ...], int]:
    """The survivor's consents after a merge: per channel the more recent answer of the two
    (the person's latest word); returns them and how many came from the duplicate."""
    own = {consent.channel: consent for consent in survivor}
    taken = [
        consent
        for consent in duplicate
        if consent.channel not in own or consent.updated_at > own[consent.channel].updated_at
    ]
    return merge_consents(survivor, taken), len(taken)


@dataclass(frozen=True)
class Card:
    card_number: str
    member_id: str | None
    status: CardStatus
    issued_at: datetime
    card_type: str = DEFAULT_CARD_TYPE
    expires_at: datetime | None = None
    block_reason: str = ""
    replaced_by: str = ""


@dataclass(frozen=True)
class CardType:
    code: str
    name: str
    validity_days: int


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


_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def is_valid_code(code: str) -> bool:
    """Codes of tiers, card types and segments: lower case, digits, '_' and '-', up to 32."""
    return bool(_CODE.fullmatch(code))


def is_valid_time_zone(name: str) -> bool:
    if not name or name.startswith("/") or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def is_valid_locale(tag: str) -> bool:
    return len(tag) <= 35 and bool(_LOCALE.fullmatch(tag))


def parse_birth_date(text: str, today: date) -> date:
    """A birth date as YYYY-MM-DD, not in the future and not before 1900."""
    try:
        born = date.fromisoformat(text)
    except ValueError:
        raise InvalidIdentifier("a date as YYYY-MM-DD") from None
    if len(text) != 10 or not date(1900, 1, 1) <= born <= today:
        raise InvalidIdentifier("a date as YYYY-MM-DD between 1900-01-01 and today")
    return born


# Custom attributes -------------------------------------------------------------

AttributeScalar = str | int | bool
MAX_ATTRIBUTE_TEXT = 500
MAX_ALLOWED_VALUES = 100
INT_ATTRIBUTE_BOUND = 2**63


class AttributeType(StrEnum):
    STRING = "string"
    INT = "int"
    BOOL = "bool"
    DATE = "date"
    ENUM = "enum"


@dataclass(frozen=True)
class AttributeDefinition:
    code: str
    name: str
    type: AttributeType
    allowed_values: tuple[str, ...] = ()


def attribute_value_error(definition: AttributeDefinition, value: AttributeScalar) -> str | None:
    """Why `value` is not a value of the attribute, or None when it is."""
    kind = definition.type
    if kind is AttributeType.BOOL:
        return None if isinstance(value, bool) else "a bool_value"
    if kind is AttributeType.INT:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int_value"
    if not isinstance(value, str):
        return "a string_value"
    if kind is AttributeType.DATE:
        try:
            date.fromisoformat(value)
        except ValueError:
            return "a date as YYYY-MM-DD in string_value"
        return None if len(value) == 10 else "a date as YYYY-MM-DD in string_value"
    if kind is AttributeType.ENUM:
        return None if value in definition.allowed_values else f"one of {', '.join(definition.allowed_values)}"
    if len(value) > MAX_ATTRIBUTE_TEXT:
        return f"at most {MAX_ATTRIBUTE_TEXT} characters"
    if any(ord(char) < 32 for char in value):
        return "no control characters"
    return None


def sample_attribute_value(definition: AttributeDefinition) -> AttributeScalar:
    """A value of the attribute's type, for trial runs of segment expressions."""
    samples: dict[AttributeType, AttributeScalar] = {
        AttributeType.STRING: "",
        AttributeType.INT: 0,
        AttributeType.BOOL: False,
        AttributeType.DATE: "2000-01-01",
        AttributeType.ENUM: definition.allowed_values[0] if definition.allowed_values else "",
    }
    return samples[definition.type]


# Stored as text with the kind of value: "s" text, "i" integer, "b" bool ("1"/"0").
def encode_attribute(value: AttributeScalar) -> tuple[str, str]:
    if isinstance(value, bool):
        return "b", "1" if value else "0"
    if isinstance(value, int):
        return "i", str(value)
    return "s", value


def decode_attribute(kind: str, text: str) -> AttributeScalar:
    if kind == "b":
        return text == "1"
    if kind == "i":
        return int(text)
    return text


# Referral codes ----------------------------------------------------------------

# No 0/O, 1/I/L: the code is read aloud and typed from paper.
REFERRAL_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
REFERRAL_CODE_LENGTH = 8


def new_referral_code() -> str:
    return "".join(secrets.choice(REFERRAL_ALPHABET) for _ in range(REFERRAL_CODE_LENGTH))


def normalize_referral_code(raw: str) -> str:
    """The stored form of a code as a person typed it: upper case, without spaces and dashes."""
    code = re.sub(r"[\s-]", "", raw).upper()
    if len(code) != REFERRAL_CODE_LENGTH or any(char not in REFERRAL_ALPHABET for char in code):
        raise InvalidIdentifier(f"a referral code of {REFERRAL_CODE_LENGTH} letters and digits")
    return code


# Card batches ----------------------------------------------------------------


def batch_card_number(prefix: str, sequence: int, sequence_digits: int) -> str:
    payload = f"{prefix}{sequence:0{sequence_digits}d}"
    return payload + luhn_check_digit(payload)


def batch_card_numbers(prefix: str, first: int, count: int, sequence_digits: int) -> Iterator[str]:
    """The numbers of a range in order; unique because the payload (prefix + sequence) is."""
    for sequence in range(first, first + count):
        yield batch_card_number(prefix, sequence, sequence_digits)


def ranges_overlap(first_a: int, count_a: int, first_b: int, count_b: int) -> bool:
    return first_a < first_b + count_b and first_b < first_a + count_a


# QR tokens --------------------------------------------------------------------


class InvalidToken(ValueError):
    """A QR token that is malformed or not signed by this program."""


class ExpiredToken(ValueError):
    """A genuine QR token past its lifetime."""


def _token_signature(secret: bytes, body: str) -> str:
    digest = hmac.new(secret, body.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_qr_token(secret: bytes, member_id: str, expires_at: datetime) -> str:
    """`<member id>.<expiry, unix seconds>.<HMAC-SHA256, 128 bits, base64url>`: short enough for
    a small QR code, and verifiable by any replica holding the secret without a lookup."""
    body = f"{member_id}.{int(expires_at.timestamp())}"
    return f"{body}.{_token_signature(secret, body)}"


def verify_qr_token(secret: bytes, token: str, now: datetime) -> str:
    """The member id a token was issued for; raises InvalidToken or ExpiredToken."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        raise InvalidToken("not a QR token")
    member_id, expiry, signature = parts
    if not hmac.compare_digest(signature, _token_signature(secret, f"{member_id}.{expiry}")):
        raise InvalidToken("not a QR token of this program")
    if int(expiry) <= now.timestamp():
        raise ExpiredToken("the QR token has expired")
    return member_id


# Tiers --------------------------------------------------------------------------


class TierMetric(StrEnum):
    SPEND = "spend"
    POINTS = "points"


class CalendarPeriod(StrEnum):
    NONE = ""
    YEAR = "year"
    QUARTER = "quarter"
    MONTH = "month"


@dataclass(frozen=True)
class TierDefinition:
    code: str
    name: str
    rank: int
    spend_threshold_minor: int
    window_months: int
    duration_days: int
    downgrade_after_inactive_days: int
    metric: TierMetric = TierMetric.SPEND
    points_threshold: int = 0
    calendar_period: CalendarPeriod = CalendarPeriod.NONE

    @property
    def threshold(self) -> int:
        return self.points_threshold if self.metric is TierMetric.POINTS else self.spend_threshold_minor


BASIC_TIER = TierDefinition(DEFAULT_TIER, "Basic", 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class TierDecision:
    """What evaluation changes: the tier (with the reason of a change) or only its end."""

    tier: str
    expires_at: datetime | None
    reason: str | None
    """None when the tier stays and only its end moves (requalified)."""


def months_before(moment: datetime, months: int) -> datetime:
    """The same day and time `months` calendar months earlier (the month's last day when shorter)."""
    month_index = moment.year * 12 + moment.month - 1 - months
    year, month = divmod(month_index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def calendar_period_start(period: CalendarPeriod, now: datetime) -> datetime:
    """Midnight of the first day of the calendar year, quarter or month holding `now`."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is CalendarPeriod.YEAR:
        return midnight.replace(month=1, day=1)
    if period is CalendarPeriod.QUARTER:
        return midnight.replace(month=(now.month - 1) // 3 * 3 + 1, day=1)
    return midnight.replace(day=1)


def window_start(definition: TierDefinition, now: datetime) -> datetime | None:
    """Where a tier's qualifying spend or points start counting; None for all time."""
    if definition.calendar_period is not CalendarPeriod.NONE:
        return calendar_period_start(definition.calendar_period, now)
    return months_before(now, definition.window_months) if definition.window_months else None


def _inactive(definition: TierDefinition, last_purchase: datetime | None, now: datetime) -> bool:
    if not definition.downgrade_after_inactive_days:
        return False
    return last_purchase is None or now - last_purchase > timedelta(days=definition.downgrade_after_inactive_days)


def _lasts_until(definition: TierDefinition, now: datetime) -> datetime | None:
    return now + timedelta(days=definition.duration_days) if definition.duration_days else None


def evaluate_tier(
    current: str,
    current_expires_at: datetime | None,
    definitions: Sequence[TierDefinition],
    spend_by_tier: Mapping[str, int],
    last_purchase: datetime | None,
    now: datetime,
) -> TierDecision | None:
    """Decides a member's tier from the spend or points each definition counts (over its
    own window), given by tier code in `spend_by_tier`.

    The best tier the member qualifies for wins at once. A tier with a duration lasts that
    long after the member last qualified (requalifying moves its end); a tier without one
    lasts while the member qualifies. A lower tier replaces the current one only when the
    current has lapsed, or at once when the member has been inactive longer than the
    current tier allows. Returns None when nothing changes.
    """
    by_code = {definition.code: definition for definition in definitions}
    qualifying = [
        definition
        for definition in definitions
        if spend_by_tier.get(definition.code, 0) >= definition.threshold
        and not _inactive(definition, last_purchase, now)
    ]
    best = max(qualifying, key=lambda definition: definition.rank, default=BASIC_TIER)
    held = by_code.get(current, BASIC_TIER)
    if best.code == held.code:
        renewed = _lasts_until(held, now)
        if renewed is not None and (current_expires_at is None or renewed > current_expires_at):
            return TierDecision(held.code, renewed, None)
        return None
    if best.rank > held.rank:
        return TierDecision(best.code, _lasts_until(best, now), "qualified")
    if _inactive(held, last_purchase, now):
        return TierDecision(best.code, _lasts_until(best, now), "inactive")
    if held.duration_days == 0 or current not in by_code or current_expires_at is None:
        return TierDecision(best.code, _lasts_until(best, now), "not_qualified")
    if current_expires_at is not None and current_expires_at <= now:
        return TierDecision(best.code, _lasts_until(best, now), "expired")
    return None


# Dynamic segments and RFM ------------------------------------------------------------


@dataclass(frozen=True)
class MemberFacts:
    """What a dynamic segment's expression and the RFM scores see of one member."""

    member_id: str
    tier: str
    created_at: datetime
    birth_date: str
    purchase_count: int
    total_spend_minor: int
    last_purchase_at: datetime | None
    attributes: Mapping[str, AttributeScalar] = field(default_factory=dict)


def age_on(birth_date: str, today: date) -> int:
    """Full years on `today`; -1 when the birth date is unknown."""
    if not birth_date:
        return -1
    born = date.fromisoformat(birth_date)
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def segment_variables(facts: MemberFacts, now: datetime) -> dict[str, Any]:
    """The CEL activation of a dynamic segment: one `member` map. Unknown numbers are -1, so
    an expression compares integers without checking for presence first."""
    return {
        "member": {
            "tier": facts.tier,
            "purchase_count": facts.purchase_count,
            "total_spend_minor": facts.total_spend_minor,
            "days_since_last_purchase": (now - facts.last_purchase_at).days if facts.last_purchase_at else -1,
            "registered_days_ago": (now - facts.created_at).days,
            "registration_date": facts.created_at.date().isoformat(),
            "age": age_on(facts.birth_date, now.date()),
            "attributes": dict(facts.attributes),
        }
    }


SAMPLE_FACTS = MemberFacts(
    "sample", DEFAULT_TIER, datetime(2024, 1, 1, tzinfo=ZoneInfo("UTC")), "1990-05-17", 3, 1, None
)


class SegmentExpressionError(ValueError):
    """A dynamic segment's expression does not compile or is not a condition."""


def compile_segment(expression: str, attributes: Sequence[AttributeDefinition] = ()) -> cel.Program:
    """Compiles the expression and trial-runs it on a sample member (with a value of every
    defined attribute), so a typo or a non-boolean result is refused when the segment is
    created, not in every job run."""
    sample = dataclasses.replace(
        SAMPLE_FACTS, attributes={definition.code: sample_attribute_value(definition) for definition in attributes}
    )
    try:
        program = cel.compile(expression)
        result = program.execute(segment_variables(sample, sample.created_at))
    except Exception as error:  # the CEL runtime raises several types for bad expressions
        raise SegmentExpressionError(str(error)) from error
    if not isinstance(result, bool):
        raise SegmentExpressionError(f"the expression must be true or false, not {type(result).__name__}")
    return program


def in_segment(program: cel.Program, facts: MemberFacts, now: datetime) -> bool:
    """Whether the member matches; an expression that fails on this member's values (a
    division by zero, say) leaves them out rather than stopping the whole recomputation."""
    try:
        return program.execute(segment_variables(facts, now)) is True
    except Exception:
        return False


@dataclass(frozen=True)
class Rfm:
    """Recency, frequency and monetary scores, 1 (lowest) to 5 (best), by quintile among the
    members who bought anything; 0 for a member without purchases."""

    recency: int
    frequency: int
    monetary: int


def _quintiles(values: Mapping[str, float]) -> dict[str, int]:
    """Score 1 to 5 by the quintile of each value, higher values scoring higher. Equal values
    score alike: each takes the quintile of the first of its equals."""
    ordered = sorted(values.values())
    first_rank: dict[float, int] = {}
    for rank, value in enumerate(ordered):
        first_rank.setdefault(value, rank)
    return {key: 1 + first_rank[value] * 5 // len(ordered) for key, value in values.items()}


def rfm_scores(facts: Sequence[MemberFacts], now: datetime) -> dict[str, Rfm]:
    buyers = [member for member in facts if member.last_purchase_at is not None and member.purchase_count > 0]
    # Recency scores higher the more recent the purchase, so it is ranked on minus the age.
    recency = _quintiles(
        {m.member_id: -(now - m.last_purchase_at).total_seconds() for m in buyers if m.last_purchase_at}
    )
    frequency = _quintiles({m.member_id: m.purchase_count for m in buyers})
    monetary = _quintiles({m.member_id: m.total_spend_minor for m in buyers})
    return {m.member_id: Rfm(recency[m.member_id], frequency[m.member_id], monetary[m.member_id]) for m in buyers}


# Birthdays and profile completion (announced for stimulating campaigns) -------------


def local_date(now: datetime, time_zone: str) -> date:
    """The calendar day at `now` in the member's time zone; UTC when it is unset or unknown."""
    return now.astimezone(ZoneInfo(time_zone) if is_valid_time_zone(time_zone) else ZoneInfo("UTC")).date()


def birthday_falls_on(birth_date: str, day: date) -> bool:
    """Whether `day` is the member's birthday; 29 February is celebrated on 28 February in
    years without one (the last day of the month the member was born in)."""
    if not birth_date:
        return False
    born = date.fromisoformat(birth_date)
    if (born.month, born.day) == (2, 29) and not calendar.isleap(day.year):
        return (day.month, day.day) == (2, 28)
    return (born.month, born.day) == (day.month, day.day)


def birthday_candidates(now: datetime) -> tuple[str, ...]:
    """The birth dates' "MM-DD" that may be today somewhere: the UTC day and its neighbours
    (time zones reach 14 hours either side), with 02-29 whenever 28 February is among them."""
    days = [(now - timedelta(days=1)).date(), now.date(), (now + timedelta(days=1)).date()]
    month_days = {f"{day.month:02d}-{day.day:02d}" for day in days}
    if "02-28" in month_days:
        month_days.add("02-29")
    return tuple(sorted(month_days))


def profile_complete(member: Member) -> bool:
    """A profile is complete with a first name, a last name, an e-mail and a birth date."""
    return bool(member.first_name.strip() and member.last_name.strip() and member.email and member.birth_date)
