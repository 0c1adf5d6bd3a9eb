"""The ledger's tables and queries; the only module here that speaks SQL."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime
from services.accounts.domain import (
    MAX_HOLDER_ID_LENGTH,
    MAX_REASON_LENGTH,
    MAX_SOURCE_REF_LENGTH,
    Accrual,
    EntryKind,
    Lot,
)


class Base(DeclarativeBase):
    pass


class AccountRow(Base):
    """One points account per holder (member or household) and point currency."""

    __tablename__ = "accounts"
    __table_args__ = (UniqueConstraint("holder_id", "currency"),)

    account_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    holder_id: Mapped[str] = mapped_column(String(MAX_HOLDER_ID_LENGTH))
    currency: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class LotRow(Base):
    __tablename__ = "lots"
    __table_args__ = (Index("ix_lots_account_open", "account_id", "remaining"),)

    lot_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    activate_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expire_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(String(16))
    source_ref: Mapped[str] = mapped_column(String(MAX_SOURCE_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class EntryRow(Base):
    """Append-only: entries are written, never updated or deleted."""

    __tablename__ = "entries"
    __table_args__ = (Index("ix_entries_account_created", "account_id", "created_at", "entry_id"),)

    entry_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    lot_id: Mapped[str | None] = mapped_column(ForeignKey("lots.lot_id"))
    source_ref: Mapped[str] = mapped_column(String(MAX_SOURCE_REF_LENGTH))
    reason: Mapped[str] = mapped_column(String(MAX_REASON_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


async def find_account(session: AsyncSession, holder_id: str, currency: str) -> AccountRow | None:
    account: AccountRow | None = await session.scalar(
        select(AccountRow).where(AccountRow.holder_id == holder_id, AccountRow.currency == currency)
    )
    return account


async def open_account(session: AsyncSession, holder_id: str, currency: str, now: datetime) -> AccountRow:
    """The holder's account, created on first use. Of two transactions opening the same
    account at once, one inserts and the other waits for it and uses its row."""
    account = await find_account(session, holder_id, currency)
    if account is None:
        insert = postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert
        await session.execute(
            insert(AccountRow)
            .values(account_id=str(uuid.uuid4()), holder_id=holder_id, currency=currency, created_at=now)
            .on_conflict_do_nothing(index_elements=["holder_id", "currency"])
        )
        account = await find_account(session, holder_id, currency)
        assert account is not None
    return account


async def add_accrual(session: AsyncSession, account: AccountRow, accrual: Accrual, now: datetime) -> EntryRow:
    lot = LotRow(
        lot_id=str(uuid.uuid4()),
        account_id=account.account_id,
        amount=accrual.amount,
        remaining=accrual.amount,
        activate_at=accrual.activate_at,
        expire_at=accrual.expire_at,
        source=accrual.source.value,
        source_ref=accrual.source_ref,
        created_at=now,
    )
    entry = EntryRow(
        entry_id=str(uuid.uuid4()),
        account_id=account.account_id,
        kind=EntryKind.ACCRUAL.value,
        amount=accrual.amount,
        lot_id=lot.lot_id,
        source_ref=accrual.source_ref,
        reason=accrual.reason,
        created_at=now,
    )
    session.add(lot)
    await session.flush()
    session.add(entry)
    await session.flush()
    return entry


async def open_lots(session: AsyncSession, account_id: str, now: datetime) -> list[Lot]:
    """Lots with points left that have not expired by `now`."""
    rows = await session.scalars(
        select(LotRow).where(
            LotRow.account_id == account_id,
            LotRow.remaining > 0,
            or_(LotRow.expire_at.is_(None), LotRow.expire_at > now),
        )
    )
    return [Lot(row.lot_id, row.remaining, row.activate_at, row.expire_at) for row in rows]


async def list_entries(session: AsyncSession, account_id: str, limit: int, after: Cursor | None) -> list[EntryRow]:
    """Entries newest first, starting after the (created_at, entry_id) of the previous page."""
    query = select(EntryRow).where(EntryRow.account_id == account_id)
    if after is not None:
        query = query.where(
            or_(
                EntryRow.created_at < after.time,
                (EntryRow.created_at == after.time) & (EntryRow.entry_id < after.item_id),
            )
        )
    query = query.order_by(EntryRow.created_at.desc(), EntryRow.entry_id.desc()).limit(limit)
    return list(await session.scalars(query))
