"""Rules' use cases and the live-campaign cache against real SQLite and PostgreSQL, and
CreateCampaign's validation over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loyalty.common.v1 import receipt_pb2
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime import db
from loyalty.runtime.errors import FailedPrecondition, NotFound, read_remote_error
from loyalty.runtime.timeutil import to_timestamp
from services.rules import service, store
from services.rules.domain import (
    Campaign,
    CampaignStatus,
    EarnFixedPoints,
    EarnPointsPercent,
    Receipt,
    ReceiptLine,
    Rule,
    Subject,
)
from tests import infra

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
MEMBER = Subject("member-1", "gold", ("new",))


def draft(campaign_id: str = "c-1", points: int = 10, condition: str = "") -> Campaign:
    return Campaign(
        campaign_id=campaign_id,
        name=f"campaign {campaign_id}",
        status=CampaignStatus.DRAFT,
        start_at=START,
        end_at=START + timedelta(days=30),
        version=0,
        rules=(
            Rule(f"{campaign_id}-r1", "fixed", condition, EarnFixedPoints(points), "points for you", 1),
            Rule(f"{campaign_id}-r0", "percent", 'member.tier == "gold"', EarnPointsPercent(250), "gold", 0),
        ),
    )


def receipt(amount: int = 10_000) -> Receipt:
    line = ReceiptLine(1, "SKU-1", amount, 1000, amount, False)
    return Receipt("store-1", "pos-1", "pos", START + timedelta(days=1), "RUB", (line,))


async def test_a_campaign_is_created_as_a_draft_and_published_once(database_url: str) -> None:
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_campaign(session, draft())
        async with sessions() as session:
            stored = await service.get_campaign(session, "c-1")
        assert stored == draft(), "rules, effects, period and conditions read back as written"

        async with sessions() as session, session.begin():
            published = await service.publish_campaign(session, "c-1")
        assert (published.status, published.version) == (CampaignStatus.ACTIVE, 1)
        assert published.rules == draft().rules

        async with sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as again:
                await service.publish_campaign(session, "c-1")
        assert again.value.reason == "CAMPAIGN_ALREADY_PUBLISHED"

        async with sessions() as session, session.begin():
            with pytest.raises(NotFound) as missing:
                await service.publish_campaign(session, "no-such-campaign")
        assert missing.value.reason == "CAMPAIGN_NOT_FOUND"

        async with sessions() as session:
            reread = await service.get_campaign(session, "c-1")
            events = (await session.execute(select(store.outbox.c.event_type, store.outbox.c.payload))).all()
            with pytest.raises(NotFound):
                await service.get_campaign(session, "no-such-campaign")
        assert (reread.status, reread.version) == (CampaignStatus.ACTIVE, 1), "the refused publish changed nothing"
        assert [tuple(event) for event in events] == [("campaign.published", {"campaign_id": "c-1"})]


async def test_concurrent_publications_of_one_campaign_publish_it_once(database_url: str) -> None:
    """BUG on SQLite: publish_campaign reads the status with SELECT ... FOR UPDATE, which
    SQLite ignores, and the driver runs that read outside the write transaction; every
    concurrent publish sees a draft, all succeed, and campaign.published is emitted 8 times.
    PostgreSQL serialises them on the row lock."""
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            await service.create_campaign(session, draft())

        async def publish() -> Campaign:
            async with sessions() as session, session.begin():
                return await service.publish_campaign(session, "c-1")

        outcomes = await asyncio.gather(*(publish() for _ in range(8)), return_exceptions=True)
        published = [outcome for outcome in outcomes if isinstance(outcome, Campaign)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, FailedPrecondition)]
        assert len(published) == 1, outcomes
        assert [error.reason for error in refused] == ["CAMPAIGN_ALREADY_PUBLISHED"] * 7
        async with sessions() as session:
            events = (await session.execute(select(store.outbox.c.event_type))).scalars().all()
            assert (await service.get_campaign(session, "c-1")).version == 1
        assert events == ["campaign.published"]


async def test_live_campaigns_pick_up_a_publication_after_invalidate(database_url: str) -> None:
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        live = service.LiveCampaigns(sessions, refresh_seconds=3600)
        assert await live.current() == []

        async with sessions() as session, session.begin():
            await service.create_campaign(session, draft("c-1", points=10))
            await service.create_campaign(session, draft("c-draft", points=5_000))
        async with sessions() as session, session.begin():
            await service.publish_campaign(session, "c-1")
        assert await live.current() == [], "within refresh_seconds the cache is not consulted again"

        live.invalidate()
        compiled = await live.current()
        assert [c.campaign.campaign_id for c in compiled] == ["c-1"], "drafts are not live"
        assert [r.rule.rule_id for r in compiled[0].rules] == ["c-1-r0", "c-1-r1"], "in priority order"
        evaluation = await live.evaluate(receipt(10_000), MEMBER)
        assert evaluation.points_total == 250 + 10
        assert [a.campaign_version for a in evaluation.applied] == [1, 1]

        live.invalidate()
        assert await live.current() is compiled, "nothing was published since: no rebuild"

        async with sessions() as session, session.begin():
            await service.create_campaign(session, draft("c-2", points=1))
            await service.publish_campaign(session, "c-2")
        live.invalidate()
        assert sorted(c.campaign.campaign_id for c in await live.current()) == ["c-1", "c-2"]
        assert (await live.evaluate(receipt(10_000), MEMBER)).points_total == 2 * 250 + 10 + 1


async def test_live_campaigns_refresh_by_themselves_after_refresh_seconds(database_url: str) -> None:
    async with infra.migrated_engine("rules", database_url) as engine:
        sessions = db.create_session_factory(engine)
        live = service.LiveCampaigns(sessions, refresh_seconds=0.2)
        assert await live.current() == []
        async with sessions() as session, session.begin():
            await service.create_campaign(session, draft("c-1"))
            await service.publish_campaign(session, "c-1")

        async def picked_up() -> bool:
            return len(await live.current()) == 1

        await infra.wait_until(picked_up, "the published campaign in another replica's cache", seconds=5)


@asynccontextmanager
async def rules_stub(tmp_path: Path, database_url: str) -> AsyncIterator[RulesServiceAsyncStub]:
    settings = infra.suite_settings(tmp_path)
    settings.rules.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("rules",)),
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        yield RulesServiceStub(channel)


def proto_rule(condition: str = "", points: int = 10) -> pb.Rule:
    return pb.Rule(
        name="a rule",
        condition=condition,
        effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=points)),
        receipt_text="points for you",
    )


async def test_create_campaign_names_the_bad_condition(tmp_path: Path, database_url: str) -> None:
    async with rules_stub(tmp_path, database_url) as stub:
        bad = pb.CreateCampaignRequest(
            request_id="camp-bad",
            campaign=pb.Campaign(name="bad", rules=[proto_rule("receipt.total_minor >"), proto_rule()]),
        )
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.CreateCampaign(bad)
        remote = read_remote_error(invalid.value)
        assert (remote.code, remote.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [v.field for v in remote.violations] == ["campaign.rules[0].condition"]
        assert remote.violations[0].description.startswith("not a valid condition")

        several = pb.CreateCampaignRequest(
            request_id="camp-worse",
            campaign=pb.Campaign(
                name=" ",
                rules=[proto_rule(), proto_rule("receipt.total_minor + 1"), pb.Rule(condition='customer.x == "y"')],
                start_time=to_timestamp(START),
                end_time=to_timestamp(START),
            ),
        )
        with pytest.raises(grpc.aio.AioRpcError) as worse:
            await stub.CreateCampaign(several)
        assert [v.field for v in read_remote_error(worse.value).violations] == [
            "campaign.name",
            "campaign.end_time",
            "campaign.rules[1].condition",
            "campaign.rules[2].condition",
            "campaign.rules[2].effect",
        ]

        good = pb.CreateCampaignRequest(
            request_id="camp-good",
            campaign=pb.Campaign(name="good", rules=[proto_rule("receipt.total_minor >= 5000", points=30)]),
        )
        created = await stub.CreateCampaign(good)
        assert await stub.CreateCampaign(good) == created, "a retry answers the first campaign"
        assert created.campaign.status == pb.CAMPAIGN_STATUS_DRAFT
        fetched = await stub.GetCampaign(pb.GetCampaignRequest(campaign_id=created.campaign.campaign_id))
        assert fetched.campaign == created.campaign

        published = await stub.PublishCampaign(
            pb.PublishCampaignRequest(request_id="pub-1", campaign_id=created.campaign.campaign_id)
        )
        assert (published.campaign.status, published.campaign.version) == (pb.CAMPAIGN_STATUS_ACTIVE, 1)
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await stub.PublishCampaign(
                pb.PublishCampaignRequest(request_id="pub-2", campaign_id=created.campaign.campaign_id)
            )
        assert (twice.value.code(), read_remote_error(twice.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CAMPAIGN_ALREADY_PUBLISHED",
        )

        evaluated = await stub.EvaluateReceipt(
            pb.EvaluateReceiptRequest(
                receipt=receipt_pb2.Receipt(
                    store_id="store-1",
                    terminal_id="pos-1",
                    receipt_number="0001",
                    currency_code="RUB",
                    lines=[receipt_pb2.ReceiptLine(position=1, sku="SKU-1", price_minor=6000, quantity_milli=1000)],
                ),
                subject=pb.Subject(member_id="member-1"),
            )
        )
        assert evaluated.points_total == 30, "the published campaign is live on this replica at once"


async def test_names_longer_than_the_store_holds_are_invalid(tmp_path: Path, database_url: str) -> None:
    """BUG: campaign and rule names are stored in 200-character columns (receipt_text 500,
    condition 4000) but never checked for length: PostgreSQL refuses the insert and the client
    gets INTERNAL; SQLite stores them. They must be INVALID_ARGUMENT naming the fields."""
    async with rules_stub(tmp_path, database_url) as stub:
        long_rule = proto_rule()
        long_rule.name = "r" * 201
        request = pb.CreateCampaignRequest(
            request_id="camp-long", campaign=pb.Campaign(name="c" * 201, rules=[long_rule])
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateCampaign(request)
        remote = read_remote_error(refused.value)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in remote.violations] == ["campaign.name", "campaign.rules[0].name"]
