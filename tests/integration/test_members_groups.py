"""Households and their invitations, static segments, partners with their stores and
registers, over real gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
from sqlalchemy import update

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime.timeutil import utcnow
from services.members import store
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


def invite(
    request_id: str, household_id: str, invited_by: str, member_id: str = "", phone: str = ""
) -> pb.InviteToHouseholdRequest:
    return pb.InviteToHouseholdRequest(
        request_id=request_id, household_id=household_id, invited_by=invited_by, member_id=member_id, phone=phone
    )


async def test_household_invitations_are_accepted_declined_or_expire(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        anna, boris, vera = (
            await members.register(),
            await members.register("+79160000001"),
            await members.register("+79160000002"),
        )
        household = (
            await members.stub.CreateHousehold(
                pb.CreateHouseholdRequest(request_id="h-1", owner_member_id=anna.member_id, name="Smirnovs")
            )
        ).household
        home = household.household_id
        by_phone = (
            await members.stub.InviteToHousehold(invite("i-1", home, anna.member_id, phone="8 916 000-00-01"))
        ).invitation
        assert (by_phone.member_id, by_phone.status) == (boris.member_id, pb.INVITATION_STATUS_PENDING)
        lasts = by_phone.expire_time.ToDatetime() - by_phone.create_time.ToDatetime()
        assert lasts == timedelta(days=7)
        twice = await refusal(
            members.stub.InviteToHousehold(invite("i-2", home, anna.member_id, member_id=boris.member_id))
        )
        assert (twice.code, twice.reason) == (grpc.StatusCode.ALREADY_EXISTS, "INVITATION_PENDING")
        outsider = await refusal(
            members.stub.InviteToHousehold(invite("i-3", home, vera.member_id, member_id=boris.member_id))
        )
        assert outsider.reason == "INVITER_NOT_IN_HOUSEHOLD"
        bad = await refusal(
            members.stub.InviteToHousehold(
                pb.InviteToHouseholdRequest(
                    request_id="i-4", household_id=home, invited_by=anna.member_id, phone="12", valid_days=91
                )
            )
        )
        assert {v.field for v in bad.violations} == {"phone", "valid_days"}

        accepted = await members.stub.AcceptHouseholdInvitation(
            pb.AcceptHouseholdInvitationRequest(request_id="a-1", invitation_id=by_phone.invitation_id)
        )
        assert accepted.invitation.status == pb.INVITATION_STATUS_ACCEPTED
        assert sorted(accepted.household.member_ids) == sorted([anna.member_id, boris.member_id])
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=boris.phone))).context
        assert context.account_holder_id == home
        again = await refusal(
            members.stub.AcceptHouseholdInvitation(
                pb.AcceptHouseholdInvitationRequest(request_id="a-2", invitation_id=by_phone.invitation_id)
            )
        )
        assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INVITATION_ACCEPTED")

        # Boris, now in the household, invites Vera; she declines.
        to_vera = (
            await members.stub.InviteToHousehold(
                pb.InviteToHouseholdRequest(
                    request_id="i-5",
                    household_id=home,
                    invited_by=boris.member_id,
                    member_id=vera.member_id,
                    valid_days=2,
                )
            )
        ).invitation
        declined = await members.stub.DeclineHouseholdInvitation(
            pb.DeclineHouseholdInvitationRequest(request_id="d-1", invitation_id=to_vera.invitation_id)
        )
        assert declined.invitation.status == pb.INVITATION_STATUS_DECLINED
        # A new invitation, left to expire.
        late = (
            await members.stub.InviteToHousehold(invite("i-6", home, anna.member_id, member_id=vera.member_id))
        ).invitation
        async with members.engine.begin() as connection:
            await connection.execute(
                update(store.HouseholdInvitationRow)
                .where(store.HouseholdInvitationRow.invitation_id == late.invitation_id)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        expired = await refusal(
            members.stub.AcceptHouseholdInvitation(
                pb.AcceptHouseholdInvitationRequest(request_id="a-3", invitation_id=late.invitation_id)
            )
        )
        assert (expired.code, expired.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INVITATION_EXPIRED")
        listed = (
            await members.stub.ListHouseholdInvitations(pb.ListHouseholdInvitationsRequest(member_id=vera.member_id))
        ).invitations
        assert [item.status for item in listed] == [pb.INVITATION_STATUS_EXPIRED, pb.INVITATION_STATUS_DECLINED]
        of_household = (
            await members.stub.ListHouseholdInvitations(pb.ListHouseholdInvitationsRequest(household_id=home))
        ).invitations
        assert len(of_household) == 3
        vera_now = (await members.stub.GetMember(pb.GetMemberRequest(member_id=vera.member_id))).member
        assert vera_now.household_id == ""
        assert [event["member_id"] for event in await members.events("household.invited")] == [
            boris.member_id,
            vera.member_id,
            vera.member_id,
        ]
        missing = await refusal(
            members.stub.DeclineHouseholdInvitation(
                pb.DeclineHouseholdInvitationRequest(request_id="d-2", invitation_id="nope")
            )
        )
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "INVITATION_NOT_FOUND")


async def test_stores_carry_a_region_and_registers_resolve_to_their_store(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        acme = pb.Partner(
            partner_id="acme",
            name="ACME",
            store_ids=["s-9"],
            stores=[
                pb.Store(store_id="s-1", region="moscow", time_zone="Europe/Moscow", terminal_ids=["t-2", "t-1"]),
                pb.Store(store_id="s-2", region="ural", time_zone="Asia/Yekaterinburg", terminal_ids=["t-3"]),
            ],
        )
        stored = (await members.stub.SetPartner(pb.SetPartnerRequest(request_id="p-1", partner=acme))).partner
        assert list(stored.store_ids) == ["s-1", "s-2", "s-9"]
        assert [(s.store_id, s.region, list(s.terminal_ids)) for s in stored.stores] == [
            ("s-1", "moscow", ["t-1", "t-2"]),
            ("s-2", "ural", ["t-3"]),
            ("s-9", "", []),
        ]
        assert (await members.stub.GetPartner(pb.GetPartnerRequest(partner_id="acme"))).partner == stored
        resolved = await members.stub.ResolveTerminal(pb.ResolveTerminalRequest(terminal_id="t-3"))
        assert (resolved.store_id, resolved.partner_id, resolved.region, resolved.time_zone) == (
            "s-2",
            "acme",
            "ural",
            "Asia/Yekaterinburg",
        )

        taken = await refusal(
            members.stub.SetPartner(
                pb.SetPartnerRequest(
                    request_id="p-2",
                    partner=pb.Partner(
                        partner_id="other", name="Other", stores=[pb.Store(store_id="o-1", terminal_ids=["t-1"])]
                    ),
                )
            )
        )
        assert (taken.code, taken.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TERMINAL_OWNED_BY_OTHER_PARTNER")
        bad = await refusal(
            members.stub.SetPartner(
                pb.SetPartnerRequest(
                    request_id="p-3",
                    partner=pb.Partner(
                        partner_id="acme",
                        name="ACME",
                        store_ids=["s-1"],
                        stores=[
                            pb.Store(store_id="s-1", time_zone="Mars/Olympus", terminal_ids=["t-1"]),
                            pb.Store(store_id="s-4", terminal_ids=["t-1"]),
                        ],
                    ),
                )
            )
        )
        assert {v.field for v in bad.violations} == {
            "partner.stores[0].time_zone",
            "partner.store_ids",
            "partner.stores",
        }

        # The register moves within the partner: s-1 is replaced, t-1 now belongs to s-4.
        moved = pb.Partner(
            partner_id="acme",
            name="ACME",
            stores=[pb.Store(store_id="s-4", region="moscow", terminal_ids=["t-1"])],
        )
        await members.stub.SetPartner(pb.SetPartnerRequest(request_id="p-4", partner=moved))
        assert (await members.stub.ResolveTerminal(pb.ResolveTerminalRequest(terminal_id="t-1"))).store_id == "s-4"
        gone = await refusal(members.stub.ResolveTerminal(pb.ResolveTerminalRequest(terminal_id="t-3")))
        assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "TERMINAL_NOT_FOUND")
