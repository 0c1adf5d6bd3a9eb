"""Notifications' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, UniqueConstraint, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.inbox import define_inbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime, utcnow
from services.notifications.domain import (
    Category,
    Channel,
    Contact,
    MassSend,
    MassSendState,
    Message,
    MessageState,
    Reason,
    Template,
    Trigger,
)


class Base(DeclarativeBase):
    pass


class TemplateRow(Base):
    __tablename__ = "templates"

    event_type: Mapped[str] = mapped_column(String(100), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    locale: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Template:
        return Template(self.event_type, Channel(self.channel), self.locale, self.subject, self.body)


class TriggerRow(Base):
    __tablename__ = "triggers"

    event_type: Mapped[str] = mapped_column(String(100), primary_key=True)
    enabled: Mapped[bool]
    template_key: Mapped[str] = mapped_column(String(100))
    channels: Mapped[list[str]] = mapped_column(JSON)
    delay_seconds: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Trigger:
        return Trigger(
            event_type=self.event_type,
            enabled=self.enabled,
            template_key=self.template_key,
            channels=tuple(Channel(channel) for channel in self.channels),
            delay=timedelta(seconds=self.delay_seconds),
            category=Category(self.category),
        )


class ContactRow(Base):
    """The members' contact details and consents, as their events told us."""

    __tablename__ = "contacts"
    __table_args__ = (Index("ix_contacts_birth_month_day", "birth_month_day"),)

    member_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    first_name: Mapped[str] = mapped_column(String(200))
    last_name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str] = mapped_column(String(32))
    email: Mapped[str] = mapped_column(String(320))
    locale: Mapped[str] = mapped_column(String(16))
    time_zone: Mapped[str] = mapped_column(String(64))
    birth_date: Mapped[str] = mapped_column(String(10))
    # "MM-DD", so the birthday job finds today's birthdays through an index.
    birth_month_day: Mapped[str] = mapped_column(String(5))
    push_token: Mapped[str] = mapped_column(Text)
    telegram_chat_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    tier: Mapped[str] = mapped_column(String(64))
    consents: Mapped[dict[str, bool]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Contact:
        return Contact(
            member_id=self.member_id,
            first_name=self.first_name,
            last_name=self.last_name,
            phone=self.phone,
            email=self.email,
            locale=self.locale,
            time_zone=self.time_zone,
            birth_date=self.birth_date,
            push_token=self.push_token,
            telegram_chat_id=self.telegram_chat_id,
            status=self.status,
            tier=self.tier,
            consents=dict(self.consents),
        )


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # One message per event and recipient, however often the event is delivered.
        UniqueConstraint("event_id", "member_id", name="uq_messages_event_id_member_id"),
        # Serves a member's messages newest first, the one listing there is.
        Index("ix_messages_member_id_create_time", "member_id", "create_time", "message_id"),
        # Serves the dispatcher's look for due messages.
        Index("ix_messages_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_messages_mass_send_id", "mass_send_id"),
    )

    message_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(36))
    event_type: Mapped[str] = mapped_column(String(100))
    event_id: Mapped[str] = mapped_column(String(36))
    channel: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    category: Mapped[str] = mapped_column(String(16), server_default="transactional")
    template_key: Mapped[str] = mapped_column(String(100), server_default="")
    channels: Mapped[list[str]] = mapped_column(JSON, server_default="[]")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, server_default="{}")
    occurred_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    reason: Mapped[str] = mapped_column(String(64), server_default="")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Which dispatcher holds the message while it talks to a provider.
    claim_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    mass_send_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    cascade_from: Mapped[int] = mapped_column(Integer, server_default="0")

    def to_domain(self) -> Message:
        return Message(
            message_id=self.message_id,
            member_id=self.member_id,
            event_type=self.event_type,
            event_id=self.event_id,
            category=Category(self.category),
            template_key=self.template_key or self.event_type,
            channels=tuple(Channel(channel) for channel in self.channels),
            channel=Channel(self.channel),
            subject=self.subject,
            body=self.body,
            state=MessageState(self.state),
            created_at=self.create_time,
            occurred_at=self.occurred_at or self.create_time,
            next_attempt_at=self.next_attempt_at or self.create_time,
            data=dict(self.data),
            reason=self.reason,
            attempts=self.attempts,
            sent_at=self.sent_at,
            delivered_at=self.delivered_at,
            mass_send_id=self.mass_send_id or "",
            cascade_from=self.cascade_from,
        )


class MassSendRow(Base):
    __tablename__ = "mass_sends"

    mass_send_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    template_key: Mapped[str] = mapped_column(String(100))
    channels: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    recipients: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> MassSend:
        return MassSend(
            mass_send_id=self.mass_send_id,
            template_key=self.template_key,
            channels=tuple(Channel(channel) for channel in self.channels),
            state=MassSendState(self.state),
            recipients=self.recipients,
            created_at=self.create_time,
        )


inbox = define_inbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def find_templates(
    session: AsyncSession, event_type: str, channels: Sequence[Channel], locales: Sequence[str]
) -> dict[tuple[Channel, str], Template]:
    """The stored templates of a key for any of the channels and locales, in one query (a
    cascade of five channels in two locales is otherwise ten lookups per message)."""
    rows = await session.scalars(
        select(TemplateRow).where(
            TemplateRow.event_type == event_type,
            TemplateRow.channel.in_([channel.value for channel in channels]),
            TemplateRow.locale.in_(list(locales)),
        )
    )
    return {(Channel(row.channel), row.locale): row.to_domain() for row in rows}


async def has_templates(session: AsyncSession, event_type: str) -> bool:
    found = await session.scalar(select(TemplateRow.event_type).where(TemplateRow.event_type == event_type).limit(1))
    return found is not None


async def upsert_template(session: AsyncSession, template: Template) -> None:
    """Inserts or replaces in one statement, so two concurrent first upserts both succeed."""
    values = {
        "event_type": template.event_type,
        "channel": template.channel.value,
        "locale": template.locale,
        "subject": template.subject,
        "body": template.body,
        "updated_at": utcnow(),
    }
    statement = _insert(session)(TemplateRow).values(values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[TemplateRow.event_type, TemplateRow.channel, TemplateRow.locale],
            set_={name: statement.excluded[name] for name in ("subject", "body", "updated_at")},
        )
    )


async def find_trigger(session: AsyncSession, event_type: str) -> Trigger | None:
    row = await session.get(TriggerRow, event_type)
    return row.to_domain() if row else None


async def list_triggers(session: AsyncSession) -> list[Trigger]:
    rows = await session.scalars(select(TriggerRow).order_by(TriggerRow.event_type))
    return [row.to_domain() for row in rows.all()]


async def upsert_trigger(session: AsyncSession, trigger: Trigger) -> None:
    values = {
        "event_type": trigger.event_type,
        "enabled": trigger.enabled,
        "template_key": trigger.template_key,
        "channels": [channel.value for channel in trigger.channels],
        "delay_seconds": int(trigger.delay.total_seconds()),
        "category": trigger.category.value,
        "updated_at": utcnow(),
    }
    statement = _insert(session)(TriggerRow).values(values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[TriggerRow.event_type],
            set_={name: statement.excluded[name] for name in values if name != "event_type"},
        )
    )


async def find_contact(session: AsyncSession, member_id: str) -> Contact | None:
    row = await session.get(ContactRow, member_id)
    return row.to_domain() if row else None


async def save_contact(session: AsyncSession, contact: Contact) -> None:
    values = {
        "member_id": contact.member_id,
        "first_name": contact.first_name,
        "last_name": contact.last_name,
        "phone": contact.phone,
        "email": contact.email,
        "locale": contact.locale,
        "time_zone": contact.time_zone,
        "birth_date": contact.birth_date,
        "birth_month_day": contact.birth_date[5:10],
        "push_token": contact.push_token,
        "telegram_chat_id": contact.telegram_chat_id,
        "status": contact.status,
        "tier": contact.tier,
        "consents": dict(contact.consents),
        "updated_at": utcnow(),
    }
    statement = _insert(session)(ContactRow).values(values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[ContactRow.member_id],
            set_={name: statement.excluded[name] for name in values if name != "member_id"},
        )
    )


async def contacts_born_on(session: AsyncSession, month_days: Sequence[str]) -> list[Contact]:
    rows = await session.scalars(
        select(ContactRow).where(ContactRow.birth_month_day.in_(month_days)).order_by(ContactRow.member_id)
    )
    return [row.to_domain() for row in rows.all()]


def _message_values(message: Message) -> dict[str, Any]:
    return {
        "message_id": message.message_id,
        "member_id": message.member_id,
        "event_type": message.event_type,
        "event_id": message.event_id,
        "channel": message.channel.value,
        "subject": message.subject,
        "body": message.body,
        "state": message.state.value,
        "create_time": message.created_at,
        "category": message.category.value,
        "template_key": message.template_key,
        "channels": [channel.value for channel in message.channels],
        "data": dict(message.data),
        "occurred_at": message.occurred_at,
        "next_attempt_at": message.next_attempt_at,
        "reason": message.reason,
        "attempts": message.attempts,
        "sent_at": message.sent_at,
        "delivered_at": message.delivered_at,
        "mass_send_id": message.mass_send_id or None,
        "cascade_from": message.cascade_from,
    }


async def add_message(session: AsyncSession, message: Message) -> bool:
    """Stores a new message; False when one for this event and member exists already."""
    statement = _insert(session)(MessageRow).values(_message_values(message))
    result = await session.execute(
        statement.on_conflict_do_nothing(index_elements=[MessageRow.event_id, MessageRow.member_id])
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def add_messages(session: AsyncSession, messages: Sequence[Message]) -> None:
    if messages:
        statement = _insert(session)(MessageRow).values([_message_values(message) for message in messages])
        await session.execute(
            statement.on_conflict_do_nothing(index_elements=[MessageRow.event_id, MessageRow.member_id])
        )


async def find_message(session: AsyncSession, message_id: str, for_update: bool = False) -> Message | None:
    row = await session.get(MessageRow, message_id, with_for_update=for_update)
    return row.to_domain() if row else None


async def save_message(session: AsyncSession, message: Message) -> None:
    values = _message_values(message)
    del values["message_id"]
    await session.execute(update(MessageRow).where(MessageRow.message_id == message.message_id).values(**values))


async def claim_due(
    session: AsyncSession, now: datetime, limit: int, claim_id: str, hold_until: datetime
) -> list[Message]:
    """Takes up to ``limit`` due messages for one dispatcher: their next attempt moves to
    ``hold_until``, so a dispatcher that dies mid-send leaves them to be claimed again. Rows
    another replica is claiming are skipped (PostgreSQL; SQLite has a single writer), and so
    are the messages of paused mass sends."""
    paused = select(MassSendRow.mass_send_id).where(MassSendRow.state == MassSendState.PAUSED.value)
    query = (
        select(MessageRow)
        .where(
            MessageRow.state == MessageState.QUEUED.value,
            MessageRow.next_attempt_at <= now,
            or_(MessageRow.mass_send_id.is_(None), MessageRow.mass_send_id.not_in(paused)),
        )
        .order_by(MessageRow.next_attempt_at, MessageRow.message_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await session.scalars(query)).all()
    for row in rows:
        row.claim_id = claim_id
        row.next_attempt_at = hold_until
    await session.flush()
    return [row.to_domain() for row in rows]


async def save_progress(session: AsyncSession, message: Message, claim_id: str) -> bool:
    """Writes a claimed message's new state; False when the claim was lost meanwhile."""
    values = _message_values(message)
    del values["message_id"]
    result = await session.execute(
        update(MessageRow)
        .where(MessageRow.message_id == message.message_id, MessageRow.claim_id == claim_id)
        .values(**values, claim_id=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def release_awaiting_contact(session: AsyncSession, member_id: str, now: datetime) -> int:
    """Makes the member's messages that wait for their contact (queued, reason
    UNKNOWN_MEMBER) due now; a message a dispatcher holds is left to it. Returns how many."""
    result = await session.execute(
        update(MessageRow)
        .where(
            MessageRow.member_id == member_id,
            MessageRow.state == MessageState.QUEUED.value,
            MessageRow.reason == Reason.UNKNOWN_MEMBER.value,
            MessageRow.claim_id.is_(None),
        )
        .values(next_attempt_at=now, reason="")
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def sent_since(session: AsyncSession, member_id: str, since: datetime) -> int:
    """How many messages went out to a member since a moment (the frequency cap's count)."""
    count = await session.scalar(
        select(func.count())
        .select_from(MessageRow)
        .where(
            MessageRow.member_id == member_id,
            MessageRow.sent_at >= since,
            MessageRow.state.in_([MessageState.SENT.value, MessageState.DELIVERED.value]),
        )
    )
    return int(count or 0)


async def suppress_queued(session: AsyncSession, member_id: str, reason: Reason) -> None:
    await session.execute(
        update(MessageRow)
        .where(MessageRow.member_id == member_id, MessageRow.state == MessageState.QUEUED.value)
        .values(state=MessageState.SUPPRESSED.value, reason=reason.value)
    )


async def list_messages(session: AsyncSession, member_id: str, limit: int, after: Cursor | None) -> list[Message]:
    """A member's messages newest first, ties broken by id, starting after the cursor."""
    query = select(MessageRow).where(MessageRow.member_id == member_id)
    if after is not None:
        query = query.where(
            or_(
                MessageRow.create_time < after.time,
                and_(MessageRow.create_time == after.time, MessageRow.message_id < after.item_id),
            )
        )
    query = query.order_by(MessageRow.create_time.desc(), MessageRow.message_id.desc()).limit(limit)
    return [row.to_domain() for row in (await session.scalars(query)).all()]


@dataclass(frozen=True)
class StatisticsRow:
    template_key: str
    channel: Channel
    state: MessageState
    count: int


async def statistics(session: AsyncSession, since: datetime | None, until: datetime | None) -> list[StatisticsRow]:
    """Messages per template, channel and state, created in [since, until)."""
    query = select(MessageRow.template_key, MessageRow.channel, MessageRow.state, func.count()).group_by(
        MessageRow.template_key, MessageRow.channel, MessageRow.state
    )
    if since is not None:
        query = query.where(MessageRow.create_time >= since)
    if until is not None:
        query = query.where(MessageRow.create_time < until)
    rows = (await session.execute(query.order_by(MessageRow.template_key, MessageRow.channel, MessageRow.state))).all()
    return [StatisticsRow(key, Channel(channel), MessageState(state), count) for key, channel, state, count in rows]


async def add_mass_send(session: AsyncSession, mass_send: MassSend) -> None:
    session.add(
        MassSendRow(
            mass_send_id=mass_send.mass_send_id,
            template_key=mass_send.template_key,
            channels=[channel.value for channel in mass_send.channels],
            state=mass_send.state.value,
            recipients=mass_send.recipients,
            create_time=mass_send.created_at,
        )
    )
    await session.flush()


async def find_mass_send(session: AsyncSession, mass_send_id: str) -> MassSend | None:
    row = await session.get(MassSendRow, mass_send_id)
    return row.to_domain() if row else None


async def set_mass_send_state(session: AsyncSession, mass_send_id: str, state: MassSendState) -> None:
    await session.execute(update(MassSendRow).where(MassSendRow.mass_send_id == mass_send_id).values(state=state.value))


async def mass_send_progress(session: AsyncSession, mass_send_id: str) -> dict[MessageState, int]:
    rows = await session.execute(
        select(MessageRow.state, func.count()).where(MessageRow.mass_send_id == mass_send_id).group_by(MessageRow.state)
    )
    return {MessageState(state): count for state, count in rows.all()}
