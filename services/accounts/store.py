"""The ledger's tables and queries; the only module here that speaks SQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    and_,
    any_,
    bindparam,
    case,
    false,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import UtcDateTime
from services.accounts.domain import (
    MAX_ACTOR_LENGTH,
    MAX_HOLDER_ID_LENGTH,
    MAX_REASON_LENGTH,
    MAX_SOURCE_REF_LENGTH,
    Accrual,
    Allocation,
    EntryKind,
    Hold,
    HoldStatus,
    Lot,
    LotRestriction,
    MassAccrualPlan,
    MassItem,
    MassTarget,
    MonthForecast,
    capped_reason,
    mass_item_ref,
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
    # Points a return took back beyond what was left (a negative balance); changed only
    # with the row locked, repaid first by the next accruals.
    debt: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A blocked account refuses accruals, holds, redemptions and transfers; changed only with
    # the row locked, so an operation in flight either finishes before the block or is refused.
    blocked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class LotRow(Base):
    __tablename__ = "lots"
    __table_args__ = (
        Index("ix_lots_account_open", "account_id", "remaining"),
        Index("ix_lots_expiry_due", "expire_at", "expired_at"),
    )

    lot_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    activate_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expire_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(String(16))
    source_ref: Mapped[str] = mapped_column(String(MAX_SOURCE_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # When the expiry job wrote this lot's expiry entry; a lot is expired once, ever.
    expired_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # When points.expiring was announced for this lot.
    expiry_warned_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Promo restrictions: the only stores the points may be spent in (null: any), and the
    # largest share of a receipt, in basis points, they may pay (null: no cap).
    store_ids: Mapped[list[str] | None] = mapped_column(JSON)
    max_receipt_share_bp: Mapped[int | None] = mapped_column(Integer)
    # The coalition partner that issued the points; null: the program itself.
    partner_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))

    def restriction(self) -> LotRestriction | None:
        if not self.store_ids and not self.max_receipt_share_bp:
            return None
        return LotRestriction(frozenset(self.store_ids or ()), self.max_receipt_share_bp or 0)


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
    # For a reversal: the operation it reverses.
    reverses_entry_id: Mapped[str | None] = mapped_column(ForeignKey("entries.entry_id"), index=True)
    # For a redemption (and its reversals): the coalition partner the points were spent at.
    partner_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))


class HoldRow(Base):
    __tablename__ = "holds"
    __table_args__ = (Index("ix_holds_account_status", "account_id", "status"),)

    hold_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    captured: Mapped[int] = mapped_column(BigInteger)
    source_ref: Mapped[str] = mapped_column(String(MAX_SOURCE_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    member_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))
    store_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))
    receipt_amount: Mapped[int | None] = mapped_column(BigInteger)
    partner_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))

    def to_domain(self) -> Hold:
        return Hold(
            self.hold_id,
            self.amount,
            HoldStatus(self.status),
            self.expires_at,
            self.captured,
            self.member_id or "",
            self.store_id or "",
            self.receipt_amount or 0,
            self.partner_id or "",
        )


class AllocationRow(Base):
    """Which lots paid for a redemption entry, and how much each."""

    __tablename__ = "allocations"

    entry_id: Mapped[str] = mapped_column(ForeignKey("entries.entry_id"), primary_key=True)
    lot_id: Mapped[str] = mapped_column(ForeignKey("lots.lot_id"), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class AdjustmentRow(Base):
    """The audit trail of manual adjustments: who credited or debited points by hand, and why."""

    __tablename__ = "adjustments"
    __table_args__ = (Index("ix_adjustments_account_created", "account_id", "created_at"),)

    entry_id: Mapped[str] = mapped_column(ForeignKey("entries.entry_id", name="fk_adjustments_entry"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", name="fk_adjustments_account"))
    amount: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR_LENGTH))
    reason: Mapped[str] = mapped_column(String(MAX_REASON_LENGTH))
    member_id: Mapped[str | None] = mapped_column(String(MAX_HOLDER_ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AccountBlockRow(Base):
    """The audit trail of blocks and unblocks: who, when and why."""

    __tablename__ = "account_blocks"
    __table_args__ = (Index("ix_account_blocks_account_created", "account_id", "created_at"),)

    block_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", name="fk_account_blocks_account"))
    blocked: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR_LENGTH))
    reason: Mapped[str] = mapped_column(String(MAX_REASON_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class MassOperationRow(Base):
    """A mass accrual or deduction: its items are uploaded in chunks, then a background job
    applies them; who ordered it and why are kept for audit."""

    __tablename__ = "mass_operations"

    operation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR_LENGTH))
    reason: Mapped[str] = mapped_column(String(MAX_REASON_LENGTH))
    expire_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class MassItemRow(Base):
    """One (holder, amount) of a mass operation; applied exactly once: its status changes in
    the same transaction as the ledger rows it writes."""

    __tablename__ = "mass_operation_items"
    __table_args__ = (Index("ix_mass_operation_items_pending", "operation_id", "status", "item_index"),)

    operation_id: Mapped[str] = mapped_column(
        ForeignKey("mass_operations.operation_id", name="fk_mass_operation_items_operation"), primary_key=True
    )
    item_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder_id: Mapped[str] = mapped_column(String(MAX_HOLDER_ID_LENGTH))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    failure: Mapped[str | None] = mapped_column(String(64))
    # Of an applied accrual item: the points an accrual limit clipped (null: none).
    capped: Mapped[int | None] = mapped_column(BigInteger)


class MassChunkRow(Base):
    """One applied chunk of a mass operation, written in the chunk's transaction: progress is
    summed over these (a few hundred rows for a million items), never counted over items."""

    __tablename__ = "mass_operation_chunks"

    operation_id: Mapped[str] = mapped_column(
        ForeignKey("mass_operations.operation_id", name="fk_mass_operation_chunks_operation"), primary_key=True
    )
    # The chunk's lowest item index: items are claimed once, so no two chunks share it.
    first_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_index: Mapped[int] = mapped_column(Integer)
    applied: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    # Points credited (accrual) or debited (deduction) by the applied items.
    points: Mapped[int] = mapped_column(BigInteger)
    # Points the daily accrual limit clipped.
    capped: Mapped[int] = mapped_column(BigInteger)
    applied_at: Mapped[datetime] = mapped_column(UtcDateTime())


outbox = define_outbox_table(Base.metadata)
# The tables themselves, for multi-row statements that bypass the ORM's unit of work.
_ACCOUNTS = cast(Table, AccountRow.__table__)
_MASS_ITEMS = cast(Table, MassItemRow.__table__)
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


async def add_accrual(
    session: AsyncSession,
    account: AccountRow,
    accrual: Accrual,
    now: datetime,
    repaid: int = 0,
    kind: EntryKind = EntryKind.ACCRUAL,
) -> EntryRow:
    """A new lot and its entry (an accrual, or a credit adjustment); `repaid` of the points
    go to the account's negative balance instead of the lot (the account must be locked)."""
    account.debt -= repaid
    lot = LotRow(
        lot_id=str(uuid.uuid4()),
        account_id=account.account_id,
        amount=accrual.amount,
        remaining=accrual.amount - repaid,
        activate_at=accrual.activate_at,
        expire_at=accrual.expire_at,
        source=accrual.source.value,
        source_ref=accrual.source_ref,
        created_at=now,
        store_ids=sorted(accrual.restriction.store_ids) or None,
        max_receipt_share_bp=accrual.restriction.max_receipt_share_bp or None,
        partner_id=accrual.partner_id or None,
    )
    entry = EntryRow(
        entry_id=str(uuid.uuid4()),
        account_id=account.account_id,
        kind=kind.value,
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


async def accrued_since(session: AsyncSession, account_id: str, since: datetime, sources: frozenset[str]) -> int:
    """Points credited to the account since `since` by accruals of the given sources."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LotRow.amount), 0)).where(
            LotRow.account_id == account_id, LotRow.created_at >= since, LotRow.source.in_(sources)
        )
    )
    return int(total or 0)


async def open_lots(session: AsyncSession, account_id: str, now: datetime, for_update: bool = False) -> list[Lot]:
    """Lots with points left that have not expired by `now`; locked when about to be spent,
    so the expiry job and a redemption never both take the same points."""
    query = (
        select(LotRow)
        .where(
            LotRow.account_id == account_id,
            LotRow.remaining > 0,
            or_(LotRow.expire_at.is_(None), LotRow.expire_at > now),
        )
        .execution_options(populate_existing=True)
    )
    rows = await session.scalars(query.with_for_update() if for_update else query)
    return [
        Lot(row.lot_id, row.remaining, row.activate_at, row.expire_at, row.restriction(), row.partner_id or "")
        for row in rows
    ]


async def active_lots_in_spending_order(
    session: AsyncSession, account_id: str, now: datetime, limit: int, offset: int
) -> list[Lot]:
    """A batch of the active lots with points left, locked, in the order they are spent
    (soonest expiry first, lots that never expire last): a redemption reads only as many
    batches as it needs, however many lots the account has."""
    rows = await session.scalars(
        select(LotRow)
        .where(
            LotRow.account_id == account_id,
            LotRow.remaining > 0,
            LotRow.activate_at <= now,
            or_(LotRow.expire_at.is_(None), LotRow.expire_at > now),
        )
        .order_by(LotRow.expire_at.is_(None), LotRow.expire_at, LotRow.activate_at, LotRow.lot_id)
        .limit(limit)
        .offset(offset)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return [
        Lot(row.lot_id, row.remaining, row.activate_at, row.expire_at, row.restriction(), row.partner_id or "")
        for row in rows
    ]


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


async def _locked_account(session: AsyncSession, *conditions: ColumnElement[bool]) -> AccountRow | None:
    """The account, locked until the end of the transaction and read fresh: operations that
    change one account run one after another, so none can spend what another just took."""
    account: AccountRow | None = await session.scalar(
        select(AccountRow).where(*conditions).with_for_update().execution_options(populate_existing=True)
    )
    return account


async def lock_account(session: AsyncSession, holder_id: str, currency: str) -> AccountRow | None:
    return await _locked_account(session, AccountRow.holder_id == holder_id, AccountRow.currency == currency)


@dataclass(frozen=True)
class BalanceFigures:
    active: int
    pending: int
    held: int


async def balance_figures(session: AsyncSession, account_id: str, now: datetime) -> BalanceFigures:
    """domain.balance_at computed by the database in one round trip, so a balance costs the
    same for an account with thousands of lots as for one with a single lot."""
    unexpired = or_(LotRow.expire_at.is_(None), LotRow.expire_at > now)
    lots = (
        select(
            func.coalesce(func.sum(case((LotRow.activate_at <= now, LotRow.remaining), else_=0)), 0).label("active"),
            func.coalesce(func.sum(case((LotRow.activate_at > now, LotRow.remaining), else_=0)), 0).label("pending"),
        )
        .where(LotRow.account_id == account_id, LotRow.remaining > 0, unexpired)
        .subquery()
    )
    held = (
        select(func.coalesce(func.sum(HoldRow.amount), 0))
        .where(
            HoldRow.account_id == account_id,
            HoldRow.status == HoldStatus.ACTIVE.value,
            HoldRow.expires_at > now,
        )
        .scalar_subquery()
    )
    row = (await session.execute(select(lots.c.active, lots.c.pending, held))).one()
    return BalanceFigures(int(row[0]), int(row[1]), int(row[2]))


async def live_holds(session: AsyncSession, account_id: str, now: datetime) -> list[Hold]:
    rows = await session.scalars(
        select(HoldRow).where(
            HoldRow.account_id == account_id,
            HoldRow.status == HoldStatus.ACTIVE.value,
            HoldRow.expires_at > now,
        )
    )
    return [row.to_domain() for row in rows]


async def add_hold(
    session: AsyncSession,
    account: AccountRow,
    amount: int,
    expires_at: datetime,
    source_ref: str,
    now: datetime,
    member_id: str = "",
    store_id: str = "",
    receipt_amount: int = 0,
    partner_id: str = "",
) -> Hold:
    row = HoldRow(
        hold_id=str(uuid.uuid4()),
        account_id=account.account_id,
        amount=amount,
        status=HoldStatus.ACTIVE.value,
        expires_at=expires_at,
        captured=0,
        source_ref=source_ref,
        created_at=now,
        settled_at=None,
        member_id=member_id or None,
        store_id=store_id or None,
        receipt_amount=receipt_amount or None,
        partner_id=partner_id or None,
    )
    session.add(row)
    await session.flush()
    return row.to_domain()


async def find_hold(session: AsyncSession, hold_id: str) -> tuple[Hold, AccountRow] | None:
    """The hold as the database has it now (never a copy cached by the session) and its account."""
    row = await session.scalar(
        select(HoldRow).where(HoldRow.hold_id == hold_id).execution_options(populate_existing=True)
    )
    if row is None:
        return None
    return row.to_domain(), await session.get_one(AccountRow, row.account_id)


async def settle_hold(session: AsyncSession, hold_id: str, status: HoldStatus, captured: int, now: datetime) -> Hold:
    row = await session.get_one(HoldRow, hold_id)
    row.status, row.captured, row.settled_at = status.value, captured, now
    await session.flush()
    return row.to_domain()


async def add_redemption(
    session: AsyncSession,
    account: AccountRow,
    allocations: list[Allocation],
    source_ref: str,
    reason: str,
    now: datetime,
    kind: EntryKind = EntryKind.REDEMPTION,
    partner_id: str = "",
) -> EntryRow:
    """Debits the allocated lots and writes one entry (a redemption, or a debit adjustment)
    that remembers them."""
    entry = EntryRow(
        entry_id=str(uuid.uuid4()),
        account_id=account.account_id,
        partner_id=partner_id or None,
        kind=kind.value,
        amount=-sum(allocation.amount for allocation in allocations),
        lot_id=None,
        source_ref=source_ref,
        reason=reason,
        created_at=now,
    )
    session.add(entry)
    await session.flush()
    for allocation in allocations:
        debited = await session.execute(
            update(LotRow)
            .where(LotRow.lot_id == allocation.lot_id, LotRow.remaining >= allocation.amount)
            .values(remaining=LotRow.remaining - allocation.amount)
        )
        if debited.rowcount != 1:  # type: ignore[attr-defined]
            raise RuntimeError(f"lot {allocation.lot_id} no longer holds {allocation.amount} points")
        session.add(AllocationRow(entry_id=entry.entry_id, lot_id=allocation.lot_id, amount=allocation.amount))
    await session.flush()
    return entry


async def add_entry(
    session: AsyncSession,
    account: AccountRow,
    kind: EntryKind,
    amount: int,
    source_ref: str,
    reason: str,
    now: datetime,
) -> EntryRow:
    """An entry that touches no lot: a negative balance moving between accounts."""
    entry = EntryRow(
        entry_id=str(uuid.uuid4()),
        account_id=account.account_id,
        kind=kind.value,
        amount=amount,
        lot_id=None,
        source_ref=source_ref,
        reason=reason,
        created_at=now,
    )
    session.add(entry)
    await session.flush()
    return entry


async def accounts_of(session: AsyncSession, holder_id: str) -> list[AccountRow]:
    return list(await session.scalars(select(AccountRow).where(AccountRow.holder_id == holder_id)))


async def add_adjustment_record(
    session: AsyncSession, entry: EntryRow, actor: str, reason: str, member_id: str, now: datetime
) -> None:
    session.add(
        AdjustmentRow(
            entry_id=entry.entry_id,
            account_id=entry.account_id,
            amount=entry.amount,
            actor=actor,
            reason=reason,
            member_id=member_id or None,
            created_at=now,
        )
    )
    await session.flush()


async def set_blocked(
    session: AsyncSession, account: AccountRow, blocked: bool, actor: str, reason: str, now: datetime
) -> None:
    """Blocks or unblocks the (locked) account and records who did it and why."""
    account.blocked = blocked
    session.add(
        AccountBlockRow(
            block_id=str(uuid.uuid4()),
            account_id=account.account_id,
            blocked=blocked,
            actor=actor,
            reason=reason,
            created_at=now,
        )
    )
    await session.flush()


async def block_history(session: AsyncSession, account_id: str) -> list[AccountBlockRow]:
    return list(
        await session.scalars(
            select(AccountBlockRow)
            .where(AccountBlockRow.account_id == account_id)
            .order_by(AccountBlockRow.created_at, AccountBlockRow.block_id)
        )
    )


async def expiring_points(
    session: AsyncSession, account_id: str, now: datetime, after: datetime | None, limit: int
) -> list[tuple[datetime, int]]:
    """(expiry instant, points) of the account's unexpired lots, soonest first, one pair per
    instant, `limit` instants after `after` (exclusive); pending lots count, they expire too."""
    query = (
        select(LotRow.expire_at, func.sum(LotRow.remaining))
        .where(LotRow.account_id == account_id, LotRow.remaining > 0, LotRow.expire_at > (after or now))
        .group_by(LotRow.expire_at)
        .order_by(LotRow.expire_at)
        .limit(limit)
    )
    return [(expire_at, int(amount)) for expire_at, amount in (await session.execute(query)).all()]


async def outstanding_by_currency(session: AsyncSession, now: datetime) -> dict[str, int]:
    """Points left in lots that have not expired, per currency, across all accounts."""
    rows = await session.execute(
        select(AccountRow.currency, func.coalesce(func.sum(LotRow.remaining), 0))
        .join(LotRow, LotRow.account_id == AccountRow.account_id)
        .where(or_(LotRow.expire_at.is_(None), LotRow.expire_at > now))
        .group_by(AccountRow.currency)
    )
    return {currency: int(total) for currency, total in rows.tuples()}


@dataclass(frozen=True)
class DueLot:
    lot_id: str
    account_id: str
    holder_id: str
    currency: str
    remaining: int
    expire_at: datetime


async def _due_lots(session: AsyncSession, condition: ColumnElement[bool], limit: int) -> list[DueLot]:
    """Lots matching `condition`, locked; lots another job run holds are skipped, not waited for."""
    query = (
        select(LotRow, AccountRow.holder_id, AccountRow.currency)
        .join(AccountRow, AccountRow.account_id == LotRow.account_id)
        .where(condition)
        .order_by(LotRow.expire_at, LotRow.lot_id)
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    if session.bind.dialect.name == "postgresql":
        query = query.with_for_update(of=LotRow, skip_locked=True)
    rows = await session.execute(query)
    return [
        DueLot(lot.lot_id, lot.account_id, holder_id, currency, lot.remaining, lot.expire_at)
        for lot, holder_id, currency in rows.tuples()
        if lot.expire_at is not None
    ]


async def lots_to_expire(session: AsyncSession, now: datetime, limit: int) -> list[DueLot]:
    """Lots past their expiry whose expiry is not written yet."""
    return await _due_lots(session, (LotRow.expire_at <= now) & LotRow.expired_at.is_(None), limit)


async def lots_to_warn(session: AsyncSession, now: datetime, until: datetime, limit: int) -> list[DueLot]:
    """Lots with points left that expire before `until` and were not announced yet."""
    return await _due_lots(
        session,
        (LotRow.expire_at > now)
        & (LotRow.expire_at <= until)
        & (LotRow.remaining > 0)
        & LotRow.expiry_warned_at.is_(None),
        limit,
    )


async def write_expiry(session: AsyncSession, lot: DueLot, now: datetime) -> None:
    """Empties the lot and records why: the entry takes the points out of the balance history."""
    if lot.remaining > 0:
        session.add(
            EntryRow(
                entry_id=str(uuid.uuid4()),
                account_id=lot.account_id,
                kind=EntryKind.EXPIRY.value,
                amount=-lot.remaining,
                lot_id=lot.lot_id,
                source_ref=f"lot:{lot.lot_id}",
                reason="points expired",
                created_at=now,
            )
        )
    await session.execute(update(LotRow).where(LotRow.lot_id == lot.lot_id).values(remaining=0, expired_at=now))
    await session.flush()


async def mark_warned(session: AsyncSession, lot_ids: list[str], now: datetime) -> None:
    await session.execute(update(LotRow).where(LotRow.lot_id.in_(lot_ids)).values(expiry_warned_at=now))


async def find_entry(session: AsyncSession, entry_id: str) -> EntryRow | None:
    return await session.get(EntryRow, entry_id)


async def reversed_so_far(session: AsyncSession, entry_id: str) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(func.abs(EntryRow.amount)), 0)).where(EntryRow.reverses_entry_id == entry_id)
    )
    return int(total or 0)


async def lock_lot(session: AsyncSession, lot_id: str) -> LotRow:
    lot: LotRow | None = await session.scalar(
        select(LotRow).where(LotRow.lot_id == lot_id).with_for_update().execution_options(populate_existing=True)
    )
    if lot is None:
        raise LookupError(f"lot {lot_id} is gone")
    return lot


async def paid_by(session: AsyncSession, entry_id: str) -> list[Allocation]:
    """The lots that paid for a redemption, in the order they were spent."""
    rows = await session.execute(
        select(AllocationRow.lot_id, AllocationRow.amount, LotRow.expire_at, LotRow.activate_at)
        .join(LotRow, LotRow.lot_id == AllocationRow.lot_id)
        .where(AllocationRow.entry_id == entry_id)
    )
    ordered = sorted(
        rows.tuples(),
        key=lambda row: (row[2] is None, row[2] or row[3], row[3], row[0]),
    )
    return [Allocation(lot_id, amount) for lot_id, amount, _expire, _activate in ordered]


async def restored_to(session: AsyncSession, entry_id: str) -> dict[str, int]:
    """Per lot, what reversals of the redemption `entry_id` have given back so far."""
    rows = await session.execute(
        select(AllocationRow.lot_id, func.sum(AllocationRow.amount))
        .join(EntryRow, EntryRow.entry_id == AllocationRow.entry_id)
        .where(EntryRow.reverses_entry_id == entry_id)
        .group_by(AllocationRow.lot_id)
    )
    return {lot_id: int(total) for lot_id, total in rows.tuples()}


async def add_reversal(
    session: AsyncSession,
    account: AccountRow,
    original: EntryRow,
    amount: int,
    restored: list[Allocation],
    source_ref: str,
    now: datetime,
) -> EntryRow:
    """The reversal entry (signed `amount`), remembering the lots it gave points back to."""
    entry = EntryRow(
        entry_id=str(uuid.uuid4()),
        account_id=account.account_id,
        kind=EntryKind.REVERSAL.value,
        amount=amount,
        lot_id=original.lot_id,
        source_ref=source_ref,
        reason=f"reverses {original.kind} {original.entry_id}",
        created_at=now,
        reverses_entry_id=original.entry_id,
        partner_id=original.partner_id,
    )
    session.add(entry)
    await session.flush()
    for allocation in restored:
        session.add(AllocationRow(entry_id=entry.entry_id, lot_id=allocation.lot_id, amount=allocation.amount))
    await session.flush()
    return entry


async def write_off(session: AsyncSession, account: AccountRow, lot_id: str, amount: int, now: datetime) -> None:
    """An expiry entry for points given back to a lot whose expiry was already written."""
    session.add(
        EntryRow(
            entry_id=str(uuid.uuid4()),
            account_id=account.account_id,
            kind=EntryKind.EXPIRY.value,
            amount=-amount,
            lot_id=lot_id,
            source_ref=f"lot:{lot_id}",
            reason="points returned to an expired lot",
            created_at=now,
        )
    )
    await session.flush()


async def lock_account_by_id(session: AsyncSession, account_id: str) -> AccountRow:
    account = await _locked_account(session, AccountRow.account_id == account_id)
    if account is None:
        raise LookupError(f"account {account_id} is gone")
    return account


@dataclass(frozen=True)
class PeriodTotals:
    opening: int
    credits: int
    debits: int


async def period_totals(session: AsyncSession, account_id: str, start: datetime, end: datetime) -> PeriodTotals:
    """The sum of the entries before `start`, and the credits and debits in [start, end)."""
    in_period = and_(EntryRow.created_at >= start, EntryRow.created_at < end)
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(case((EntryRow.created_at < start, EntryRow.amount), else_=0)), 0),
                func.coalesce(func.sum(case((and_(in_period, EntryRow.amount > 0), EntryRow.amount), else_=0)), 0),
                func.coalesce(func.sum(case((and_(in_period, EntryRow.amount < 0), EntryRow.amount), else_=0)), 0),
            ).where(EntryRow.account_id == account_id, EntryRow.created_at < end)
        )
    ).one()
    return PeriodTotals(int(row[0]), int(row[1]), int(row[2]))


async def entries_in_period(
    session: AsyncSession, account_id: str, start: datetime, end: datetime, limit: int, after: Cursor | None
) -> list[EntryRow]:
    """Entries in [start, end), oldest first, starting after the (created_at, entry_id) of the previous page."""
    query = select(EntryRow).where(
        EntryRow.account_id == account_id, EntryRow.created_at >= start, EntryRow.created_at < end
    )
    if after is not None:
        query = query.where(
            or_(
                EntryRow.created_at > after.time,
                (EntryRow.created_at == after.time) & (EntryRow.entry_id > after.item_id),
            )
        )
    return list(await session.scalars(query.order_by(EntryRow.created_at, EntryRow.entry_id).limit(limit)))


@dataclass(frozen=True)
class Liability:
    currency: str
    active: int
    pending: int
    negative: int
    expiring_30_days: int
    expiring_90_days: int


async def liability(session: AsyncSession, now: datetime, soon: datetime, later: datetime) -> list[Liability]:
    """Per currency: points not expired (active, pending), what expires by `soon` and by
    `later`, and the negative balances owed to the program."""
    unexpired = or_(LotRow.expire_at.is_(None), LotRow.expire_at > now)

    def total(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, LotRow.remaining), else_=0)), 0)

    lots = await session.execute(
        select(
            AccountRow.currency,
            total(and_(unexpired, LotRow.activate_at <= now)),
            total(and_(unexpired, LotRow.activate_at > now)),
            total(and_(unexpired, LotRow.expire_at <= soon)),
            total(and_(unexpired, LotRow.expire_at <= later)),
        )
        .join(LotRow, LotRow.account_id == AccountRow.account_id)
        .where(LotRow.remaining > 0)
        .group_by(AccountRow.currency)
    )
    owed = await session.execute(
        select(AccountRow.currency, func.sum(AccountRow.debt)).where(AccountRow.debt > 0).group_by(AccountRow.currency)
    )
    debts = {currency: int(total) for currency, total in owed.tuples()}
    figures = {row[0]: row for row in lots.tuples()}
    return [
        Liability(
            currency,
            int(figures[currency][1]) if currency in figures else 0,
            int(figures[currency][2]) if currency in figures else 0,
            int(debts.get(currency) or 0),
            int(figures[currency][3]) if currency in figures else 0,
            int(figures[currency][4]) if currency in figures else 0,
        )
        for currency in sorted({*figures, *debts})
    ]


async def expiry_forecast(session: AsyncSession, now: datetime, starts: list[datetime]) -> list[MonthForecast]:
    """Points of unexpired lots with points left whose last spendable instant falls in month
    i, i.e. expire_at in (starts[i], starts[i + 1]] (points expiring at 00:00 on the 1st, as
    month_end rounding makes them, belong to the month that ends then), per currency and
    issuing partner: one grouped statement, the month found by a CASE over the boundaries so
    it reads the same on every database."""
    month = case(
        *((LotRow.expire_at <= boundary, index) for index, boundary in enumerate(starts[1:])), else_=len(starts)
    )
    due = (
        select(
            month.label("month"),
            AccountRow.currency.label("currency"),
            func.coalesce(LotRow.partner_id, "").label("partner_id"),
            LotRow.remaining.label("points"),
        )
        .join(AccountRow, AccountRow.account_id == LotRow.account_id)
        .where(
            LotRow.remaining > 0,
            LotRow.expire_at > now,
            LotRow.expire_at > starts[0],
            LotRow.expire_at <= starts[-1],
        )
        .subquery()
    )
    rows = await session.execute(
        select(due.c.month, due.c.currency, due.c.partner_id, func.sum(due.c.points)).group_by(
            due.c.month, due.c.currency, due.c.partner_id
        )
    )
    lines = [
        MonthForecast(starts[index].date(), currency, partner_id, int(points))
        for index, currency, partner_id, points in rows.tuples()
        if points
    ]
    return sorted(lines, key=lambda line: (line.month, line.currency, line.partner_id))


@dataclass(frozen=True)
class Settlement:
    issuer_partner_id: str
    spender_partner_id: str
    currency: str
    points: int


async def partner_settlements(session: AsyncSession, start: datetime, end: datetime) -> list[Settlement]:
    """Per (issuing partner, spending partner, currency): points issued by one and spent at
    another in [start, end), net of the redemptions reversed in the period. The program
    itself is the partner ''."""
    issuer = func.coalesce(LotRow.partner_id, "")
    spender = func.coalesce(EntryRow.partner_id, "")
    signed = case((EntryRow.kind == EntryKind.REDEMPTION.value, AllocationRow.amount), else_=-AllocationRow.amount)
    rows = await session.execute(
        select(issuer, spender, AccountRow.currency, func.sum(signed))
        .select_from(AllocationRow)
        .join(EntryRow, EntryRow.entry_id == AllocationRow.entry_id)
        .join(LotRow, LotRow.lot_id == AllocationRow.lot_id)
        .join(AccountRow, AccountRow.account_id == EntryRow.account_id)
        .where(
            EntryRow.kind.in_([EntryKind.REDEMPTION.value, EntryKind.REVERSAL.value]),
            EntryRow.created_at >= start,
            EntryRow.created_at < end,
            issuer != spender,
        )
        .group_by(issuer, spender, AccountRow.currency)
        .order_by(issuer, spender, AccountRow.currency)
    )
    return [Settlement(a, b, currency, int(points)) for a, b, currency, points in rows.tuples() if points]


MASS_PENDING = "pending"
MASS_APPLIED = "applied"
MASS_FAILED = "failed"


async def add_mass_items(session: AsyncSession, operation: MassOperationRow, items: list[tuple[str, int]]) -> None:
    """Appends items to the (locked) operation, numbered after those it has: on PostgreSQL
    as arrays the server unnests, one statement per upload call."""
    if items:
        holder_ids = [holder_id for holder_id, _amount in items]
        amounts = [amount for _holder_id, amount in items]
        if _is_postgresql(session):
            await session.execute(
                text(
                    "INSERT INTO mass_operation_items (operation_id, item_index, holder_id, amount, status)"
                    " SELECT :operation_id, :first + new.position - 1, new.holder_id, new.amount, :pending"
                    " FROM unnest(CAST(:holder_ids AS varchar[]), CAST(:amounts AS bigint[]))"
                    " WITH ORDINALITY AS new(holder_id, amount, position)"
                ),
                {
                    "operation_id": operation.operation_id,
                    "first": operation.total,
                    "pending": MASS_PENDING,
                    "holder_ids": holder_ids,
                    "amounts": amounts,
                },
            )
        else:
            await session.execute(
                insert(_MASS_ITEMS),
                [
                    {
                        "operation_id": operation.operation_id,
                        "item_index": operation.total + offset,
                        "holder_id": holder_id,
                        "amount": amount,
                        "status": MASS_PENDING,
                    }
                    for offset, (holder_id, amount) in enumerate(items)
                ],
            )
    operation.total += len(items)
    await session.flush()


async def find_mass_operation(
    session: AsyncSession, operation_id: str, for_update: bool = False
) -> MassOperationRow | None:
    query = select(MassOperationRow).where(MassOperationRow.operation_id == operation_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    operation: MassOperationRow | None = await session.scalar(query)
    return operation


@dataclass(frozen=True)
class MassProgress:
    applied: int
    failed: int
    # Points accrual limits clipped from applied items.
    capped: int


async def mass_progress(session: AsyncSession, operation_id: str) -> MassProgress:
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(MassChunkRow.applied), 0),
                func.coalesce(func.sum(MassChunkRow.failed), 0),
                func.coalesce(func.sum(MassChunkRow.capped), 0),
            ).where(MassChunkRow.operation_id == operation_id)
        )
    ).one()
    return MassProgress(int(row[0]), int(row[1]), int(row[2]))


async def mass_failures(session: AsyncSession, operation_id: str, limit: int) -> list[MassItemRow]:
    return list(
        await session.scalars(
            select(MassItemRow)
            .where(MassItemRow.operation_id == operation_id, MassItemRow.status == MASS_FAILED)
            .order_by(MassItemRow.item_index)
            .limit(limit)
        )
    )


def _is_postgresql(session: AsyncSession) -> bool:
    return session.bind.dialect.name == "postgresql"


async def claim_mass_chunk(
    session: AsyncSession, running: str, limit: int, after: dict[str, int]
) -> tuple[MassOperationRow, list[MassItem]] | None:
    """Up to `limit` pending items, in index order, of the oldest running operation that has
    any unclaimed. The operation is share-locked first and checked to be still running: a
    cancel (which locks it for update) waits for the chunks in flight, and a chunk that
    comes after it applies nothing. The items are locked (another replica skips them: SKIP
    LOCKED on PostgreSQL; SQLite has a single writer); on PostgreSQL they are marked applied
    by the claiming statement itself, which the chunk's rollback undoes. `after` holds, per
    operation, the last index this replica handled, so a claim does not walk the index
    entries of items already applied; an item a dead replica held below it is found by a
    pass that starts at -1."""
    operations = await session.scalars(
        select(MassOperationRow.operation_id)
        .where(MassOperationRow.status == running)
        .order_by(MassOperationRow.created_at, MassOperationRow.operation_id)
    )
    for operation_id in list(operations):
        operation = await session.scalar(
            select(MassOperationRow)
            .where(MassOperationRow.operation_id == operation_id, MassOperationRow.status == running)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
        if operation is None:
            continue
        items = _MASS_ITEMS
        pending = (
            select(items.c.item_index, items.c.holder_id, items.c.amount)
            .where(
                items.c.operation_id == operation_id,
                items.c.status == MASS_PENDING,
                items.c.item_index > after.get(operation_id, -1),
            )
            .order_by(items.c.item_index)
            .limit(limit)
        )
        if _is_postgresql(session):
            # A materialised CTE picks the chunk once; a subquery under IN may be run again
            # per row of the UPDATE, each run locking (and so claiming) other items.
            rows = await session.execute(
                text(
                    "WITH claimed AS MATERIALIZED ("
                    " SELECT item_index FROM mass_operation_items"
                    " WHERE operation_id = :operation_id AND status = :pending AND item_index > :after"
                    " ORDER BY item_index LIMIT :limit FOR UPDATE SKIP LOCKED)"
                    " UPDATE mass_operation_items AS items SET status = :applied FROM claimed"
                    " WHERE items.operation_id = :operation_id AND items.item_index = claimed.item_index"
                    " RETURNING items.item_index, items.holder_id, items.amount"
                ),
                {
                    "operation_id": operation_id,
                    "pending": MASS_PENDING,
                    "applied": MASS_APPLIED,
                    "after": after.get(operation_id, -1),
                    "limit": limit,
                },
            )
        else:
            rows = await session.execute(pending)
        found = [MassItem(index, holder_id, amount) for index, holder_id, amount in rows.tuples()]
        if found:
            return operation, sorted(found, key=lambda item: item.index)
    return None


@dataclass(frozen=True)
class MassChunk:
    operation_id: str
    first_index: int
    last_index: int
    # Indexes of the items applied.
    applied: list[int]
    # Index -> reason of the items that failed.
    failures: dict[int, str]
    # Index -> points the accrual limit clipped, of applied items.
    capped: dict[int, int]
    points: int


async def settle_mass_items(session: AsyncSession, chunk: MassChunk, now: datetime) -> None:
    """Marks a chunk's items applied (on SQLite; on PostgreSQL the claim did), or failed with
    their reason, records the points an accrual limit clipped from applied ones, and the
    chunk's progress row."""
    operation_id, applied, failures, capped = chunk.operation_id, chunk.applied, chunk.failures, chunk.capped
    session.add(
        MassChunkRow(
            operation_id=operation_id,
            first_index=chunk.first_index,
            last_index=chunk.last_index,
            applied=len(applied),
            failed=len(failures),
            points=chunk.points,
            capped=sum(capped.values()),
            applied_at=now,
        )
    )
    await session.flush()
    items = _MASS_ITEMS
    if applied and not _is_postgresql(session):  # on PostgreSQL the claim marked them
        await session.execute(
            update(items)
            .where(items.c.operation_id == operation_id, items.c.item_index == bindparam("index"))
            .values(status=MASS_APPLIED),
            [{"index": index} for index in applied],
        )
    changes = [
        {"index": index, "status": MASS_FAILED, "failure": reason, "capped": None} for index, reason in failures.items()
    ] + [
        {"index": index, "status": MASS_APPLIED, "failure": None, "capped": points} for index, points in capped.items()
    ]
    if changes:
        await session.execute(
            update(items)
            .where(items.c.operation_id == operation_id, items.c.item_index == bindparam("index"))
            .values(status=bindparam("status"), failure=bindparam("failure"), capped=bindparam("capped")),
            changes,
        )


async def finish_mass_operations(session: AsyncSession, running: str, finished: str, now: datetime) -> None:
    """Running operations with no pending item left are finished; one a replica is still
    applying a chunk of (it holds the row shared) is skipped: that replica finishes it."""
    pending = select(MassItemRow.item_index).where(
        MassItemRow.operation_id == MassOperationRow.operation_id, MassItemRow.status == MASS_PENDING
    )
    done = (
        select(MassOperationRow.operation_id)
        .where(MassOperationRow.status == running, ~pending.exists())
        .with_for_update(skip_locked=True)
    )
    await session.execute(
        update(MassOperationRow)
        .where(MassOperationRow.operation_id.in_(done.scalar_subquery()))
        .values(status=finished, finished_at=now)
        .execution_options(synchronize_session=False)
    )


async def lock_mass_targets(
    session: AsyncSession, holder_ids: list[str], currency: str, now: datetime
) -> dict[str, MassTarget]:
    """The holders' accounts, opened when new and locked in holder order (as every
    multi-account operation locks them, so none deadlocks): two statements per chunk. An
    account this transaction has just opened is not locked again: no other transaction can
    see it before the commit, and it owes nothing and is not blocked."""
    ordered = sorted(set(holder_ids))
    account_ids = [str(uuid.uuid4()) for _ in ordered]
    opened: dict[str, MassTarget] = {}
    if _is_postgresql(session):
        created = await session.execute(
            text(
                "INSERT INTO accounts (account_id, holder_id, currency, created_at)"
                " SELECT new.account_id, new.holder_id, :currency, :now"
                " FROM unnest(CAST(:account_ids AS varchar[]), CAST(:holder_ids AS varchar[]))"
                " AS new(account_id, holder_id) ORDER BY new.holder_id"
                " ON CONFLICT (holder_id, currency) DO NOTHING"
                " RETURNING holder_id, account_id"
            ).bindparams(bindparam("now", type_=UtcDateTime())),
            {"currency": currency, "now": now, "account_ids": account_ids, "holder_ids": ordered},
        )
        opened = {holder_id: MassTarget(account_id, 0, False) for holder_id, account_id in created.tuples()}
        existing = [holder_id for holder_id in ordered if holder_id not in opened]
        if not existing:
            return opened
        holders: ColumnElement[bool] = AccountRow.holder_id == any_(
            bindparam("holders", existing, type_=postgresql.ARRAY(String()))
        )
    else:
        await session.execute(
            sqlite.insert(AccountRow).on_conflict_do_nothing(index_elements=["holder_id", "currency"]),
            [
                {"account_id": account_id, "holder_id": holder_id, "currency": currency, "created_at": now}
                for account_id, holder_id in zip(account_ids, ordered, strict=True)
            ],
        )
        holders = AccountRow.holder_id.in_(ordered)
    rows = await session.execute(
        select(AccountRow.holder_id, AccountRow.account_id, AccountRow.debt, AccountRow.blocked)
        .where(AccountRow.currency == currency, holders)
        .order_by(AccountRow.holder_id)
        .with_for_update()
    )
    return opened | {
        holder_id: MassTarget(account_id, debt, blocked) for holder_id, account_id, debt, blocked in rows.tuples()
    }


async def accrued_since_by_account(
    session: AsyncSession, account_ids: list[str], since: datetime, sources: frozenset[str]
) -> dict[str, int]:
    """accrued_since for many accounts in one statement."""
    accounts = (
        LotRow.account_id == any_(bindparam("accounts", account_ids, type_=postgresql.ARRAY(String())))
        if _is_postgresql(session)
        else LotRow.account_id.in_(account_ids)
    )
    rows = await session.execute(
        select(LotRow.account_id, func.sum(LotRow.amount))
        .where(accounts, LotRow.created_at >= since, LotRow.source.in_(sources))
        .group_by(LotRow.account_id)
    )
    return {account_id: int(total) for account_id, total in rows.tuples()}


async def add_mass_credits(
    session: AsyncSession, operation: MassOperationRow, plan: MassAccrualPlan, source: str, now: datetime
) -> None:
    """What add_accrual writes for one credit (a lot and its entry, here of kind ADJUSTMENT),
    written for a whole chunk at once, and the negative balances the chunk repays (the
    accounts must be locked). The operation's row is the audit record of who ordered the
    credits and why; each entry's source_ref names the operation and the item."""
    if not plan.credits:
        return
    account_ids = [credit.account_id for credit in plan.credits]
    amounts = [credit.amount for credit in plan.credits]
    remaining = [credit.amount - credit.repaid for credit in plan.credits]
    refs = [mass_item_ref(operation.operation_id, credit.index) for credit in plan.credits]
    reasons = [
        capped_reason(operation.reason, credit.amount + credit.capped, credit.amount)
        if credit.capped
        else operation.reason
        for credit in plan.credits
    ]
    if _is_postgresql(session):
        # One statement for both tables: the lot ids are made by the server and shared
        # through the materialised CTE; the entries' foreign keys see the lots at its end.
        await session.execute(
            text(
                "WITH new AS MATERIALIZED ("
                " SELECT gen_random_uuid()::varchar AS lot_id, account_id, amount, remaining, ref, reason"
                " FROM unnest(CAST(:account_ids AS varchar[]), CAST(:amounts AS bigint[]),"
                " CAST(:remaining AS bigint[]), CAST(:refs AS varchar[]), CAST(:reasons AS varchar[]))"
                " AS input(account_id, amount, remaining, ref, reason)),"
                " lots_written AS (INSERT INTO lots (lot_id, account_id, amount, remaining, activate_at, expire_at,"
                " source, source_ref, created_at)"
                " SELECT lot_id, account_id, amount, remaining, :now, :expire_at, :source, ref, :now FROM new)"
                " INSERT INTO entries (entry_id, account_id, kind, amount, lot_id, source_ref, reason, created_at)"
                " SELECT gen_random_uuid()::varchar, account_id, :kind, amount, lot_id, ref, reason, :now FROM new"
            ).bindparams(bindparam("now", type_=UtcDateTime()), bindparam("expire_at", type_=UtcDateTime())),
            {
                "now": now,
                "expire_at": operation.expire_at,
                "source": source,
                "kind": EntryKind.ADJUSTMENT.value,
                "account_ids": account_ids,
                "amounts": amounts,
                "remaining": remaining,
                "refs": refs,
                "reasons": reasons,
            },
        )
    else:
        lot_ids = [str(uuid.uuid4()) for _ in plan.credits]
        await session.execute(
            insert(LotRow),
            [
                {
                    "lot_id": lot_id,
                    "account_id": account_id,
                    "amount": amount,
                    "remaining": left,
                    "activate_at": now,
                    "expire_at": operation.expire_at,
                    "source": source,
                    "source_ref": ref,
                    "created_at": now,
                }
                for lot_id, account_id, amount, left, ref in zip(
                    lot_ids, account_ids, amounts, remaining, refs, strict=True
                )
            ],
        )
        await session.execute(
            insert(EntryRow),
            [
                {
                    "entry_id": str(uuid.uuid4()),
                    "account_id": account_id,
                    "kind": EntryKind.ADJUSTMENT.value,
                    "amount": amount,
                    "lot_id": lot_id,
                    "source_ref": ref,
                    "reason": reason,
                    "created_at": now,
                }
                for lot_id, account_id, amount, ref, reason in zip(
                    lot_ids, account_ids, amounts, refs, reasons, strict=True
                )
            ],
        )
    if plan.repaid:
        accounts = _ACCOUNTS
        await session.execute(
            update(accounts)
            .where(accounts.c.account_id == bindparam("id"))
            .values(debt=accounts.c.debt - bindparam("repaid")),
            [{"id": account_id, "repaid": repaid} for account_id, repaid in plan.repaid.items()],
        )
