"""Campaigns and rules as stored; the only module here that speaks SQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from loyalty.runtime.idempotency import define_idempotency_table
from loyalty.runtime.outbox import define_outbox_table
from loyalty.runtime.timeutil import UtcDateTime
from services.rules.domain import (
    MAX_CONDITION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_RECEIPT_TEXT_LENGTH,
    Campaign,
    CampaignStatus,
    EarnFixedPoints,
    EarnPointsPercent,
    Effect,
    Rule,
)


class Base(DeclarativeBase):
    pass


class CampaignRow(Base):
    __tablename__ = "campaigns"

    campaign_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    status: Mapped[str] = mapped_column(String(16), index=True)
    start_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    end_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    rules: Mapped[list[RuleRow]] = relationship(order_by="RuleRow.position", cascade="all, delete-orphan")


class RuleRow(Base):
    __tablename__ = "rules"

    rule_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    condition: Mapped[str] = mapped_column(String(MAX_CONDITION_LENGTH))
    effect: Mapped[dict[str, Any]] = mapped_column(JSON)
    receipt_text: Mapped[str] = mapped_column(String(MAX_RECEIPT_TEXT_LENGTH))
    priority: Mapped[int] = mapped_column(Integer)


outbox = define_outbox_table(Base.metadata)
idempotency_keys = define_idempotency_table(Base.metadata)


def _effect_to_json(effect: Effect) -> dict[str, Any]:
    if isinstance(effect, EarnPointsPercent):
        return {"kind": "earn_points_percent", "basis_points": effect.basis_points}
    return {"kind": "earn_fixed_points", "amount": effect.amount}


def _effect_from_json(data: dict[str, Any]) -> Effect:
    if data["kind"] == "earn_points_percent":
        return EarnPointsPercent(int(data["basis_points"]))
    return EarnFixedPoints(int(data["amount"]))


def _to_domain(row: CampaignRow) -> Campaign:
    return Campaign(
        campaign_id=row.campaign_id,
        name=row.name,
        status=CampaignStatus(row.status),
        start_at=row.start_at,
        end_at=row.end_at,
        version=row.version,
        rules=tuple(
            Rule(r.rule_id, r.name, r.condition, _effect_from_json(r.effect), r.receipt_text, r.priority)
            for r in row.rules
        ),
    )


async def add_campaign(session: AsyncSession, campaign: Campaign, now: datetime) -> None:
    session.add(
        CampaignRow(
            campaign_id=campaign.campaign_id,
            name=campaign.name,
            status=campaign.status.value,
            start_at=campaign.start_at,
            end_at=campaign.end_at,
            version=campaign.version,
            created_at=now,
            rules=[
                RuleRow(
                    rule_id=rule.rule_id,
                    position=position,
                    name=rule.name,
                    condition=rule.condition,
                    effect=_effect_to_json(rule.effect),
                    receipt_text=rule.receipt_text,
                    priority=rule.priority,
                )
                for position, rule in enumerate(campaign.rules)
            ],
        )
    )
    await session.flush()


async def find_campaign(session: AsyncSession, campaign_id: str, for_update: bool = False) -> Campaign | None:
    query = select(CampaignRow).options(selectinload(CampaignRow.rules)).where(CampaignRow.campaign_id == campaign_id)
    if for_update:
        query = query.with_for_update()
    row = await session.scalar(query)
    return _to_domain(row) if row else None


async def mark_published(session: AsyncSession, campaign_id: str, version: int, now: datetime) -> None:
    row = await session.get_one(CampaignRow, campaign_id)
    row.status = CampaignStatus.ACTIVE.value
    row.version = version
    row.published_at = now
    await session.flush()


async def active_campaigns(session: AsyncSession) -> list[Campaign]:
    rows = await session.scalars(
        select(CampaignRow)
        .options(selectinload(CampaignRow.rules))
        .where(CampaignRow.status == CampaignStatus.ACTIVE.value)
    )
    return [_to_domain(row) for row in rows]


async def last_publication(session: AsyncSession) -> datetime | None:
    """When any campaign was last published: tells a replica its cache is stale."""
    latest: datetime | None = await session.scalar(select(func.max(CampaignRow.published_at)))
    return latest
