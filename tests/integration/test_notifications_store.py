"""Notifications against real SQLite and PostgreSQL, and end to end over gRPC and the real buses."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from loyalty.members.v1 import members_service_pb2 as members_pb
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.notifications.v1 import notifications_service_pb2 as pb
from loyalty.notifications.v1 import notifications_service_pb2_grpc as pb_grpc
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.settings import Settings
from services.notifications import service, store
from services.notifications.domain import Category, Channel, Message, MessageState
from tests import infra

OCCURRED = datetime(2025, 3, 8, 9, 30, tzinfo=UTC)
MEMBERS = "notifications.members"
# SMS is the one channel with a provider; nothing is sent here, messages are only queued.
DELIVERY = service.Delivery.from_settings(Settings(), frozenset({Channel.SMS}))


def registered(member_id: str = "m-1", first_name: str = "Anna", event_id: str | None = None) -> Event:
    """A registration as the members service publishes it today: a name, no contact details yet."""
    return Event(
        event_id=event_id or str(uuid.uuid4()),
        event_type="member.registered",
        source="members",
        key=member_id,
        occurred_at=OCCURRED,
        payload={"member_id": member_id, "first_name": first_name, "channel": 1, "referral_code": None},
        trace_context={},
    )


def with_phone(event: Event) -> Event:
    return replace(event, payload={**event.payload, "phone": "+79990000001", "consents": {"sms": True}})


async def test_a_redelivered_event_records_one_message(database_url: str) -> None:
    async with infra.migrated_engine("notifications", database_url) as engine:
        sessions = db.create_session_factory(engine)
        event = registered()
        async with sessions() as session, session.begin():
            first = await service.handle_event(session, MEMBERS, event, DELIVERY)
        async with sessions() as session, session.begin():
            again = await service.handle_event(session, MEMBERS, event, DELIVERY)
        assert first is not None
        assert again is None
        async with sessions() as session:
            rows = (await session.scalars(select(store.MessageRow))).all()
            handled = await session.scalar(select(func.count()).select_from(store.inbox))
        # No contact details yet: the message is kept, suppressed, with the text it would have had.
        assert [(row.event_id, row.state, row.reason, row.body) for row in rows] == [
            (event.event_id, "suppressed", "NO_PROVIDER", "Welcome to the program, Anna!")
        ]
        assert handled == 1


async def test_unknown_events_are_marked_handled_and_ignored(database_url: str) -> None:
    async with infra.migrated_engine("notifications", database_url) as engine:
        sessions = db.create_session_factory(engine)
        unknown = Event("e-1", "card.replaced", "members", "m-1", OCCURRED, {"member_id": "m-1"}, {})
        async with sessions() as session, session.begin():
            assert await service.handle_event(session, MEMBERS, unknown, DELIVERY) is None
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.MessageRow)) == 0
            assert (await session.scalars(select(store.inbox.c.event_id))).all() == ["e-1"]


async def test_an_upserted_template_wins_and_the_default_covers_its_failures(database_url: str) -> None:
    async with infra.migrated_engine("notifications", database_url) as engine:
        sessions = db.create_session_factory(engine)
        for body in (
            "Hello {{ member.first_name }}",
            "Hi {{ member.first_name[0] }}. from {{ program.name }}",
        ):
            template = service.parse_template("member.registered", Channel.SMS, "en", "", body)
            async with sessions() as session, session.begin():
                await service.upsert_template(session, template)
        async with sessions() as session, session.begin():
            boris = await service.handle_event(session, MEMBERS, with_phone(registered("m-1", "Boris")), DELIVERY)
            # The stored template passed its check with a sample name, but fails without one.
            nameless = await service.handle_event(session, MEMBERS, with_phone(registered("m-2", "")), DELIVERY)
        assert boris is not None and (boris.channel, boris.state, boris.body) == (
            Channel.SMS,
            MessageState.QUEUED,
            "Hi B. from Loyalty",
        )
        assert nameless is not None and nameless.body == "Welcome to the program, friend!"
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.TemplateRow)) == 1


async def test_pages_hold_every_message_once_newest_first(database_url: str) -> None:
    async with infra.migrated_engine("notifications", database_url) as engine:
        sessions = db.create_session_factory(engine)
        base = datetime(2025, 1, 1, tzinfo=UTC)
        # Three messages share one instant, so the order must fall back to the id.
        moments = [
            base,
            base + timedelta(microseconds=1),
            *[base + timedelta(hours=1)] * 3,
            base + timedelta(days=1),
            base + timedelta(days=1, seconds=1),
        ]
        mine = [message("m-1", moment) for moment in moments]
        async with sessions() as session, session.begin():
            for item in [*mine, message("m-2", base + timedelta(hours=2))]:
                await store.add_message(session, item)
        newest_first = [m.message_id for m in sorted(mine, key=lambda m: (m.created_at, m.message_id), reverse=True)]

        for page_size in (1, 2, 3, 7, 8):
            seen: list[str] = []
            pages, token = 0, ""
            while True:
                async with sessions() as session:
                    page = await service.list_messages(session, service.parse_messages_query("m-1", page_size, token))
                pages += 1
                assert len(page.messages) <= page_size
                seen.extend(m.message_id for m in page.messages)
                token = page.next_page_token
                if not token:
                    break
            assert seen == newest_first, f"page size {page_size}"
            assert pages == -(-len(mine) // page_size), "no empty last page"


def message(member_id: str, created_at: datetime) -> Message:
    return Message(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        event_type="member.registered",
        event_id=str(uuid.uuid4()),
        category=Category.TRANSACTIONAL,
        template_key="member.registered",
        channels=(Channel.SMS,),
        channel=Channel.SMS,
        subject="",
        body="hello",
        state=MessageState.QUEUED,
        created_at=created_at,
        occurred_at=created_at,
        next_attempt_at=created_at,
    )


async def register_and_await_welcome(settings: Settings) -> None:
    async with (
        grpc.aio.insecure_channel(settings.address("members")) as members_channel,
        grpc.aio.insecure_channel(settings.address("notifications")) as notifications_channel,
    ):
        members = members_grpc.MembersServiceStub(members_channel)
        notifications = pb_grpc.NotificationsServiceStub(notifications_channel)
        registration = await members.RegisterMember(
            members_pb.RegisterMemberRequest(request_id="reg-1", phone="+79161234567", first_name="Anna")
        )
        member_id = registration.member.member_id
        found: list[pb.Message] = []

        async def welcomed() -> bool:
            response = await notifications.ListMessages(pb.ListMessagesRequest(member_id=member_id))
            found[:] = response.messages
            return bool(found)

        await infra.wait_until(welcomed, what="the welcome message")
        [welcome] = found
        assert welcome.body == "Welcome to the program, Anna!"
        # No provider is configured in this suite, so nothing can carry it.
        assert (welcome.event_type, welcome.state, welcome.reason) == (
            "member.registered",
            pb.MESSAGE_STATE_SUPPRESSED,
            "NO_PROVIDER",
        )

        with pytest.raises(grpc.aio.AioRpcError) as bad_template:
            await notifications.UpsertTemplate(
                pb.UpsertTemplateRequest(
                    request_id="tpl-1",
                    template=pb.Template(
                        event_type="member.registered",
                        channel=pb.CHANNEL_SMS,
                        locale="en",
                        body="{{ ''.__class__.__mro__ }}",
                    ),
                )
            )
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await notifications.ListMessages(pb.ListMessagesRequest(member_id=member_id, page_token="nope"))
    for error, field in ((bad_template.value, "template.body"), (bad_token.value, "page_token")):
        remote = read_remote_error(error)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [violation.field for violation in remote.violations] == [field]


async def test_a_registered_member_is_welcomed_over_the_in_process_bus(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings, ("members", "notifications")):
        await register_and_await_welcome(settings)


async def test_a_registered_member_is_welcomed_over_redis_streams(tmp_path: Path, redis_prefix: str) -> None:
    settings = infra.suite_settings(
        tmp_path, event_bus="redis", redis_url=SecretStr(infra.REDIS_URL), stream_prefix=redis_prefix
    )
    async with infra.running_suite(settings, ("members", "notifications")):
        await register_and_await_welcome(settings)
