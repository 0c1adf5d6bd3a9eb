"""Stimulating campaigns on a member's birthday and on a first completed profile, end to end:
the real members service announces the events (the birthday job, UpdateMember), Redis
streams carry them, the real rules service runs the campaigns and hands the rewards out
through the real accounts and rewards services (rules on SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as accounts_pb
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.members.v1 import members_service_pb2 as members_pb
from loyalty.members.v1.members_service_pb2_grpc import MembersServiceStub
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.rules.v1 import rules_service_pb2 as pb
from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event, EventBus
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.members import jobs
from services.members import store as members_store
from tests import infra
from tests.integration.test_members_api import mask
from tests.integration.test_rules_rewards import balance, coupon_owners, create_series, publish

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub
    from loyalty.members.v1.members_service_pb2_grpc import MembersServiceAsyncStub
    from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceAsyncStub
    from loyalty.rules.v1.rules_service_pb2_grpc import RulesServiceAsyncStub


@dataclass
class Suite:
    rules: RulesServiceAsyncStub
    members: MembersServiceAsyncStub
    accounts: AccountsServiceAsyncStub
    rewards: RewardsServiceAsyncStub
    bus: EventBus
    members_url: str

    async def announced(self, event_type: str) -> list[Event]:
        """The events of `event_type` the members service wrote to its outbox, as published."""
        engine = db.create_engine(self.members_url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    select(members_store.outbox).where(members_store.outbox.c.event_type == event_type)
                )
                return [
                    Event(row.event_id, row.event_type, "members", row.key, row.occurred_at, dict(row.payload), {})
                    for row in rows
                ]
        finally:
            await engine.dispose()


@asynccontextmanager
async def suite(tmp_path: Path, database_url: str, redis_prefix: str) -> AsyncIterator[Suite]:
    settings = infra.suite_settings(
        tmp_path, event_bus="redis", redis_url=SecretStr(infra.REDIS_URL), stream_prefix=redis_prefix
    )
    settings.rules.database_url = SecretStr(database_url)
    members_url = f"sqlite+aiosqlite:///{tmp_path / 'members.db'}"
    settings.members.database_url = SecretStr(members_url)
    async with (
        infra.running_suite(settings, ("members", "accounts", "rules", "rewards")) as hosts,
        grpc.aio.insecure_channel(settings.address("rules")) as rules_channel,
        grpc.aio.insecure_channel(settings.address("members")) as members_channel,
        grpc.aio.insecure_channel(settings.address("accounts")) as accounts_channel,
        grpc.aio.insecure_channel(settings.address("rewards")) as rewards_channel,
    ):
        yield Suite(
            RulesServiceStub(rules_channel),
            MembersServiceStub(members_channel),
            AccountsServiceStub(accounts_channel),
            RewardsServiceStub(rewards_channel),
            hosts["rules"].bus,
            members_url,
        )


async def register(members: MembersServiceAsyncStub, phone: str, **fields: Any) -> str:
    request = members_pb.RegisterMemberRequest(request_id=str(uuid.uuid4()), phone=phone, **fields)
    return str((await members.RegisterMember(request)).member.member_id)


async def test_a_birthday_campaign_gives_500_points_valid_7_days_once_a_year_even_when_delivered_twice(
    tmp_path: Path, database_url: str, redis_prefix: str
) -> None:
    """DOMAIN.md: points on the birthday, valid a few days: EarnFixedPoints{500, lot{lifetime_days: 7}}."""
    async with suite(tmp_path, database_url, redis_prefix) as s:
        seven_days = pb.PointsLot(lifetime_days=7)
        birthday = await publish(
            s.rules,
            pb.Campaign(
                name="happy birthday",
                trigger=pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY,
                rules=[
                    pb.Rule(
                        name="500 for the birthday",
                        condition="member.days_to_birthday == 0",
                        effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=500, lot=seven_days)),
                    )
                ],
            ),
        )
        assert birthday.trigger == pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY
        # not live yet: its period is honoured
        later = pb.Campaign(
            name="next month",
            trigger=pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY,
            start_time=to_timestamp(utcnow() + timedelta(days=30)),
            rules=[pb.Rule(effect=pb.Effect(earn_fixed_points=pb.EarnFixedPoints(amount=100)))],
        )
        await publish(s.rules, later)

        today = utcnow().date()
        born = today.replace(year=1990) if (today.month, today.day) != (2, 29) else today.replace(year=1992)
        member_id = await register(s.members, "+79161110001", birth_date=born.isoformat())
        members_engine = db.create_engine(s.members_url)
        try:
            assert await jobs.announce_birthdays(db.create_session_factory(members_engine)) == 1
        finally:
            await members_engine.dispose()

        async def credited() -> bool:
            return await balance(s.accounts, member_id) == 500

        await infra.wait_until(credited, "the birthday points")
        (announced,) = await s.announced("member.birthday")
        # the same event redelivered, and the birthday announced again under a new event id
        again = Event(str(uuid.uuid4()), "member.birthday", "members", member_id, utcnow(), announced.payload, {})
        for event in (announced, again):
            await s.bus.publish("members", event)
        sentinel = Event(
            str(uuid.uuid4()),
            "member.birthday",
            "members",
            "sentinel",
            utcnow(),
            {"member_id": "sentinel", "birth_date": born.isoformat(), "date": today.isoformat()},
            {},
        )
        await s.bus.publish("members", sentinel)

        async def sentinel_credited() -> bool:
            return await balance(s.accounts, "sentinel") == 500

        await infra.wait_until(sentinel_credited, "the birthday after the repeated ones")
        assert await balance(s.accounts, member_id) == 500, "one birthday, one credit"
        answer = await s.accounts.GetBalance(accounts_pb.GetBalanceRequest(holder_id=member_id))
        expiry_days = {(today + timedelta(days=7)).isoformat(), (utcnow().date() + timedelta(days=7)).isoformat()}
        assert [(day.day in expiry_days, day.amount) for day in answer.balance.next_expiries] == [(True, 500)]
        entries = await s.accounts.ListEntries(accounts_pb.ListEntriesRequest(holder_id=member_id))
        assert [(e.amount, e.source_ref) for e in entries.entries] == [(500, f"campaign:{birthday.campaign_id}")]

        next_year = Event(
            str(uuid.uuid4()),
            "member.birthday",
            "members",
            member_id,
            utcnow(),
            {**announced.payload, "date": today.replace(year=today.year + 1).isoformat()}
            if (today.month, today.day) != (2, 29)
            else {**announced.payload, "date": f"{today.year + 1}-02-28"},
            {},
        )
        await s.bus.publish("members", next_year)

        async def credited_again() -> bool:
            return await balance(s.accounts, member_id) == 1000

        await infra.wait_until(credited_again, "next year's birthday points")


async def test_a_profile_completed_campaign_gives_a_coupon_once(
    tmp_path: Path, database_url: str, redis_prefix: str
) -> None:
    async with suite(tmp_path, database_url, redis_prefix) as s:
        series_id = await create_series(s.rewards, "Thanks for your profile")
        campaign = await publish(
            s.rules,
            pb.Campaign(
                name="complete your profile",
                trigger=pb.CAMPAIGN_TRIGGER_PROFILE_COMPLETED,
                rules=[pb.Rule(name="coupon", effect=pb.Effect(issue_coupon=pb.IssueCoupon(series_id=series_id)))],
            ),
        )
        assert campaign.trigger == pb.CAMPAIGN_TRIGGER_PROFILE_COMPLETED

        member_id = await register(s.members, "+79161110002", first_name="Anna", last_name="Ivanova")
        changes: list[dict[str, Any]] = [
            {"email": "anna@example.com"},
            {"birth_date": "1990-05-17"},  # completes the profile
            {"last_name": "Petrova"},
        ]
        for index, fields in enumerate(changes):
            await s.members.UpdateMember(
                members_pb.UpdateMemberRequest(
                    request_id=f"u-{index}",
                    member_id=member_id,
                    member=members_pb.Member(**fields),
                    update_mask=mask(*fields),
                )
            )

        async def coupon_issued() -> bool:
            return member_id in await coupon_owners(s.rewards, series_id)

        await infra.wait_until(coupon_issued, "the profile completion coupon")
        (announced,) = await s.announced("member.profile_completed")
        assert announced.payload == {"member_id": member_id}
        again = Event(
            str(uuid.uuid4()), "member.profile_completed", "members", member_id, utcnow(), announced.payload, {}
        )
        await s.bus.publish("members", announced)
        await s.bus.publish("members", again)
        complete_id = await register(
            s.members,
            "+79161110003",
            first_name="Boris",
            last_name="Orlov",
            email="b@example.com",
            birth_date="1985-01-02",
        )

        async def second_served() -> bool:
            return complete_id in await coupon_owners(s.rewards, series_id)

        await infra.wait_until(second_served, "the coupon of a profile complete at registration")
        assert sorted(await coupon_owners(s.rewards, series_id)) == sorted([member_id, complete_id]), "one each"


async def test_stimulating_campaigns_have_no_scope(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with (
        infra.running_suite(settings, ("rules",)),
        grpc.aio.insecure_channel(settings.address("rules")) as channel,
    ):
        stub: RulesServiceAsyncStub = RulesServiceStub(channel)
        for trigger in (pb.CAMPAIGN_TRIGGER_MEMBER_BIRTHDAY, pb.CAMPAIGN_TRIGGER_PROFILE_COMPLETED):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateCampaign(
                    pb.CreateCampaignRequest(
                        request_id=str(uuid.uuid4()),
                        campaign=pb.Campaign(
                            name="x",
                            trigger=trigger,
                            rules=[pb.Rule(effect=pb.Effect(discount_percent=pb.DiscountPercent(basis_points=100)))],
                            scope=pb.CampaignScope(tiers=["gold"]),
                        ),
                    )
                )
            assert sorted(v.field for v in read_remote_error(refused.value).violations) == [
                "campaign.rules[0].effect",
                "campaign.scope",
            ]
