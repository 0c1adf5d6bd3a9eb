"""Members' use cases, each given the session of its unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.runtime.errors import FailedPrecondition, NotFound, Violations
from loyalty.runtime.outbox import add_event
from loyalty.runtime.timeutil import utcnow
from services.members import store
from services.members.domain import (
    DEFAULT_TIER,
    Card,
    CardStatus,
    InvalidIdentifier,
    Member,
    MemberStatus,
    is_valid_card_number,
    new_card_number,
    normalize_email,
    normalize_phone,
)

MAX_NAME_LENGTH = 100
MAX_REFERRAL_CODE_LENGTH = 64
CARD_NUMBER_ATTEMPTS = 5


@dataclass(frozen=True)
class Registration:
    phone: str
    email: str | None
    first_name: str
    last_name: str
    channel: int
    referral_code: str | None


def parse_registration(
    phone: str, email: str, first_name: str, last_name: str, channel: int, referral_code: str
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
    violations.check(len(first_name) <= MAX_NAME_LENGTH, "first_name", f"at most {MAX_NAME_LENGTH} characters")
    violations.check(len(last_name) <= MAX_NAME_LENGTH, "last_name", f"at most {MAX_NAME_LENGTH} characters")
    violations.check_length(referral_code, "referral_code", MAX_REFERRAL_CODE_LENGTH)
    violations.raise_if_any()
    assert normal_phone is not None
    return Registration(
        normal_phone, normal_email, first_name.strip(), last_name.strip(), channel, referral_code or None
    )


def parse_phone(phone: str, field: str = "phone") -> str:
    try:
        return normalize_phone(phone)
    except InvalidIdentifier as error:
        violations = Violations()
        violations.add(field, str(error))
        violations.raise_if_any()
        raise


async def register_member(session: AsyncSession, registration: Registration) -> tuple[Member, bool]:
    """Returns the member and whether it was created; an existing phone or e-mail wins."""
    existing = await store.find_member_by_phone(session, registration.phone)
    if existing is None and registration.email:
        existing = await store.find_member_by_email(session, registration.email)
    if existing is not None:
        return existing, False
    member = Member(
        member_id=str(uuid.uuid4()),
        phone=registration.phone,
        email=registration.email,
        first_name=registration.first_name,
        last_name=registration.last_name,
        status=MemberStatus.ACTIVE,
        tier=DEFAULT_TIER,
        registration_channel=registration.channel,
        created_at=utcnow(),
    )
    await store.add_member(session, member, registration.referral_code)
    await add_event(
        session,
        store.outbox,
        "member.registered",
        key=member.member_id,
        payload={
            "member_id": member.member_id,
            "first_name": member.first_name,
            "channel": member.registration_channel,
            "referral_code": registration.referral_code,
        },
    )
    return member, True


async def get_member(session: AsyncSession, member_id: str) -> Member:
    member = await store.find_member(session, member_id)
    if member is None:
        raise NotFound("MEMBER_NOT_FOUND", f"no member {member_id!r}")
    return member


async def issue_card(session: AsyncSession, member_id: str, card_number: str) -> Card:
    member = await get_member(session, member_id)
    if member.status is not MemberStatus.ACTIVE:
        raise FailedPrecondition("MEMBER_BLOCKED", "cards are not issued to a blocked member")
    if card_number:
        if await store.find_card(session, card_number) is not None:
            raise FailedPrecondition("CARD_NUMBER_TAKEN", f"card {card_number} already belongs to a member")
    else:
        for _attempt in range(CARD_NUMBER_ATTEMPTS):
            card_number = new_card_number()
            if await store.find_card(session, card_number) is None:
                break
        else:
            raise FailedPrecondition("CARD_NUMBERS_EXHAUSTED", "could not find a free card number")
    card = Card(card_number, member.member_id, CardStatus.ACTIVE, utcnow())
    await store.add_card(session, card)
    return card


def check_card_number(card_number: str, field: str = "card_number") -> None:
    violations = Violations()
    violations.check(is_valid_card_number(card_number), field, "digits with a valid check digit")
    violations.raise_if_any()


@dataclass(frozen=True)
class Identification:
    member: Member
    card_number: str


async def identify_by_card(session: AsyncSession, card_number: str) -> Identification:
    card = await store.find_card(session, card_number)
    if card is None:
        raise NotFound("CARD_NOT_FOUND", "no card with this number")
    if card.status is not CardStatus.ACTIVE:
        raise FailedPrecondition("CARD_BLOCKED", "the card is blocked")
    return Identification(await get_member(session, card.member_id), card.card_number)


async def identify_by_phone(session: AsyncSession, phone: str) -> Identification:
    member = await store.find_member_by_phone(session, phone)
    if member is None:
        raise NotFound("MEMBER_NOT_FOUND", "no member with this phone")
    return Identification(member, "")
