"""Members' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.members.domain import Card, CardStatus, Member, MemberStatus


class Base(DeclarativeBase):
    pass


class MemberRow(Base):
    __tablename__ = "members"

    member_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    phone: Mapped[str] = mapped_column(String(16), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    tier: Mapped[str] = mapped_column(String(32))
    registration_channel: Mapped[int] = mapped_column(Integer)
    referral_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Member:
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
        )


class CardRow(Base):
    __tablename__ = "cards"

    card_number: Mapped[str] = mapped_column(String(19), primary_key=True)
    member_id: Mapped[str] = mapped_column(ForeignKey("members.member_id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Card:
        return Card(self.card_number, self.member_id, CardStatus(self.status), self.issued_at)


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


async def find_member(session: AsyncSession, member_id: str) -> Member | None:
    row = await session.get(MemberRow, member_id)
    return row.to_domain() if row else None


async def find_member_by_phone(session: AsyncSession, phone: str) -> Member | None:
    row = await session.scalar(select(MemberRow).where(MemberRow.phone == phone))
    return row.to_domain() if row else None


async def find_member_by_email(session: AsyncSession, email: str) -> Member | None:
    row = await session.scalar(select(MemberRow).where(MemberRow.email == email))
    return row.to_domain() if row else None


async def add_member(session: AsyncSession, member: Member, referral_code: str | None) -> None:
    session.add(
        MemberRow(
            member_id=member.member_id,
            phone=member.phone,
            email=member.email,
            first_name=member.first_name,
            last_name=member.last_name,
            status=member.status.value,
            tier=member.tier,
            registration_channel=member.registration_channel,
            referral_code=referral_code,
            created_at=member.created_at,
        )
    )
    await session.flush()


async def find_card(session: AsyncSession, card_number: str) -> Card | None:
    row = await session.get(CardRow, card_number)
    return row.to_domain() if row else None


async def add_card(session: AsyncSession, card: Card) -> None:
    session.add(
        CardRow(
            card_number=card.card_number,
            member_id=card.member_id,
            status=card.status.value,
            issued_at=card.issued_at,
        )
    )
    await session.flush()
