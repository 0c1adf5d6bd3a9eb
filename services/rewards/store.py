"""Rewards' tables and the queries on them; the only module here that speaks SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.inbox import define_inbox_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.rewards.domain import (
    Badge,
    BadgeAward,
    ChipProgram,
    Coupon,
    CouponStatus,
    GiftCard,
    GiftCardEntry,
    GiftCardEntryKind,
    GiftCardStatus,
    ReceiptSpending,
    Reservation,
    ReservationStatus,
    Series,
    SeriesKind,
)

MAX_CODE_LENGTH = 32
MAX_MEMBER_ID_LENGTH = 36
MAX_RECEIPT_REF_LENGTH = 100
MAX_NAME_LENGTH = 200
MAX_DESCRIPTION_LENGTH = 1000
MAX_REF_ID_LENGTH = 64
"""Ids of other services' resources kept here: campaigns, partners."""
ID_LENGTH = 36
RESERVATION_ID_LENGTH = ID_LENGTH


class Base(DeclarativeBase):
    pass


class SeriesRow(Base):
    __tablename__ = "coupon_series"

    series_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    campaign_id: Mapped[str | None] = mapped_column(String(MAX_REF_ID_LENGTH))
    benefit: Mapped[bytes] = mapped_column(LargeBinary)
    min_receipt_total_minor: Mapped[int] = mapped_column(BigInteger)
    uses_per_code: Mapped[int] = mapped_column(Integer)
    uses_per_member: Mapped[int] = mapped_column(Integer)
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime())
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    validity_days: Mapped[int] = mapped_column(Integer)
    mass_code: Mapped[str | None] = mapped_column(String(MAX_CODE_LENGTH))
    code_alphabet: Mapped[str] = mapped_column(String(64))
    code_length: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Series:
        return Series(
            series_id=self.series_id,
            name=self.name,
            kind=SeriesKind(self.kind),
            campaign_id=self.campaign_id,
            benefit=self.benefit,
            min_receipt_total_minor=self.min_receipt_total_minor,
            uses_per_code=self.uses_per_code,
            uses_per_member=self.uses_per_member,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
            validity_days=self.validity_days,
            mass_code=self.mass_code,
            code_alphabet=self.code_alphabet,
            code_length=self.code_length,
            created_at=self.created_at,
        )


class CouponRow(Base):
    __tablename__ = "coupons"
    __table_args__ = (
        Index("ix_coupons_series_code", "series_id", "code"),
        Index("ix_coupons_series_partner", "series_id", "partner_id"),
    )

    code: Mapped[str] = mapped_column(String(MAX_CODE_LENGTH), primary_key=True)
    series_id: Mapped[str] = mapped_column(ForeignKey("coupon_series.series_id", name="fk_coupons_series"))
    member_id: Mapped[str | None] = mapped_column(String(MAX_MEMBER_ID_LENGTH))
    partner_id: Mapped[str | None] = mapped_column(String(MAX_REF_ID_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    uses: Mapped[int] = mapped_column(Integer)
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime())
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self, series: Series) -> Coupon:
        return Coupon(
            code=self.code,
            series=series,
            member_id=self.member_id,
            partner_id=self.partner_id,
            status=CouponStatus(self.status),
            uses=self.uses,
            valid_from=self.valid_from,
            valid_until=self.valid_until,
            created_at=self.created_at,
        )


class ReservationRow(Base):
    __tablename__ = "coupon_reservations"
    __table_args__ = (
        Index("ix_coupon_reservations_code_status", "code", "status"),
        Index("ix_coupon_reservations_member_uses", "series_id", "member_id", "status"),
    )

    reservation_id: Mapped[str] = mapped_column(String(RESERVATION_ID_LENGTH), primary_key=True)
    code: Mapped[str] = mapped_column(ForeignKey("coupons.code", name="fk_coupon_reservations_coupon"))
    series_id: Mapped[str] = mapped_column(String(ID_LENGTH))
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
            series_id=self.series_id,
            member_id=self.member_id,
            receipt_ref=self.receipt_ref,
            status=ReservationStatus(self.status),
            expires_at=self.expires_at,
            created_at=self.created_at,
        )


class CodeJobRow(Base):
    """A code generation job; ``generated`` advances in the transaction that writes each batch,
    so a job interrupted by a crash resumes exactly where it stopped."""

    __tablename__ = "code_generation_jobs"
    __table_args__ = (Index("ix_code_generation_jobs_unfinished", "finished_at"),)

    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    series_id: Mapped[str] = mapped_column(ForeignKey("coupon_series.series_id", name="fk_code_generation_jobs_series"))
    requested: Mapped[int] = mapped_column(Integer)
    generated: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class GiftCardRow(Base):
    __tablename__ = "gift_cards"
    __table_args__ = (CheckConstraint("balance_minor >= 0", name="ck_gift_cards_balance_not_negative"),)

    card_number: Mapped[str] = mapped_column(String(MAX_CODE_LENGTH), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    currency_code: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    balance_minor: Mapped[int] = mapped_column(BigInteger)
    pin_hash: Mapped[str | None] = mapped_column(String(200))
    validity_days: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    def to_domain(self) -> GiftCard:
        return GiftCard(
            card_number=self.card_number,
            batch_id=self.batch_id,
            currency_code=self.currency_code,
            status=GiftCardStatus(self.status),
            balance_minor=self.balance_minor,
            pin_hash=self.pin_hash,
            validity_days=self.validity_days,
            expires_at=self.expires_at,
            created_at=self.created_at,
            activated_at=self.activated_at,
        )


class GiftCardEntryRow(Base):
    """A card's ledger: append-only; the card's balance is the sum of its entries."""

    __tablename__ = "gift_card_entries"
    __table_args__ = (
        CheckConstraint("balance_after_minor >= 0", name="ck_gift_card_entries_balance_not_negative"),
        Index("ix_gift_card_entries_card_receipt", "card_number", "receipt_ref"),
    )

    entry_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    card_number: Mapped[str] = mapped_column(ForeignKey("gift_cards.card_number", name="fk_gift_card_entries_card"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    balance_after_minor: Mapped[int] = mapped_column(BigInteger)
    receipt_ref: Mapped[str] = mapped_column(String(MAX_RECEIPT_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class BadgeRow(Base):
    __tablename__ = "badges"

    badge_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> Badge:
        return Badge(self.badge_id, self.name, self.description, self.created_at)


class BadgeAwardRow(Base):
    """A member holds a badge at most once: the primary key makes awarding idempotent."""

    __tablename__ = "badge_awards"

    member_id: Mapped[str] = mapped_column(String(MAX_MEMBER_ID_LENGTH), primary_key=True)
    badge_id: Mapped[str] = mapped_column(ForeignKey("badges.badge_id", name="fk_badge_awards_badge"), primary_key=True)
    awarded_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ChipProgramRow(Base):
    __tablename__ = "chip_programs"

    chip_program_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    currency_code: Mapped[str] = mapped_column(String(3))
    spend_per_chip_minor: Mapped[int] = mapped_column(BigInteger)
    chips_per_exchange: Mapped[int] = mapped_column(Integer)
    exchange_series_id: Mapped[str] = mapped_column(
        ForeignKey("coupon_series.series_id", name="fk_chip_programs_series")
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    def to_domain(self) -> ChipProgram:
        return ChipProgram(
            chip_program_id=self.chip_program_id,
            name=self.name,
            currency_code=self.currency_code,
            spend_per_chip_minor=self.spend_per_chip_minor,
            chips_per_exchange=self.chips_per_exchange,
            exchange_series_id=self.exchange_series_id,
            created_at=self.created_at,
        )


class ChipAccountRow(Base):
    """A member's chips in one collection: the sum of their chip entries, never negative."""

    __tablename__ = "chip_accounts"
    __table_args__ = (CheckConstraint("chips >= 0", name="ck_chip_accounts_chips_not_negative"),)

    chip_program_id: Mapped[str] = mapped_column(
        ForeignKey("chip_programs.chip_program_id", name="fk_chip_accounts_program"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(String(MAX_MEMBER_ID_LENGTH), primary_key=True)
    chips: Mapped[int] = mapped_column(Integer)


class ChipEntryRow(Base):
    """Chips earned (by a receipt) or spent (by an exchange); append-only. One entry per
    collection, member and reference, so a receipt earns its chips once."""

    __tablename__ = "chip_entries"
    __table_args__ = (
        UniqueConstraint("chip_program_id", "member_id", "ref", name="uq_chip_entries_ref"),
        CheckConstraint("chips_after >= 0", name="ck_chip_entries_chips_not_negative"),
    )

    entry_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    chip_program_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    member_id: Mapped[str] = mapped_column(String(MAX_MEMBER_ID_LENGTH))
    chips: Mapped[int] = mapped_column(Integer)
    chips_after: Mapped[int] = mapped_column(Integer)
    ref: Mapped[str] = mapped_column(String(MAX_RECEIPT_REF_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)
inbox = define_inbox_table(Base.metadata)


def _dialect_insert(session: AsyncSession, table: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """INSERT with ON CONFLICT for the session's database. Executed with a list of rows it
    runs as SQLAlchemy's batched "insertmanyvalues" with RETURNING, one cached statement."""
    if session.bind.dialect.name == "postgresql":
        return postgresql.Insert(table)
    return sqlite.Insert(table)


# Series


async def add_series(session: AsyncSession, series: Series) -> None:
    session.add(
        SeriesRow(
            series_id=series.series_id,
            name=series.name,
            kind=series.kind.value,
            campaign_id=series.campaign_id,
            benefit=series.benefit,
            min_receipt_total_minor=series.min_receipt_total_minor,
            uses_per_code=series.uses_per_code,
            uses_per_member=series.uses_per_member,
            valid_from=series.valid_from,
            valid_until=series.valid_until,
            validity_days=series.validity_days,
            mass_code=series.mass_code,
            code_alphabet=series.code_alphabet,
            code_length=series.code_length,
            created_at=series.created_at,
        )
    )
    await session.flush()


async def find_series(session: AsyncSession, series_id: str) -> Series | None:
    row = await session.get(SeriesRow, series_id)
    return row.to_domain() if row else None


async def lock_series(session: AsyncSession, series_id: str) -> None:
    """Locks the series until the end of the transaction: reservations counted against a
    per-member limit of the series then run one after another."""
    await session.execute(select(SeriesRow.series_id).where(SeriesRow.series_id == series_id).with_for_update())


# Coupons


def _coupon_values(coupon: Coupon) -> dict[str, object]:
    return {
        "code": coupon.code,
        "series_id": coupon.series.series_id,
        "member_id": coupon.member_id,
        "partner_id": coupon.partner_id,
        "status": coupon.status.value,
        "uses": coupon.uses,
        "valid_from": coupon.valid_from,
        "valid_until": coupon.valid_until,
        "created_at": coupon.created_at,
    }


async def code_exists(session: AsyncSession, code: str) -> bool:
    return await session.scalar(select(CouponRow.code).where(CouponRow.code == code)) is not None


async def add_coupon(session: AsyncSession, coupon: Coupon) -> None:
    await session.execute(insert(CouponRow).values(_coupon_values(coupon)))


# From this many coupons on, PostgreSQL receives them by COPY into a scratch table, about
# twice as fast as batched INSERTs (measured with tools/bench_rewards.py).
COPY_THRESHOLD = 1000
_COUPON_COLUMNS = (
    "code",
    "series_id",
    "member_id",
    "partner_id",
    "status",
    "uses",
    "valid_from",
    "valid_until",
    "created_at",
)


async def add_new_coupons(session: AsyncSession, coupons: Sequence[Coupon]) -> set[str]:
    """Inserts the coupons whose code is free; returns the codes written. A code taken
    meanwhile, by this batch or anyone, is skipped, never an error."""
    if not coupons:
        return set()
    rows = [_coupon_values(coupon) for coupon in coupons]
    if session.bind.dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        return await _copy_new_coupons(session, rows)
    statement = (
        _dialect_insert(session, CouponRow).on_conflict_do_nothing(index_elements=["code"]).returning(CouponRow.code)
    )
    return set((await session.scalars(statement, rows)).all())


async def _copy_new_coupons(session: AsyncSession, rows: Sequence[dict[str, object]]) -> set[str]:
    """COPY into a scratch table of this transaction, then one INSERT ... ON CONFLICT DO NOTHING."""
    columns = ", ".join(_COUPON_COLUMNS)
    # Through the session, so the scratch table lives in the session's transaction.
    await session.execute(text("CREATE TEMPORARY TABLE coupons_incoming (LIKE coupons) ON COMMIT DROP"))
    connection = await session.connection()
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    await driver.copy_records_to_table(
        "coupons_incoming", records=[tuple(row[c] for c in _COUPON_COLUMNS) for row in rows], columns=_COUPON_COLUMNS
    )
    written = await session.scalars(
        text(
            f"INSERT INTO coupons ({columns}) SELECT {columns} FROM coupons_incoming "
            "ON CONFLICT (code) DO NOTHING RETURNING code"
        )
    )
    codes = set(written.all())
    await session.execute(text("DROP TABLE coupons_incoming"))
    return codes


async def _coupon(session: AsyncSession, code: str, lock: bool) -> Coupon | None:
    query = select(CouponRow, SeriesRow).join(SeriesRow, SeriesRow.series_id == CouponRow.series_id)
    query = query.where(CouponRow.code == code).execution_options(populate_existing=True)
    if lock:
        query = query.with_for_update(of=CouponRow)
    found = (await session.execute(query)).one_or_none()
    return found[0].to_domain(found[1].to_domain()) if found else None


async def find_coupon(session: AsyncSession, code: str) -> Coupon | None:
    return await _coupon(session, code, lock=False)


async def lock_coupon(session: AsyncSession, code: str) -> Coupon | None:
    """The coupon as the database has it now, locked until the end of the transaction:
    reserving, redeeming and reinstating one coupon run one after another, so two
    registers can never both take it. (SQLite ignores FOR UPDATE; there every
    transaction begins IMMEDIATE and so already runs alone.)"""
    return await _coupon(session, code, lock=True)


async def set_coupon_uses(session: AsyncSession, code: str, uses: int, status: CouponStatus) -> Coupon:
    row = await session.get_one(CouponRow, code)
    row.uses, row.status = uses, status.value
    await session.flush()
    return row.to_domain((await session.get_one(SeriesRow, row.series_id)).to_domain())


async def list_coupons(session: AsyncSession, series: Series, after_code: str, limit: int) -> list[Coupon]:
    """The series' coupons ordered by code, starting after ``after_code``."""
    rows = await session.scalars(
        select(CouponRow)
        .where(CouponRow.series_id == series.series_id, CouponRow.code > after_code)
        .order_by(CouponRow.code)
        .limit(limit)
    )
    return [row.to_domain(series) for row in rows]


@dataclass(frozen=True)
class PartnerUsageRow:
    partner_id: str
    codes: int
    used_codes: int
    redemptions: int


async def partner_usage(session: AsyncSession, series_id: str) -> list[PartnerUsageRow]:
    used = func.sum(case((CouponRow.uses > 0, 1), else_=0))
    rows = await session.execute(
        select(CouponRow.partner_id, func.count(), used, func.sum(CouponRow.uses))
        .where(CouponRow.series_id == series_id, CouponRow.partner_id.is_not(None))
        .group_by(CouponRow.partner_id)
        .order_by(CouponRow.partner_id)
    )
    return [PartnerUsageRow(str(p), int(c), int(u or 0), int(r or 0)) for p, c, u, r in rows]


# Reservations


async def holding_reservations(session: AsyncSession, code: str, now: datetime) -> list[Reservation]:
    """The coupon's reservations that still hold it: active and not lapsed."""
    rows = await session.scalars(
        select(ReservationRow)
        .where(
            ReservationRow.code == code,
            ReservationRow.status == ReservationStatus.ACTIVE.value,
            ReservationRow.expires_at > now,
        )
        .execution_options(populate_existing=True)
    )
    return [row.to_domain() for row in rows]


async def member_uses(session: AsyncSession, series_id: str, member_id: str, receipt_ref: str, now: datetime) -> int:
    """The member's redemptions in the series plus their live reservations for receipts
    other than ``receipt_ref``."""
    live_elsewhere = and_(
        ReservationRow.status == ReservationStatus.ACTIVE.value,
        ReservationRow.expires_at > now,
        ReservationRow.receipt_ref != receipt_ref,
    )
    count = await session.scalar(
        select(func.count())
        .select_from(ReservationRow)
        .where(
            ReservationRow.series_id == series_id,
            ReservationRow.member_id == member_id,
            or_(ReservationRow.status == ReservationStatus.REDEEMED.value, live_elsewhere),
        )
    )
    return int(count or 0)


async def redeemed_reservation(session: AsyncSession, code: str, receipt_ref: str) -> Reservation | None:
    """The reservation through which the coupon is currently redeemed on the receipt, if any."""
    row = await session.scalar(
        select(ReservationRow)
        .where(
            ReservationRow.code == code,
            ReservationRow.receipt_ref == receipt_ref,
            ReservationRow.status == ReservationStatus.REDEEMED.value,
        )
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
    session: AsyncSession, coupon: Coupon, member_id: str | None, receipt_ref: str, expires_at: datetime, now: datetime
) -> Reservation:
    row = ReservationRow(
        reservation_id=str(uuid.uuid4()),
        code=coupon.code,
        series_id=coupon.series.series_id,
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


# Code generation jobs


@dataclass(frozen=True)
class CodeJob:
    job_id: str
    series_id: str
    requested: int
    generated: int
    created_at: datetime
    finished_at: datetime | None


def _job(row: CodeJobRow) -> CodeJob:
    return CodeJob(row.job_id, row.series_id, row.requested, row.generated, row.created_at, row.finished_at)


async def add_code_job(session: AsyncSession, series_id: str, requested: int, now: datetime) -> CodeJob:
    row = CodeJobRow(job_id=str(uuid.uuid4()), series_id=series_id, requested=requested, generated=0, created_at=now)
    session.add(row)
    await session.flush()
    return _job(row)


async def find_code_job(session: AsyncSession, job_id: str) -> CodeJob | None:
    row = await session.get(CodeJobRow, job_id, populate_existing=True)
    return _job(row) if row else None


async def unfinished_code_jobs(session: AsyncSession) -> list[str]:
    rows = await session.scalars(
        select(CodeJobRow.job_id).where(CodeJobRow.finished_at.is_(None)).order_by(CodeJobRow.created_at)
    )
    return list(rows)


async def lock_code_job(session: AsyncSession, job_id: str) -> CodeJob | None:
    """The job locked until the end of the transaction: replicas working one job write its
    batches one after another, so none writes more codes than asked."""
    row = await session.scalar(
        select(CodeJobRow)
        .where(CodeJobRow.job_id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return _job(row) if row else None


async def advance_code_job(session: AsyncSession, job_id: str, generated: int, finished_at: datetime | None) -> None:
    row = await session.get_one(CodeJobRow, job_id)
    row.generated, row.finished_at = generated, finished_at
    await session.flush()


# Gift cards


async def add_gift_cards(session: AsyncSession, cards: Sequence[GiftCard]) -> set[str]:
    """Inserts the cards whose number is free; returns the numbers written."""
    if not cards:
        return set()
    statement = (
        _dialect_insert(session, GiftCardRow)
        .on_conflict_do_nothing(index_elements=["card_number"])
        .returning(GiftCardRow.card_number)
    )
    rows = [
        {
            "card_number": card.card_number,
            "batch_id": card.batch_id,
            "currency_code": card.currency_code,
            "status": card.status.value,
            "balance_minor": card.balance_minor,
            "pin_hash": card.pin_hash,
            "validity_days": card.validity_days,
            "expires_at": card.expires_at,
            "created_at": card.created_at,
            "activated_at": card.activated_at,
        }
        for card in cards
    ]
    return set((await session.scalars(statement, rows)).all())


async def find_gift_card(session: AsyncSession, card_number: str) -> GiftCard | None:
    row = await session.get(GiftCardRow, card_number, populate_existing=True)
    return row.to_domain() if row else None


async def lock_gift_card(session: AsyncSession, card_number: str) -> GiftCard | None:
    """The card as the database has it now, locked until the end of the transaction: its
    entries are written one transaction after another, each seeing the last balance."""
    row = await session.scalar(
        select(GiftCardRow)
        .where(GiftCardRow.card_number == card_number)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return row.to_domain() if row else None


async def activate_gift_card(
    session: AsyncSession, card_number: str, pin_hash: str | None, expires_at: datetime | None, now: datetime
) -> None:
    row = await session.get_one(GiftCardRow, card_number)
    row.status, row.pin_hash, row.expires_at, row.activated_at = GiftCardStatus.ACTIVE.value, pin_hash, expires_at, now
    await session.flush()


async def append_gift_card_entry(session: AsyncSession, entry: GiftCardEntry) -> GiftCard:
    """Adds the entry and moves the card's balance to its ``balance_after_minor``, in the caller's
    transaction (which holds the card's lock)."""
    session.add(
        GiftCardEntryRow(
            card_number=entry.card_number,
            kind=entry.kind.value,
            amount_minor=entry.amount_minor,
            balance_after_minor=entry.balance_after_minor,
            receipt_ref=entry.receipt_ref,
            created_at=entry.created_at,
        )
    )
    row = await session.get_one(GiftCardRow, entry.card_number)
    row.balance_minor = entry.balance_after_minor
    await session.flush()
    return row.to_domain()


async def receipt_spending(session: AsyncSession, card_number: str, receipt_ref: str) -> ReceiptSpending:
    kinds = (GiftCardEntryKind.SPEND.value, GiftCardEntryKind.REFUND.value)
    rows = await session.execute(
        select(GiftCardEntryRow.kind, func.sum(GiftCardEntryRow.amount_minor))
        .where(
            GiftCardEntryRow.card_number == card_number,
            GiftCardEntryRow.receipt_ref == receipt_ref,
            GiftCardEntryRow.kind.in_(kinds),
        )
        .group_by(GiftCardEntryRow.kind)
    )
    sums = {kind: int(total or 0) for kind, total in rows}
    return ReceiptSpending(
        spent_minor=-sums.get(GiftCardEntryKind.SPEND.value, 0),
        refunded_minor=sums.get(GiftCardEntryKind.REFUND.value, 0),
    )


# Badges


async def add_badge(session: AsyncSession, badge: Badge) -> None:
    session.add(
        BadgeRow(badge_id=badge.badge_id, name=badge.name, description=badge.description, created_at=badge.created_at)
    )
    await session.flush()


async def find_badge(session: AsyncSession, badge_id: str) -> Badge | None:
    row = await session.get(BadgeRow, badge_id)
    return row.to_domain() if row else None


async def award_badge(session: AsyncSession, badge: Badge, member_id: str, now: datetime) -> tuple[BadgeAward, bool]:
    """The member's award of the badge, written now unless they already hold it (then the
    first); True when written now. A concurrent award of the same badge waits on the key."""
    inserted = await session.scalar(
        _dialect_insert(session, BadgeAwardRow)
        .values(member_id=member_id, badge_id=badge.badge_id, awarded_at=now)
        .on_conflict_do_nothing(index_elements=["member_id", "badge_id"])
        .returning(BadgeAwardRow.member_id)
    )
    row = await session.get_one(BadgeAwardRow, (member_id, badge.badge_id), populate_existing=True)
    return BadgeAward(badge, member_id, row.awarded_at), inserted is not None


async def member_badges(session: AsyncSession, member_id: str, limit: int) -> list[BadgeAward]:
    rows = await session.execute(
        select(BadgeAwardRow, BadgeRow)
        .join(BadgeRow, BadgeRow.badge_id == BadgeAwardRow.badge_id)
        .where(BadgeAwardRow.member_id == member_id)
        .order_by(BadgeAwardRow.awarded_at, BadgeAwardRow.badge_id)
        .limit(limit)
    )
    return [BadgeAward(badge.to_domain(), award.member_id, award.awarded_at) for award, badge in rows.tuples()]


# Chips


async def add_chip_program(session: AsyncSession, program: ChipProgram) -> None:
    session.add(
        ChipProgramRow(
            chip_program_id=program.chip_program_id,
            name=program.name,
            currency_code=program.currency_code,
            spend_per_chip_minor=program.spend_per_chip_minor,
            chips_per_exchange=program.chips_per_exchange,
            exchange_series_id=program.exchange_series_id,
            created_at=program.created_at,
        )
    )
    await session.flush()


async def find_chip_program(session: AsyncSession, chip_program_id: str) -> ChipProgram | None:
    row = await session.get(ChipProgramRow, chip_program_id)
    return row.to_domain() if row else None


async def chip_programs(session: AsyncSession) -> list[ChipProgram]:
    return [row.to_domain() for row in await session.scalars(select(ChipProgramRow))]


async def lock_chip_account(session: AsyncSession, chip_program_id: str, member_id: str) -> int:
    """The member's chips in the collection, the account created at 0 if new and locked until
    the end of the transaction."""
    await session.execute(
        _dialect_insert(session, ChipAccountRow)
        .values(chip_program_id=chip_program_id, member_id=member_id, chips=0)
        .on_conflict_do_nothing(index_elements=["chip_program_id", "member_id"])
    )
    chips = await session.scalar(
        select(ChipAccountRow.chips)
        .where(ChipAccountRow.chip_program_id == chip_program_id, ChipAccountRow.member_id == member_id)
        .with_for_update()
    )
    return int(chips or 0)


async def chip_entry_exists(session: AsyncSession, chip_program_id: str, member_id: str, ref: str) -> bool:
    found = await session.scalar(
        select(ChipEntryRow.entry_id).where(
            ChipEntryRow.chip_program_id == chip_program_id,
            ChipEntryRow.member_id == member_id,
            ChipEntryRow.ref == ref,
        )
    )
    return found is not None


async def append_chip_entry(
    session: AsyncSession, chip_program_id: str, member_id: str, chips: int, chips_after: int, ref: str, now: datetime
) -> None:
    """Adds the entry and moves the account to ``chips_after`` (the caller holds its lock)."""
    session.add(
        ChipEntryRow(
            chip_program_id=chip_program_id,
            member_id=member_id,
            chips=chips,
            chips_after=chips_after,
            ref=ref,
            created_at=now,
        )
    )
    row = await session.get_one(ChipAccountRow, (chip_program_id, member_id))
    row.chips = chips_after
    await session.flush()


async def chip_balances(session: AsyncSession, member_id: str) -> list[tuple[ChipProgram, int]]:
    rows = await session.execute(
        select(ChipProgramRow, ChipAccountRow.chips)
        .join(ChipAccountRow, ChipAccountRow.chip_program_id == ChipProgramRow.chip_program_id)
        .where(ChipAccountRow.member_id == member_id)
        .order_by(ChipProgramRow.created_at, ChipProgramRow.chip_program_id)
    )
    return [(program.to_domain(), int(chips)) for program, chips in rows.tuples()]
