"""Calculations and committed receipts with their saga state; the only SQL of the gateway."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, LargeBinary, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.gateway.domain import ChequeState, ReceiptKey


class Base(DeclarativeBase):
    pass


class CalculationRow(Base):
    __tablename__ = "calculations"

    calculation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    receipt_hash: Mapped[str] = mapped_column(String(64))
    member_id: Mapped[str] = mapped_column(String(64))
    holder_id: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


class ChequeRow(Base):
    """A committed receipt. Its row is the saga's durable record: once written, the
    receipt's effects are owed and are applied until state is completed."""

    __tablename__ = "cheques"

    terminal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    receipt_number: Mapped[str] = mapped_column(String(64), primary_key=True)
    receipt_hash: Mapped[str] = mapped_column(String(64))
    member_id: Mapped[str] = mapped_column(String(64))
    holder_id: Mapped[str] = mapped_column(String(64))
    points: Mapped[int] = mapped_column(BigInteger)
    response: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(500), default="")
    committed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    @property
    def key(self) -> ReceiptKey:
        return ReceiptKey(self.terminal_id, self.receipt_number)


outbox = define_outbox_table(Base.metadata)


async def add_calculation(session: AsyncSession, row: CalculationRow) -> None:
    session.add(row)
    await session.flush()


async def find_calculation(session: AsyncSession, calculation_id: str) -> CalculationRow | None:
    return await session.get(CalculationRow, calculation_id)


async def find_cheque(session: AsyncSession, key: ReceiptKey) -> ChequeRow | None:
    return await session.get(ChequeRow, (key.terminal_id, key.receipt_number))


async def add_cheque_if_new(session: AsyncSession, row: ChequeRow) -> bool:
    """Records the receipt unless its terminal and number are already recorded; says which.

    ON CONFLICT rather than a caught unique violation: a concurrent commit of the same
    receipt is normal traffic (a register retrying), not an error path.
    """
    insert = postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert
    values = {column.key: getattr(row, column.key) for column in ChequeRow.__table__.columns}
    result = await session.execute(
        insert(ChequeRow).values(**values).on_conflict_do_nothing(index_elements=["terminal_id", "receipt_number"])
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def record_attempt(session: AsyncSession, key: ReceiptKey, error: str) -> None:
    row = await session.get_one(ChequeRow, (key.terminal_id, key.receipt_number))
    row.attempts += 1
    row.last_error = error[:500]


async def mark_completed(session: AsyncSession, key: ReceiptKey, now: datetime) -> None:
    row = await session.get_one(ChequeRow, (key.terminal_id, key.receipt_number))
    row.attempts += 1
    row.state = ChequeState.COMPLETED.value
    row.completed_at = now
    row.last_error = ""


async def count_unfinished(session: AsyncSession) -> int:
    count: int = (
        await session.scalar(
            select(func.count()).select_from(ChequeRow).where(ChequeRow.state == ChequeState.COMMITTED.value)
        )
        or 0
    )
    return count


async def unfinished_cheques(session: AsyncSession, committed_before: datetime, limit: int) -> list[ReceiptKey]:
    rows = await session.execute(
        select(ChequeRow.terminal_id, ChequeRow.receipt_number)
        .where(ChequeRow.state == ChequeState.COMMITTED.value, ChequeRow.committed_at < committed_before)
        .order_by(ChequeRow.committed_at)
        .limit(limit)
    )
    return [ReceiptKey(terminal_id, number) for terminal_id, number in rows]
