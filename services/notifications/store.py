"""Notifications' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, Text, UniqueConstraint, and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.inbox import define_inbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime, utcnow
from services.notifications.domain import Channel, Message, MessageState, Template


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


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # A message is rendered once per event and channel, however often the event is delivered.
        UniqueConstraint("event_id", "channel", name="uq_messages_event_id_channel"),
        # Serves a member's messages newest first, the one listing there is.
        Index("ix_messages_member_id_create_time", "member_id", "create_time", "message_id"),
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

    def to_domain(self) -> Message:
        return Message(
            message_id=self.message_id,
            member_id=self.member_id,
            event_type=self.event_type,
            event_id=self.event_id,
            channel=Channel(self.channel),
            subject=self.subject,
            body=self.body,
            state=MessageState(self.state),
            created_at=self.create_time,
        )


inbox = define_inbox_table(Base.metadata)


async def find_template(session: AsyncSession, event_type: str, channel: Channel, locale: str) -> Template | None:
    row = await session.get(TemplateRow, (event_type, channel.value, locale))
    return row.to_domain() if row else None


async def upsert_template(session: AsyncSession, template: Template) -> None:
    """Inserts or replaces in one statement, so two concurrent first upserts both succeed."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {
        "event_type": template.event_type,
        "channel": template.channel.value,
        "locale": template.locale,
        "subject": template.subject,
        "body": template.body,
        "updated_at": utcnow(),
    }
    statement = insert(TemplateRow).values(values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[TemplateRow.event_type, TemplateRow.channel, TemplateRow.locale],
            set_={name: statement.excluded[name] for name in ("subject", "body", "updated_at")},
        )
    )


async def add_message(session: AsyncSession, message: Message) -> None:
    session.add(
        MessageRow(
            message_id=message.message_id,
            member_id=message.member_id,
            event_type=message.event_type,
            event_id=message.event_id,
            channel=message.channel.value,
            subject=message.subject,
            body=message.body,
            state=message.state.value,
            create_time=message.created_at,
        )
    )
    await session.flush()


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
