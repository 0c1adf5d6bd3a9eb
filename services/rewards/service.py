"""Rewards' use cases, each given the session of its unit of work."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.bus import Event
from loyalty.runtime.errors import AlreadyExists, FailedPrecondition, NotFound, Violations
from loyalty.runtime.inbox import first_delivery
from loyalty.runtime.outbox import add_event
from loyalty.runtime.timeutil import utcnow
from loyalty.runtime.validation import MAX_ID_LENGTH
from services.rewards import store
from services.rewards.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    GIFT_CARD_NUMBER_LENGTH,
    MAX_RESERVATION_SECONDS,
    MAX_TERMINAL_ID_LENGTH,
    Badge,
    BadgeAward,
    ChipProgram,
    Coupon,
    CouponStatus,
    GiftCard,
    GiftCardEntry,
    GiftCardEntryKind,
    GiftCardStatus,
    Rejection,
    Reservation,
    ReservationStatus,
    Series,
    SeriesKind,
    Usage,
    activation_expiry,
    check_activation,
    check_code_format,
    check_exchange,
    check_refund,
    check_reinstatable,
    check_reservation,
    check_spend,
    gift_card_not_found,
    is_chosen_code,
    is_valid_pin,
    is_valid_window,
    new_code,
    normalize_code,
    pin_matches,
    refusal,
    reservation_ttl,
    validate,
    validate_reservation,
    wrong_pin,
)

# Rounds of fresh candidates for codes that collided with existing ones; with at least
# 2^40 possible codes a second round is already rare.
CODE_ATTEMPTS = 5
# The outbox key of an event about a bearer coupon, which has no owner to key it by.
BEARER_EVENT_KEY = "bearer"
MAX_MEMBERS_PER_ISSUE = 1000
MAX_CODES_PER_JOB = 10_000_000
MAX_CODES_PER_IMPORT = 10_000
MAX_GIFT_CARDS_PER_BATCH = 1000
MAX_GIFT_CARD_VALIDITY_DAYS = 3660
MAX_USES = 1_000_000
MAX_BADGES_LISTED = 1000


# Coupon series


@dataclass(frozen=True)
class SeriesTerms:
    """What CreateCouponSeries was asked for, checked as far as it can be without a clock."""

    name: str
    kind: SeriesKind
    campaign_id: str | None
    benefit: bytes
    min_receipt_total_minor: int
    uses_per_code: int
    uses_per_member: int
    valid_from: datetime | None
    """None means from the moment of creation."""
    valid_until: datetime | None
    validity_days: int
    mass_code: str | None
    code_alphabet: str
    code_length: int


@dataclass(frozen=True)
class BenefitFields:
    """The parts of a CouponBenefit that rewards checks before storing it whole."""

    kind: str | None
    """Which of the oneof is set: percent_off_basis_points, amount_off_minor, ..."""
    value: int | str
    skus: Sequence[str]
    category_ids: Sequence[str]
    product_list_ids: Sequence[str]
    min_receipt_total_minor: int


def check_benefit(benefit: BenefitFields, violations: Violations, prefix: str = "benefit") -> None:
    kind, value = benefit.kind, benefit.value
    if kind is None:
        violations.add(prefix, "required: one kind of benefit")
    elif kind == "percent_off_basis_points":
        violations.check(isinstance(value, int) and 1 <= value <= 10_000, f"{prefix}.{kind}", "from 1 to 10000")
    elif kind == "gift_sku":
        violations.check(
            isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH,
            f"{prefix}.{kind}",
            f"1 to {MAX_ID_LENGTH} characters",
        )
    else:
        violations.check(isinstance(value, int) and value > 0, f"{prefix}.{kind}", "must be positive")
    for name, ids in (
        ("skus", benefit.skus),
        ("category_ids", benefit.category_ids),
        ("product_list_ids", benefit.product_list_ids),
    ):
        violations.check(len(ids) <= 1000, f"{prefix}.{name}", "at most 1000")
        violations.check(
            all(0 < len(item) <= MAX_ID_LENGTH for item in ids), f"{prefix}.{name}", f"1 to {MAX_ID_LENGTH} characters"
        )
    violations.check(benefit.min_receipt_total_minor >= 0, f"{prefix}.min_receipt_total_minor", "must not be negative")


def parse_series(
    *,
    name: str,
    kind: SeriesKind | None,
    campaign_id: str,
    benefit: bytes,
    benefit_fields: BenefitFields,
    uses_per_code: int,
    uses_per_member: int,
    valid_from: datetime | None,
    valid_until: datetime | None,
    validity_days: int,
    mass_code: str,
    code_alphabet: str,
    code_length: int,
    violations: Violations,
) -> SeriesTerms:
    """Checks every field of a series that does not depend on when it is created."""
    violations.check(0 < len(name) <= store.MAX_NAME_LENGTH, "name", f"1 to {store.MAX_NAME_LENGTH} characters")
    violations.check(kind is not None, "kind", "required: COUPON_SERIES_KIND_MASS or COUPON_SERIES_KIND_UNIQUE")
    violations.check_length(campaign_id, "campaign_id", store.MAX_REF_ID_LENGTH)
    check_benefit(benefit_fields, violations)
    violations.check(0 <= uses_per_code <= MAX_USES, "uses_per_code", f"from 0 (no limit) to {MAX_USES}")
    violations.check(0 <= uses_per_member <= MAX_USES, "uses_per_member", f"from 0 (no limit) to {MAX_USES}")
    if valid_from is not None:
        violations.check(is_valid_window(valid_from, valid_until), "valid_until", "must be after valid_from")
    violations.check(0 <= validity_days <= 3660, "validity_days", "from 0 (the series' window) to 3660")
    code = normalize_code(mass_code)
    if kind is SeriesKind.MASS:
        violations.check(not code or is_chosen_code(code), "mass_code", "4 to 32 letters and digits")
        violations.check(validity_days == 0, "validity_days", "a mass code shares the series' window: must be 0")
    elif code:
        violations.add("mass_code", "only a mass series has a shared code")
    alphabet, length = code_alphabet or CODE_ALPHABET, code_length or CODE_LENGTH
    check_code_format(alphabet, length, violations)
    violations.raise_if_any()
    assert kind is not None
    return SeriesTerms(
        name=name,
        kind=kind,
        campaign_id=campaign_id or None,
        benefit=benefit,
        min_receipt_total_minor=benefit_fields.min_receipt_total_minor,
        uses_per_code=uses_per_code,
        uses_per_member=uses_per_member,
        valid_from=valid_from,
        valid_until=valid_until,
        validity_days=validity_days,
        mass_code=code or None,
        code_alphabet=alphabet,
        code_length=length,
    )


async def create_series(session: AsyncSession, terms: SeriesTerms, now: datetime) -> Series:
    """Writes the series and, for a mass series, its one shared coupon."""
    valid_from = now if terms.valid_from is None else terms.valid_from
    # Checked here rather than in parse_series: a retry of a creation that succeeded must
    # answer the recorded series even after valid_until has passed.
    if not is_valid_window(valid_from, terms.valid_until):
        violations = Violations()
        violations.add("valid_until", "must be after the moment of creation when valid_from is empty")
        violations.raise_if_any()
    mass_code = terms.mass_code
    if terms.kind is SeriesKind.MASS and mass_code is None:
        mass_code = await _free_code(session, terms.code_alphabet, terms.code_length)
    series = Series(
        series_id=str(uuid.uuid4()),
        name=terms.name,
        kind=terms.kind,
        campaign_id=terms.campaign_id,
        benefit=terms.benefit,
        min_receipt_total_minor=terms.min_receipt_total_minor,
        uses_per_code=terms.uses_per_code,
        uses_per_member=terms.uses_per_member,
        valid_from=valid_from,
        valid_until=terms.valid_until,
        validity_days=terms.validity_days,
        mass_code=mass_code,
        code_alphabet=terms.code_alphabet,
        code_length=terms.code_length,
        created_at=now,
    )
    await store.add_series(session, series)
    if mass_code is not None:
        if await store.code_exists(session, mass_code):
            raise AlreadyExists("COUPON_CODE_TAKEN", "another coupon already has this code")
        await store.add_coupon(session, _new_coupon(series, mass_code, None, None, now))
    return series


async def _free_code(session: AsyncSession, alphabet: str, length: int) -> str:
    for _attempt in range(CODE_ATTEMPTS):
        code = new_code(alphabet, length)
        if not await store.code_exists(session, code):
            return code
    raise FailedPrecondition("COUPON_CODES_EXHAUSTED", "could not find a free coupon code")


async def get_series(session: AsyncSession, series_id: str) -> Series:
    series = await store.find_series(session, series_id) if series_id else None
    if series is None:
        raise NotFound("COUPON_SERIES_NOT_FOUND", "no coupon series has this id")
    return series


async def _issuing_series(session: AsyncSession, series_id: str, now: datetime) -> Series:
    """The series, if new unique codes may be issued in it now."""
    series = await get_series(session, series_id)
    if series.kind is SeriesKind.MASS:
        raise FailedPrecondition("COUPON_SERIES_MASS", "a mass series has only its shared code")
    if series.has_ended(now):
        raise FailedPrecondition("COUPON_SERIES_ENDED", "the series' validity has ended")
    return series


def _new_coupon(series: Series, code: str, member_id: str | None, partner_id: str | None, now: datetime) -> Coupon:
    valid_from, valid_until = series.coupon_window(now)
    return Coupon(
        code=code,
        series=series,
        member_id=member_id,
        partner_id=partner_id,
        status=CouponStatus.ACTIVE,
        uses=0,
        valid_from=valid_from,
        valid_until=valid_until,
        created_at=now,
    )


async def write_new_coupons(
    session: AsyncSession, series: Series, owners: Sequence[str | None], now: datetime
) -> list[Coupon]:
    """One coupon with a fresh code per owner (None: a bearer coupon), in the owners' order.
    Codes that collide with existing ones are drawn again."""
    written: list[Coupon | None] = [None] * len(owners)
    pending = list(range(len(owners)))
    for _attempt in range(CODE_ATTEMPTS):
        candidates: dict[str, int] = {}
        for index in pending:
            candidates.setdefault(new_code(series.code_alphabet, series.code_length), index)
        coupons = {code: _new_coupon(series, code, owners[index], None, now) for code, index in candidates.items()}
        for code in await store.add_new_coupons(session, list(coupons.values())):
            written[candidates[code]] = coupons[code]
        pending = [index for index, coupon in enumerate(written) if coupon is None]
        if not pending:
            return [coupon for coupon in written if coupon is not None]
    raise FailedPrecondition("COUPON_CODES_EXHAUSTED", "could not find free coupon codes; lengthen the series' codes")


def parse_member_ids(member_ids: Sequence[str], violations: Violations) -> list[str]:
    violations.check(
        0 < len(member_ids) <= MAX_MEMBERS_PER_ISSUE, "member_ids", f"1 to {MAX_MEMBERS_PER_ISSUE} members"
    )
    for index, member_id in enumerate(member_ids):
        violations.check(
            0 < len(member_id) <= store.MAX_MEMBER_ID_LENGTH,
            f"member_ids[{index}]",
            f"1 to {store.MAX_MEMBER_ID_LENGTH} characters",
        )
    return list(member_ids)


async def issue_coupons(
    session: AsyncSession, series_id: str, owners: Sequence[str | None], now: datetime
) -> list[Coupon]:
    """Writes a coupon of the series for each owner (None: bearer), with a ``coupon.issued`` event each."""
    series = await _issuing_series(session, series_id, now)
    coupons = await write_new_coupons(session, series, owners, now)
    for coupon in coupons:
        await add_event(
            session,
            store.outbox,
            "coupon.issued",
            key=coupon.member_id or BEARER_EVENT_KEY,
            payload={
                "code_suffix": coupon.code_suffix,
                "member_id": coupon.member_id,
                "series_id": series.series_id,
                "campaign_id": series.campaign_id,
            },
        )
    return coupons


async def list_coupons(session: AsyncSession, series_id: str, after_code: str, limit: int) -> list[Coupon]:
    return await store.list_coupons(session, await get_series(session, series_id), after_code, limit)


# Code generation jobs


def parse_code_count(count: int, violations: Violations) -> int:
    violations.check(0 < count <= MAX_CODES_PER_JOB, "count", f"1 to {MAX_CODES_PER_JOB}")
    return count


async def start_code_job(session: AsyncSession, series_id: str, count: int, now: datetime) -> store.CodeJob:
    """Records a job generating ``count`` bearer codes; the job runner writes them."""
    series = await _issuing_series(session, series_id, now)
    return await store.add_code_job(session, series.series_id, count, now)


async def get_code_job(session: AsyncSession, job_id: str) -> store.CodeJob:
    job = await store.find_code_job(session, job_id) if job_id else None
    if job is None:
        raise NotFound("CODE_GENERATION_JOB_NOT_FOUND", "no code generation job has this id")
    return job


async def generate_code_batch(session: AsyncSession, job_id: str, batch_size: int, now: datetime) -> bool:
    """Writes the job's next batch of codes and its progress in one transaction; True when
    the job has all its codes (or no longer exists)."""
    job = await store.lock_code_job(session, job_id)
    if job is None or job.finished_at is not None:
        return True
    series = await get_series(session, job.series_id)
    count = min(batch_size, job.requested - job.generated)
    await write_new_coupons(session, series, [None] * count, now)
    generated = job.generated + count
    finished = generated >= job.requested
    await store.advance_code_job(session, job_id, generated, now if finished else None)
    return finished


# Partner promo codes


def parse_promo_import(partner_id: str, codes: Sequence[str], violations: Violations) -> list[str]:
    """The codes in their stored form, each checked; duplicates within the request are kept
    (the import reports them)."""
    violations.check(
        0 < len(partner_id) <= store.MAX_REF_ID_LENGTH, "partner_id", f"1 to {store.MAX_REF_ID_LENGTH} characters"
    )
    violations.check(0 < len(codes) <= MAX_CODES_PER_IMPORT, "codes", f"1 to {MAX_CODES_PER_IMPORT} codes")
    normalized = [normalize_code(code) for code in codes]
    for index, code in enumerate(normalized):
        violations.check(is_chosen_code(code), f"codes[{index}]", "4 to 32 letters and digits")
    return normalized


async def import_promo_codes(
    session: AsyncSession, series_id: str, partner_id: str, codes: Sequence[str], now: datetime
) -> tuple[int, list[str]]:
    """Adds the partner's codes to the series; answers how many were imported and the codes
    skipped because they already exist (in any series, or twice in the request)."""
    series = await _issuing_series(session, series_id, now)
    unique = list(dict.fromkeys(codes))
    coupons = [_new_coupon(series, code, None, partner_id, now) for code in unique]
    imported = await store.add_new_coupons(session, coupons)
    seen: set[str] = set()
    duplicates = []
    for code in codes:
        if code not in imported or code in seen:
            duplicates.append(code)
        seen.add(code)
    return len(imported), duplicates


async def partner_usage(session: AsyncSession, series_id: str) -> list[store.PartnerUsageRow]:
    await get_series(session, series_id)
    return await store.partner_usage(session, series_id)


# Validation and the reservation lifecycle


def parse_lookup(code: str, terminal_id: str, receipt_total_minor: int | None) -> str:
    """The stored form of a code presented to ValidateCoupon, checked with the terminal asking."""
    violations = Violations()
    normalized = _check_code(code, violations)
    violations.check_length(terminal_id, "terminal_id", MAX_TERMINAL_ID_LENGTH)
    _check_receipt_total(receipt_total_minor, violations)
    violations.raise_if_any()
    return normalized


def _check_receipt_total(receipt_total_minor: int | None, violations: Violations) -> None:
    violations.check(
        receipt_total_minor is None or receipt_total_minor >= 0, "receipt_total_minor", "must not be negative"
    )


def _check_code(raw: str, violations: Violations) -> str:
    """The presented code in its stored form; an empty or overlong one is a violation of ``code``."""
    code = normalize_code(raw)
    violations.check(bool(code), "code", "required")
    violations.check_length(code, "code", store.MAX_CODE_LENGTH)
    return code


@dataclass(frozen=True)
class CouponCheck:
    """The answer to "can this coupon be applied now?"."""

    coupon: Coupon | None
    rejection: Rejection | None

    @property
    def valid(self) -> bool:
        return self.rejection is None


async def _usage(
    session: AsyncSession, coupon: Coupon | None, member_id: str, receipt_ref: str, now: datetime
) -> Usage:
    if coupon is None:
        return Usage()
    holders = await store.holding_reservations(session, coupon.code, now)
    member_uses = 0
    if coupon.series.uses_per_member and member_id:
        member_uses = await store.member_uses(session, coupon.series.series_id, member_id, receipt_ref, now)
    return Usage(holders, member_uses)


async def validate_coupon(
    session: AsyncSession,
    code: str,
    member_id: str,
    now: datetime,
    receipt_ref: str = "",
    receipt_total_minor: int | None = None,
) -> CouponCheck:
    """Decides whether the coupon applies to the receipt ``receipt_ref``; changes nothing.

    A coupon held by live reservations for other receipts does not apply. Someone
    else's personal coupon is answered without the coupon, so its owner and terms are
    not disclosed to whoever holds the code.
    """
    coupon = await store.find_coupon(session, code)
    usage = await _usage(session, coupon, member_id, receipt_ref, now)
    rejection = validate(coupon, member_id, now, usage, receipt_ref, receipt_total_minor)
    if rejection is Rejection.OTHER_MEMBER:
        return CouponCheck(None, rejection)
    return CouponCheck(coupon, rejection)


def parse_receipt_ref(receipt_ref: str, violations: Violations, field: str = "receipt_ref") -> None:
    violations.check(bool(receipt_ref), field, "required: the receipt the coupon is applied to")
    violations.check_length(receipt_ref, field, store.MAX_RECEIPT_REF_LENGTH)


def parse_reservation_request(
    code: str, member_id: str, receipt_ref: str, ttl_seconds: int, terminal_id: str, receipt_total_minor: int | None
) -> tuple[str, str | None, timedelta]:
    """The stored code, member (None when anonymous) and lifetime of a reservation request."""
    violations = Violations()
    normalized = _check_code(code, violations)
    violations.check_length(member_id, "member_id", store.MAX_MEMBER_ID_LENGTH)
    parse_receipt_ref(receipt_ref, violations)
    violations.check(
        0 <= ttl_seconds <= MAX_RESERVATION_SECONDS,
        "ttl_seconds",
        f"from 0 to {MAX_RESERVATION_SECONDS} (0 means the default)",
    )
    violations.check_length(terminal_id, "terminal_id", MAX_TERMINAL_ID_LENGTH)
    _check_receipt_total(receipt_total_minor, violations)
    violations.raise_if_any()
    return normalized, member_id or None, reservation_ttl(ttl_seconds)


def parse_reinstatement(code: str, receipt_ref: str) -> tuple[str, str]:
    """The stored code and the returned receipt of a reinstatement request."""
    violations = Violations()
    normalized = _check_code(code, violations)
    parse_receipt_ref(receipt_ref, violations)
    violations.raise_if_any()
    return normalized, receipt_ref


def parse_reservation_id(reservation_id: str) -> str:
    violations = Violations()
    violations.check(bool(reservation_id), "reservation_id", "required")
    violations.check_length(reservation_id, "reservation_id", store.RESERVATION_ID_LENGTH)
    violations.raise_if_any()
    return reservation_id


@dataclass(frozen=True)
class ReservedCoupon:
    """A reservation and its coupon, as a reserve or a redeem leaves them."""

    reservation: Reservation
    coupon: Coupon


async def reserve_coupon(
    session: AsyncSession,
    code: str,
    member_id: str | None,
    receipt_ref: str,
    ttl: timedelta,
    now: datetime,
    receipt_total_minor: int | None = None,
) -> ReservedCoupon:
    """Holds the coupon for the receipt until ``now + ttl``.

    The coupon row is locked before its reservations are read, so of two registers
    reserving one coupon at once the second sees the first's reservation. A series that
    limits uses per member is locked first, so one member's reservations of different
    codes in it are counted one after another too.
    """
    found = await store.find_coupon(session, code)
    if found is not None and found.series.uses_per_member:
        await store.lock_series(session, found.series.series_id)
    coupon = await store.lock_coupon(session, code)
    usage = await _usage(session, coupon, member_id or "", "", now)
    rejection = validate_reservation(coupon, member_id or "", receipt_ref, usage, now, receipt_total_minor)
    if rejection is not None or coupon is None:
        raise refusal(rejection or Rejection.NOT_FOUND)
    reservation = await store.add_reservation(session, coupon, member_id, receipt_ref, now + ttl, now)
    return ReservedCoupon(reservation, coupon)


async def _locked_reservation(
    session: AsyncSession, reservation_id: str, now: datetime
) -> tuple[Reservation, Coupon | None]:
    """A reservation that still holds its coupon, and the coupon, locked. The reservation is
    read again under the lock: a concurrent redeem or release may have settled it meanwhile."""
    found = await store.find_reservation(session, reservation_id)
    if found is None:
        return check_reservation(None, now), None
    coupon = await store.lock_coupon(session, found.code)
    return check_reservation(await store.find_reservation(session, reservation_id), now), coupon


def _event_payload(coupon: Coupon, reservation: Reservation) -> dict[str, object]:
    return {
        "code_suffix": coupon.code_suffix,
        "member_id": reservation.member_id,
        "series_id": coupon.series.series_id,
        "campaign_id": coupon.series.campaign_id,
        "partner_id": coupon.partner_id,
        "reservation_id": reservation.reservation_id,
        "receipt_ref": reservation.receipt_ref,
    }


async def redeem_coupon(session: AsyncSession, reservation_id: str, now: datetime) -> ReservedCoupon:
    """Uses the coupon once through the reservation, and writes its ``coupon.redeemed`` event."""
    _reservation, coupon = await _locked_reservation(session, reservation_id, now)
    if coupon is None or coupon.status is CouponStatus.REDEEMED:
        raise refusal(Rejection.ALREADY_USED)
    redeemed = await store.settle_reservation(session, reservation_id, ReservationStatus.REDEEMED, now)
    used = await store.set_coupon_uses(session, coupon.code, *coupon.uses_after(1))
    await add_event(
        session,
        store.outbox,
        "coupon.redeemed",
        key=redeemed.member_id or BEARER_EVENT_KEY,
        payload=_event_payload(used, redeemed),
    )
    return ReservedCoupon(redeemed, used)


async def release_reservation(session: AsyncSession, reservation_id: str, now: datetime) -> Reservation:
    """Frees the coupon held by the reservation (its receipt was cancelled)."""
    await _locked_reservation(session, reservation_id, now)
    return await store.settle_reservation(session, reservation_id, ReservationStatus.RELEASED, now)


async def reinstate_coupon(session: AsyncSession, code: str, receipt_ref: str, now: datetime) -> Coupon:
    """Gives back the use a returned receipt made of the coupon, and writes its
    ``coupon.reinstated`` event."""
    coupon = await store.lock_coupon(session, code)
    redeemed_on = await store.redeemed_reservation(session, code, receipt_ref) if coupon else None
    redeemed_on = check_reinstatable(coupon, redeemed_on, receipt_ref, now)
    assert coupon is not None
    returned = await store.settle_reservation(session, redeemed_on.reservation_id, ReservationStatus.RETURNED, now)
    active = await store.set_coupon_uses(session, code, *coupon.uses_after(-1))
    await add_event(
        session,
        store.outbox,
        "coupon.reinstated",
        key=returned.member_id or BEARER_EVENT_KEY,
        payload=_event_payload(active, returned),
    )
    return active


# Gift cards


def _check_currency(currency_code: str, violations: Violations) -> None:
    violations.check(
        len(currency_code) == 3 and currency_code.isascii() and currency_code.isalpha() and currency_code.isupper(),
        "currency_code",
        "an ISO 4217 code such as RUB",
    )


def parse_gift_card_batch(count: int, currency_code: str, validity_days: int, violations: Violations) -> None:
    violations.check(0 < count <= MAX_GIFT_CARDS_PER_BATCH, "count", f"1 to {MAX_GIFT_CARDS_PER_BATCH}")
    _check_currency(currency_code, violations)
    violations.check(
        0 <= validity_days <= MAX_GIFT_CARD_VALIDITY_DAYS,
        "validity_days",
        f"from 0 (never expires) to {MAX_GIFT_CARD_VALIDITY_DAYS}",
    )


async def issue_gift_cards(
    session: AsyncSession, count: int, currency_code: str, validity_days: int, now: datetime
) -> tuple[str, list[GiftCard]]:
    """Writes a batch of inactive cards with fresh random numbers; answers the batch id and cards."""
    batch_id = str(uuid.uuid4())
    cards: list[GiftCard] = []
    for _attempt in range(CODE_ATTEMPTS):
        candidates = {new_code(CODE_ALPHABET, GIFT_CARD_NUMBER_LENGTH): None for _ in range(count - len(cards))}
        batch = [
            GiftCard(
                card_number=number,
                batch_id=batch_id,
                currency_code=currency_code,
                status=GiftCardStatus.INACTIVE,
                balance_minor=0,
                pin_hash=None,
                validity_days=validity_days,
                expires_at=None,
                created_at=now,
            )
            for number in candidates
        ]
        written = await store.add_gift_cards(session, batch)
        cards.extend(card for card in batch if card.card_number in written)
        if len(cards) == count:
            return batch_id, cards
    raise FailedPrecondition("GIFT_CARD_NUMBERS_EXHAUSTED", "could not find free gift card numbers")


def parse_card_number(card_number: str, violations: Violations) -> str:
    number = normalize_code(card_number)
    violations.check(bool(number), "card_number", "required")
    violations.check_length(number, "card_number", store.MAX_CODE_LENGTH)
    return number


def parse_pin(pin: str, violations: Violations) -> None:
    violations.check(not pin or is_valid_pin(pin), "pin", "4 to 12 digits")


def parse_amount(amount_minor: int, violations: Violations) -> None:
    violations.check(amount_minor > 0, "amount_minor", "must be positive")


async def activate_gift_card(
    session: AsyncSession, card_number: str, amount_minor: int, pin_hash: str | None, receipt_ref: str, now: datetime
) -> GiftCard:
    """Sells the card: loads it with the amount (its first entry) and starts its validity."""
    card = check_activation(await store.lock_gift_card(session, card_number), now)
    await store.activate_gift_card(session, card_number, pin_hash, activation_expiry(card, now), now)
    return await store.append_gift_card_entry(
        session, GiftCardEntry(card_number, GiftCardEntryKind.ACTIVATION, amount_minor, amount_minor, receipt_ref, now)
    )


async def _check_pin(card: GiftCard, pin: str) -> None:
    """Refuses a wrong (or missing) PIN for a card that has one. scrypt runs off the event loop."""
    if card.pin_hash is None:
        return
    if not pin or not await asyncio.to_thread(pin_matches, pin, card.pin_hash):
        raise wrong_pin()


async def read_gift_card(session: AsyncSession, card_number: str, pin: str) -> GiftCard:
    card = await store.find_gift_card(session, card_number)
    if card is None:
        raise gift_card_not_found()
    await _check_pin(card, pin)
    return card


async def spend_gift_card(
    session: AsyncSession, card_number: str, pin: str, amount_minor: int, receipt_ref: str, now: datetime
) -> GiftCard:
    """Pays ``amount_minor`` of the receipt from the card: one entry, the balance lowered in
    the same transaction under the card's lock, so concurrent payments never overdraw it.

    The PIN is checked before the lock (scrypt is slow) and again under it only if the
    card's PIN changed meanwhile (it was activated).
    """
    seen = await read_gift_card(session, card_number, pin)
    card = await store.lock_gift_card(session, card_number)
    if card is None:
        raise gift_card_not_found()
    if card.pin_hash != seen.pin_hash:
        await _check_pin(card, pin)
    balance = check_spend(card, amount_minor, now)
    return await store.append_gift_card_entry(
        session, GiftCardEntry(card_number, GiftCardEntryKind.SPEND, -amount_minor, balance, receipt_ref, now)
    )


async def refund_gift_card(
    session: AsyncSession, card_number: str, amount_minor: int, receipt_ref: str, now: datetime
) -> GiftCard:
    """Puts back on the card part of what the receipt spent from it."""
    card = await store.lock_gift_card(session, card_number)
    if card is None:
        raise gift_card_not_found()
    spending = await store.receipt_spending(session, card_number, receipt_ref)
    balance = check_refund(card, amount_minor, spending, now)
    return await store.append_gift_card_entry(
        session, GiftCardEntry(card_number, GiftCardEntryKind.REFUND, amount_minor, balance, receipt_ref, now)
    )


# Badges


def parse_badge(name: str, description: str, violations: Violations) -> None:
    violations.check(0 < len(name) <= store.MAX_NAME_LENGTH, "name", f"1 to {store.MAX_NAME_LENGTH} characters")
    violations.check_length(description, "description", store.MAX_DESCRIPTION_LENGTH)


async def create_badge(session: AsyncSession, name: str, description: str, now: datetime) -> Badge:
    badge = Badge(str(uuid.uuid4()), name, description, now)
    await store.add_badge(session, badge)
    return badge


def parse_member_id(member_id: str, violations: Violations) -> None:
    violations.check(
        0 < len(member_id) <= store.MAX_MEMBER_ID_LENGTH, "member_id", f"1 to {store.MAX_MEMBER_ID_LENGTH} characters"
    )


async def award_badge(session: AsyncSession, member_id: str, badge_id: str, now: datetime) -> tuple[BadgeAward, bool]:
    """Awards the badge unless the member holds it; a new award writes ``badge.awarded``."""
    badge = await store.find_badge(session, badge_id) if badge_id else None
    if badge is None:
        raise NotFound("BADGE_NOT_FOUND", "no badge has this id")
    award, new = await store.award_badge(session, badge, member_id, now)
    if new:
        await add_event(
            session,
            store.outbox,
            "badge.awarded",
            key=member_id,
            payload={"member_id": member_id, "badge_id": badge.badge_id, "badge_name": badge.name},
        )
    return award, new


async def member_badges(session: AsyncSession, member_id: str) -> list[BadgeAward]:
    return await store.member_badges(session, member_id, MAX_BADGES_LISTED)


# Chips


def parse_chip_program(
    name: str,
    currency_code: str,
    spend_per_chip_minor: int,
    chips_per_exchange: int,
    exchange_series_id: str,
    violations: Violations,
) -> None:
    violations.check(0 < len(name) <= store.MAX_NAME_LENGTH, "name", f"1 to {store.MAX_NAME_LENGTH} characters")
    _check_currency(currency_code, violations)
    violations.check(spend_per_chip_minor > 0, "spend_per_chip_minor", "must be positive")
    violations.check(0 < chips_per_exchange <= MAX_USES, "chips_per_exchange", f"1 to {MAX_USES}")
    violations.check(bool(exchange_series_id), "exchange_series_id", "required")


async def create_chip_program(
    session: AsyncSession,
    name: str,
    currency_code: str,
    spend_per_chip_minor: int,
    chips_per_exchange: int,
    exchange_series_id: str,
    now: datetime,
) -> ChipProgram:
    series = await get_series(session, exchange_series_id)
    if series.kind is SeriesKind.MASS:
        raise FailedPrecondition("COUPON_SERIES_MASS", "chips are exchanged for coupons of a unique-code series")
    program = ChipProgram(
        chip_program_id=str(uuid.uuid4()),
        name=name,
        currency_code=currency_code,
        spend_per_chip_minor=spend_per_chip_minor,
        chips_per_exchange=chips_per_exchange,
        exchange_series_id=series.series_id,
        created_at=now,
    )
    await store.add_chip_program(session, program)
    return program


async def chip_balances(session: AsyncSession, member_id: str) -> list[tuple[ChipProgram, int]]:
    return await store.chip_balances(session, member_id)


async def exchange_chips(
    session: AsyncSession, member_id: str, chip_program_id: str, now: datetime
) -> tuple[ChipProgram, int, Coupon]:
    """Takes one exchange's chips from the member and issues them a coupon of the collection's
    series, in one transaction: chips are never taken without the coupon or the reverse."""
    program = await store.find_chip_program(session, chip_program_id) if chip_program_id else None
    if program is None:
        raise NotFound("CHIP_PROGRAM_NOT_FOUND", "no chip collection has this id")
    chips = check_exchange(program, await store.lock_chip_account(session, chip_program_id, member_id))
    (coupon,) = await issue_coupons(session, program.exchange_series_id, [member_id], now)
    exchange_ref = f"exchange:{uuid.uuid4()}"
    await store.append_chip_entry(
        session, chip_program_id, member_id, -program.chips_per_exchange, chips, exchange_ref, now
    )
    return program, chips, coupon


COMMITTED_RECEIPTS_CONSUMER = "rewards.chips"


async def handle_gateway_event(session: AsyncSession, event: Event) -> None:
    """Credits chips for a committed receipt of an identified member, once per receipt: the
    inbox remembers the event, and each receipt is one entry per collection."""
    if event.event_type != "cheque.committed":
        return
    if not await first_delivery(session, store.inbox, COMMITTED_RECEIPTS_CONSUMER, event.event_id):
        return
    payload = event.payload
    member_id = str(payload.get("member_id") or "")
    if not member_id:
        return
    receipt_ref = f"receipt:{payload['terminal_id']}:{payload['receipt_number']}"
    paid_minor, currency_code = int(payload.get("paid_minor") or 0), str(payload.get("currency_code") or "")
    now = utcnow()
    for program in await store.chip_programs(session):
        earned = program.chips_for(paid_minor, currency_code)
        if not earned or await store.chip_entry_exists(session, program.chip_program_id, member_id, receipt_ref):
            continue
        chips = await store.lock_chip_account(session, program.chip_program_id, member_id)
        await store.append_chip_entry(
            session, program.chip_program_id, member_id, earned, chips + earned, receipt_ref, now
        )
