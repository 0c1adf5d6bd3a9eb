"""member.birthday (the birthday job) and member.profile_completed, announced once through the
outbox, over real gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from services.members import jobs
from tests.integration.test_members_api import Members, mask, members_service

# 22:30 UTC on 14 June: already 15 June in Moscow (UTC+3), still 14 June in UTC.
EVENING = datetime(2026, 6, 14, 22, 30, tzinfo=UTC)


async def test_the_birthday_job_announces_once_a_year_in_the_members_time_zone_even_when_runs_race(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        moscow = await members.register("+79160000001", birth_date="1990-06-15", time_zone="Europe/Moscow")
        utc_today = await members.register("+79160000002", birth_date="1980-06-14")
        await members.register("+79160000003", birth_date="1985-06-15")  # 15 June only tomorrow in UTC
        await members.register("+79160000004")  # no birth date
        blocked = await members.register("+79160000005", birth_date="1970-06-14")
        await members.stub.BlockMember(
            pb.BlockMemberRequest(request_id="block-1", member_id=blocked.member_id, reason="fraud")
        )
        sessions = db.create_session_factory(members.engine)

        first, second = await asyncio.gather(
            jobs.announce_birthdays(sessions, EVENING), jobs.announce_birthdays(sessions, EVENING)
        )
        assert first + second == 2, "two racing runs announce each birthday once between them"
        assert await jobs.announce_birthdays(sessions, EVENING) == 0, "a re-run announces nothing"
        assert await jobs.announce_birthdays(sessions, EVENING.replace(hour=23, minute=59)) == 0
        assert sorted(
            (e["member_id"], e["birth_date"], e["date"]) for e in await members.events("member.birthday")
        ) == (
            sorted(
                [
                    (moscow.member_id, "1990-06-15", "2026-06-15"),
                    (utc_today.member_id, "1980-06-14", "2026-06-14"),
                ]
            )
        )

        next_year = EVENING.replace(year=2027)
        racing = await asyncio.gather(*(jobs.announce_birthdays(sessions, next_year) for _ in range(3)))
        assert sum(racing) == 2, "a new year announces again, once"
        assert sorted(e["date"] for e in await members.events("member.birthday")) == [
            "2026-06-14",
            "2026-06-15",
            "2027-06-14",
            "2027-06-15",
        ]


async def test_29_february_is_celebrated_on_28_february_in_other_years(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        leapling = await members.register("+79160000011", birth_date="2000-02-29")
        sessions = db.create_session_factory(members.engine)
        noon = datetime(2027, 2, 28, 12, tzinfo=UTC)
        assert await jobs.announce_birthdays(sessions, noon) == 1
        assert await jobs.announce_birthdays(sessions, noon.replace(month=3, day=1)) == 0
        assert await jobs.announce_birthdays(sessions, noon.replace(year=2028)) == 0, "2028 has a 29 February"
        assert await jobs.announce_birthdays(sessions, noon.replace(year=2028, day=29)) == 1
        assert [e["date"] for e in await members.events("member.birthday")] == ["2027-02-28", "2028-02-29"]
        assert {e["member_id"] for e in await members.events("member.birthday")} == {leapling.member_id}


async def _update(members: Members, request_id: str, member_id: str, **fields: Any) -> None:
    await members.stub.UpdateMember(
        pb.UpdateMemberRequest(
            request_id=request_id, member_id=member_id, member=pb.Member(**fields), update_mask=mask(*fields)
        )
    )


async def test_a_completed_profile_is_announced_once_at_registration_or_on_the_completing_update(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        gradual = await members.register("+79160000021", first_name="Anna")
        await _update(members, "u-1", gradual.member_id, last_name="Ivanova", email="anna@example.com")
        assert await members.events("member.profile_completed") == [], "no birth date yet"
        await _update(members, "u-2", gradual.member_id, birth_date="1990-05-17")
        assert await members.events("member.profile_completed") == [{"member_id": gradual.member_id}]
        await _update(members, "u-3", gradual.member_id, last_name="Petrova")
        await _update(members, "u-4", gradual.member_id, birth_date="1991-05-17")

        complete = await members.register(
            "+79160000022", first_name="Boris", last_name="Orlov", email="boris@example.com", birth_date="1985-01-02"
        )
        await _update(members, "u-5", complete.member_id, first_name="Borya")
        assert await members.events("member.profile_completed") == [
            {"member_id": gradual.member_id},
            {"member_id": complete.member_id},
        ], "each profile completion is announced once, never again on later changes"
