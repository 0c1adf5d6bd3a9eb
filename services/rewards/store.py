"""Rewards' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.rewards.domain import Coupon, CouponStatus, Reservation, ReservationStatus

MAX_CODE_LENGTH = 32
MAX_MEMBER_ID_LENGTH = 36
MAX_RECEIPT_REF_LENGTH = 100
RESERVATION_ID_LENGTH = 36


class Base(DeclarativeBase):
    pass


class CouponRow(Base):
    __tablename__ = "coupons"

    code: Mapped[str] = mapped_column(String(MAX_CODE_LENGTH), primary_key=True)
    member_id: Mapped[str | None] = mapped_column(String(MAX_MEMBER_ID_LENGTH))
    discount_basis_points: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime())
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Coupon:
        return Coupon(
            code=self.code,
            member_id=self.member_id,
            discount_basis_points=self.discount_basis_points,
            status=CouponStatus(self.status),
            valid_from=self.valid_from,
            valid_until=self.valid_until,
            created_at=self.created_at,
        )


class ReservationRow(Base):
    __tablename__ = "coupon_reservations"
    __table_args__ = (Index("ix_coupon_reservations_code_status", "code", "status"),)

    reservation_id: Mapped[str] = mapped_column(String(RESERVATION_ID_LENGTH), primary_key=True)
    code: Mapped[str] = mapped_column(ForeignKey("coupons.code"))
    member_id: Mapped[str | None] = mapped_column(String(MAX_MEMBER_ID_LENGTH))
    receipt_ref: Mapped[str] = mapped_column(String(MAX_RECEIPT_REF_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    def to_domain(self) -> Reservation:
        return Reservation(
            reservation_id=self.reservation_id,
            code=self.code,
            member_id=self.member_id,
            receipt_ref=self.receipt_ref,
            status=ReservationStatus(self.status),
            expires_at=self.expires_at,
            created_at=self.created_at,
        )


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


async def find_coupon(session: AsyncSession, code: str) -> Coupon | None:
    row = await session.get(CouponRow, code)
    return row.to_domain() if row else None


async def add_coupon(session: AsyncSession, coupon: Coupon) -> None:
    session.add(
        CouponRow(
            code=coupon.code,
            member_id=coupon.member_id,
            discount_basis_points=coupon.discount_basis_points,
            status=coupon.status.value,
            valid_from=coupon.valid_from,
            valid_until=coupon.valid_until,
            created_at=coupon.created_at,
        )
    )
    await session.flush()


async def lock_coupon(session: AsyncSession, code: str) -> Coupon | None:
    """The coupon as the database has it now, locked until the end of the transaction:
    reserving, redeeming and reinstating one coupon run one after another, so two
    registers can never both take it. (SQLite ignores FOR UPDATE; there every
    transaction begins IMMEDIATE and so already runs alone.)"""
    row = await session.scalar(
        select(CouponRow).where(CouponRow.code == code).with_for_update().execution_options(populate_existing=True)
    )
    return row.to_domain() if row else None


async def set_coupon_status(session: AsyncSession, code: str, status: CouponStatus) -> Coupon:
    row = await session.get_one(CouponRow, code)
    row.status = status.value
    await session.flush()
    return row.to_domain()


async def holding_reservations(session: AsyncSession, code: str) -> list[Reservation]:
    """The coupon's reservations still marked active; whether each still holds depends on the clock."""
    rows = await session.scalars(
        select(ReservationRow)
        .where(ReservationRow.code == code, ReservationRow.status == ReservationStatus.ACTIVE.value)
        .execution_options(populate_existing=True)
    )
    return [row.to_domain() for row in rows]


async def redeemed_reservation(session: AsyncSession, code: str) -> Reservation | None:
    """The reservation through which the coupon is currently redeemed, if any."""
    row = await session.scalar(
        select(ReservationRow)
        .where(ReservationRow.code == code, ReservationRow.status == ReservationStatus.REDEEMED.value)
        .execution_options(populate_existing=True)
    )
    return row.to_domain() if row else None


async def find_reservation(session: AsyncSession, reservation_id: str) -> Reservation | None:
    """The reservation as the database has it now (never a copy cached by the session)."""
    row = await session.scalar(
        select(ReservationRow)
        .where(ReservationRow.reservation_id == reservation_id)
        .execution_options(populate_existing=True)
    )
    return row.to_domain() if row else None


async def add_reservation(
    session: AsyncSession, code: str, member_id: str | None, receipt_ref: str, expires_at: datetime, now: datetime
) -> Reservation:
    row = ReservationRow(
        reservation_id=str(uuid.uuid4()),
        code=code,
        member_id=member_id,
        receipt_ref=receipt_ref,
        status=ReservationStatus.ACTIVE.value,
        expires_at=expires_at,
        created_at=now,
        settled_at=None,
    )
    session.add(row)
    await session.flush()
    return row.to_domain()


async def settle_reservation(
    session: AsyncSession, reservation_id: str, status: ReservationStatus, now: datetime
) -> Reservation:
    row = await session.get_one(ReservationRow, reservation_id)
    row.status, row.settled_at = status.value, now
    await session.flush()
    return row.to_domain()
