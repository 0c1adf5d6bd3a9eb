"""Delivery against real providers started by the tests: an SMTP server (aiosmtpd) whose
mailbox is read back, and an HTTP provider on loopback that answers as each test tells it.
Events are handled and messages dispatched through the real service code, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import email
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.notifications.v1 import notifications_service_pb2 as pb
from loyalty.notifications.v1 import notifications_service_pb2_grpc as pb_grpc
from loyalty.runtime import db
from loyalty.runtime.bus import Event
from loyalty.runtime.errors import FailedPrecondition, NotFound, read_remote_error
from loyalty.runtime.settings import Settings
from loyalty.runtime.timeutil import utcnow
from services.notifications import domain, jobs, service, store
from services.notifications.domain import Category, Channel, Contact, Message, MessageState, Trigger
from services.notifications.providers import configured_channels, open_providers
from tests import infra

Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class HttpRequest:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class HttpProviderStub:
    """An HTTP provider on loopback: records every request, answers with ``respond``."""

    respond: Callable[[HttpRequest], Answer] = lambda request: (200, {"status": "delivered"})
    requests: list[HttpRequest] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path_prefix: str) -> list[HttpRequest]:
        return [request for request in self.requests if request.path.startswith(path_prefix)]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.strip().split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in header_lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        request = HttpRequest(request_line.split(" ")[1], headers, json.loads(body))
        self.requests.append(request)
        status, answer = self.respond(request)
        data = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} Answer\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()


class Mailbox:
    """An aiosmtpd handler keeping every accepted e-mail; addresses at bounce.test are refused."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], EmailMessage]] = []

    async def handle_RCPT(
        self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if address.endswith("@bounce.test"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope) -> str:
        assert isinstance(envelope.content, bytes)
        parsed = email.message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        self.received.append((list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"


@dataclass
class Providers:
    http: HttpProviderStub
    mailbox: Mailbox
    smtp_port: int

    def settings(self, **messaging: object) -> Settings:
        config: dict[str, object] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtp_port,
            "email_from": "club@shop.test",
            "sms": {"url": self.http.url("/sms")},
            "viber": {"url": self.http.url("/viber")},
            "push": {"url": self.http.url("/push")},
            "telegram": {"url": self.http.url("/bot{token}/sendMessage"), "payload_format": "telegram"},
            "quiet_hours_start": None,
            "quiet_hours_end": None,
            "retry_base_seconds": 0.001,
            "dispatch_interval_seconds": 0.05,
        }
        config.update(messaging)
        return Settings.model_validate(
            {
                "messaging": config,
                "provider_tokens": {"sms": "sms-secret", "telegram": "tg-secret", "viber": "viber-secret"},
                "log_format": "text",
            }
        )


@pytest.fixture
async def providers() -> AsyncIterator[Providers]:
    loop = asyncio.get_running_loop()
    http, mailbox = HttpProviderStub(), Mailbox()
    http.port, smtp_port = infra.free_port(), infra.free_port()
    http_server = await asyncio.start_server(http.serve, "127.0.0.1", http.port)
    smtp_server = await loop.create_server(lambda: SMTP(mailbox, hostname="mail.test"), "127.0.0.1", smtp_port)
    try:
        yield Providers(http, mailbox, smtp_port)
    finally:
        for server in (http_server, smtp_server):
            server.close()
            await server.wait_closed()


class Harness:
    """The service's event handling and dispatching, wired to one database and settings."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.delivery = service.Delivery.from_settings(settings, configured_channels(settings))

    async def handle(self, stream: str, event: Event) -> Message | None:
        async with self.sessions() as session, session.begin():
            return await service.handle_event(session, f"notifications.{stream}", event, self.delivery)

    async def dispatch(self) -> int:
        async with open_providers(self.settings) as providers:
            throttle = jobs.ChannelThrottle.from_settings(self.settings.messaging)
            return await jobs.dispatch_due(self.sessions, providers, self.delivery, throttle, self.settings.messaging)

    async def configure(self, event_type: str, channels: list[Channel], **changes: Any) -> None:
        values: dict[str, Any] = {
            "event_type": event_type,
            "enabled": True,
            "template_key": event_type,
            "channels": tuple(channels),
            "delay": timedelta(0),
            "category": domain.default_trigger(event_type).category,  # type: ignore[union-attr]
        }
        values.update(changes)
        async with self.sessions() as session, session.begin():
            await service.update_trigger(session, Trigger(**values))

    async def message(self, message_id: str) -> Message:
        async with self.sessions() as session:
            found = await store.find_message(session, message_id)
        assert found is not None
        return found

    async def messages(self) -> list[Message]:
        async with self.sessions() as session:
            rows = (await session.scalars(select(store.MessageRow).order_by(store.MessageRow.create_time))).all()
        return [row.to_domain() for row in rows]


HarnessFactory = Callable[[Settings], AbstractAsyncContextManager[Harness]]


@pytest.fixture
def harness_factory(database_url: str) -> HarnessFactory:
    """Opens a harness on a fresh, migrated database of each kind, welcome messages off."""

    @asynccontextmanager
    async def make(settings: Settings) -> AsyncIterator[Harness]:
        async with infra.migrated_engine("notifications", database_url) as engine:
            harness = Harness(db.create_session_factory(engine), settings)
            # Members are registered to build their contacts; their welcome is not the point here.
            await harness.configure("member.registered", [Channel.SMS], enabled=False)
            yield harness

    return make


def event(event_type: str, stream_source: str, payload: dict[str, Any], event_id: str | None = None) -> Event:
    return Event(
        event_id=event_id or str(uuid.uuid4()),
        event_type=event_type,
        source=stream_source,
        key=str(payload.get("member_id") or payload.get("holder_id") or ""),
        occurred_at=utcnow(),
        payload=payload,
        trace_context={},
    )


def member(member_id: str, **contact: Any) -> Event:
    """member.registered as the members service will publish it, with contacts and consents."""
    payload: dict[str, Any] = {
        "member_id": member_id,
        "phone": "",
        "email": "",
        "first_name": "Anna",
        "last_name": "Smith",
        "locale": "en",
        "time_zone": "",
        "birth_date": "",
        "push_token": "",
        "telegram_chat_id": "",
        "status": "active",
        "tier": "base",
        "consents": {},
    }
    payload.update(contact)
    return event("member.registered", "members", payload)


def accrued(holder_id: str, amount: int = 150) -> Event:
    return event(
        "points.accrued",
        "accounts",
        {"holder_id": holder_id, "currency": "BONUS", "amount": amount, "source": "receipt", "entry_id": "e"},
    )


def coupon(member_id: str) -> Event:
    return event("coupon.issued", "rewards", {"member_id": member_id, "code_suffix": "7K2Q", "series_id": "s-1"})


async def test_email_is_delivered_to_a_real_smtp_server_and_read_back(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    async with harness_factory(providers.settings()) as harness:
        await harness.configure("coupon.issued", [Channel.EMAIL])
        template = service.parse_template(
            "coupon.issued",
            Channel.EMAIL,
            "en",
            "{{ member.first_name }}, a coupon for you",
            "<p>Code ending {{ event.data.code_suffix }} for {{ member.first_name }} {{ member.last_name }}</p>",
        )
        async with harness.sessions() as session, session.begin():
            await service.upsert_template(session, template)
        await harness.handle(
            "members", member("m-1", email="anna@shop.test", last_name="<Smith & Co>", consents={"email": True})
        )
        queued = await harness.handle("rewards", coupon("m-1"))
        assert queued is not None and queued.state is MessageState.QUEUED

        assert await harness.dispatch() == 1

        [(recipients, mail)] = providers.mailbox.received
        assert recipients == ["anna@shop.test"]
        assert (mail["From"], mail["To"], mail["Subject"]) == (
            "club@shop.test",
            "anna@shop.test",
            "Anna, a coupon for you",
        )
        assert queued.message_id in mail["Message-ID"]
        body = mail.get_body()
        assert body is not None
        assert body.get_content_type() == "text/html"
        assert body.get_content().strip() == "<p>Code ending 7K2Q for Anna &lt;Smith &amp; Co&gt;</p>"
        sent = await harness.message(queued.message_id)
        assert (sent.state, sent.channel, sent.attempts) == (MessageState.SENT, Channel.EMAIL, 1)
        assert sent.sent_at is not None
        assert await harness.dispatch() == 0
        assert len(providers.mailbox.received) == 1


async def test_a_failing_provider_and_an_undelivered_answer_fall_down_the_cascade(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    answers: dict[str, Answer] = {"/sms": (500, {"error": "down"}), "/viber": (200, {"status": "undelivered"})}
    providers.http.respond = lambda request: answers.get(request.path, (200, {"status": "delivered"}))
    async with harness_factory(providers.settings()) as harness:
        await harness.configure("points.accrued", [Channel.SMS, Channel.VIBER, Channel.EMAIL])
        await harness.handle("members", member("m-1", phone="+79990000001", email="anna@shop.test"))
        queued = await harness.handle("accounts", accrued("m-1"))
        assert queued is not None and queued.channel is Channel.SMS

        await harness.dispatch()

        [sms] = providers.http.to("/sms")
        assert sms.headers["authorization"] == "Bearer sms-secret"
        assert sms.headers["idempotency-key"] == f"{queued.message_id}:1"
        assert sms.payload == {
            "to": "+79990000001",
            "subject": "",
            "text": "You earned 150 points. Thank you for shopping with Loyalty!",
            "message_id": queued.message_id,
        }
        [viber] = providers.http.to("/viber")
        assert viber.headers["authorization"] == "Bearer viber-secret"
        [(recipients, mail)] = providers.mailbox.received
        assert recipients == ["anna@shop.test"]
        assert mail["Subject"] == "You earned points"
        done = await harness.message(queued.message_id)
        assert (done.state, done.channel, done.attempts) == (MessageState.SENT, Channel.EMAIL, 3)


async def test_telegram_gets_the_bot_api_shape_and_a_blocked_bot_falls_to_sms(
    providers: Providers, harness_factory: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def telegram(request: HttpRequest) -> Answer:
        if request.payload.get("chat_id") == "666":
            return 403, {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}
        return 200, {"ok": True, "result": {"message_id": 1}}

    providers.http.respond = telegram
    async with harness_factory(providers.settings()) as harness:
        await harness.configure("tier.changed", [Channel.TELEGRAM, Channel.SMS])
        await harness.handle("members", member("m-1", telegram_chat_id="4242"))
        await harness.handle("members", member("m-2", telegram_chat_id="666", phone="+79990000002"))
        tier_events = [
            event("tier.changed", "members", {"member_id": who, "old_tier": "base", "new_tier": "gold"})
            for who in ("m-1", "m-2")
        ]
        queued = [await harness.handle("members", tier_event) for tier_event in tier_events]

        await harness.dispatch()

        telegram_calls = providers.http.to("/bottg-secret/sendMessage")
        assert [call.payload for call in telegram_calls] == [
            {"chat_id": "4242", "text": "Your tier is now gold."},
            {"chat_id": "666", "text": "Your tier is now gold."},
        ]
        assert "authorization" not in telegram_calls[0].headers
        [sms] = providers.http.to("/sms")
        assert sms.payload["to"] == "+79990000002"
        first, second = [await harness.message(message.message_id) for message in queued if message is not None]
        assert (first.state, first.channel, first.delivered_at is not None) == (
            MessageState.DELIVERED,
            Channel.TELEGRAM,
            True,
        )
        # The SMS provider's answer has no delivery status: taken, not confirmed.
        assert (second.state, second.channel) == (MessageState.SENT, Channel.SMS)
        assert "blocked by the user" in caplog.text
        assert "tg-secret" not in caplog.text and "sms-secret" not in caplog.text


async def test_refusals_everywhere_fail_and_provider_outages_retry_until_dead(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    def answer(request: HttpRequest) -> Answer:
        if request.payload["to"] == "+79990000001":
            return 400, {"error": "invalid number"}
        return 503, {"error": "maintenance"}

    providers.http.respond = answer
    async with harness_factory(providers.settings(max_attempts=3)) as harness:
        await harness.configure("points.accrued", [Channel.SMS, Channel.EMAIL])
        await harness.handle("members", member("refused", phone="+79990000001", email="nobody@bounce.test"))
        await harness.handle("members", member("outage", phone="+79990000002"))
        refused = await harness.handle("accounts", accrued("refused"))
        outage = await harness.handle("accounts", accrued("outage"))
        assert refused is not None and outage is not None

        await harness.dispatch()
        failed = await harness.message(refused.message_id)
        assert (failed.state, failed.attempts, failed.reason) == (
            MessageState.FAILED,
            2,
            "email: recipient refused: 550",
        )
        retrying = await harness.message(outage.message_id)
        assert (retrying.state, retrying.attempts, retrying.reason) == (MessageState.QUEUED, 1, "sms: HTTP 503")
        assert retrying.next_attempt_at > retrying.created_at

        async def dead() -> bool:
            await harness.dispatch()
            return (await harness.message(outage.message_id)).state is MessageState.DEAD

        await infra.wait_until(dead, what="the message to die after its attempts")
        assert (await harness.message(outage.message_id)).attempts == 3
        assert len(providers.http.to("/sms")) == 1 + 3
        assert providers.mailbox.received == []


async def test_concurrent_dispatchers_send_each_message_once(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    async with harness_factory(providers.settings(dispatch_batch=4)) as harness:
        await harness.configure("points.accrued", [Channel.SMS])
        members = [f"m-{number}" for number in range(16)]
        for number, someone in enumerate(members):
            await harness.handle("members", member(someone, phone=f"+7999{number:07d}"))
            await harness.handle("accounts", accrued(someone))

        while sum(await asyncio.gather(*(harness.dispatch() for _ in range(4)))):
            pass

        sent_ids = [request.payload["message_id"] for request in providers.http.to("/sms")]
        assert len(sent_ids) == len(set(sent_ids)) == len(members)
        assert {message.state for message in await harness.messages()} == {MessageState.DELIVERED}


async def test_quiet_hours_delay_a_message_and_consent_is_respected(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    now = utcnow()
    # Quiet from an hour before now until two hours after, in UTC.
    start, end = time((now.hour - 1) % 24), time((now.hour + 2) % 24)
    settings = providers.settings(quiet_hours_start=start, quiet_hours_end=end, default_time_zone="UTC")
    async with harness_factory(settings) as harness:
        await harness.configure("coupon.issued", [Channel.SMS, Channel.EMAIL])
        consenting = {"sms": True}
        await harness.handle("members", member("asleep", phone="+79990000001", consents=consenting))
        # Eight hours ahead of UTC, well outside the quiet hours.
        await harness.handle(
            "members", member("awake", phone="+79990000002", time_zone="Asia/Shanghai", consents=consenting)
        )
        await harness.handle(
            "members",
            member("no-consent", phone="+79990000003", email="n@shop.test", consents={"sms": False}),
        )
        asleep, awake, no_consent = [
            await harness.handle("rewards", coupon(someone)) for someone in ("asleep", "awake", "no-consent")
        ]
        assert asleep is not None and awake is not None and no_consent is not None
        assert (no_consent.state, no_consent.reason) == (MessageState.SUPPRESSED, "NO_CONSENT")

        await harness.dispatch()

        assert [request.payload["to"] for request in providers.http.to("/sms")] == ["+79990000002"]
        assert (await harness.message(awake.message_id)).state is MessageState.DELIVERED
        waiting = await harness.message(asleep.message_id)
        quiet_end = datetime.combine(now.date(), end, tzinfo=UTC)
        if quiet_end <= now:
            quiet_end += timedelta(days=1)
        assert (waiting.state, waiting.next_attempt_at, waiting.attempts) == (MessageState.QUEUED, quiet_end, 0)
        assert providers.mailbox.received == []


async def test_the_frequency_cap_suppresses_marketing_but_not_service_messages(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    async with harness_factory(providers.settings(frequency_cap=1)) as harness:
        await harness.configure("coupon.issued", [Channel.SMS])
        await harness.configure("points.accrued", [Channel.SMS])
        await harness.handle("members", member("m-1", phone="+79990000001", consents={"sms": True}))
        first = await harness.handle("rewards", coupon("m-1"))
        await harness.dispatch()
        second = await harness.handle("rewards", coupon("m-1"))
        points = await harness.handle("accounts", accrued("m-1"))
        await harness.dispatch()
        assert first is not None and second is not None and points is not None
        states = [(await harness.message(m.message_id)) for m in (first, second, points)]
        assert [(m.state, m.reason) for m in states] == [
            (MessageState.DELIVERED, ""),
            (MessageState.SUPPRESSED, "FREQUENCY_CAPPED"),
            (MessageState.DELIVERED, ""),
        ]
        assert len(providers.http.to("/sms")) == 2


async def test_an_erased_member_gets_nothing_more(providers: Providers, harness_factory: HarnessFactory) -> None:
    async with harness_factory(providers.settings()) as harness:
        await harness.configure("points.accrued", [Channel.SMS], delay=timedelta(hours=1))
        await harness.handle("members", member("m-1", phone="+79990000001"))
        delayed = await harness.handle("accounts", accrued("m-1"))
        assert delayed is not None and delayed.state is MessageState.QUEUED
        await harness.handle("members", event("member.erased", "members", {"member_id": "m-1"}))
        erased = await harness.message(delayed.message_id)
        assert (erased.state, erased.reason) == (MessageState.SUPPRESSED, "MEMBER_ERASED")
        async with harness.sessions() as session:
            assert await store.find_contact(session, "m-1") == Contact("m-1", status="erased")
        # A late update does not bring the details back.
        await harness.handle("members", member("m-1", phone="+79990000001"))
        after = await harness.handle("accounts", accrued("m-1"))
        assert after is not None and (after.state, after.reason) == (MessageState.SUPPRESSED, "MEMBER_ERASED")
        await harness.dispatch()
        assert providers.http.requests == []


async def test_a_birthday_is_greeted_once_in_the_members_zone(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    now = datetime(2025, 3, 8, 20, 0, tzinfo=UTC)
    async with harness_factory(providers.settings()) as harness:
        # 20:00 UTC on 8 March is already 9 March in Tokyo, still 8 March in New York.
        await harness.handle(
            "members",
            member("tokyo", phone="+1", birth_date="1990-03-09", time_zone="Asia/Tokyo", consents={"sms": True}),
        )
        await harness.handle(
            "members",
            member("ny", phone="+2", birth_date="1990-03-09", time_zone="America/New_York", consents={"sms": True}),
        )
        for _run in range(2):
            await jobs.queue_birthdays(harness.sessions, harness.delivery, now)
        [greeting] = await harness.messages()
        assert (greeting.member_id, greeting.event_type, greeting.category) == (
            "tokyo",
            "member.birthday",
            Category.MARKETING,
        )
        assert greeting.body == "Happy birthday, Anna!"
        await jobs.queue_birthdays(harness.sessions, harness.delivery, now + timedelta(hours=12))
        assert sorted(message.member_id for message in await harness.messages()) == ["ny", "tokyo"]


async def test_a_paused_mass_send_waits_and_resumes_with_progress(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    async with harness_factory(providers.settings()) as harness:
        template = service.parse_template(
            "promo.spring", Channel.SMS, "en", "", "Spring sale, {{ member.first_name }}!"
        )
        async with harness.sessions() as session, session.begin():
            await service.upsert_template(session, template)
        for someone, consents in (("m-1", {"sms": True}), ("m-2", {"sms": True}), ("m-3", {})):
            await harness.handle("members", member(someone, phone=f"+7{someone}", consents=consents))
        request = service.parse_mass_send("promo.spring", [Channel.SMS], ["m-1", "m-2", "m-3", "m-1"])
        async with harness.sessions() as session, session.begin():
            mass_send = await service.create_mass_send(session, request, utcnow())
            paused = await service.set_mass_send_paused(session, mass_send.mass_send_id, paused=True)
        assert paused.by_state == {MessageState.QUEUED: 3}
        assert await harness.dispatch() == 0

        async with harness.sessions() as session, session.begin():
            await service.set_mass_send_paused(session, mass_send.mass_send_id, paused=False)
        assert await harness.dispatch() == 3
        async with harness.sessions() as session:
            progress = await service.get_mass_send(session, mass_send.mass_send_id)
        assert progress.mass_send.recipients == 3
        assert (progress.state.value, dict(progress.by_state)) == (
            "completed",
            {MessageState.DELIVERED: 2, MessageState.SUPPRESSED: 1},
        )
        assert sorted(request.payload["text"] for request in providers.http.to("/sms")) == ["Spring sale, Anna!"] * 2


async def test_over_grpc_a_redelivered_event_sends_once_and_a_mass_send_completes(
    providers: Providers, tmp_path: Path
) -> None:
    configured = providers.settings()
    settings = infra.suite_settings(
        tmp_path, messaging=configured.messaging, provider_tokens=configured.provider_tokens
    )
    async with (
        infra.running_suite(settings, ("notifications",)) as hosts,
        grpc.aio.insecure_channel(settings.address("notifications")) as channel,
    ):
        bus = hosts["notifications"].bus
        stub = pb_grpc.NotificationsServiceStub(channel)
        points_trigger = pb.Trigger(
            event_type="points.accrued", enabled=True, channels=[pb.CHANNEL_SMS], category=pb.CATEGORY_TRANSACTIONAL
        )
        updates = [
            await stub.UpdateTrigger(pb.UpdateTriggerRequest(request_id="t-1", trigger=points_trigger))
            for _ in range(2)
        ]
        assert updates[0] == updates[1]
        await stub.UpdateTrigger(
            pb.UpdateTriggerRequest(
                request_id="t-2",
                trigger=pb.Trigger(
                    event_type="member.registered", channels=[pb.CHANNEL_SMS], category=pb.CATEGORY_TRANSACTIONAL
                ),
            )
        )
        triggers = {
            trigger.event_type: trigger for trigger in (await stub.ListTriggers(pb.ListTriggersRequest())).triggers
        }
        assert list(triggers["points.accrued"].channels) == [pb.CHANNEL_SMS]
        assert not triggers["member.registered"].enabled
        assert triggers["coupon.issued"].category == pb.CATEGORY_MARKETING

        await bus.publish("members", member("m-1", phone="+79990000001", consents={"sms": True}))
        points = accrued("m-1")
        # The points may be handled before the registration (another stream): they wait for it.
        for delivered_event in (points, points, accrued("m-1", amount=7)):
            await bus.publish("accounts", delivered_event)

        async def both_delivered() -> bool:
            listed = await stub.ListMessages(pb.ListMessagesRequest(member_id="m-1"))
            states = [message.state for message in listed.messages]
            return states == [pb.MESSAGE_STATE_DELIVERED] * 2

        await infra.wait_until(both_delivered, what="both points messages delivered")
        texts = sorted(request.payload["text"] for request in providers.http.to("/sms"))
        assert texts == [
            "You earned 150 points. Thank you for shopping with Loyalty!",
            "You earned 7 points. Thank you for shopping with Loyalty!",
        ]

        listed = await stub.ListMessages(pb.ListMessagesRequest(member_id="m-1"))
        report = pb.ReportDeliveryRequest(request_id="r-1", message_id=listed.messages[0].message_id, delivered=True)
        assert (await stub.ReportDelivery(report)).message.state == pb.MESSAGE_STATE_DELIVERED
        with pytest.raises(grpc.aio.AioRpcError) as unnamed:
            await stub.ReportDelivery(pb.ReportDeliveryRequest(request_id="r-2", delivered=True))
        assert [violation.field for violation in read_remote_error(unnamed.value).violations] == ["message_id"]

        preview = await stub.PreviewTemplate(
            pb.PreviewTemplateRequest(
                template=pb.Template(
                    event_type="points.accrued",
                    channel=pb.CHANNEL_SMS,
                    locale="en",
                    body="Hi {{ member.first_name }}, +{{ event.data.amount }}",
                ),
                member_id="m-1",
            )
        )
        assert (preview.subject, preview.body) == ("", "Hi Anna, +150")
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stub.PreviewTemplate(
                pb.PreviewTemplateRequest(
                    template=pb.Template(
                        event_type="points.accrued", channel=pb.CHANNEL_SMS, locale="en", body="{{ x }"
                    )
                )
            )
        remote = read_remote_error(broken.value)
        assert (remote.code, [violation.field for violation in remote.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["template.body"],
        )

        await stub.UpsertTemplate(
            pb.UpsertTemplateRequest(
                request_id="tpl-1",
                template=pb.Template(
                    event_type="promo.spring", channel=pb.CHANNEL_SMS, locale="en", body="Spring sale!"
                ),
            )
        )
        created = await stub.CreateMassSend(
            pb.CreateMassSendRequest(
                request_id="mass-1", template_key="promo.spring", channels=[pb.CHANNEL_SMS], member_ids=["m-1", "ghost"]
            )
        )
        mass_send_id = created.mass_send.mass_send_id
        assert created.mass_send.recipients == 2
        finished: list[pb.MassSend] = []

        async def completed() -> bool:
            found = (await stub.GetMassSend(pb.GetMassSendRequest(mass_send_id=mass_send_id))).mass_send
            finished[:] = [found]
            return found.state == pb.MASS_SEND_STATE_COMPLETED

        await infra.wait_until(completed, what="the mass send to complete")
        # The unknown member's message is suppressed at once: mass sends go to known members.
        assert (finished[0].queued, finished[0].delivered, finished[0].suppressed) == (0, 1, 1)

        statistics = await stub.GetDeliveryStatistics(pb.GetDeliveryStatisticsRequest())
        counts = {
            (entry.template_key, entry.channel): (entry.delivered, entry.suppressed) for entry in statistics.statistics
        }
        assert counts == {("points.accrued", pb.CHANNEL_SMS): (2, 0), ("promo.spring", pb.CHANNEL_SMS): (1, 1)}


async def test_points_that_overtake_the_registration_wait_for_the_member(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    async with harness_factory(providers.settings(retry_base_seconds=30)) as harness:
        await harness.configure("points.accrued", [Channel.SMS])
        early = await harness.handle("accounts", accrued("late-member"))
        never = await harness.handle("accounts", accrued("never-registered"))
        assert early is not None and never is not None
        assert (early.state, early.body) == (MessageState.QUEUED, "")

        assert await harness.dispatch() == 2
        waiting = await harness.message(early.message_id)
        assert (waiting.state, waiting.attempts, waiting.reason) == (MessageState.QUEUED, 0, "UNKNOWN_MEMBER")
        # One wait to the end of the grace, not a poll every retry delay.
        assert waiting.next_attempt_at == waiting.created_at + domain.UNKNOWN_MEMBER_GRACE
        assert await harness.dispatch() == 0
        assert providers.http.requests == []

        # The registration releases the member's waiting message at once, and only theirs.
        await harness.handle("members", member("late-member", phone="+79990000001"))
        assert await harness.dispatch() == 1
        delivered = await harness.message(early.message_id)
        assert (delivered.state, delivered.reason) == (MessageState.DELIVERED, "")
        # The other one is still within its grace period.
        assert (await harness.message(never.message_id)).state is MessageState.QUEUED

        later = utcnow() + domain.UNKNOWN_MEMBER_GRACE + timedelta(minutes=1)
        async with harness.sessions() as session, session.begin():
            [claimed] = await store.claim_due(session, later, 10, "claim-1", later + timedelta(minutes=2))
        async with open_providers(harness.settings) as open_ones:
            throttle = jobs.ChannelThrottle.from_settings(harness.settings.messaging)
            given_up = await service.deliver(
                harness.sessions, open_ones, harness.delivery, throttle, claimed, "claim-1", later
            )
        assert (given_up.state, given_up.reason) == (MessageState.SUPPRESSED, "UNKNOWN_MEMBER")
        assert (await harness.message(never.message_id)).state is MessageState.SUPPRESSED
        assert [request.payload["to"] for request in providers.http.requests] == ["+79990000001"]


async def test_a_late_undelivered_report_moves_the_message_to_the_next_channel(
    providers: Providers, harness_factory: HarnessFactory
) -> None:
    providers.http.respond = lambda request: (202, {})
    async with harness_factory(providers.settings()) as harness:
        await harness.configure("points.expiring", [Channel.SMS, Channel.EMAIL])
        await harness.handle("members", member("m-1", phone="+79990000001", email="anna@shop.test"))
        expiring = event(
            "points.expiring",
            "accounts",
            {"holder_id": "m-1", "currency": "BONUS", "amount": 40, "expire_at": "2025-04-01T00:00:00+00:00"},
        )
        queued = await harness.handle("accounts", expiring)
        assert queued is not None
        await harness.dispatch()
        assert (await harness.message(queued.message_id)).state is MessageState.SENT

        async with harness.sessions() as session, session.begin():
            with pytest.raises(NotFound):
                await service.report_delivery(session, "no-such-message", True, "")
        async with harness.sessions() as session, session.begin():
            requeued = await service.report_delivery(session, queued.message_id, False, "number unreachable")
        assert (requeued.state, requeued.reason) == (MessageState.QUEUED, "sms: number unreachable")
        async with harness.sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as not_sent:
                await service.report_delivery(session, queued.message_id, True, "")
        assert not_sent.value.reason == "MESSAGE_NOT_SENT"

        await harness.dispatch()
        assert len(providers.http.to("/sms")) == 1, "the refused channel is not tried again"
        [(_recipients, mail)] = providers.mailbox.received
        assert mail.get_body().get_content().strip() == "40 of your points expire on 2025-04-01."  # type: ignore[union-attr]
        async with harness.sessions() as session, session.begin():
            delivered = await service.report_delivery(session, queued.message_id, True, "")
            again = await service.report_delivery(session, queued.message_id, True, "")
        assert (delivered.state, delivered.channel) == (MessageState.DELIVERED, Channel.EMAIL)
        assert again == delivered
