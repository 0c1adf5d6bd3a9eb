"""Calculations, committed receipts, returns and terminal API keys; the only SQL of the gateway."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, LargeBinary, String, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime
from services.gateway.domain import CalculationState, ReceiptKey, SagaState


class Base(DeclarativeBase):
    pass


class CalculationRow(Base):
    """A soft cheque: what was calculated, and the hold and coupon reservations made for it."""

    __tablename__ = "calculations"

    calculation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    partner_id: Mapped[str] = mapped_column(String(64))
    receipt_hash: Mapped[str] = mapped_column(String(64))
    member_id: Mapped[str] = mapped_column(String(64))
    holder_id: Mapped[str] = mapped_column(String(64))
    hold_id: Mapped[str] = mapped_column(String(64), default="")
    points_to_pay: Mapped[int] = mapped_column(BigInteger, default=0)
    # [[code, reservation_id, receipt_ref], ...] of the coupons applied.
    coupon_reservations: Mapped[list[list[str]]] = mapped_column(JSON, default=list)
    # The rules' answer before the points payment, so a commit paying a different
    # amount of points can spread it again.
    evaluation: Mapped[bytes] = mapped_column(LargeBinary)
    response: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default=CalculationState.OPEN.value)
    expire_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    # The rules' points lots before the points payment (a serialized
    # EvaluateReceiptResponse holding only points_lots); NULL: one lot of the defaults.
    points_lots: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class ChequeRow(Base):
    """A committed receipt. Its row is the saga's durable record: once written, the
    receipt's effects are owed and are applied until saga_state is completed."""

    __tablename__ = "receipts"

    partner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    receipt_number: Mapped[str] = mapped_column(String(64), primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    receipt_hash: Mapped[str] = mapped_column(String(64))
    # The receipt and identifier as committed, kept so a receipt whose promotions could
    # not be evaluated at commit can be evaluated by the saga later.
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    identifier: Mapped[bytes] = mapped_column(LargeBinary)
    evaluated: Mapped[bool] = mapped_column(Boolean)
    # The calculation whose hold and coupon reservations the receipt uses; empty if none.
    calculation_id: Mapped[str] = mapped_column(String(36), default="")
    offline: Mapped[bool] = mapped_column(Boolean, default=False)
    member_id: Mapped[str] = mapped_column(String(64))
    holder_id: Mapped[str] = mapped_column(String(64))
    points: Mapped[int] = mapped_column(BigInteger)
    points_paid: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_id: Mapped[str] = mapped_column(String(64), default="")
    coupon_reservations: Mapped[list[list[str]]] = mapped_column(JSON, default=list)
    # The CommitChequeResponse first answered; a retry answers it again.
    response: Mapped[bytes] = mapped_column(LargeBinary)
    saga_state: Mapped[str] = mapped_column(String(16), index=True)
    accrual_entry_id: Mapped[str] = mapped_column(String(64), default="")
    redemption_entry_id: Mapped[str] = mapped_column(String(64), default="")
    # {position: quantity_milli returned so far}; keys are strings in JSON.
    returned: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(500), default="")
    committed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The rules' points lots as on the calculation; NULL (receipts from before lots):
    # one lot of the program's defaults.
    points_lots: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Every lot's accrual entry id, in lot order ("" for a lot of no points);
    # accrual_entry_id is the first lot's.
    accrual_entry_ids: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)

    @property
    def key(self) -> ReceiptKey:
        return ReceiptKey(self.partner_id, self.terminal_id, self.receipt_number)

    @property
    def returned_quantities(self) -> dict[int, int]:
        return {int(position): quantity for position, quantity in (self.returned or {}).items()}


class ReturnRow(Base):
    """A return (or the cancellation of a committed receipt): what it gives back, recorded
    before any of it is applied, and applied by the saga until completed."""

    __tablename__ = "receipt_returns"

    partner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    return_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(64))
    receipt_number: Mapped[str] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    points_taken_back: Mapped[int] = mapped_column(BigInteger)
    points_refunded: Mapped[int] = mapped_column(BigInteger)
    reinstate_coupons: Mapped[bool] = mapped_column(Boolean)
    # The ReturnChequeResponse first answered.
    response: Mapped[bytes] = mapped_column(LargeBinary)
    saga_state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Points taken back from each of the receipt's lots, in lot order; NULL (returns
    # from before lots): all of points_taken_back from the first lot.
    lots_taken_back: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)

    @property
    def receipt_key(self) -> ReceiptKey:
        return ReceiptKey(self.partner_id, self.terminal_id, self.receipt_number)


class ApiKeyRow(Base):
    """A terminal API key; only a hash of its secret is kept."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    partner_id: Mapped[str] = mapped_column(String(64), index=True)
    store_ids: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert


async def add_calculation(session: AsyncSession, row: CalculationRow) -> None:
    session.add(row)
    await session.flush()


async def find_calculation(session: AsyncSession, calculation_id: str, lock: bool = False) -> CalculationRow | None:
    return await session.get(CalculationRow, calculation_id, with_for_update=lock)


async def mark_calculation_committed(session: AsyncSession, calculation_id: str) -> bool:
    """Marks an open calculation committed; False when it was cancelled meanwhile."""
    result = await session.execute(
        update(CalculationRow)
        .where(
            CalculationRow.calculation_id == calculation_id, CalculationRow.state != CalculationState.CANCELLED.value
        )
        .values(state=CalculationState.COMMITTED.value)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def purge_calculations(session: AsyncSession, created_before: datetime) -> int:
    """Deletes soft cheques nobody can commit any more (their holds long lapsed)."""
    result = await session.execute(delete(CalculationRow).where(CalculationRow.created_at < created_before))
    return int(result.rowcount)  # type: ignore[attr-defined]


async def find_cheque(session: AsyncSession, key: ReceiptKey, lock: bool = False) -> ChequeRow | None:
    return await session.get(
        ChequeRow, (key.partner_id, key.terminal_id, key.receipt_number), with_for_update=lock, populate_existing=lock
    )


async def add_cheque_if_new(session: AsyncSession, row: ChequeRow) -> bool:
    """Records the receipt unless it is already recorded; says which.

    ON CONFLICT rather than a caught unique violation: a concurrent commit of the same
    receipt is normal traffic (a register retrying), not an error path.
    """
    values = {column.key: getattr(row, column.key) for column in ChequeRow.__table__.columns}
    result = await session.execute(
        _insert(session)(ChequeRow)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["partner_id", "terminal_id", "receipt_number"])
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def record_attempt(session: AsyncSession, key: ReceiptKey, error: str) -> None:
    row = await session.get_one(ChequeRow, (key.partner_id, key.terminal_id, key.receipt_number))
    row.attempts += 1
    row.last_error = error[:500]


async def count_unfinished(session: AsyncSession) -> int:
    receipts = await session.scalar(
        select(func.count()).select_from(ChequeRow).where(ChequeRow.saga_state == SagaState.COMMITTED.value)
    )
    returns = await session.scalar(
        select(func.count()).select_from(ReturnRow).where(ReturnRow.saga_state == SagaState.COMMITTED.value)
    )
    return (receipts or 0) + (returns or 0)


async def unfinished_cheques(session: AsyncSession, committed_before: datetime, limit: int) -> list[ReceiptKey]:
    rows = await session.execute(
        select(ChequeRow.partner_id, ChequeRow.terminal_id, ChequeRow.receipt_number)
        .where(ChequeRow.saga_state == SagaState.COMMITTED.value, ChequeRow.committed_at < committed_before)
        .order_by(ChequeRow.committed_at)
        .limit(limit)
    )
    return [ReceiptKey(partner, terminal, number) for partner, terminal, number in rows]


async def find_return(session: AsyncSession, partner_id: str, return_id: str) -> ReturnRow | None:
    return await session.get(ReturnRow, (partner_id, return_id))


async def add_return(session: AsyncSession, row: ReturnRow) -> None:
    session.add(row)
    await session.flush()


async def record_return_attempt(session: AsyncSession, partner_id: str, return_id: str, error: str) -> None:
    row = await session.get_one(ReturnRow, (partner_id, return_id))
    row.attempts += 1
    row.last_error = error[:500]


async def mark_return_completed(session: AsyncSession, partner_id: str, return_id: str, now: datetime) -> bool:
    """Marks the return completed; False when a concurrent run already had."""
    result = await session.execute(
        update(ReturnRow)
        .where(
            ReturnRow.partner_id == partner_id,
            ReturnRow.return_id == return_id,
            ReturnRow.saga_state == SagaState.COMMITTED.value,
        )
        .values(saga_state=SagaState.COMPLETED.value, completed_at=now, last_error="", attempts=ReturnRow.attempts + 1)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def unfinished_returns(session: AsyncSession, created_before: datetime, limit: int) -> list[tuple[str, str]]:
    rows = await session.execute(
        select(ReturnRow.partner_id, ReturnRow.return_id)
        .where(ReturnRow.saga_state == SagaState.COMMITTED.value, ReturnRow.created_at < created_before)
        .order_by(ReturnRow.created_at)
        .limit(limit)
    )
    return [(partner, return_id) for partner, return_id in rows]


async def add_api_key(session: AsyncSession, row: ApiKeyRow) -> None:
    session.add(row)
    await session.flush()


async def find_api_key(session: AsyncSession, key_id: str) -> ApiKeyRow | None:
    return await session.get(ApiKeyRow, key_id)


async def list_api_keys(session: AsyncSession, partner_id: str, after: Cursor | None, limit: int) -> list[ApiKeyRow]:
    query = select(ApiKeyRow)
    if partner_id:
        query = query.where(ApiKeyRow.partner_id == partner_id)
    if after is not None:
        query = query.where(
            (ApiKeyRow.created_at < after.time)
            | ((ApiKeyRow.created_at == after.time) & (ApiKeyRow.key_id < after.item_id))
        )
    rows = await session.scalars(query.order_by(ApiKeyRow.created_at.desc(), ApiKeyRow.key_id.desc()).limit(limit))
    return list(rows)
