"""Members' profiles over real gRPC, on SQLite and PostgreSQL: update with a field mask,
consents, the events the notifications service reads, block and unblock, erasure, and
concurrent registration of one phone. Also the harness the other members API tests use."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.members.v1.members_service_pb2_grpc import MembersServiceStub
from loyalty.runtime import db
from loyalty.runtime.bus import Event, EventBus
from loyalty.runtime.errors import RemoteError, read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.members import store
from tests import infra

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.members.v1.members_service_pb2_grpc import MembersServiceAsyncStub

PROFILE_EVENT_KEYS = {
    "member_id",
    "phone",
    "email",
    "first_name",
    "last_name",
    "locale",
    "time_zone",
    "birth_date",
    "push_token",
    "telegram_chat_id",
    "status",
    "tier",
    "consents",
    "attributes",
}


@dataclass
class Members:
    stub: MembersServiceAsyncStub
    engine: AsyncEngine
    """The service's own database, to check what it wrote."""
    bus: EventBus

    async def register(self, phone: str = "+79161234567", **fields: Any) -> pb.Member:
        request = pb.RegisterMemberRequest(request_id=f"reg-{uuid.uuid4()}", phone=phone, **fields)
        return (await self.stub.RegisterMember(request)).member

    async def events(self, event_type: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(store.outbox.c.payload)
                .where(store.outbox.c.event_type == event_type)
                .order_by(store.outbox.c.id)
            )
            return [dict(row.payload) for row in rows]

    async def publish_gateway(self, event_type: str, payload: dict[str, Any], event_id: str = "") -> str:
        """Puts an event on the gateway's stream as the gateway would; returns its id."""
        event_id = event_id or str(uuid.uuid4())
        await self.bus.publish(
            "gateway",
            Event(event_id, event_type, "gateway", str(payload.get("member_id", "")), utcnow(), payload, {}),
        )
        return event_id


@asynccontextmanager
async def members_service(tmp_path: Path, database_url: str, **overrides: object) -> AsyncIterator[Members]:
    # Tests that change rows behind the service's back see the change at once.
    settings = infra.suite_settings(tmp_path, **{"identify_cache_seconds": 0, **overrides})
    settings.members.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("members",)) as hosts,
        grpc.aio.insecure_channel(settings.address("members")) as channel,
    ):
        engine = db.create_engine(database_url)
        try:
            yield Members(MembersServiceStub(channel), engine, hosts["members"].bus)
        finally:
            await engine.dispose()


async def refusal(call: object) -> RemoteError:
    """What the service answered to a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return read_remote_error(refused.value)


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


async def test_a_profile_changes_only_in_the_masked_fields_and_announces_it(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register(
            email="anna@example.com",
            first_name="Anna",
            locale="ru-RU",
            consents=[pb.Consent(channel=pb.CONTACT_CHANNEL_SMS, granted=True, source="pos")],
        )
        update = pb.UpdateMemberRequest(
            request_id="update-1",
            member_id=member.member_id,
            member=pb.Member(
                first_name="  Anya ",
                last_name="ignored: not in the mask",
                time_zone="Asia/Yekaterinburg",
                birth_date="1990-05-17",
                push_token="push-token-1",
                telegram_chat_id="123456",
                consents=[
                    pb.Consent(channel=pb.CONTACT_CHANNEL_EMAIL, granted=True, source="app"),
                    pb.Consent(channel=pb.CONTACT_CHANNEL_SMS, granted=False, source="app"),
                ],
            ),
            update_mask=mask("first_name", "time_zone", "birth_date", "push_token", "telegram_chat_id", "consents"),
        )
        updated = (await members.stub.UpdateMember(update)).member
        assert (updated.first_name, updated.last_name, updated.locale) == ("Anya", "", "ru-RU")
        assert (updated.time_zone, updated.birth_date, updated.push_token, updated.telegram_chat_id) == (
            "Asia/Yekaterinburg",
            "1990-05-17",
            "push-token-1",
            "123456",
        )
        assert {(c.channel, c.granted, c.source) for c in updated.consents} == {
            (pb.CONTACT_CHANNEL_SMS, False, "app"),
            (pb.CONTACT_CHANNEL_EMAIL, True, "app"),
        }
        assert all(c.update_time.seconds > 0 for c in updated.consents)
        assert (await members.stub.UpdateMember(update)).member == updated, "a retry answers the first result"
        fetched = (await members.stub.GetMember(pb.GetMemberRequest(member_id=member.member_id))).member
        assert fetched == updated

        registered = await members.events("member.registered")
        changes = await members.events("member.updated")
        assert len(registered) == 1 and len(changes) == 1, "one event per change, none for the retry"
        assert set(registered[0]) == PROFILE_EVENT_KEYS | {"channel", "referral_code", "referrer_id"}
        assert set(changes[0]) == PROFILE_EVENT_KEYS
        assert registered[0]["consents"] == {
            "sms": True,
            "email": False,
            "push": False,
            "viber": False,
            "telegram": False,
        }
        assert changes[0]["consents"] == {"sms": False, "email": True, "push": False, "viber": False, "telegram": False}
        assert (changes[0]["phone"], changes[0]["email"], changes[0]["status"], changes[0]["tier"]) == (
            "+79161234567",
            "anna@example.com",
            "active",
            "basic",
        )
        assert (changes[0]["first_name"], changes[0]["time_zone"], changes[0]["telegram_chat_id"]) == (
            "Anya",
            "Asia/Yekaterinburg",
            "123456",
        )


async def test_bad_profile_updates_name_every_field(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register()
        bad = await refusal(
            members.stub.UpdateMember(
                pb.UpdateMemberRequest(
                    request_id="bad-1",
                    member_id=member.member_id,
                    member=pb.Member(
                        phone="12",
                        email="not-an-email",
                        time_zone="Mars/Olympus",
                        locale="Russian!",
                        birth_date="2990-01-01",
                        consents=[pb.Consent(source="app")],
                    ),
                    update_mask=mask("phone", "email", "time_zone", "locale", "birth_date", "consents"),
                )
            )
        )
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in bad.violations} == {
            "member.phone",
            "member.email",
            "member.time_zone",
            "member.locale",
            "member.birth_date",
            "member.consents[0].channel",
        }
        unknown_path = await refusal(
            members.stub.UpdateMember(
                pb.UpdateMemberRequest(
                    request_id="bad-2",
                    member_id=member.member_id,
                    member=pb.Member(tier="gold"),
                    update_mask=mask("tier"),
                )
            )
        )
        assert [v.field for v in unknown_path.violations] == ["update_mask"]
        other = await members.register("+79160000000", email="boris@example.com")
        taken = await refusal(
            members.stub.UpdateMember(
                pb.UpdateMemberRequest(
                    request_id="bad-3",
                    member_id=member.member_id,
                    member=pb.Member(phone="8 916 000-00-00"),
                    update_mask=mask("phone"),
                )
            )
        )
        assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PHONE_TAKEN")
        missing = await refusal(
            members.stub.UpdateMember(
                pb.UpdateMemberRequest(
                    request_id="bad-4", member_id="nobody", member=pb.Member(locale="en"), update_mask=mask("locale")
                )
            )
        )
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
        assert other.member_id != member.member_id
        assert await members.events("member.updated") == []


async def test_a_blocked_member_is_refused_at_identification_until_unblocked(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register()
        card = (await members.stub.IssueCard(pb.IssueCardRequest(request_id="card-1", member_id=member.member_id))).card
        blocked = (
            await members.stub.BlockMember(
                pb.BlockMemberRequest(request_id="block-1", member_id=member.member_id, reason="fraud")
            )
        ).member
        assert (blocked.status, blocked.block_reason) == (pb.MEMBER_STATUS_BLOCKED, "fraud")
        for identifier in (
            pb.IdentifyMemberRequest(phone="+79161234567"),
            pb.IdentifyMemberRequest(card_number=card.card_number),
        ):
            refused = await refusal(members.stub.IdentifyMember(identifier))
            assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_BLOCKED")
        await members.stub.UnblockMember(pb.UnblockMemberRequest(request_id="unblock-1", member_id=member.member_id))
        identified = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone="+79161234567"))
        assert identified.context.status == pb.MEMBER_STATUS_ACTIVE
        assert [event["status"] for event in await members.events("member.updated")] == ["blocked", "active"]


async def test_erasure_removes_personal_data_and_keeps_the_anonymous_id(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register(
            email="anna@example.com",
            first_name="Anna",
            last_name="Smirnova",
            birth_date="1990-05-17",
            consents=[pb.Consent(channel=pb.CONTACT_CHANNEL_EMAIL, granted=True, source="web")],
        )
        card = (await members.stub.IssueCard(pb.IssueCardRequest(request_id="card-1", member_id=member.member_id))).card
        await members.publish_gateway(
            "cheque.committed",
            {
                "terminal_id": "pos-1",
                "receipt_number": "0001",
                "member_id": member.member_id,
                "paid_minor": 150_00,
                "receipt_time": utcnow().isoformat(),
            },
        )

        async def counted() -> bool:
            stats = await members.stub.GetMemberStatistics(pb.GetMemberStatisticsRequest(member_id=member.member_id))
            return stats.purchase_count == 1

        await infra.wait_until(counted, "the receipt to be counted")
        erased = (
            await members.stub.EraseMember(pb.EraseMemberRequest(request_id="erase-1", member_id=member.member_id))
        ).member
        assert erased.member_id == member.member_id
        assert (erased.phone, erased.email, erased.first_name, erased.last_name, erased.birth_date) == ("",) * 5
        assert list(erased.consents) == []
        assert erased.participation_type == pb.PARTICIPATION_TYPE_ANONYMOUS
        assert erased.erase_time.seconds > 0
        gone = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone="+79161234567")))
        assert gone.reason == "MEMBER_NOT_FOUND"
        card_refused = await refusal(
            members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number))
        )
        assert card_refused.reason == "CARD_BLOCKED"
        unblock = await refusal(
            members.stub.UnblockCard(pb.UnblockCardRequest(request_id="unblock-1", card_number=card.card_number))
        )
        assert unblock.reason == "MEMBER_ERASED"
        stats = await members.stub.GetMemberStatistics(pb.GetMemberStatisticsRequest(member_id=member.member_id))
        assert (stats.purchase_count, stats.total_spend_minor) == (1, 150_00), "statistics stay with the anonymous id"
        assert await members.events("member.erased") == [{"member_id": member.member_id}]
        async with members.engine.connect() as connection:
            payloads = [str(row.payload) for row in await connection.execute(select(store.outbox.c.payload))]
            consents = await connection.scalar(select(func.count()).select_from(store.ConsentRow))
        assert not any("anna" in payload.lower() or "79161234567" in payload for payload in payloads)
        assert consents == 0
        again = await members.register()
        assert again.member_id != member.member_id, "the phone is free for a new registration"


async def test_concurrent_registrations_of_one_phone_over_grpc_create_one_member(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        outcomes = await asyncio.gather(
            *(
                members.stub.RegisterMember(
                    pb.RegisterMemberRequest(request_id=f"concurrent-{index}", phone="8 916 123 45 67")
                )
                for index in range(10)
            ),
            return_exceptions=True,
        )
        created = [outcome for outcome in outcomes if isinstance(outcome, pb.RegisterMemberResponse)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
        assert len(created) == 1 and created[0].created
        assert len(refused) == 9
        member_id = created[0].member.member_id
        assert {already_existing_member(error) for error in refused} == {member_id}
        assert len(await members.events("member.registered")) == 1


def already_existing_member(error: grpc.aio.AioRpcError) -> str:
    """The member id an ALREADY_EXISTS refusal carries in its ErrorInfo metadata."""
    assert read_remote_error(error).reason == "MEMBER_ALREADY_EXISTS"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.metadata["member_id"])
    raise AssertionError("no ErrorInfo in the refusal")


async def test_a_duplicate_registration_is_refused_unless_the_caller_asks_for_the_existing_member(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        first = await members.stub.RegisterMember(
            pb.RegisterMemberRequest(request_id="dup-1", phone="+79161234567", email="anna@example.com")
        )
        for request in (
            pb.RegisterMemberRequest(request_id="dup-2", phone="8 916 123-45-67"),
            pb.RegisterMemberRequest(request_id="dup-3", phone="+79160000000", email="ANNA@example.com"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await members.stub.RegisterMember(request)
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert already_existing_member(refused.value) == first.member.member_id
        existing = await members.stub.RegisterMember(
            pb.RegisterMemberRequest(request_id="dup-4", phone="+7 916 123 45 67", return_existing=True)
        )
        assert (existing.member.member_id, existing.created) == (first.member.member_id, False)
        replayed = await members.stub.RegisterMember(
            pb.RegisterMemberRequest(request_id="dup-1", phone="+79161234567", email="anna@example.com")
        )
        assert replayed == first, "a retry of the first registration replays its answer"
        assert len(await members.events("member.registered")) == 1
