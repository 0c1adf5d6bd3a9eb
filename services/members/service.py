"""Members' use cases, each given the session of its unit of work."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.bus import Event
from loyalty.runtime.errors import AlreadyExists, FailedPrecondition, NotFound, Violations
from loyalty.runtime.inbox import first_delivery
from loyalty.runtime.outbox import add_event
from loyalty.runtime.timeutil import utcnow
from services.members import store
from services.members.domain import (
    CONSENT_CHANNELS,
    DEFAULT_CARD_TYPE,
    DEFAULT_TIER,
    MAX_ALLOWED_VALUES,
    MAX_ATTRIBUTE_TEXT,
    MAX_CARD_NUMBER_LENGTH,
    AttributeDefinition,
    AttributeScalar,
    AttributeType,
    CalendarPeriod,
    Card,
    CardStatus,
    CardType,
    Consent,
    ExpiredToken,
    InvalidIdentifier,
    InvalidToken,
    Member,
    MemberFacts,
    MemberStatus,
    SegmentExpressionError,
    TierDefinition,
    TierMetric,
    attribute_value_error,
    batch_card_numbers,
    birthday_falls_on,
    compile_segment,
    evaluate_tier,
    in_segment,
    is_valid_card_number,
    is_valid_code,
    is_valid_locale,
    is_valid_time_zone,
    local_date,
    member_payload,
    merge_consents,
    merge_newer_consents,
    new_card_number,
    new_referral_code,
    normalize_email,
    normalize_phone,
    normalize_referral_code,
    parse_birth_date,
    profile_complete,
    ranges_overlap,
    rfm_scores,
    sign_qr_token,
    verify_qr_token,
    window_start,
)

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 100
MAX_REASON_LENGTH = 200
MAX_ACTOR_LENGTH = 100
MAX_EXPRESSION_LENGTH = 2000
MAX_SOURCE_LENGTH = 32
MAX_PUSH_TOKEN_LENGTH = 512
MAX_CHAT_ID_LENGTH = 64
MAX_ID_LENGTH = 64
MAX_SEGMENT_BATCH = 10_000
MAX_BATCH_COUNT = 10_000_000
CARD_NUMBER_ATTEMPTS = 5
REFERRAL_CODE_ATTEMPTS = 5
ATTRIBUTES_PATH = "attributes."
INVITATION_PENDING, INVITATION_ACCEPTED, INVITATION_DECLINED, INVITATION_EXPIRED = (
    "pending",
    "accepted",
    "declined",
    "expired",
)
DEFAULT_INVITATION_DAYS = 7
MAX_INVITATION_DAYS = 90
GATEWAY_CONSUMER = "members.gateway"
SALE, RETURN = "sale", "return"
BATCH_PENDING, BATCH_DONE = "pending", "done"
UPDATABLE_FIELDS = frozenset(
    {
        "phone",
        "email",
        "first_name",
        "last_name",
        "time_zone",
        "locale",
        "birth_date",
        "push_token",
        "telegram_chat_id",
        "consents",
    }
)


@dataclass(frozen=True)
class ConsentInput:
    """A consent as a client sends it; channel is "" when the client gave none."""

    channel: str
    granted: bool
    source: str


@dataclass(frozen=True)
class Registration:
    phone: str
    email: str | None
    first_name: str
    last_name: str
    channel: int
    referral_code: str | None
    consents: tuple[ConsentInput, ...] = ()
    time_zone: str = ""
    locale: str = ""
    birth_date: str = ""
    card_number: str = ""


def _check_consents(consents: Sequence[ConsentInput], violations: Violations, field: str = "consents") -> None:
    seen: set[str] = set()
    for index, consent in enumerate(consents):
        where = f"{field}[{index}]"
        violations.check(consent.channel in CONSENT_CHANNELS, f"{where}.channel", "a contact channel")
        violations.check(consent.channel not in seen, f"{where}.channel", "given twice")
        seen.add(consent.channel)
        violations.check_length(consent.source, f"{where}.source", MAX_SOURCE_LENGTH)


def _check_profile_text(values: dict[str, str], violations: Violations, prefix: str = "") -> dict[str, str]:
    """Checks the optional profile fields present in `values`; returns their stored forms."""
    checked: dict[str, str] = {}
    for name, value in values.items():
        where = f"{prefix}{name}"
        if name == "time_zone":
            violations.check(not value or is_valid_time_zone(value), where, "an IANA time zone such as Europe/Moscow")
        elif name == "locale":
            violations.check(not value or is_valid_locale(value), where, "a BCP 47 locale such as ru-RU")
        elif name == "birth_date" and value:
            try:
                parse_birth_date(value, utcnow().date())
            except InvalidIdentifier as error:
                violations.add(where, str(error))
        elif name in ("first_name", "last_name"):
            violations.check_length(value, where, MAX_NAME_LENGTH)
            value = value.strip()
        elif name == "push_token":
            violations.check_length(value, where, MAX_PUSH_TOKEN_LENGTH)
        elif name == "telegram_chat_id":
            violations.check_length(value, where, MAX_CHAT_ID_LENGTH)
        checked[name] = value
    return checked


def parse_registration(
    phone: str,
    email: str,
    first_name: str,
    last_name: str,
    channel: int,
    referral_code: str,
    consents: Sequence[ConsentInput] = (),
    time_zone: str = "",
    locale: str = "",
    birth_date: str = "",
    card_number: str = "",
) -> Registration:
    violations = Violations()
    normal_phone = normal_email = None
    try:
        normal_phone = normalize_phone(phone)
    except InvalidIdentifier as error:
        violations.add("phone", str(error) if phone else "required")
    if email:
        try:
            normal_email = normalize_email(email)
        except InvalidIdentifier as error:
            violations.add("email", str(error))
    profile = _check_profile_text(
        {
            "first_name": first_name,
            "last_name": last_name,
            "time_zone": time_zone,
            "locale": locale,
            "birth_date": birth_date,
        },
        violations,
    )
    normal_referral_code = None
    if referral_code.strip():
        try:
            normal_referral_code = normalize_referral_code(referral_code)
        except InvalidIdentifier as error:
            violations.add("referral_code", str(error))
    _check_consents(consents, violations)
    if card_number:
        violations.check(is_valid_card_number(card_number), "card_number", "digits with a valid check digit")
    violations.raise_if_any()
    assert normal_phone is not None
    return Registration(
        normal_phone,
        normal_email,
        profile["first_name"],
        profile["last_name"],
        channel,
        normal_referral_code,
        tuple(consents),
        time_zone,
        locale,
        birth_date,
        card_number,
    )


def parse_phone(phone: str, field: str = "phone") -> str:
    try:
        return normalize_phone(phone)
    except InvalidIdentifier as error:
        violations = Violations()
        violations.add(field, str(error))
        violations.raise_if_any()
        raise


def _consents(inputs: Sequence[ConsentInput], now: datetime) -> tuple[Consent, ...]:
    return tuple(Consent(item.channel, item.granted, now, item.source) for item in inputs)


async def _announce_member(session: AsyncSession, event_type: str, member: Member, **extra: Any) -> None:
    await add_event(session, store.outbox, event_type, key=member.member_id, payload=member_payload(member) | extra)


async def _announce_profile_completed(session: AsyncSession, member: Member) -> None:
    """member.profile_completed, the first time the profile is complete (domain.profile_complete);
    claimed on the member's row in this transaction, so never twice."""
    if profile_complete(member) and await store.claim_profile_completed(session, member.member_id, utcnow()):
        payload = {"member_id": member.member_id}
        await add_event(session, store.outbox, "member.profile_completed", key=member.member_id, payload=payload)


async def announce_birthday(session: AsyncSession, candidate: store.BirthdayCandidate, now: datetime) -> bool:
    """member.birthday when today, in the member's time zone, is the birthday and this year's
    was not announced yet; the year is claimed in the event's transaction. Returns whether
    it was announced."""
    today = local_date(now, candidate.time_zone)
    if not birthday_falls_on(candidate.birth_date, today):
        return False
    if candidate.announced_year is not None and candidate.announced_year >= today.year:
        return False  # spares the write; the claim below decides
    if not await store.claim_birthday(session, candidate.member_id, today.year):
        return False
    await add_event(
        session,
        store.outbox,
        "member.birthday",
        key=candidate.member_id,
        payload={"member_id": candidate.member_id, "birth_date": candidate.birth_date, "date": today.isoformat()},
    )
    return True


async def _unused_referral_code(session: AsyncSession) -> str:
    for _attempt in range(REFERRAL_CODE_ATTEMPTS):
        code = new_referral_code()
        if not await store.referral_code_taken(session, code):
            return code
    raise FailedPrecondition("REFERRAL_CODES_EXHAUSTED", "could not find a free referral code; retry")


async def _referrer(session: AsyncSession, code: str | None) -> str | None:
    """The member owning a referral code (the survivor when it was merged away)."""
    if code is None:
        return None
    referrer = await store.member_by_referral_code(session, code)
    if referrer is None:
        raise NotFound("REFERRAL_CODE_NOT_FOUND", "no member has this referral code")
    return referrer.merged_into or referrer.member_id


async def lookup_referral_code(session: AsyncSession, raw: str) -> str:
    violations = Violations()
    code = ""
    try:
        code = normalize_referral_code(raw)
    except InvalidIdentifier as error:
        violations.add("referral_code", str(error))
    violations.raise_if_any()
    referrer = await _referrer(session, code)
    assert referrer is not None
    return referrer


async def register_member(
    session: AsyncSession, registration: Registration, *, return_existing: bool = False
) -> tuple[Member, bool]:
    """Returns the member and whether it was created. An existing phone or e-mail is refused
    with MEMBER_ALREADY_EXISTS (its id in the details), or answered with created=false when
    the caller asks for ``return_existing``.

    With a card number, the anonymous member holding that card becomes this person: the
    member id (and so the card's points and history) stays.

    A referral code names the inviting member (an unknown one is refused with NOT_FOUND
    REFERRAL_CODE_NOT_FOUND); the new member records them and the inviter's count rises."""
    existing = await store.find_member_by_phone(session, registration.phone)
    if existing is None and registration.email:
        existing = await store.find_member_by_email(session, registration.email)
    now = utcnow()
    if registration.card_number:
        return await _claim_anonymous_card(session, registration, existing, now), True
    referrer = await _referrer(session, registration.referral_code)
    if existing is not None and existing.merged_into:
        existing = await get_member(session, existing.merged_into)
    if existing is not None:
        if return_existing:
            return existing, False
        raise AlreadyExists(
            "MEMBER_ALREADY_EXISTS",
            "the phone or e-mail is already registered",
            {"member_id": existing.member_id},
        )
    member = Member(
        member_id=str(uuid.uuid4()),
        phone=registration.phone,
        email=registration.email,
        first_name=registration.first_name,
        last_name=registration.last_name,
        status=MemberStatus.ACTIVE,
        tier=DEFAULT_TIER,
        registration_channel=registration.channel,
        created_at=now,
        time_zone=registration.time_zone,
        locale=registration.locale,
        birth_date=registration.birth_date,
        consents=merge_consents((), _consents(registration.consents, now)),
        referral_code=await _unused_referral_code(session),
        referred_by=referrer,
    )
    await store.add_member(session, member, registration.referral_code)
    if referrer is not None:
        await store.count_referral(session, referrer)
    await _announce_member(
        session,
        "member.registered",
        member,
        channel=member.registration_channel,
        referral_code=registration.referral_code,
        referrer_id=referrer or "",
    )
    await _announce_profile_completed(session, member)
    return member, True


async def _claim_anonymous_card(
    session: AsyncSession, registration: Registration, existing: Member | None, now: datetime
) -> Member:
    card = await store.find_card(session, registration.card_number)
    if card is None or card.member_id is None:
        raise NotFound("CARD_NOT_FOUND", "no issued card with this number")
    holder = await get_member(session, card.member_id, for_update=True)
    if holder.phone is not None or holder.erased_at is not None:
        raise FailedPrecondition("CARD_NOT_ANONYMOUS", "the card already belongs to a registered member")
    if existing is not None:
        raise AlreadyExists(
            "MEMBER_ALREADY_EXISTS",
            "the phone or e-mail belongs to another member; merge them instead",
            {"member_id": existing.member_id},
        )
    referrer = await _referrer(session, registration.referral_code)
    if referrer == holder.member_id:
        referrer = None  # the card's own code: nobody invited them
    member = dataclasses.replace(
        holder,
        phone=registration.phone,
        email=registration.email,
        first_name=registration.first_name,
        last_name=registration.last_name,
        time_zone=registration.time_zone,
        locale=registration.locale,
        birth_date=registration.birth_date,
        consents=merge_consents(holder.consents, _consents(registration.consents, now)),
        referral_code=holder.referral_code or await _unused_referral_code(session),
        referred_by=referrer,
    )
    await store.save_member(session, member)
    if referrer is not None:
        await store.record_referral(session, member.member_id, registration.referral_code or "", referrer)
        await store.count_referral(session, referrer)
    await _announce_member(
        session,
        "member.registered",
        member,
        channel=registration.channel,
        referral_code=registration.referral_code,
        referrer_id=referrer or "",
    )
    await _announce_profile_completed(session, member)
    return member


async def get_member(session: AsyncSession, member_id: str, for_update: bool = False) -> Member:
    member = await store.find_member(session, member_id, for_update)
    if member is None:
        raise NotFound("MEMBER_NOT_FOUND", f"no member {member_id!r}")
    return member


async def _live_member(session: AsyncSession, member_id: str) -> Member:
    """The member, locked for a change; an erased member can no longer be changed."""
    member = await get_member(session, member_id, for_update=True)
    if member.erased_at is not None:
        raise FailedPrecondition("MEMBER_ERASED", "the member's data was erased")
    if member.merged_into:
        raise FailedPrecondition("MEMBER_MERGED", f"the member was merged into {member.merged_into}")
    return member


# Profile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileChange:
    """The checked new values of the fields an update mask names."""

    values: dict[str, str | None]
    consents: tuple[ConsentInput, ...]
    paths: frozenset[str]
    # The attributes named in the mask: the new value, or None to clear it (checked
    # against their definitions in update_member).
    attributes: dict[str, AttributeScalar | None] = dataclasses.field(default_factory=dict)


def parse_profile_change(
    paths: Sequence[str],
    values: dict[str, str],
    consents: Sequence[ConsentInput],
    attributes: Mapping[str, AttributeScalar | None] | None = None,
) -> ProfileChange:
    """Checks an update: `values` holds the new value of every scalar field (as sent),
    `attributes` the attribute values sent (None for a key sent without a value)."""
    violations = Violations()
    sent_attributes = attributes or {}
    if not paths:
        violations.add("update_mask", "name at least one field")
    attribute_changes: dict[str, AttributeScalar | None] = {}
    for path in paths:
        if path.startswith(ATTRIBUTES_PATH):
            code = path.removeprefix(ATTRIBUTES_PATH)
            violations.check(is_valid_code(code), "update_mask", f"{path!r}: not an attribute code")
            if code in sent_attributes:
                value = sent_attributes[code]
                if value is None:
                    violations.add(f"member.attributes[{code}]", "a value, or leave the key out to clear it")
                attribute_changes[code] = value
            else:
                attribute_changes[code] = None
            continue
        violations.check(path in UPDATABLE_FIELDS, "update_mask", f"{path!r} cannot be updated")
    violations.raise_if_any()
    named = {path: values.get(path, "") for path in paths if path in UPDATABLE_FIELDS and path != "consents"}
    checked: dict[str, str | None] = dict(_check_profile_text(named, violations, "member."))
    if "phone" in named:
        try:
            checked["phone"] = normalize_phone(named["phone"])
        except InvalidIdentifier as error:
            violations.add("member.phone", str(error) if named["phone"] else "required: a member keeps a phone")
    if "email" in named:
        try:
            checked["email"] = normalize_email(named["email"]) if named["email"] else None
        except InvalidIdentifier as error:
            violations.add("member.email", str(error))
    if "consents" in paths:
        _check_consents(consents, violations, "member.consents")
    violations.raise_if_any()
    return ProfileChange(checked, tuple(consents), frozenset(paths), attribute_changes)


async def _check_attribute_changes(session: AsyncSession, changes: Mapping[str, AttributeScalar | None]) -> None:
    """Every attribute named must be defined and every value given of its type."""
    violations = Violations()
    for code, value in sorted(changes.items()):
        definition = await store.find_attribute_definition(session, code)
        if definition is None:
            violations.add("update_mask", f"no attribute {code!r} is defined")
        elif value is not None:
            error = attribute_value_error(definition, value)
            if error is not None:
                violations.add(f"member.attributes[{code}]", f"expected {error}")
    violations.raise_if_any()


async def update_member(session: AsyncSession, member_id: str, change: ProfileChange) -> Member:
    member = await _live_member(session, member_id)
    if member.phone is None:
        raise FailedPrecondition("MEMBER_ANONYMOUS", "register the card holder (RegisterMember with the card) first")
    phone, email = change.values.get("phone"), change.values.get("email")
    if phone is not None and phone != member.phone:
        other = await store.find_member_by_phone(session, phone)
        if other is not None:
            raise AlreadyExists("PHONE_TAKEN", "the phone belongs to another member", {"member_id": other.member_id})
    if email is not None and email != member.email:
        other = await store.find_member_by_email(session, email)
        if other is not None:
            raise AlreadyExists("EMAIL_TAKEN", "the e-mail belongs to another member", {"member_id": other.member_id})
    consents = member.consents
    if "consents" in change.paths:
        consents = merge_consents(member.consents, _consents(change.consents, utcnow()))
    await _check_attribute_changes(session, change.attributes)
    attributes = {**member.attributes, **change.attributes}
    kept = {code: value for code, value in attributes.items() if value is not None}
    updated = dataclasses.replace(
        member,
        **change.values,  # type: ignore[arg-type]
        consents=consents,
        attributes=kept,
    )
    if updated == member:
        return member
    await store.save_member(session, updated)
    changed = {code: value for code, value in change.attributes.items() if member.attributes.get(code) != value}
    await store.set_attributes(session, member_id, changed)
    await _announce_member(session, "member.updated", updated)
    await _announce_profile_completed(session, updated)
    return updated


def check_reason(reason: str, field: str = "reason") -> None:
    violations = Violations()
    violations.check(bool(reason.strip()), field, "required")
    violations.check_length(reason, field, MAX_REASON_LENGTH)
    violations.raise_if_any()


async def block_member(session: AsyncSession, member_id: str, reason: str) -> Member:
    member = await _live_member(session, member_id)
    if member.status is MemberStatus.BLOCKED:
        return member
    blocked = dataclasses.replace(member, status=MemberStatus.BLOCKED, block_reason=reason)
    await store.save_member(session, blocked)
    await _announce_member(session, "member.updated", blocked)
    return blocked


async def unblock_member(session: AsyncSession, member_id: str) -> Member:
    member = await _live_member(session, member_id)
    if member.status is MemberStatus.ACTIVE:
        return member
    active = dataclasses.replace(member, status=MemberStatus.ACTIVE, block_reason="")
    await store.save_member(session, active)
    await _announce_member(session, "member.updated", active)
    return active


ERASED_REASON = "erased"


async def erase_member(session: AsyncSession, member_id: str) -> Member:
    """Removes the member's personal data; the id, tier, purchases and ledger stay, anonymous.

    The member is blocked and their cards too (a card would identify the person again);
    they leave their household and segments; their attributes and referral code go; profile
    events still in the outbox lose their personal payload, and the stored idempotent
    answers naming the member (registration, updates...) are dropped."""
    member = await get_member(session, member_id, for_update=True)
    if member.erased_at is not None:
        return member
    if member.household_id:
        member = await _leave(session, member)
    erased = dataclasses.replace(
        member,
        phone=None,
        email=None,
        first_name="",
        last_name="",
        time_zone="",
        locale="",
        birth_date="",
        push_token="",
        telegram_chat_id="",
        consents=(),
        attributes={},
        referral_code=None,
        status=MemberStatus.BLOCKED,
        block_reason=ERASED_REASON,
        erased_at=utcnow(),
    )
    await store.save_member(session, erased)
    await store.drop_attributes(session, member_id)
    await store.drop_stored_answers_naming(session, member_id)
    for card in await store.member_cards(session, member_id):
        if card.status is CardStatus.ACTIVE:
            await store.save_card(
                session, dataclasses.replace(card, status=CardStatus.BLOCKED, block_reason=ERASED_REASON)
            )
    await store.drop_segment_memberships(session, member_id)
    await store.scrub_member_events(session, member_id)
    await add_event(session, store.outbox, "member.erased", key=member_id, payload={"member_id": member_id})
    return erased


# Merge -----------------------------------------------------------------------------

MergeAccounts = Callable[[str, str, str], Awaitable[None]]
"""Moves every point of one account holder to another (from, to, reason); idempotent."""


def check_merge(survivor_id: str, duplicate_id: str, actor: str, reason: str) -> None:
    violations = Violations()
    violations.check(bool(survivor_id), "survivor_id", "required")
    violations.check(bool(duplicate_id), "duplicate_id", "required")
    violations.check(survivor_id != duplicate_id, "duplicate_id", "must differ from survivor_id")
    violations.check(bool(actor.strip()), "actor", "required")
    violations.check_length(actor, "actor", MAX_ACTOR_LENGTH)
    violations.check(bool(reason.strip()), "reason", "required")
    violations.check_length(reason, "reason", MAX_REASON_LENGTH)
    violations.raise_if_any()


async def merge_members(
    session: AsyncSession, survivor_id: str, duplicate_id: str, actor: str, reason: str, merge_accounts: MergeAccounts
) -> tuple[Member, store.MergeCounts]:
    """Moves the duplicate's cards, purchases, points, static segment memberships, tier
    history and consents to the survivor and marks it merged; returns the survivor and what
    moved. The survivor's tier is then judged on the purchases it now holds.

    The points move first, over gRPC and idempotently: if this transaction then fails, the
    retry finds the duplicate unmerged and asks accounts again, which answers its first result."""
    # Locked in id order, so two merges of the same pair cannot deadlock.
    locked = {member_id: await _live_member(session, member_id) for member_id in sorted((survivor_id, duplicate_id))}
    survivor, duplicate = locked[survivor_id], locked[duplicate_id]
    if duplicate.household_id:
        # Its points sit in the household's pool, which is not the duplicate's to take away.
        raise FailedPrecondition("MEMBER_IN_HOUSEHOLD", "the duplicate must leave its household first")
    await merge_accounts(duplicate.account_holder_id, survivor.account_holder_id, reason)
    now = utcnow()
    cards_moved = await store.move_holdings(session, duplicate_id, survivor_id)
    consents, consents_moved = merge_newer_consents(survivor.consents, duplicate.consents)
    moved = store.MergeCounts(
        cards=cards_moved,
        segments=await store.move_static_segments(session, duplicate_id, survivor_id),
        tier_changes=await store.move_tier_history(session, duplicate_id, survivor_id),
        consents=consents_moved,
    )
    await store.save_member(session, dataclasses.replace(duplicate, merged_into=survivor_id, consents=()))
    await store.save_member(session, dataclasses.replace(survivor, consents=consents))
    await store.add_merge(session, duplicate_id, survivor_id, actor, reason, moved, now)
    survivor = await evaluate_member_tier(session, survivor_id, now)
    await add_event(
        session,
        store.outbox,
        "member.merged",
        key=survivor_id,
        payload={
            "survivor_id": survivor_id,
            "duplicate_id": duplicate_id,
            "actor": actor,
            "reason": reason,
            "cards_moved": moved.cards,
            "segments_moved": moved.segments,
            "tier_changes_moved": moved.tier_changes,
            "consents_moved": moved.consents,
        },
    )
    return survivor, moved


# Cards -----------------------------------------------------------------------------


def check_card_number(card_number: str, field: str = "card_number") -> None:
    violations = Violations()
    violations.check(is_valid_card_number(card_number), field, "digits with a valid check digit")
    violations.raise_if_any()


def check_code(code: str, field: str) -> None:
    violations = Violations()
    violations.check(is_valid_code(code), field, "lower case letters, digits, '_' or '-', up to 32")
    violations.raise_if_any()


async def _card_type(session: AsyncSession, code: str) -> CardType:
    card_type = await store.find_card_type(session, code or DEFAULT_CARD_TYPE)
    if card_type is not None:
        return card_type
    if not code or code == DEFAULT_CARD_TYPE:
        return CardType(DEFAULT_CARD_TYPE, "Standard", 0)
    raise NotFound("CARD_TYPE_NOT_FOUND", f"no card type {code!r}")


async def _new_card(session: AsyncSession, member_id: str, card_number: str, card_type_code: str) -> Card:
    """Issues a pre-printed, emitted or generated number to the member."""
    card_type = await _card_type(session, card_type_code)
    now = utcnow()
    expires_at = now + timedelta(days=card_type.validity_days) if card_type.validity_days else None
    if card_number:
        existing = await store.find_card(session, card_number, for_update=True)
        if existing is not None:
            if existing.status is not CardStatus.UNISSUED:
                raise FailedPrecondition("CARD_NUMBER_TAKEN", f"card {card_number} already belongs to a member")
            # An emitted card keeps the type it was printed as.
            stock_type = await _card_type(session, existing.card_type)
            issued = Card(
                card_number,
                member_id,
                CardStatus.ACTIVE,
                now,
                stock_type.code,
                now + timedelta(days=stock_type.validity_days) if stock_type.validity_days else None,
            )
            await store.save_card(session, issued)
            return issued
    else:
        for _attempt in range(CARD_NUMBER_ATTEMPTS):
            card_number = new_card_number()
            if await store.find_card(session, card_number) is None:
                break
        else:
            raise FailedPrecondition("CARD_NUMBERS_EXHAUSTED", "could not find a free card number")
    card = Card(card_number, member_id, CardStatus.ACTIVE, now, card_type.code, expires_at)
    await store.add_card(session, card)
    return card


async def issue_card(session: AsyncSession, member_id: str, card_number: str, card_type: str = "") -> Card:
    member = await get_member(session, member_id)
    if member.status is not MemberStatus.ACTIVE:
        raise FailedPrecondition("MEMBER_BLOCKED", "cards are not issued to a blocked member")
    return await _new_card(session, member.member_id, card_number, card_type)


async def issue_anonymous_card(session: AsyncSession, card_number: str, card_type: str) -> Card:
    """A card without a profile: its holder is a new anonymous member, so points and history
    accrue from the first receipt and stay when the person registers with the card."""
    holder = Member(
        member_id=str(uuid.uuid4()),
        phone=None,
        email=None,
        first_name="",
        last_name="",
        status=MemberStatus.ACTIVE,
        tier=DEFAULT_TIER,
        registration_channel=0,
        created_at=utcnow(),
    )
    await store.add_member(session, holder, None)
    return await _new_card(session, holder.member_id, card_number, card_type)


async def _issued_card(session: AsyncSession, card_number: str) -> Card:
    card = await store.find_card(session, card_number, for_update=True)
    if card is None or card.member_id is None:
        raise NotFound("CARD_NOT_FOUND", "no issued card with this number")
    return card


async def block_card(session: AsyncSession, card_number: str, reason: str) -> Card:
    card = await _issued_card(session, card_number)
    if card.status is CardStatus.BLOCKED:
        return card
    if card.status is not CardStatus.ACTIVE:
        raise FailedPrecondition(f"CARD_{card.status.value.upper()}", f"the card is {card.status.value}")
    blocked = dataclasses.replace(card, status=CardStatus.BLOCKED, block_reason=reason)
    await store.save_card(session, blocked)
    await add_event(
        session,
        store.outbox,
        "card.blocked",
        key=card.member_id or card_number,
        payload={"member_id": card.member_id, "card_number": card_number, "reason": reason},
    )
    return blocked


async def unblock_card(session: AsyncSession, card_number: str) -> Card:
    card = await _issued_card(session, card_number)
    if card.status is CardStatus.ACTIVE:
        return card
    if card.block_reason == ERASED_REASON:
        raise FailedPrecondition("MEMBER_ERASED", "the card's member was erased")
    if card.status is not CardStatus.BLOCKED:
        raise FailedPrecondition("CARD_NOT_BLOCKED", f"a {card.status.value} card cannot be unblocked")
    active = dataclasses.replace(card, status=CardStatus.ACTIVE, block_reason="")
    await store.save_card(session, active)
    return active


async def replace_card(session: AsyncSession, card_number: str, new_number: str, reason: str) -> tuple[Card, Card]:
    """The new card identifies the same member (so balance and history stay with them); the
    old one is marked replaced and points to its successor."""
    old = await _issued_card(session, card_number)
    if old.status is CardStatus.REPLACED:
        raise FailedPrecondition("CARD_REPLACED", f"the card was already replaced by {old.replaced_by}")
    assert old.member_id is not None
    member = await _live_member(session, old.member_id)
    new = await _new_card(session, member.member_id, new_number, old.card_type)
    replaced = dataclasses.replace(old, status=CardStatus.REPLACED, block_reason=reason, replaced_by=new.card_number)
    await store.save_card(session, replaced)
    await add_event(
        session,
        store.outbox,
        "card.replaced",
        key=member.member_id,
        payload={"member_id": member.member_id, "old_card_number": old.card_number, "new_card_number": new.card_number},
    )
    return replaced, new


async def list_member_cards(session: AsyncSession, member_id: str) -> list[Card]:
    await get_member(session, member_id)
    return await store.member_cards(session, member_id)


def parse_card_type(code: str, name: str, validity_days: int) -> CardType:
    violations = Violations()
    violations.check(is_valid_code(code), "card_type.code", "lower case letters, digits, '_' or '-', up to 32")
    violations.check(bool(name.strip()), "card_type.name", "required")
    violations.check_length(name, "card_type.name", MAX_NAME_LENGTH)
    violations.check(validity_days >= 0, "card_type.validity_days", "must not be negative")
    violations.raise_if_any()
    return CardType(code, name.strip(), validity_days)


async def set_card_type(session: AsyncSession, card_type: CardType) -> CardType:
    await store.put_card_type(session, card_type)
    return card_type


# Card batches --------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOrder:
    card_type: str
    prefix: str
    first_sequence: int
    count: int
    sequence_digits: int


def parse_batch_order(card_type: str, prefix: str, first: int, count: int, digits: int) -> BatchOrder:
    violations = Violations()
    violations.check(prefix.isdigit() and 1 <= len(prefix) <= 8, "prefix", "1 to 8 digits")
    violations.check(1 <= count <= MAX_BATCH_COUNT, "count", f"1 to {MAX_BATCH_COUNT:,}")
    violations.check(first >= 0, "first_sequence", "must not be negative")
    violations.check(
        digits >= 1 and len(prefix) + digits + 1 <= MAX_CARD_NUMBER_LENGTH,
        "sequence_digits",
        f"positive, with the prefix and check digit at most {MAX_CARD_NUMBER_LENGTH} digits",
    )
    if 1 <= digits <= MAX_CARD_NUMBER_LENGTH:
        violations.check(first + count <= 10**digits, "count", f"the range must fit in {digits} digits")
    if card_type:
        violations.check(is_valid_code(card_type), "card_type", "lower case letters, digits, '_' or '-', up to 32")
    violations.raise_if_any()
    return BatchOrder(card_type or DEFAULT_CARD_TYPE, prefix, first, count, digits)


async def order_card_batch(session: AsyncSession, order: BatchOrder) -> store.CardBatch:
    """Records a batch for the emission job; ranges of one prefix never overlap."""
    await _card_type(session, order.card_type)
    for other in await store.batches_of_prefix(session, order.prefix, order.sequence_digits):
        if ranges_overlap(order.first_sequence, order.count, other.first_sequence, other.count):
            raise FailedPrecondition(
                "CARD_RANGE_OVERLAPS", f"the range overlaps batch {other.batch_id}", {"batch_id": other.batch_id}
            )
    batch = store.CardBatch(
        batch_id=str(uuid.uuid4()),
        card_type=order.card_type,
        prefix=order.prefix,
        first_sequence=order.first_sequence,
        count=order.count,
        sequence_digits=order.sequence_digits,
        emitted=0,
        skipped=0,
        status=BATCH_PENDING,
        created_at=utcnow(),
    )
    await store.add_batch(session, batch)
    return batch


async def get_card_batch(session: AsyncSession, batch_id: str) -> store.CardBatch:
    batch = await store.find_batch(session, batch_id)
    if batch is None:
        raise NotFound("CARD_BATCH_NOT_FOUND", f"no card batch {batch_id!r}")
    return batch


async def emit_next_chunk(session: AsyncSession, chunk: int) -> tuple[store.CardBatch, int] | None:
    """Writes the next `chunk` numbers of the oldest unfinished batch and its progress in
    the same transaction, so a crash resumes where the last commit ended. Returns the batch
    and how many numbers this chunk handled; None when no batch is waiting."""
    batch = await store.claim_pending_batch(session, BATCH_PENDING)
    if batch is None:
        return None
    done = batch.emitted + batch.skipped
    size = min(chunk, batch.count - done)
    numbers = list(batch_card_numbers(batch.prefix, batch.first_sequence + done, size, batch.sequence_digits))
    written = await store.insert_stock_cards(session, numbers, batch.card_type, batch.batch_id, utcnow())
    emitted, skipped = batch.emitted + written, batch.skipped + size - written
    status = BATCH_DONE if emitted + skipped == batch.count else BATCH_PENDING
    await store.record_batch_progress(session, batch.batch_id, emitted, skipped, status)
    return dataclasses.replace(batch, emitted=emitted, skipped=skipped, status=status), size


# Identification --------------------------------------------------------------------


@dataclass(frozen=True)
class Identification:
    member: Member
    card_number: str
    card_type: str
    segments: tuple[str, ...]


def _identified(identity: store.Identity) -> Identification:
    if identity.member.status is MemberStatus.BLOCKED:
        raise FailedPrecondition("MEMBER_BLOCKED", "the member is blocked")
    card = identity.card
    return Identification(
        identity.member, card.card_number if card else "", card.card_type if card else "", identity.segments
    )


async def identify_by_card(session: AsyncSession, card_number: str) -> Identification:
    found = await store.identity_by_card(session, card_number)
    if found is None:
        raise NotFound("CARD_NOT_FOUND", "no card with this number")
    if isinstance(found, Card):
        raise FailedPrecondition("CARD_NOT_ISSUED", "the card was never issued")
    card = found.card
    assert card is not None
    if card.status is not CardStatus.ACTIVE:
        raise FailedPrecondition(f"CARD_{card.status.value.upper()}", f"the card is {card.status.value}")
    if card.expires_at is not None and card.expires_at <= utcnow():
        raise FailedPrecondition("CARD_EXPIRED", "the card is expired")
    return _identified(found)


async def identify_by_phone(session: AsyncSession, phone: str) -> Identification:
    found = await store.identity_by_phone(session, phone)
    if found is not None and found.member.merged_into:
        # A merged duplicate keeps its phone, so the phone goes on identifying the survivor.
        found = await store.identity_by_id(session, found.member.merged_into)
    if found is None:
        raise NotFound("MEMBER_NOT_FOUND", "no member with this phone")
    return _identified(found)


def check_qr_token(token: str, secret: bytes) -> str:
    """The member id a genuine, unexpired token names."""
    try:
        return verify_qr_token(secret, token, utcnow())
    except InvalidToken as error:
        violations = Violations()
        violations.add("qr_token", str(error))
        violations.raise_if_any()
        raise
    except ExpiredToken as error:
        raise FailedPrecondition("QR_TOKEN_EXPIRED", str(error)) from None


async def identify_by_member_id(session: AsyncSession, member_id: str) -> Identification:
    found = await store.identity_by_id(session, member_id)
    if found is None:
        raise NotFound("MEMBER_NOT_FOUND", f"no member {member_id!r}")
    return _identified(found)


async def issue_qr_token(session: AsyncSession, member_id: str, secret: bytes, ttl: timedelta) -> tuple[str, datetime]:
    member = await get_member(session, member_id)
    if member.status is MemberStatus.BLOCKED:
        raise FailedPrecondition("MEMBER_BLOCKED", "the member is blocked")
    expires_at = utcnow() + ttl
    return sign_qr_token(secret, member.member_id, expires_at), expires_at


# Tiers and purchases ---------------------------------------------------------------


def parse_tier_definition(definition: TierDefinition) -> TierDefinition:
    violations = Violations()
    violations.check(is_valid_code(definition.code), "tier.code", "lower case letters, digits, '_' or '-', up to 32")
    violations.check(definition.code != DEFAULT_TIER, "tier.code", f"{DEFAULT_TIER!r} is the built-in lowest tier")
    violations.check(bool(definition.name.strip()), "tier.name", "required")
    violations.check_length(definition.name, "tier.name", MAX_NAME_LENGTH)
    violations.check(definition.rank > 0, "tier.rank", "must be positive (0 is the basic tier)")
    violations.check(definition.spend_threshold_minor >= 0, "tier.spend_threshold_minor", "must not be negative")
    violations.check(definition.points_threshold >= 0, "tier.points_threshold", "must not be negative")
    violations.check(0 <= definition.window_months <= 120, "tier.window_months", "0 (all time) to 120")
    violations.check(
        definition.calendar_period is CalendarPeriod.NONE or definition.window_months == 0,
        "tier.window_months",
        "must be 0 with a calendar_period",
    )
    violations.check(definition.duration_days >= 0, "tier.duration_days", "must not be negative")
    violations.check(
        definition.downgrade_after_inactive_days >= 0, "tier.downgrade_after_inactive_days", "must not be negative"
    )
    violations.raise_if_any()
    return dataclasses.replace(definition, name=definition.name.strip())


async def set_tier_definition(session: AsyncSession, definition: TierDefinition) -> TierDefinition:
    for other in await store.list_tier_definitions(session):
        if other.rank == definition.rank and other.code != definition.code:
            raise FailedPrecondition("TIER_RANK_TAKEN", f"tier {other.code!r} has rank {other.rank}")
    await store.put_tier_definition(session, definition)
    return definition


async def evaluate_member_tier(session: AsyncSession, member_id: str, now: datetime) -> Member:
    """Re-decides the member's tier from their purchases as of `now`; a change is written
    to the tier history with a tier.changed event."""
    member = await get_member(session, member_id, for_update=True)
    definitions = await store.list_tier_definitions(session)
    progress: dict[str, int] = {}
    for definition in definitions:
        spend, points = await store.totals_since(session, member_id, window_start(definition, now))
        progress[definition.code] = points if definition.metric is TierMetric.POINTS else spend
    last_purchase = (await store.purchase_counts(session, member_id, SALE)).last_at
    decision = evaluate_tier(member.tier, member.tier_expires_at, definitions, progress, last_purchase, now)
    if decision is None:
        return member
    changed = dataclasses.replace(member, tier=decision.tier, tier_expires_at=decision.expires_at)
    await store.save_member(session, changed)
    if decision.reason is not None:
        await store.add_tier_change(session, member_id, member.tier, decision.tier, decision.reason, now)
        await add_event(
            session,
            store.outbox,
            "tier.changed",
            key=member_id,
            payload={
                "member_id": member_id,
                "old_tier": member.tier,
                "new_tier": decision.tier,
                "reason": decision.reason,
            },
        )
    return changed


async def tier_history(session: AsyncSession, member_id: str) -> list[store.TierChange]:
    await get_member(session, member_id)
    return await store.tier_history(session, member_id)


def _event_time(payload: dict[str, Any], field: str, fallback: datetime) -> datetime:
    raw = payload.get(field)
    if not raw:
        return fallback
    moment = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=fallback.tzinfo)


async def handle_gateway_event(session: AsyncSession, event: Event, now: datetime) -> str | None:
    """Records a receipt or return of the gateway's stream once and re-evaluates the
    member's tier; returns the member counted, None when the event was a redelivery, of
    another type, or of no known member."""
    if not await first_delivery(session, store.inbox, GATEWAY_CONSUMER, event.event_id):
        return None
    payload = event.payload
    member_id = str(payload.get("member_id") or "")
    if event.event_type == "cheque.committed":
        key = f"{payload['terminal_id']}/{payload['receipt_number']}"
        kind, amount, points = SALE, int(payload["paid_minor"]), int(payload.get("points") or 0)
        occurred_at = _event_time(payload, "receipt_time", event.occurred_at)
    elif event.event_type == "cheque.returned":
        key = f"{payload['terminal_id']}/{payload['receipt_number']}/{payload['return_id']}"
        kind, amount = RETURN, -int(payload["returned_minor"])
        points = -int(payload.get("points_taken_back") or 0)
        occurred_at = _event_time(payload, "return_time", event.occurred_at)
    else:
        return None
    if not member_id or await store.find_member(session, member_id) is None:
        # A receipt without a customer, or of a member this service does not know.
        log.info("gateway event %s has no known member; not counted", event.event_id)
        return None
    if not await store.add_purchase(session, key, member_id, kind, amount, occurred_at, points):
        return None
    await evaluate_member_tier(session, member_id, now)
    return member_id


@dataclass(frozen=True)
class Statistics:
    purchase_count: int
    total_spend_minor: int
    spend_last_30_days_minor: int
    spend_last_365_days_minor: int
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    points_earned: int


async def statistics(session: AsyncSession, member_id: str, now: datetime) -> Statistics:
    await get_member(session, member_id)
    counts = await store.purchase_counts(session, member_id, SALE)
    total_spend, points_earned = await store.totals_since(session, member_id, None)
    return Statistics(
        purchase_count=counts.count,
        total_spend_minor=total_spend,
        points_earned=points_earned,
        spend_last_30_days_minor=await store.spend_since(session, member_id, now - timedelta(days=30)),
        spend_last_365_days_minor=await store.spend_since(session, member_id, now - timedelta(days=365)),
        first_purchase_at=counts.first_at,
        last_purchase_at=counts.last_at,
    )


# Households ------------------------------------------------------------------------


async def _household(session: AsyncSession, household_id: str, for_update: bool = False) -> store.Household:
    household = await store.find_household(session, household_id, for_update)
    if household is None:
        raise NotFound("HOUSEHOLD_NOT_FOUND", f"no household {household_id!r}")
    return household


async def _join(session: AsyncSession, member: Member, household_id: str) -> None:
    if member.household_id:
        raise FailedPrecondition(
            "ALREADY_IN_HOUSEHOLD", "the member is in a household already", {"household_id": member.household_id}
        )
    if member.status is MemberStatus.BLOCKED:
        raise FailedPrecondition("MEMBER_BLOCKED", "the member is blocked")
    await store.save_member(session, dataclasses.replace(member, household_id=household_id))
    await add_event(
        session,
        store.outbox,
        "household.joined",
        key=member.member_id,
        payload={"household_id": household_id, "member_id": member.member_id},
    )


async def create_household(session: AsyncSession, owner_member_id: str, name: str) -> store.Household:
    owner = await _live_member(session, owner_member_id)
    household_id = str(uuid.uuid4())
    await store.add_household(session, household_id, name.strip(), owner.member_id, utcnow())
    await _join(session, owner, household_id)
    return await _household(session, household_id)


async def join_household(session: AsyncSession, household_id: str, member_id: str) -> store.Household:
    await _household(session, household_id, for_update=True)
    await _join(session, await _live_member(session, member_id), household_id)
    return await _household(session, household_id)


async def _leave(session: AsyncSession, member: Member) -> Member:
    """The pooled points stay with the household (they were earned together and the others
    keep spending them); the member's own account, keyed by their id, is theirs again."""
    household_id = member.household_id
    left = dataclasses.replace(member, household_id=None)
    await store.save_member(session, left)
    await add_event(
        session,
        store.outbox,
        "household.left",
        key=member.member_id,
        payload={"household_id": household_id, "member_id": member.member_id},
    )
    return left


async def leave_household(session: AsyncSession, member_id: str) -> Member:
    member = await _live_member(session, member_id)
    if not member.household_id:
        raise FailedPrecondition("NOT_IN_HOUSEHOLD", "the member is in no household")
    return await _leave(session, member)


async def get_household(session: AsyncSession, household_id: str) -> store.Household:
    return await _household(session, household_id)


def check_invitation(member_id: str, phone: str, valid_days: int) -> str:
    """The invitee's normalised phone ("" when invited by id); exactly one must be given."""
    violations = Violations()
    violations.check(bool(member_id) != bool(phone), "member_id", "give member_id or phone, not both")
    violations.check(
        0 <= valid_days <= MAX_INVITATION_DAYS, "valid_days", f"1 to {MAX_INVITATION_DAYS}, or 0 for the default"
    )
    normal = ""
    if phone:
        try:
            normal = normalize_phone(phone)
        except InvalidIdentifier as error:
            violations.add("phone", str(error))
    violations.raise_if_any()
    return normal


def _invitation_as_of(invitation: store.Invitation, now: datetime) -> store.Invitation:
    """A pending invitation past its end reads as expired (nothing needs to sweep them)."""
    if invitation.status == INVITATION_PENDING and invitation.expires_at <= now:
        return dataclasses.replace(invitation, status=INVITATION_EXPIRED)
    return invitation


async def invite_to_household(
    session: AsyncSession, household_id: str, invited_by: str, member_id: str, phone: str, valid_days: int
) -> store.Invitation:
    """A pending invitation of a member (by id or phone) from a member of the household."""
    household = await _household(session, household_id, for_update=True)
    if invited_by not in household.member_ids:
        raise FailedPrecondition("INVITER_NOT_IN_HOUSEHOLD", "only a member of the household can invite")
    invitee = await store.find_member_by_phone(session, phone) if phone else await store.find_member(session, member_id)
    if invitee is None:
        raise NotFound("MEMBER_NOT_FOUND", "no member with this id or phone")
    # A merged duplicate's phone stands for its survivor.
    invitee = await _live_member(session, invitee.merged_into or invitee.member_id)
    if invitee.household_id:
        raise FailedPrecondition(
            "ALREADY_IN_HOUSEHOLD", "the member is in a household already", {"household_id": invitee.household_id}
        )
    now = utcnow()
    if await store.pending_invitation(session, household_id, invitee.member_id, INVITATION_PENDING, now):
        raise AlreadyExists("INVITATION_PENDING", "the member has an open invitation to this household")
    invitation = store.Invitation(
        invitation_id=str(uuid.uuid4()),
        household_id=household_id,
        member_id=invitee.member_id,
        invited_by=invited_by,
        status=INVITATION_PENDING,
        created_at=now,
        expires_at=now + timedelta(days=valid_days or DEFAULT_INVITATION_DAYS),
        decided_at=None,
    )
    await store.add_invitation(session, invitation)
    await add_event(
        session,
        store.outbox,
        "household.invited",
        key=invitee.member_id,
        payload={
            "invitation_id": invitation.invitation_id,
            "household_id": household_id,
            "member_id": invitee.member_id,
            "invited_by": invited_by,
        },
    )
    return invitation


async def _open_invitation(session: AsyncSession, invitation_id: str, now: datetime) -> store.Invitation:
    found = await store.find_invitation(session, invitation_id, for_update=True)
    if found is None:
        raise NotFound("INVITATION_NOT_FOUND", f"no invitation {invitation_id!r}")
    invitation = _invitation_as_of(found, now)
    if invitation.status != INVITATION_PENDING:
        raise FailedPrecondition(f"INVITATION_{invitation.status.upper()}", f"the invitation is {invitation.status}")
    return invitation


async def accept_invitation(session: AsyncSession, invitation_id: str) -> tuple[store.Invitation, store.Household]:
    """The invited member joins the household, as JoinHousehold would have them."""
    now = utcnow()
    invitation = await _open_invitation(session, invitation_id, now)
    household = await join_household(session, invitation.household_id, invitation.member_id)
    await store.decide_invitation(session, invitation_id, INVITATION_ACCEPTED, now)
    return dataclasses.replace(invitation, status=INVITATION_ACCEPTED, decided_at=now), household


async def decline_invitation(session: AsyncSession, invitation_id: str) -> store.Invitation:
    now = utcnow()
    invitation = await _open_invitation(session, invitation_id, now)
    await store.decide_invitation(session, invitation_id, INVITATION_DECLINED, now)
    return dataclasses.replace(invitation, status=INVITATION_DECLINED, decided_at=now)


async def list_invitations(session: AsyncSession, member_id: str, household_id: str) -> list[store.Invitation]:
    violations = Violations()
    violations.check(bool(member_id) or bool(household_id), "member_id", "give member_id or household_id")
    violations.raise_if_any()
    now = utcnow()
    return [_invitation_as_of(item, now) for item in await store.list_invitations(session, member_id, household_id)]


# Segments ------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    code: str
    name: str
    size: int
    expression: str = ""


async def _segment(session: AsyncSession, code: str) -> Segment:
    name = await store.find_segment_name(session, code)
    if name is None:
        raise NotFound("SEGMENT_NOT_FOUND", f"no segment {code!r}")
    return Segment(code, name, await store.segment_size(session, code), await store.segment_expression(session, code))


def check_segment_expression(expression: str, attributes: Sequence[AttributeDefinition] = ()) -> None:
    """The expression compiles and is a condition on a sample member holding a value of
    every attribute in `attributes`."""
    violations = Violations()
    violations.check_length(expression, "expression", MAX_EXPRESSION_LENGTH)
    violations.raise_if_any()
    if expression.strip():
        try:
            compile_segment(expression, attributes)
        except SegmentExpressionError as error:
            violations.add("expression", str(error))
    violations.raise_if_any()


async def create_segment(session: AsyncSession, code: str, name: str, expression: str = "") -> Segment:
    if expression.strip():
        check_segment_expression(expression, await store.list_attribute_definitions(session))
    if await store.find_segment_name(session, code) is not None:
        raise AlreadyExists("SEGMENT_EXISTS", f"segment {code!r} exists")
    await store.add_segment(session, code, name.strip(), utcnow(), expression.strip())
    return Segment(code, name.strip(), 0, expression.strip())


async def _static_segment(session: AsyncSession, code: str) -> Segment:
    segment = await _segment(session, code)
    if segment.expression:
        raise FailedPrecondition("SEGMENT_IS_DYNAMIC", "a dynamic segment's members come from its expression")
    return segment


async def recompute_segment(session: AsyncSession, code: str, expression: str, facts: Sequence[MemberFacts]) -> int:
    """Makes the segment's members exactly the members matching its expression; each change
    is a `segment.joined` or `segment.left` event. Returns how many members changed."""
    now = utcnow()
    program = compile_segment(expression, await store.list_attribute_definitions(session))
    # Under the lock, a second replica's run reads the first one's result and repeats no event.
    await store.lock_segment(session, code)
    matching = {member.member_id for member in facts if in_segment(program, member, now)}
    current = await store.segment_member_ids(session, code)
    joined, left = sorted(matching - current), sorted(current - matching)
    await store.add_segment_members(session, code, set(joined))
    await store.remove_segment_members(session, code, left)
    for event_type, member_ids in (("segment.joined", joined), ("segment.left", left)):
        for member_id in member_ids:
            await add_event(
                session, store.outbox, event_type, key=member_id, payload={"segment_code": code, "member_id": member_id}
            )
    return len(joined) + len(left)


async def recompute_rfm(session: AsyncSession, facts: Sequence[MemberFacts]) -> int:
    """Scores every member who bought something; returns how many were scored."""
    scores = rfm_scores(facts, utcnow())
    await store.save_rfm(session, scores)
    return len(scores)


def check_segment_members(member_ids: Sequence[str], phones: Sequence[str]) -> list[str]:
    """The normalised phones; every id and phone is checked."""
    violations = Violations()
    violations.check(
        len(member_ids) + len(phones) <= MAX_SEGMENT_BATCH, "member_ids", f"at most {MAX_SEGMENT_BATCH} per call"
    )
    for index, member_id in enumerate(member_ids):
        violations.check(0 < len(member_id) <= MAX_ID_LENGTH, f"member_ids[{index}]", "a member id")
    normal: list[str] = []
    for index, phone in enumerate(phones):
        try:
            normal.append(normalize_phone(phone))
        except InvalidIdentifier as error:
            violations.add(f"phones[{index}]", str(error))
    violations.raise_if_any()
    return normal


async def add_segment_members(
    session: AsyncSession, code: str, member_ids: Sequence[str], phones: Sequence[str]
) -> tuple[Segment, int, int]:
    """Adds members by id and by phone; returns the segment, how many were added and how
    many ids and phones matched no member."""
    await _static_segment(session, code)
    known = await store.existing_member_ids(session, set(member_ids))
    by_phone = await store.member_ids_by_phones(session, set(phones))
    unknown = len(set(member_ids) - known) + len(set(phones)) - len(by_phone)
    added = await store.add_segment_members(session, code, known | by_phone)
    return await _segment(session, code), added, unknown


async def remove_segment_members(session: AsyncSession, code: str, member_ids: Sequence[str]) -> Segment:
    await _static_segment(session, code)
    await store.remove_segment_members(session, code, member_ids)
    return await _segment(session, code)


async def get_segment(session: AsyncSession, code: str) -> Segment:
    return await _segment(session, code)


# Partners ------------------------------------------------------------------------


@dataclass(frozen=True)
class Partner:
    partner_id: str
    name: str
    stores: tuple[store.Store, ...]

    @property
    def store_ids(self) -> tuple[str, ...]:
        return tuple(item.store_id for item in self.stores)


MAX_REGION_LENGTH = 64


def parse_partner(partner_id: str, name: str, store_ids: Sequence[str], stores: Sequence[store.Store] = ()) -> Partner:
    """Checks a partner: stores come bare (store_ids) or with their details (stores)."""
    violations = Violations()
    violations.check(0 < len(partner_id) <= MAX_ID_LENGTH, "partner.partner_id", f"1 to {MAX_ID_LENGTH} characters")
    violations.check(bool(name.strip()), "partner.name", "required")
    violations.check_length(name, "partner.name", MAX_NAME_LENGTH)
    for index, store_id in enumerate(store_ids):
        violations.check(0 < len(store_id) <= MAX_ID_LENGTH, f"partner.store_ids[{index}]", "a store id")
    terminals: list[str] = []
    for index, item in enumerate(stores):
        where = f"partner.stores[{index}]"
        violations.check(0 < len(item.store_id) <= MAX_ID_LENGTH, f"{where}.store_id", "a store id")
        violations.check_length(item.region, f"{where}.region", MAX_REGION_LENGTH)
        violations.check(
            not item.time_zone or is_valid_time_zone(item.time_zone),
            f"{where}.time_zone",
            "an IANA time zone such as Europe/Moscow",
        )
        for position, terminal_id in enumerate(item.terminal_ids):
            violations.check(
                0 < len(terminal_id) <= MAX_ID_LENGTH, f"{where}.terminal_ids[{position}]", "a terminal id"
            )
        terminals.extend(item.terminal_ids)
    every_store = [*store_ids, *(item.store_id for item in stores)]
    violations.check(len(set(every_store)) == len(every_store), "partner.store_ids", "a store is listed twice")
    violations.check(len(set(terminals)) == len(terminals), "partner.stores", "a terminal is listed twice")
    violations.raise_if_any()
    bare = [store.Store(store_id, "", "", ()) for store_id in store_ids]
    detailed = [dataclasses.replace(item, terminal_ids=tuple(sorted(item.terminal_ids))) for item in stores]
    return Partner(partner_id, name.strip(), tuple(sorted([*bare, *detailed], key=lambda item: item.store_id)))


async def set_partner(session: AsyncSession, partner: Partner) -> Partner:
    """Replaces the partner's stores and registers; a store or a terminal of another
    partner is refused."""
    for store_id, owner in (await store.store_owners(session, partner.store_ids)).items():
        if owner != partner.partner_id:
            raise FailedPrecondition(
                "STORE_OWNED_BY_OTHER_PARTNER", f"store {store_id!r} belongs to {owner!r}", {"partner_id": owner}
            )
    terminal_ids = [terminal_id for item in partner.stores for terminal_id in item.terminal_ids]
    for terminal_id, owner in (await store.terminal_owners(session, terminal_ids)).items():
        if owner != partner.partner_id:
            raise FailedPrecondition(
                "TERMINAL_OWNED_BY_OTHER_PARTNER",
                f"terminal {terminal_id!r} belongs to a store of {owner!r}",
                {"partner_id": owner},
            )
    await store.put_partner(session, partner.partner_id, partner.name, partner.stores)
    return partner


async def get_partner(session: AsyncSession, partner_id: str) -> Partner:
    found = await store.find_partner(session, partner_id)
    if found is None:
        raise NotFound("PARTNER_NOT_FOUND", f"no partner {partner_id!r}")
    return Partner(partner_id, found[0], tuple(found[1]))


async def resolve_terminal(session: AsyncSession, terminal_id: str) -> store.Terminal:
    terminal = await store.find_terminal(session, terminal_id)
    if terminal is None:
        raise NotFound("TERMINAL_NOT_FOUND", f"no store has a register {terminal_id!r}")
    return terminal


# Custom attributes -----------------------------------------------------------------


def parse_attribute_definition(
    code: str, name: str, kind: AttributeType | None, allowed_values: Sequence[str]
) -> AttributeDefinition:
    violations = Violations()
    violations.check(is_valid_code(code), "definition.code", "lower case letters, digits, '_' or '-', up to 32")
    violations.check(bool(name.strip()), "definition.name", "required")
    violations.check_length(name, "definition.name", MAX_NAME_LENGTH)
    violations.check(kind is not None, "definition.type", "required")
    if kind is AttributeType.ENUM:
        violations.check(
            0 < len(allowed_values) <= MAX_ALLOWED_VALUES,
            "definition.allowed_values",
            f"1 to {MAX_ALLOWED_VALUES} values for an enum",
        )
        violations.check(
            len(set(allowed_values)) == len(allowed_values), "definition.allowed_values", "a value is listed twice"
        )
        for index, value in enumerate(allowed_values):
            violations.check(
                0 < len(value) <= MAX_ATTRIBUTE_TEXT and all(ord(char) >= 32 for char in value),
                f"definition.allowed_values[{index}]",
                f"1 to {MAX_ATTRIBUTE_TEXT} printable characters",
            )
    else:
        violations.check(not allowed_values, "definition.allowed_values", "only an enum has allowed values")
    violations.raise_if_any()
    assert kind is not None
    return AttributeDefinition(code, name.strip(), kind, tuple(allowed_values))


async def set_attribute_definition(session: AsyncSession, definition: AttributeDefinition) -> AttributeDefinition:
    """Defines an attribute, or renames it and changes an enum's allowed values (values set
    before stay as they are); its type is fixed."""
    existing = await store.find_attribute_definition(session, definition.code)
    if existing is not None and existing.type is not definition.type:
        raise FailedPrecondition(
            "ATTRIBUTE_TYPE_FIXED", f"attribute {definition.code!r} is of type {existing.type.value}"
        )
    await store.put_attribute_definition(session, definition)
    return definition
