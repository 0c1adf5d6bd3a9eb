"""Rewards' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.rewards.domain import Coupon, CouponStatus

MAX_CODE_LENGTH = 32
MAX_MEMBER_ID_LENGTH = 36


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
