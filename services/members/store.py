"""Members' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    case,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.inbox import define_inbox_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.members.domain import (
    DEFAULT_CARD_TYPE,
    AttributeDefinition,
    AttributeScalar,
    AttributeType,
    CalendarPeriod,
    Card,
    CardStatus,
    CardType,
    Consent,
    Member,
    MemberFacts,
    MemberStatus,
    Rfm,
    TierDefinition,
    TierMetric,
    decode_attribute,
    encode_attribute,
    merge_consents,
)


class Base(DeclarativeBase):
    pass


class MemberRow(Base):
    __tablename__ = "members"
    __table_args__ = (Index("ix_members_own_referral_code", "own_referral_code", unique=True),)

    member_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # NULL for an anonymous card holder and after erasure.
    phone: Mapped[str | None] = mapped_column(String(16), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    tier: Mapped[str] = mapped_column(String(32), index=True)
    registration_channel: Mapped[int] = mapped_column(Integer)
    referral_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    time_zone: Mapped[str] = mapped_column(String(64), default="", server_default="")
    locale: Mapped[str] = mapped_column(String(35), default="", server_default="")
    birth_date: Mapped[str] = mapped_column(String(10), default="", server_default="")
    push_token: Mapped[str] = mapped_column(String(512), default="", server_default="")
    telegram_chat_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    household_id: Mapped[str | None] = mapped_column(String(36), index=True)
    block_reason: Mapped[str] = mapped_column(String(200), default="", server_default="")
    erased_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    tier_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    merged_into: Mapped[str | None] = mapped_column(String(36))
    # Written only by the RFM job; 0 until the member has bought something.
    rfm_recency: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rfm_frequency: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rfm_monetary: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The member's own code to invite others with (referral_code above is the code this
    # member registered with); NULL after erasure.
    own_referral_code: Mapped[str | None] = mapped_column(String(8))
    referred_by: Mapped[str | None] = mapped_column(String(36), index=True)
    # Raised by one atomic UPDATE per registration with the member's code.
    referred_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The last year (in the member's time zone) member.birthday was announced: claimed in the
    # event's transaction, so a birthday is announced once a year whatever runs the job.
    birthday_announced_year: Mapped[int | None] = mapped_column(Integer)
    # When member.profile_completed was announced; set once, never cleared.
    profile_completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    def to_domain(
        self, consents: Sequence[Consent] = (), attributes: dict[str, AttributeScalar] | None = None
    ) -> Member:
        return Member(
            member_id=self.member_id,
            phone=self.phone,
            email=self.email,
            first_name=self.first_name,
            last_name=self.last_name,
            status=MemberStatus(self.status),
            tier=self.tier,
            registration_channel=self.registration_channel,
            created_at=self.created_at,
            time_zone=self.time_zone,
            locale=self.locale,
            birth_date=self.birth_date,
            push_token=self.push_token,
            telegram_chat_id=self.telegram_chat_id,
            household_id=self.household_id,
            block_reason=self.block_reason,
            erased_at=self.erased_at,
            tier_expires_at=self.tier_expires_at,
            consents=tuple(consents),
            merged_into=self.merged_into,
            rfm=Rfm(self.rfm_recency, self.rfm_frequency, self.rfm_monetary) if self.rfm_recency else None,
            attributes=attributes or {},
            referral_code=self.own_referral_code,
            referred_by=self.referred_by,
            referred_count=self.referred_count,
        )


class MemberMergeRow(Base):
    """The audit trail of merges: a duplicate is merged once, into one survivor."""

    __tablename__ = "member_merges"

    duplicate_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    survivor_id: Mapped[str] = mapped_column(String(36), index=True)
    actor: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(String(200))
    cards_moved: Mapped[int] = mapped_column(Integer)
    merged_at: Mapped[datetime] = mapped_column(UtcDateTime())
    segments_moved: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tier_changes_moved: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    consents_moved: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AttributeDefinitionRow(Base):
    __tablename__ = "attribute_definitions"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(8))
    allowed_values: Mapped[list[str]] = mapped_column(JSON)

    def to_domain(self) -> AttributeDefinition:
        return AttributeDefinition(self.code, self.name, AttributeType(self.type), tuple(self.allowed_values))


class MemberAttributeRow(Base):
    __tablename__ = "member_attributes"

    member_id: Mapped[str] = mapped_column(
        ForeignKey("members.member_id", name="fk_member_attributes_member"), primary_key=True
    )
    code: Mapped[str] = mapped_column(
        ForeignKey("attribute_definitions.code", name="fk_member_attributes_definition"), primary_key=True
    )
    # "s" text, "i" integer, "b" bool: the value is kept as text.
    kind: Mapped[str] = mapped_column(String(1))
    value: Mapped[str] = mapped_column(String(500))


class ConsentRow(Base):
    __tablename__ = "consents"

    member_id: Mapped[str] = mapped_column(ForeignKey("members.member_id", name="fk_consents_member"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(String(32))


class CardRow(Base):
    __tablename__ = "cards"

    card_number: Mapped[str] = mapped_column(String(19), primary_key=True)
    # NULL while the card is unissued stock of an emitted batch.
    member_id: Mapped[str | None] = mapped_column(ForeignKey("members.member_id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())
    card_type: Mapped[str] = mapped_column(String(32), default=DEFAULT_CARD_TYPE, server_default=DEFAULT_CARD_TYPE)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    block_reason: Mapped[str] = mapped_column(String(200), default="", server_default="")
    replaced_by: Mapped[str] = mapped_column(String(19), default="", server_default="")
    batch_id: Mapped[str | None] = mapped_column(String(36))

    def to_domain(self) -> Card:
        return Card(
            card_number=self.card_number,
            member_id=self.member_id,
            status=CardStatus(self.status),
            issued_at=self.issued_at,
            card_type=self.card_type,
            expires_at=self.expires_at,
            block_reason=self.block_reason,
            replaced_by=self.replaced_by,
        )


class CardTypeRow(Base):
    __tablename__ = "card_types"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    validity_days: Mapped[int] = mapped_column(Integer)


class CardBatchRow(Base):
    __tablename__ = "card_batches"

    batch_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    card_type: Mapped[str] = mapped_column(String(32))
    prefix: Mapped[str] = mapped_column(String(8))
    first_sequence: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)
    sequence_digits: Mapped[int] = mapped_column(Integer)
    emitted: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class PurchaseRow(Base):
    """One receipt (positive) or return (negative) of a member, from the gateway's events."""

    __tablename__ = "purchases"
    __table_args__ = (Index("ix_purchases_member_time", "member_id", "occurred_at"),)

    # terminal/receipt for a sale, terminal/receipt/return id for a return: a redelivered
    # event finds its row and changes nothing.
    purchase_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(8))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Points earned by a receipt; minus the points taken back by a return.
    points: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class TierDefinitionRow(Base):
    __tablename__ = "tier_definitions"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    rank: Mapped[int] = mapped_column(Integer)
    spend_threshold_minor: Mapped[int] = mapped_column(BigInteger)
    window_months: Mapped[int] = mapped_column(Integer)
    duration_days: Mapped[int] = mapped_column(Integer)
    downgrade_after_inactive_days: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(8), default=TierMetric.SPEND.value, server_default="spend")
    points_threshold: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    calendar_period: Mapped[str] = mapped_column(String(8), default="", server_default="")

    def to_domain(self) -> TierDefinition:
        return TierDefinition(
            self.code,
            self.name,
            self.rank,
            self.spend_threshold_minor,
            self.window_months,
            self.duration_days,
            self.downgrade_after_inactive_days,
            TierMetric(self.metric),
            self.points_threshold,
            CalendarPeriod(self.calendar_period),
        )


class TierChangeRow(Base):
    __tablename__ = "tier_changes"
    __table_args__ = (Index("ix_tier_changes_member_time", "member_id", "changed_at"),)

    change_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    member_id: Mapped[str] = mapped_column(String(36))
    old_tier: Mapped[str] = mapped_column(String(32))
    new_tier: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32))
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class HouseholdRow(Base):
    __tablename__ = "households"

    household_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    owner_member_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class HouseholdInvitationRow(Base):
    __tablename__ = "household_invitations"

    invitation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    household_id: Mapped[str] = mapped_column(
        ForeignKey("households.household_id", name="fk_household_invitations_household"), index=True
    )
    member_id: Mapped[str] = mapped_column(
        ForeignKey("members.member_id", name="fk_household_invitations_member"), index=True
    )
    invited_by: Mapped[str] = mapped_column(String(36))
    # pending, accepted or declined; a pending one past expires_at reads as expired.
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class SegmentRow(Base):
    __tablename__ = "segments"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # A CEL condition over the member for a dynamic segment, recomputed by a job; empty for
    # a static or external one, whose members are added through the API.
    expression: Mapped[str] = mapped_column(String(2000), default="", server_default="")


class SegmentMemberRow(Base):
    __tablename__ = "segment_members"

    segment_code: Mapped[str] = mapped_column(
        ForeignKey("segments.code", name="fk_segment_members_segment"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(
        ForeignKey("members.member_id", name="fk_segment_members_member"), primary_key=True, index=True
    )


class PartnerRow(Base):
    __tablename__ = "partners"

    partner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class PartnerStoreRow(Base):
    __tablename__ = "partner_stores"

    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    partner_id: Mapped[str] = mapped_column(
        ForeignKey("partners.partner_id", name="fk_partner_stores_partner"), index=True
    )
    region: Mapped[str] = mapped_column(String(64), default="", server_default="")
    time_zone: Mapped[str] = mapped_column(String(64), default="", server_default="")


class StoreRegisterRow(Base):
    """A register (terminal) of a store."""

    __tablename__ = "store_registers"

    terminal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    store_id: Mapped[str] = mapped_column(
        ForeignKey("partner_stores.store_id", name="fk_store_registers_store"), index=True
    )


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)
inbox = define_inbox_table(Base.metadata)

# Members -------------------------------------------------------------------------


async def _consents(session: AsyncSession, member_id: str) -> list[Consent]:
    rows = await session.scalars(select(ConsentRow).where(ConsentRow.member_id == member_id))
    return list(merge_consents((), [Consent(row.channel, row.granted, row.updated_at, row.source) for row in rows]))


async def member_attributes(session: AsyncSession, member_id: str) -> dict[str, AttributeScalar]:
    rows = await session.execute(
        select(MemberAttributeRow.code, MemberAttributeRow.kind, MemberAttributeRow.value).where(
            MemberAttributeRow.member_id == member_id
        )
    )
    return {code: decode_attribute(kind, value) for code, kind, value in rows}


async def _with_consents(session: AsyncSession, row: MemberRow | None) -> Member | None:
    """The member with their consents and attributes."""
    if row is None:
        return None
    return row.to_domain(await _consents(session, row.member_id), await member_attributes(session, row.member_id))


async def find_member(session: AsyncSession, member_id: str, for_update: bool = False) -> Member | None:
    query = select(MemberRow).where(MemberRow.member_id == member_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    return await _with_consents(session, await session.scalar(query))


async def find_member_by_phone(session: AsyncSession, phone: str) -> Member | None:
    return await _with_consents(session, await session.scalar(select(MemberRow).where(MemberRow.phone == phone)))


async def find_member_by_email(session: AsyncSession, email: str) -> Member | None:
    return await _with_consents(session, await session.scalar(select(MemberRow).where(MemberRow.email == email)))


def _segments_of_member() -> ScalarSelect[str | None]:
    return (
        select(func.aggregate_strings(SegmentMemberRow.segment_code, ","))
        .where(SegmentMemberRow.member_id == MemberRow.member_id)
        .scalar_subquery()
    )


def _split_segments(joined: str | None) -> tuple[str, ...]:
    return tuple(sorted(joined.split(","))) if joined else ()


# Attributes travel in one aggregated string: records split by RS, fields by US. Neither
# can occur in a code (a-z0-9_-) or a value (control characters are refused).
_RECORD, _UNIT = "\x1e", "\x1f"


def _attributes_of(member_id: Any) -> ScalarSelect[str | None]:
    return (
        select(
            func.aggregate_strings(
                MemberAttributeRow.code + _UNIT + MemberAttributeRow.kind + _UNIT + MemberAttributeRow.value, _RECORD
            )
        )
        .where(MemberAttributeRow.member_id == member_id)
        .scalar_subquery()
    )


def _split_attributes(joined: str | None) -> dict[str, AttributeScalar]:
    attributes: dict[str, AttributeScalar] = {}
    for record in joined.split(_RECORD) if joined else ():
        code, kind, value = record.split(_UNIT, 2)
        attributes[code] = decode_attribute(kind, value)
    return attributes


@dataclass(frozen=True)
class Identity:
    """What identification needs in one round trip: the member (without consents, with
    attributes), the card presented, and the member's segment codes."""

    member: Member
    card: Card | None
    segments: tuple[str, ...]


async def identity_by_card(session: AsyncSession, card_number: str) -> Card | Identity | None:
    """The card's holder and segments; the bare card when it is unissued; None when unknown."""
    row = (
        await session.execute(
            select(CardRow, MemberRow, _segments_of_member(), _attributes_of(MemberRow.member_id))
            .outerjoin(MemberRow, MemberRow.member_id == CardRow.member_id)
            .where(CardRow.card_number == card_number)
        )
    ).one_or_none()
    if row is None:
        return None
    card_row: CardRow = row[0]
    member_row: MemberRow | None = row[1]
    segments: str | None = row[2]
    if member_row is None:
        return card_row.to_domain()
    return Identity(
        member_row.to_domain(attributes=_split_attributes(row[3])), card_row.to_domain(), _split_segments(segments)
    )


async def _identity_where(session: AsyncSession, condition: ColumnElement[bool]) -> Identity | None:
    row = (
        await session.execute(
            select(MemberRow, _segments_of_member(), _attributes_of(MemberRow.member_id)).where(condition)
        )
    ).one_or_none()
    if row is None:
        return None
    return Identity(row[0].to_domain(attributes=_split_attributes(row[2])), None, _split_segments(row[1]))


async def identity_by_phone(session: AsyncSession, phone: str) -> Identity | None:
    return await _identity_where(session, MemberRow.phone == phone)


async def identity_by_id(session: AsyncSession, member_id: str) -> Identity | None:
    return await _identity_where(session, MemberRow.member_id == member_id)


def _member_columns(member: Member) -> dict[str, object]:
    return {
        "phone": member.phone,
        "email": member.email,
        "first_name": member.first_name,
        "last_name": member.last_name,
        "status": member.status.value,
        "tier": member.tier,
        "time_zone": member.time_zone,
        "locale": member.locale,
        "birth_date": member.birth_date,
        "push_token": member.push_token,
        "telegram_chat_id": member.telegram_chat_id,
        "household_id": member.household_id,
        "block_reason": member.block_reason,
        "erased_at": member.erased_at,
        "tier_expires_at": member.tier_expires_at,
        "merged_into": member.merged_into,
        "own_referral_code": member.referral_code,
    }


async def _write_consents(session: AsyncSession, member: Member) -> None:
    await session.execute(delete(ConsentRow).where(ConsentRow.member_id == member.member_id))
    for consent in member.consents:
        session.add(
            ConsentRow(
                member_id=member.member_id,
                channel=consent.channel,
                granted=consent.granted,
                updated_at=consent.updated_at,
                source=consent.source,
            )
        )


async def add_member(session: AsyncSession, member: Member, referral_code: str | None) -> None:
    """Adds the member; `referral_code` is the code they registered with."""
    session.add(
        MemberRow(
            member_id=member.member_id,
            registration_channel=member.registration_channel,
            referral_code=referral_code,
            created_at=member.created_at,
            referred_by=member.referred_by,
            **_member_columns(member),
        )
    )
    await session.flush()
    await _write_consents(session, member)
    await session.flush()


async def record_referral(session: AsyncSession, member_id: str, referral_code: str, referrer_id: str) -> None:
    """Records who invited a member registered with an anonymous card (the member row exists)."""
    await session.execute(
        update(MemberRow)
        .where(MemberRow.member_id == member_id)
        .values(referral_code=referral_code, referred_by=referrer_id)
    )


async def count_referral(session: AsyncSession, referrer_id: str) -> None:
    """One more member registered with the referrer's code; atomic, so concurrent
    registrations are all counted."""
    await session.execute(
        update(MemberRow).where(MemberRow.member_id == referrer_id).values(referred_count=MemberRow.referred_count + 1)
    )


async def member_by_referral_code(session: AsyncSession, code: str) -> Member | None:
    row = await session.scalar(select(MemberRow).where(MemberRow.own_referral_code == code))
    return await _with_consents(session, row)


async def referral_code_taken(session: AsyncSession, code: str) -> bool:
    return await session.scalar(select(MemberRow.member_id).where(MemberRow.own_referral_code == code)) is not None


async def set_attributes(session: AsyncSession, member_id: str, changes: dict[str, AttributeScalar | None]) -> None:
    """Sets the attributes given a value and deletes those given None."""
    if not changes:
        return
    await session.execute(
        delete(MemberAttributeRow).where(
            MemberAttributeRow.member_id == member_id, MemberAttributeRow.code.in_(list(changes))
        )
    )
    for code, value in changes.items():
        if value is not None:
            kind, text_value = encode_attribute(value)
            session.add(MemberAttributeRow(member_id=member_id, code=code, kind=kind, value=text_value))
    await session.flush()


async def drop_attributes(session: AsyncSession, member_id: str) -> None:
    await session.execute(delete(MemberAttributeRow).where(MemberAttributeRow.member_id == member_id))


async def find_attribute_definition(session: AsyncSession, code: str) -> AttributeDefinition | None:
    row = await session.get(AttributeDefinitionRow, code)
    return row.to_domain() if row else None


async def list_attribute_definitions(session: AsyncSession) -> list[AttributeDefinition]:
    rows = await session.scalars(select(AttributeDefinitionRow).order_by(AttributeDefinitionRow.code))
    return [row.to_domain() for row in rows]


async def put_attribute_definition(session: AsyncSession, definition: AttributeDefinition) -> None:
    await session.merge(
        AttributeDefinitionRow(
            code=definition.code,
            name=definition.name,
            type=definition.type.value,
            allowed_values=list(definition.allowed_values),
        )
    )
    await session.flush()


# Byte-wise search of the stored protobuf answers (bytea / BLOB), not a text LIKE.
_DROP_ANSWERS_POSTGRES = text("DELETE FROM idempotency_keys WHERE position(:needle IN response) > 0")
_DROP_ANSWERS_SQLITE = text("DELETE FROM idempotency_keys WHERE instr(response, :needle) > 0")


async def drop_stored_answers_naming(session: AsyncSession, member_id: str) -> int:
    """Deletes the stored idempotent answers whose bytes hold the member id (every answer
    carrying the member's profile does); returns how many. Scans the key table: erasure is
    rare and the table has no member column."""
    statement = _DROP_ANSWERS_POSTGRES if session.bind.dialect.name == "postgresql" else _DROP_ANSWERS_SQLITE
    result = await session.execute(statement, {"needle": member_id.encode()})
    return int(result.rowcount)  # type: ignore[attr-defined]


async def save_member(session: AsyncSession, member: Member) -> None:
    """Writes every mutable field of the member and replaces its consents."""
    await session.execute(
        update(MemberRow).where(MemberRow.member_id == member.member_id).values(**_member_columns(member))
    )
    await _write_consents(session, member)
    await session.flush()


async def scrub_member_events(session: AsyncSession, member_id: str) -> None:
    """Replaces the payloads of the member's profile events with the bare id, so the outbox
    keeps no personal data of an erased member (unpublished ones go out scrubbed)."""
    await session.execute(
        update(outbox)
        .where(outbox.c.key == member_id, outbox.c.event_type.in_(("member.registered", "member.updated")))
        .values(payload={"member_id": member_id, "erased": True})
    )


async def drop_segment_memberships(session: AsyncSession, member_id: str) -> None:
    await session.execute(delete(SegmentMemberRow).where(SegmentMemberRow.member_id == member_id))


async def move_holdings(session: AsyncSession, duplicate_id: str, survivor_id: str) -> int:
    """Moves the duplicate's cards and purchases to the survivor; returns how many cards moved."""
    moved = await session.execute(
        update(CardRow).where(CardRow.member_id == duplicate_id).values(member_id=survivor_id)
    )
    await session.execute(
        update(PurchaseRow).where(PurchaseRow.member_id == duplicate_id).values(member_id=survivor_id)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]


async def move_static_segments(session: AsyncSession, duplicate_id: str, survivor_id: str) -> int:
    """Puts the survivor in every static segment the duplicate was in and takes the duplicate
    out of them; returns how many memberships the survivor gained. Dynamic segments are left
    to their job (it drops the merged duplicate and judges the survivor on its new totals)."""
    static_codes = select(SegmentRow.code).where(SegmentRow.expression == "")
    codes = set(
        await session.scalars(
            select(SegmentMemberRow.segment_code).where(
                SegmentMemberRow.member_id == duplicate_id, SegmentMemberRow.segment_code.in_(static_codes)
            )
        )
    )
    present = set(
        await session.scalars(
            select(SegmentMemberRow.segment_code).where(
                SegmentMemberRow.member_id == survivor_id, SegmentMemberRow.segment_code.in_(list(codes))
            )
        )
    )
    await session.execute(
        delete(SegmentMemberRow).where(
            SegmentMemberRow.member_id == duplicate_id, SegmentMemberRow.segment_code.in_(list(codes))
        )
    )
    for code in sorted(codes - present):
        session.add(SegmentMemberRow(segment_code=code, member_id=survivor_id))
    await session.flush()
    return len(codes - present)


async def move_tier_history(session: AsyncSession, duplicate_id: str, survivor_id: str) -> int:
    moved = await session.execute(
        update(TierChangeRow).where(TierChangeRow.member_id == duplicate_id).values(member_id=survivor_id)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class MergeCounts:
    """What a merge moved to the survivor, for its audit record."""

    cards: int
    segments: int
    tier_changes: int
    consents: int


async def add_merge(
    session: AsyncSession,
    duplicate_id: str,
    survivor_id: str,
    actor: str,
    reason: str,
    moved: MergeCounts,
    at: datetime,
) -> None:
    session.add(
        MemberMergeRow(
            duplicate_id=duplicate_id,
            survivor_id=survivor_id,
            actor=actor,
            reason=reason,
            cards_moved=moved.cards,
            segments_moved=moved.segments,
            tier_changes_moved=moved.tier_changes,
            consents_moved=moved.consents,
            merged_at=at,
        )
    )
    await session.flush()


# Cards ---------------------------------------------------------------------------


async def find_card(session: AsyncSession, card_number: str, for_update: bool = False) -> Card | None:
    query = select(CardRow).where(CardRow.card_number == card_number)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    row = await session.scalar(query)
    return row.to_domain() if row else None


async def add_card(session: AsyncSession, card: Card) -> None:
    session.add(
        CardRow(
            card_number=card.card_number,
            member_id=card.member_id,
            status=card.status.value,
            issued_at=card.issued_at,
            card_type=card.card_type,
            expires_at=card.expires_at,
            block_reason=card.block_reason,
            replaced_by=card.replaced_by,
        )
    )
    await session.flush()


async def save_card(session: AsyncSession, card: Card) -> None:
    await session.execute(
        update(CardRow)
        .where(CardRow.card_number == card.card_number)
        .values(
            member_id=card.member_id,
            status=card.status.value,
            issued_at=card.issued_at,
            card_type=card.card_type,
            expires_at=card.expires_at,
            block_reason=card.block_reason,
            replaced_by=card.replaced_by,
        )
    )


async def member_cards(session: AsyncSession, member_id: str) -> list[Card]:
    rows = await session.scalars(
        select(CardRow).where(CardRow.member_id == member_id).order_by(CardRow.issued_at, CardRow.card_number)
    )
    return [row.to_domain() for row in rows]


async def find_card_type(session: AsyncSession, code: str) -> CardType | None:
    row = await session.get(CardTypeRow, code)
    return CardType(row.code, row.name, row.validity_days) if row else None


async def put_card_type(session: AsyncSession, card_type: CardType) -> None:
    await session.merge(CardTypeRow(code=card_type.code, name=card_type.name, validity_days=card_type.validity_days))
    await session.flush()


async def list_card_types(session: AsyncSession) -> list[CardType]:
    rows = await session.scalars(select(CardTypeRow).order_by(CardTypeRow.code))
    return [CardType(row.code, row.name, row.validity_days) for row in rows]


# Card batches --------------------------------------------------------------------


@dataclass(frozen=True)
class CardBatch:
    batch_id: str
    card_type: str
    prefix: str
    first_sequence: int
    count: int
    sequence_digits: int
    emitted: int
    skipped: int
    status: str
    created_at: datetime


def _batch(row: CardBatchRow) -> CardBatch:
    return CardBatch(
        row.batch_id,
        row.card_type,
        row.prefix,
        row.first_sequence,
        row.count,
        row.sequence_digits,
        row.emitted,
        row.skipped,
        row.status,
        row.created_at,
    )


async def add_batch(session: AsyncSession, batch: CardBatch) -> None:
    session.add(
        CardBatchRow(
            batch_id=batch.batch_id,
            card_type=batch.card_type,
            prefix=batch.prefix,
            first_sequence=batch.first_sequence,
            count=batch.count,
            sequence_digits=batch.sequence_digits,
            emitted=batch.emitted,
            skipped=batch.skipped,
            status=batch.status,
            created_at=batch.created_at,
        )
    )
    await session.flush()


async def find_batch(session: AsyncSession, batch_id: str) -> CardBatch | None:
    row = await session.get(CardBatchRow, batch_id)
    return _batch(row) if row else None


async def batches_of_prefix(session: AsyncSession, prefix: str, sequence_digits: int) -> list[CardBatch]:
    rows = await session.scalars(
        select(CardBatchRow).where(CardBatchRow.prefix == prefix, CardBatchRow.sequence_digits == sequence_digits)
    )
    return [_batch(row) for row in rows]


async def claim_pending_batch(session: AsyncSession, pending: str) -> CardBatch | None:
    """The oldest unfinished batch, locked so that another replica works on another one."""
    query = select(CardBatchRow).where(CardBatchRow.status == pending).order_by(CardBatchRow.created_at).limit(1)
    if session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    row = await session.scalar(query.execution_options(populate_existing=True))
    return _batch(row) if row else None


async def record_batch_progress(session: AsyncSession, batch_id: str, emitted: int, skipped: int, status: str) -> None:
    await session.execute(
        update(CardBatchRow)
        .where(CardBatchRow.batch_id == batch_id)
        .values(emitted=emitted, skipped=skipped, status=status)
    )


# Rows per INSERT on SQLite: five parameters each stays under its parameter limit.
SQLITE_STOCK_ROWS = 4000
# PostgreSQL takes a whole chunk in one statement: the numbers travel as one array.
_INSERT_STOCK_POSTGRES = text(
    "INSERT INTO cards (card_number, status, issued_at, card_type, batch_id) "
    "SELECT number, :status, :issued_at, :card_type, :batch_id FROM unnest(CAST(:numbers AS varchar[])) AS number "
    "ON CONFLICT (card_number) DO NOTHING"
)


async def insert_stock_cards(
    session: AsyncSession, numbers: Sequence[str], card_type: str, batch_id: str, now: datetime
) -> int:
    """Writes unissued cards; a number that already exists is left as it is. Returns how many
    were written."""
    values = {"status": CardStatus.UNISSUED.value, "issued_at": now, "card_type": card_type, "batch_id": batch_id}
    if session.bind.dialect.name == "postgresql":
        result = await session.execute(_INSERT_STOCK_POSTGRES, {**values, "numbers": list(numbers)})
        return int(result.rowcount)  # type: ignore[attr-defined]
    written = 0
    for start in range(0, len(numbers), SQLITE_STOCK_ROWS):
        rows = [{"card_number": number, **values} for number in numbers[start : start + SQLITE_STOCK_ROWS]]
        result = await session.execute(sqlite.insert(CardRow).values(rows).on_conflict_do_nothing())
        written += result.rowcount  # type: ignore[attr-defined]
    return written


# Purchases ---------------------------------------------------------------------


async def add_purchase(
    session: AsyncSession,
    purchase_key: str,
    member_id: str,
    kind: str,
    amount_minor: int,
    occurred_at: datetime,
    points: int = 0,
) -> bool:
    """Records a receipt or return once; False when it was already recorded."""
    if await session.get(PurchaseRow, purchase_key) is not None:
        return False
    session.add(
        PurchaseRow(
            purchase_key=purchase_key,
            member_id=member_id,
            kind=kind,
            amount_minor=amount_minor,
            occurred_at=occurred_at,
            points=points,
        )
    )
    await session.flush()
    return True


async def spend_since(session: AsyncSession, member_id: str, since: datetime | None) -> int:
    """Net spend (receipts less returns) from `since`, or over all time."""
    return (await totals_since(session, member_id, since))[0]


async def totals_since(session: AsyncSession, member_id: str, since: datetime | None) -> tuple[int, int]:
    """Net spend and net points earned (receipts less returns) from `since`, or over all time."""
    query = select(
        func.coalesce(func.sum(PurchaseRow.amount_minor), 0), func.coalesce(func.sum(PurchaseRow.points), 0)
    ).where(PurchaseRow.member_id == member_id)
    if since is not None:
        query = query.where(PurchaseRow.occurred_at >= since)
    spend, points = (await session.execute(query)).one()
    return int(spend or 0), int(points or 0)


@dataclass(frozen=True)
class PurchaseCounts:
    count: int
    first_at: datetime | None
    last_at: datetime | None


async def purchase_counts(session: AsyncSession, member_id: str, sale: str) -> PurchaseCounts:
    count, first_at, last_at = (
        await session.execute(
            select(
                func.count(),
                func.min(PurchaseRow.occurred_at),
                func.max(PurchaseRow.occurred_at),
            ).where(PurchaseRow.member_id == member_id, PurchaseRow.kind == sale)
        )
    ).one()
    return PurchaseCounts(int(count), first_at, last_at)


# Tiers ---------------------------------------------------------------------------


async def list_tier_definitions(session: AsyncSession) -> list[TierDefinition]:
    rows = await session.scalars(select(TierDefinitionRow).order_by(TierDefinitionRow.rank))
    return [row.to_domain() for row in rows]


async def put_tier_definition(session: AsyncSession, definition: TierDefinition) -> None:
    await session.merge(
        TierDefinitionRow(
            code=definition.code,
            name=definition.name,
            rank=definition.rank,
            spend_threshold_minor=definition.spend_threshold_minor,
            window_months=definition.window_months,
            duration_days=definition.duration_days,
            downgrade_after_inactive_days=definition.downgrade_after_inactive_days,
            metric=definition.metric.value,
            points_threshold=definition.points_threshold,
            calendar_period=definition.calendar_period.value,
        )
    )
    await session.flush()


async def add_tier_change(
    session: AsyncSession, member_id: str, old_tier: str, new_tier: str, reason: str, at: datetime
) -> None:
    session.add(TierChangeRow(member_id=member_id, old_tier=old_tier, new_tier=new_tier, reason=reason, changed_at=at))
    await session.flush()


@dataclass(frozen=True)
class TierChange:
    old_tier: str
    new_tier: str
    reason: str
    changed_at: datetime


async def tier_history(session: AsyncSession, member_id: str) -> list[TierChange]:
    rows = await session.scalars(
        select(TierChangeRow)
        .where(TierChangeRow.member_id == member_id)
        .order_by(TierChangeRow.changed_at.desc(), TierChangeRow.change_id.desc())
    )
    return [TierChange(row.old_tier, row.new_tier, row.reason, row.changed_at) for row in rows]


async def members_above_tier(session: AsyncSession, default_tier: str, after: str, limit: int) -> list[str]:
    """Ids of members holding a tier above the default, in id order after `after`: the
    members whose tier can lapse or drop without a purchase."""
    rows = await session.scalars(
        select(MemberRow.member_id)
        .where(MemberRow.tier != default_tier, MemberRow.member_id > after)
        .order_by(MemberRow.member_id)
        .limit(limit)
    )
    return list(rows)


# Households --------------------------------------------------------------------


@dataclass(frozen=True)
class Household:
    household_id: str
    name: str
    owner_member_id: str
    member_ids: tuple[str, ...]


async def add_household(session: AsyncSession, household_id: str, name: str, owner: str, at: datetime) -> None:
    session.add(HouseholdRow(household_id=household_id, name=name, owner_member_id=owner, created_at=at))
    await session.flush()


async def find_household(session: AsyncSession, household_id: str, for_update: bool = False) -> Household | None:
    query = select(HouseholdRow).where(HouseholdRow.household_id == household_id)
    if for_update:
        query = query.with_for_update()
    row = await session.scalar(query)
    if row is None:
        return None
    member_ids = await session.scalars(
        select(MemberRow.member_id).where(MemberRow.household_id == household_id).order_by(MemberRow.member_id)
    )
    return Household(row.household_id, row.name, row.owner_member_id, tuple(member_ids))


@dataclass(frozen=True)
class Invitation:
    invitation_id: str
    household_id: str
    member_id: str
    invited_by: str
    status: str
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None


def _invitation(row: HouseholdInvitationRow) -> Invitation:
    return Invitation(
        row.invitation_id,
        row.household_id,
        row.member_id,
        row.invited_by,
        row.status,
        row.created_at,
        row.expires_at,
        row.decided_at,
    )


async def add_invitation(session: AsyncSession, invitation: Invitation) -> None:
    session.add(
        HouseholdInvitationRow(
            invitation_id=invitation.invitation_id,
            household_id=invitation.household_id,
            member_id=invitation.member_id,
            invited_by=invitation.invited_by,
            status=invitation.status,
            created_at=invitation.created_at,
            expires_at=invitation.expires_at,
            decided_at=invitation.decided_at,
        )
    )
    await session.flush()


async def find_invitation(session: AsyncSession, invitation_id: str, for_update: bool = False) -> Invitation | None:
    query = select(HouseholdInvitationRow).where(HouseholdInvitationRow.invitation_id == invitation_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    row = await session.scalar(query)
    return _invitation(row) if row else None


async def decide_invitation(session: AsyncSession, invitation_id: str, status: str, at: datetime) -> None:
    await session.execute(
        update(HouseholdInvitationRow)
        .where(HouseholdInvitationRow.invitation_id == invitation_id)
        .values(status=status, decided_at=at)
    )


async def pending_invitation(
    session: AsyncSession, household_id: str, member_id: str, pending: str, now: datetime
) -> Invitation | None:
    """The open (pending, unexpired) invitation of the member into the household, if any."""
    row = await session.scalar(
        select(HouseholdInvitationRow).where(
            HouseholdInvitationRow.household_id == household_id,
            HouseholdInvitationRow.member_id == member_id,
            HouseholdInvitationRow.status == pending,
            HouseholdInvitationRow.expires_at > now,
        )
    )
    return _invitation(row) if row else None


async def list_invitations(session: AsyncSession, member_id: str, household_id: str) -> list[Invitation]:
    """The invitations of the member or of the household (whichever is given), newest first."""
    query = select(HouseholdInvitationRow).order_by(
        HouseholdInvitationRow.created_at.desc(), HouseholdInvitationRow.invitation_id
    )
    if member_id:
        query = query.where(HouseholdInvitationRow.member_id == member_id)
    if household_id:
        query = query.where(HouseholdInvitationRow.household_id == household_id)
    return [_invitation(row) for row in await session.scalars(query)]


# Segments ------------------------------------------------------------------------


async def add_segment(session: AsyncSession, code: str, name: str, at: datetime, expression: str = "") -> None:
    session.add(SegmentRow(code=code, name=name, created_at=at, expression=expression))
    await session.flush()


async def segment_expression(session: AsyncSession, code: str) -> str:
    return str(await session.scalar(select(SegmentRow.expression).where(SegmentRow.code == code)) or "")


async def dynamic_segments(session: AsyncSession) -> list[tuple[str, str]]:
    """(code, expression) of every dynamic segment."""
    rows = await session.execute(
        select(SegmentRow.code, SegmentRow.expression).where(SegmentRow.expression != "").order_by(SegmentRow.code)
    )
    return [(code, expression) for code, expression in rows]


async def lock_segment(session: AsyncSession, code: str) -> None:
    """Serialises recomputations of one segment across replicas (PostgreSQL row lock)."""
    await session.execute(select(SegmentRow.code).where(SegmentRow.code == code).with_for_update())


async def segment_member_ids(session: AsyncSession, code: str) -> set[str]:
    rows = await session.scalars(select(SegmentMemberRow.member_id).where(SegmentMemberRow.segment_code == code))
    return set(rows)


async def member_facts(session: AsyncSession, sale: str, after: str, limit: int) -> list[MemberFacts]:
    """A page (by member id) of live members with their purchase totals; erased and merged
    members are left out."""
    totals = (
        select(
            PurchaseRow.member_id.label("member_id"),
            func.count(case((PurchaseRow.kind == sale, 1))).label("purchases"),
            func.sum(PurchaseRow.amount_minor).label("spend"),
            func.max(case((PurchaseRow.kind == sale, PurchaseRow.occurred_at))).label("last_at"),
        )
        .group_by(PurchaseRow.member_id)
        .subquery()
    )
    rows = await session.execute(
        select(
            MemberRow.member_id,
            MemberRow.tier,
            MemberRow.created_at,
            MemberRow.birth_date,
            totals.c.purchases,
            totals.c.spend,
            totals.c.last_at,
            _attributes_of(MemberRow.member_id),
        )
        .outerjoin(totals, totals.c.member_id == MemberRow.member_id)
        .where(MemberRow.erased_at.is_(None), MemberRow.merged_into.is_(None), MemberRow.member_id > after)
        .order_by(MemberRow.member_id)
        .limit(limit)
    )
    return [
        MemberFacts(
            member_id,
            tier,
            created_at,
            birth_date,
            int(purchases or 0),
            int(spend or 0),
            last_at,
            _split_attributes(attributes),
        )
        for member_id, tier, created_at, birth_date, purchases, spend, last_at, attributes in rows
    ]


async def save_rfm(session: AsyncSession, scores: dict[str, Rfm]) -> None:
    """Replaces every score by the ones given (in one transaction, so readers never see a
    half-scored base); a member left out, e.g. with every purchase returned, scores 0."""
    await session.execute(
        update(MemberRow).where(MemberRow.rfm_recency != 0).values(rfm_recency=0, rfm_frequency=0, rfm_monetary=0)
    )
    if scores:
        await session.execute(
            update(MemberRow),
            [
                {
                    "member_id": member_id,
                    "rfm_recency": rfm.recency,
                    "rfm_frequency": rfm.frequency,
                    "rfm_monetary": rfm.monetary,
                }
                for member_id, rfm in scores.items()
            ],
        )


async def find_segment_name(session: AsyncSession, code: str) -> str | None:
    row = await session.get(SegmentRow, code)
    return row.name if row else None


async def segment_size(session: AsyncSession, code: str) -> int:
    count = await session.scalar(
        select(func.count()).select_from(SegmentMemberRow).where(SegmentMemberRow.segment_code == code)
    )
    return int(count or 0)


async def existing_member_ids(session: AsyncSession, member_ids: Iterable[str]) -> set[str]:
    rows = await session.scalars(select(MemberRow.member_id).where(MemberRow.member_id.in_(list(member_ids))))
    return set(rows)


async def member_ids_by_phones(session: AsyncSession, phones: Iterable[str]) -> set[str]:
    rows = await session.scalars(select(MemberRow.member_id).where(MemberRow.phone.in_(list(phones))))
    return set(rows)


async def add_segment_members(session: AsyncSession, code: str, member_ids: set[str]) -> int:
    """Adds the members not in the segment yet; returns how many were added."""
    present = set(
        await session.scalars(
            select(SegmentMemberRow.member_id).where(
                SegmentMemberRow.segment_code == code, SegmentMemberRow.member_id.in_(list(member_ids))
            )
        )
    )
    for member_id in sorted(member_ids - present):
        session.add(SegmentMemberRow(segment_code=code, member_id=member_id))
    await session.flush()
    return len(member_ids - present)


async def remove_segment_members(session: AsyncSession, code: str, member_ids: Iterable[str]) -> None:
    await session.execute(
        delete(SegmentMemberRow).where(
            SegmentMemberRow.segment_code == code, SegmentMemberRow.member_id.in_(list(member_ids))
        )
    )


async def member_segments(session: AsyncSession, member_id: str) -> list[str]:
    rows = await session.scalars(
        select(SegmentMemberRow.segment_code)
        .where(SegmentMemberRow.member_id == member_id)
        .order_by(SegmentMemberRow.segment_code)
    )
    return list(rows)


# Partners ------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    store_id: str
    region: str
    time_zone: str
    terminal_ids: tuple[str, ...]


async def find_partner(session: AsyncSession, partner_id: str) -> tuple[str, list[Store]] | None:
    """The partner's name and stores (with their registers), by store id."""
    row = await session.get(PartnerRow, partner_id)
    if row is None:
        return None
    stores = list(
        await session.scalars(
            select(PartnerStoreRow).where(PartnerStoreRow.partner_id == partner_id).order_by(PartnerStoreRow.store_id)
        )
    )
    registers: dict[str, list[str]] = {}
    for terminal_id, store_id in await session.execute(
        select(StoreRegisterRow.terminal_id, StoreRegisterRow.store_id)
        .where(StoreRegisterRow.store_id.in_([store.store_id for store in stores]))
        .order_by(StoreRegisterRow.terminal_id)
    ):
        registers.setdefault(store_id, []).append(terminal_id)
    return row.name, [
        Store(store.store_id, store.region, store.time_zone, tuple(registers.get(store.store_id, ())))
        for store in stores
    ]


async def store_owners(session: AsyncSession, store_ids: Iterable[str]) -> dict[str, str]:
    rows = await session.execute(
        select(PartnerStoreRow.store_id, PartnerStoreRow.partner_id).where(
            PartnerStoreRow.store_id.in_(list(store_ids))
        )
    )
    return {store_id: partner_id for store_id, partner_id in rows.tuples()}


async def terminal_owners(session: AsyncSession, terminal_ids: Iterable[str]) -> dict[str, str]:
    """The partner owning each terminal already registered, by terminal id."""
    rows = await session.execute(
        select(StoreRegisterRow.terminal_id, PartnerStoreRow.partner_id)
        .join(PartnerStoreRow, PartnerStoreRow.store_id == StoreRegisterRow.store_id)
        .where(StoreRegisterRow.terminal_id.in_(list(terminal_ids)))
    )
    return {terminal_id: partner_id for terminal_id, partner_id in rows.tuples()}


async def put_partner(session: AsyncSession, partner_id: str, name: str, stores: Sequence[Store]) -> None:
    """Replaces the partner's stores and their registers by the ones given."""
    await session.merge(PartnerRow(partner_id=partner_id, name=name))
    await session.flush()
    owned = select(PartnerStoreRow.store_id).where(PartnerStoreRow.partner_id == partner_id)
    await session.execute(delete(StoreRegisterRow).where(StoreRegisterRow.store_id.in_(owned)))
    await session.execute(delete(PartnerStoreRow).where(PartnerStoreRow.partner_id == partner_id))
    for store in stores:
        session.add(
            PartnerStoreRow(
                store_id=store.store_id, partner_id=partner_id, region=store.region, time_zone=store.time_zone
            )
        )
    await session.flush()
    for store in stores:
        for terminal_id in store.terminal_ids:
            session.add(StoreRegisterRow(terminal_id=terminal_id, store_id=store.store_id))
    await session.flush()


@dataclass(frozen=True)
class Terminal:
    terminal_id: str
    store_id: str
    partner_id: str
    region: str
    time_zone: str


async def find_terminal(session: AsyncSession, terminal_id: str) -> Terminal | None:
    row = (
        await session.execute(
            select(
                StoreRegisterRow.store_id, PartnerStoreRow.partner_id, PartnerStoreRow.region, PartnerStoreRow.time_zone
            )
            .join(PartnerStoreRow, PartnerStoreRow.store_id == StoreRegisterRow.store_id)
            .where(StoreRegisterRow.terminal_id == terminal_id)
        )
    ).one_or_none()
    return Terminal(terminal_id, *row) if row else None


@dataclass(frozen=True)
class BirthdayCandidate:
    member_id: str
    birth_date: str
    time_zone: str
    announced_year: int | None


async def birthday_candidates(
    session: AsyncSession, month_days: Sequence[str], after: str, limit: int
) -> list[BirthdayCandidate]:
    """A page (by member id) of active, live members born on one of `month_days` ("MM-DD")."""
    rows = await session.execute(
        select(MemberRow.member_id, MemberRow.birth_date, MemberRow.time_zone, MemberRow.birthday_announced_year)
        .where(
            func.substr(MemberRow.birth_date, 6, 5).in_(month_days),
            MemberRow.status == MemberStatus.ACTIVE.value,
            MemberRow.erased_at.is_(None),
            MemberRow.merged_into.is_(None),
            MemberRow.member_id > after,
        )
        .order_by(MemberRow.member_id)
        .limit(limit)
    )
    return [BirthdayCandidate(*row) for row in rows]


async def claim_birthday(session: AsyncSession, member_id: str, year: int) -> bool:
    """Records that the member's birthday of `year` is announced; False when it already was
    (another replica or an earlier run) or the member is no longer active. The conditional
    UPDATE takes the row lock, so of two concurrent claims exactly one succeeds."""
    result = await session.execute(
        update(MemberRow)
        .where(
            MemberRow.member_id == member_id,
            or_(MemberRow.birthday_announced_year.is_(None), MemberRow.birthday_announced_year < year),
            MemberRow.status == MemberStatus.ACTIVE.value,
            MemberRow.erased_at.is_(None),
        )
        .values(birthday_announced_year=year)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


async def claim_profile_completed(session: AsyncSession, member_id: str, at: datetime) -> bool:
    """Records the first completion of the member's profile; False when it was recorded before."""
    result = await session.execute(
        update(MemberRow)
        .where(MemberRow.member_id == member_id, MemberRow.profile_completed_at.is_(None))
        .values(profile_completed_at=at)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]
