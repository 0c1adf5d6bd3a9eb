"""Members' use cases against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import Connection, func, select, text

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import FailedPrecondition, NotFound
from loyalty.runtime.idempotency import run_idempotent
from loyalty.runtime.timeutil import utcnow
from services import suite
from services.members import service, store
from services.members.domain import normalize_referral_code
from tests import infra


def registration(phone: str = "+79161234567", email: str = "") -> service.Registration:
    return service.parse_registration(phone, email, "Anna", "Smirnova", 1, "")


async def test_registration_is_deduplicated_by_phone_and_email(database_url: str) -> None:
    async with infra.migrated_engine("members", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            first, created = await service.register_member(session, registration(email="anna@example.com"))
        assert created
        async with sessions() as session, session.begin():
            again, created_again = await service.register_member(
                session, registration("8 916 123-45-67"), return_existing=True
            )
            by_email, created_by_email = await service.register_member(
                session, registration("+79160000000", "ANNA@example.com"), return_existing=True
            )
        assert (again.member_id, created_again) == (first.member_id, False)
        assert (by_email.member_id, created_by_email) == (first.member_id, False)
        async with sessions() as session:
            events = (await session.execute(select(store.outbox.c.event_type))).scalars().all()
        assert events == ["member.registered"], "only the first registration is an event"


async def test_concurrent_registrations_of_one_phone_create_one_member(database_url: str) -> None:
    async with infra.migrated_engine("members", database_url) as engine:
        sessions = db.create_session_factory(engine)
        request_base = pb.RegisterMemberRequest(phone="+79161234567", first_name="Anna")

        async def register(index: int) -> pb.RegisterMemberResponse:
            request = pb.RegisterMemberRequest()
            request.CopyFrom(request_base)
            request.request_id = f"reg-{index}"

            async def work(session: object) -> pb.RegisterMemberResponse:
                member, created = await service.register_member(
                    session,  # type: ignore[arg-type]
                    registration(),
                    return_existing=True,
                )
                return pb.RegisterMemberResponse(member=pb.Member(member_id=member.member_id), created=created)

            return await run_idempotent(
                sessions,
                store.idempotency_keys,
                "RegisterMember",
                request.request_id,
                request,
                pb.RegisterMemberResponse,
                work,
            )

        results = await asyncio.gather(*(register(i) for i in range(8)))
        assert len({r.member.member_id for r in results}) == 1
        assert sum(r.created for r in results) == 1
        async with sessions() as session:
            assert await session.scalar(select(func.count()).select_from(store.MemberRow)) == 1


async def test_cards_identify_their_member_and_refuse_duplicates(database_url: str) -> None:
    async with infra.migrated_engine("members", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            member, _ = await service.register_member(session, registration())
            card = await service.issue_card(session, member.member_id, "")
            generated = await service.issue_card(session, member.member_id, "")
        assert card.card_number != generated.card_number
        async with sessions() as session:
            found = await service.identify_by_card(session, card.card_number)
            assert found.member.member_id == member.member_id
            with pytest.raises(NotFound) as missing:
                await service.identify_by_card(session, "7700000000016")
            assert missing.value.reason == "CARD_NOT_FOUND"
        async with sessions() as session, session.begin():
            with pytest.raises(FailedPrecondition) as taken:
                await service.issue_card(session, member.member_id, card.card_number)
        assert taken.value.reason == "CARD_NUMBER_TAKEN"


async def test_the_referral_code_migration_gives_every_registered_member_a_code(database_url: str) -> None:
    """Members registered before referral codes existed get one each on upgrade; anonymous
    card holders (no phone) get theirs when they register."""
    config = db.alembic_config(suite.definition("members").migrations_dir)

    def upgrade(connection: Connection, target: str) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, target)

    engine = db.create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade, "31d4c5542e57")
        async with engine.begin() as connection:
            for member_id, phone in (("m-1", "+79161111111"), ("m-2", "+79162222222"), ("anon", None)):
                await connection.execute(
                    text(
                        "INSERT INTO members (member_id, phone, first_name, last_name, status, tier,"
                        " registration_channel, created_at) VALUES (:id, :phone, '', '', 'active', 'basic', 1, :at)"
                    ),
                    {"id": member_id, "phone": phone, "at": utcnow()},
                )
        async with engine.begin() as connection:
            await connection.run_sync(upgrade, "head")
        async with engine.connect() as connection:
            rows = await connection.execute(select(store.MemberRow.member_id, store.MemberRow.own_referral_code))
            codes: dict[str, str | None] = {member_id: code for member_id, code in rows}
        assert codes["anon"] is None
        assert codes["m-1"] != codes["m-2"]
        assert all(normalize_referral_code(codes[member] or "") == codes[member] for member in ("m-1", "m-2"))
    finally:
        await engine.dispose()
