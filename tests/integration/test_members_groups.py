"""Households, static segments and partners over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import grpc

from loyalty.members.v1 import members_service_pb2 as pb
from tests.integration.test_members_api import members_service, refusal


async def test_a_household_pools_the_account_and_a_leaver_takes_their_own_back(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        anna, boris = await members.register(), await members.register("+79160000001")
        household = (
            await members.stub.CreateHousehold(
                pb.CreateHouseholdRequest(request_id="h-1", owner_member_id=anna.member_id, name="Smirnovs")
            )
        ).household
        joined = (
            await members.stub.JoinHousehold(
                pb.JoinHouseholdRequest(
                    request_id="j-1", household_id=household.household_id, member_id=boris.member_id
                )
            )
        ).household
        assert sorted(joined.member_ids) == sorted([anna.member_id, boris.member_id])
        for phone in (anna.phone, boris.phone):
            context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=phone))).context
            assert (context.account_holder_id, context.household_id) == (household.household_id, household.household_id)
        family = (await members.stub.GetMember(pb.GetMemberRequest(member_id=boris.member_id))).member
        assert family.participation_type == pb.PARTICIPATION_TYPE_FAMILY

        twice = await refusal(
            members.stub.JoinHousehold(
                pb.JoinHouseholdRequest(
                    request_id="j-2", household_id=household.household_id, member_id=boris.member_id
                )
            )
        )
        assert (twice.code, twice.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_IN_HOUSEHOLD")

        left = (
            await members.stub.LeaveHousehold(pb.LeaveHouseholdRequest(request_id="l-1", member_id=boris.member_id))
        ).member
        assert (left.account_holder_id, left.household_id) == (boris.member_id, "")
        remaining = (
            await members.stub.GetHousehold(pb.GetHouseholdRequest(household_id=household.household_id))
        ).household
        assert list(remaining.member_ids) == [anna.member_id]
        joins = await members.events("household.joined")
        assert joins == [
            {"household_id": household.household_id, "member_id": anna.member_id},
            {"household_id": household.household_id, "member_id": boris.member_id},
        ]
        assert await members.events("household.left") == [
            {"household_id": household.household_id, "member_id": boris.member_id}
        ]
        not_in = await refusal(
            members.stub.LeaveHousehold(pb.LeaveHouseholdRequest(request_id="l-2", member_id=boris.member_id))
        )
        assert not_in.reason == "NOT_IN_HOUSEHOLD"
        missing = await refusal(members.stub.GetHousehold(pb.GetHouseholdRequest(household_id="nope")))
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "HOUSEHOLD_NOT_FOUND")


async def test_a_static_segment_is_imported_by_phone_and_carried_in_the_member_context(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        anna, boris = await members.register(), await members.register("+79160000001")
        await members.stub.CreateSegment(pb.CreateSegmentRequest(request_id="s-1", code="employees", name="Staff"))
        added = await members.stub.AddSegmentMembers(
            pb.AddSegmentMembersRequest(
                request_id="a-1",
                code="employees",
                member_ids=[anna.member_id, "unknown-id"],
                phones=["8 916 000-00-01", "+79169999999"],
            )
        )
        assert (added.segment.size, added.added, added.unknown) == (2, 2, 2)
        again = await members.stub.AddSegmentMembers(
            pb.AddSegmentMembersRequest(request_id="a-2", code="employees", member_ids=[anna.member_id])
        )
        assert (again.segment.size, again.added) == (2, 0)
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=anna.phone))).context
        assert list(context.segments) == ["employees"]
        removed = await members.stub.RemoveSegmentMembers(
            pb.RemoveSegmentMembersRequest(request_id="r-1", code="employees", member_ids=[anna.member_id])
        )
        assert removed.segment.size == 1
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=anna.phone))).context
        assert list(context.segments) == []
        boris_context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=boris.phone))).context
        assert list(boris_context.segments) == ["employees"]
        bad = await refusal(
            members.stub.AddSegmentMembers(
                pb.AddSegmentMembersRequest(request_id="a-3", code="Bad Code", phones=["12"])
            )
        )
        assert {v.field for v in bad.violations} == {"code"}
        exists = await refusal(
            members.stub.CreateSegment(pb.CreateSegmentRequest(request_id="s-2", code="employees", name="Again"))
        )
        assert (exists.code, exists.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SEGMENT_EXISTS")


async def test_partners_own_their_stores(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        await members.stub.SetPartner(
            pb.SetPartnerRequest(
                request_id="p-1", partner=pb.Partner(partner_id="acme", name="ACME", store_ids=["s-2", "s-1"])
            )
        )
        got = (await members.stub.GetPartner(pb.GetPartnerRequest(partner_id="acme"))).partner
        assert (got.name, list(got.store_ids)) == ("ACME", ["s-1", "s-2"])
        clash = await refusal(
            members.stub.SetPartner(
                pb.SetPartnerRequest(
                    request_id="p-2", partner=pb.Partner(partner_id="other", name="Other", store_ids=["s-1"])
                )
            )
        )
        assert clash.reason == "STORE_OWNED_BY_OTHER_PARTNER"
        await members.stub.SetPartner(
            pb.SetPartnerRequest(
                request_id="p-3", partner=pb.Partner(partner_id="acme", name="ACME Ltd", store_ids=["s-3"])
            )
        )
        got = (await members.stub.GetPartner(pb.GetPartnerRequest(partner_id="acme"))).partner
        assert (got.name, list(got.store_ids)) == ("ACME Ltd", ["s-3"])
        missing = await refusal(members.stub.GetPartner(pb.GetPartnerRequest(partner_id="nope")))
        assert missing.reason == "PARTNER_NOT_FOUND"
