"""Merging duplicate members over real gRPC, with a real accounts service in the same suite,
on SQLite and PostgreSQL: cards, statistics and points move to the survivor; audited."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.members.v1.members_service_pb2_grpc import MembersServiceStub
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.members import store
from tests import infra
from tests.integration.test_members_api import Members, already_existing_member, refusal
from tests.integration.test_members_tiers import receipt, statistics, wait_for_purchases

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub


@asynccontextmanager
async def members_and_accounts(
    tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[Members, AccountsServiceAsyncStub]]:
    settings = infra.suite_settings(tmp_path, identify_cache_seconds=0)
    settings.members.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("members", "accounts")) as hosts,
        grpc.aio.insecure_channel(settings.address("members")) as members_channel,
        grpc.aio.insecure_channel(settings.address("accounts")) as accounts_channel,
    ):
        engine = db.create_engine(database_url)
        try:
            yield (
                Members(MembersServiceStub(members_channel), engine, hosts["members"].bus),
                AccountsServiceStub(accounts_channel),
            )
        finally:
            await engine.dispose()


async def accrue(stub: AccountsServiceAsyncStub, holder_id: str, amount: int) -> None:
    await stub.AccruePoints(
        accounts.AccruePointsRequest(
            request_id=str(uuid.uuid4()),
            holder_id=holder_id,
            amount=amount,
            source=accounts.ACCRUAL_SOURCE_STAFF,
            reason="welcome",
        )
    )


async def balance(stub: AccountsServiceAsyncStub, holder_id: str) -> int:
    response = await stub.GetBalance(accounts.GetBalanceRequest(holder_id=holder_id))
    return response.balance.active


def merge(request_id: str, survivor_id: str, duplicate_id: str) -> pb.MergeMembersRequest:
    return pb.MergeMembersRequest(
        request_id=request_id, survivor_id=survivor_id, duplicate_id=duplicate_id, actor="op-1", reason="same person"
    )


async def test_a_duplicate_merges_into_the_survivor_with_its_cards_statistics_and_points(
    tmp_path: Path, database_url: str
) -> None:
    async with members_and_accounts(tmp_path, database_url) as (members, accounts_stub):
        survivor = await members.register("+79161111111")
        duplicate = await members.register("+79162222222")
        card = (await members.stub.IssueCard(pb.IssueCardRequest(request_id="c-1", member_id=duplicate.member_id))).card
        await accrue(accounts_stub, survivor.member_id, 100)
        await accrue(accounts_stub, duplicate.member_id, 250)
        await members.publish_gateway("cheque.committed", receipt(survivor.member_id, "1", 10_00, utcnow()))
        await members.publish_gateway("cheque.committed", receipt(duplicate.member_id, "2", 30_00, utcnow()))
        await wait_for_purchases(members, duplicate.member_id, 1, 30_00)
        await wait_for_purchases(members, survivor.member_id, 1, 10_00)

        merged = await members.stub.MergeMembers(merge("m-1", survivor.member_id, duplicate.member_id))
        assert (merged.survivor.member_id, merged.cards_moved) == (survivor.member_id, 1)
        assert await members.stub.MergeMembers(merge("m-1", survivor.member_id, duplicate.member_id)) == merged

        assert await balance(accounts_stub, survivor.member_id) == 350
        assert await balance(accounts_stub, duplicate.member_id) == 0
        stats = await statistics(members, survivor.member_id)
        assert (stats.purchase_count, stats.total_spend_minor) == (2, 40_00)
        by_card = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number))
        by_phone = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone="+79162222222"))
        assert by_card.context.member_id == by_phone.context.member_id == survivor.member_id
        gone = (await members.stub.GetMember(pb.GetMemberRequest(member_id=duplicate.member_id))).member
        assert gone.merged_into == survivor.member_id

        with pytest.raises(grpc.aio.AioRpcError) as again:
            await members.stub.RegisterMember(pb.RegisterMemberRequest(request_id="r-dup", phone="+79162222222"))
        assert already_existing_member(again.value) == survivor.member_id, "the phone now names the survivor"
        refused = await refusal(members.stub.MergeMembers(merge("m-2", survivor.member_id, duplicate.member_id)))
        assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED")
        blocked = await refusal(
            members.stub.BlockMember(
                pb.BlockMemberRequest(request_id="b-1", member_id=duplicate.member_id, reason="fraud")
            )
        )
        assert blocked.reason == "MEMBER_MERGED"

        assert await members.events("member.merged") == [
            {
                "survivor_id": survivor.member_id,
                "duplicate_id": duplicate.member_id,
                "actor": "op-1",
                "reason": "same person",
                "cards_moved": 1,
                "segments_moved": 0,
                "tier_changes_moved": 0,
                "consents_moved": 0,
            }
        ]
        async with members.engine.connect() as connection:
            audit = (await connection.execute(select(store.MemberMergeRow.__table__))).mappings().all()
        assert [(row["duplicate_id"], row["survivor_id"], row["actor"]) for row in audit] == [
            (duplicate.member_id, survivor.member_id, "op-1")
        ]


async def test_bad_merges_are_refused(tmp_path: Path, database_url: str) -> None:
    async with members_and_accounts(tmp_path, database_url) as (members, _):
        member = await members.register("+79161111111")
        invalid = await refusal(members.stub.MergeMembers(pb.MergeMembersRequest(request_id="m-1")))
        assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in invalid.violations} == {"survivor_id", "duplicate_id", "actor", "reason"}
        same = await refusal(members.stub.MergeMembers(merge("m-2", member.member_id, member.member_id)))
        assert [v.field for v in same.violations] == ["duplicate_id"]
        unknown = await refusal(members.stub.MergeMembers(merge("m-3", member.member_id, "nobody")))
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
        other = await members.register("+79162222222")
        household = await members.stub.CreateHousehold(
            pb.CreateHouseholdRequest(request_id="h-1", owner_member_id=other.member_id, name="Smirnovs")
        )
        assert household.household.household_id
        in_household = await refusal(members.stub.MergeMembers(merge("m-4", member.member_id, other.member_id)))
        assert in_household.reason == "MEMBER_IN_HOUSEHOLD"
        member_after = (await members.stub.GetMember(pb.GetMemberRequest(member_id=other.member_id))).member
        assert not member_after.merged_into


async def test_a_merge_moves_static_segments_tier_history_and_newer_consents_audited(
    tmp_path: Path, database_url: str
) -> None:
    async with members_and_accounts(tmp_path, database_url) as (members, _):
        survivor = await members.register(
            "+79161111111", consents=[pb.Consent(channel=pb.CONTACT_CHANNEL_SMS, granted=True, source="pos")]
        )
        duplicate = await members.register(
            "+79162222222",
            consents=[
                pb.Consent(channel=pb.CONTACT_CHANNEL_SMS, granted=False, source="web"),
                pb.Consent(channel=pb.CONTACT_CHANNEL_EMAIL, granted=True, source="web"),
            ],
        )
        for code in ("vip", "staff"):
            await members.stub.CreateSegment(pb.CreateSegmentRequest(request_id=f"s-{code}", code=code, name=code))
        await members.stub.AddSegmentMembers(
            pb.AddSegmentMembersRequest(request_id="a-1", code="vip", member_ids=[duplicate.member_id])
        )
        await members.stub.AddSegmentMembers(
            pb.AddSegmentMembersRequest(
                request_id="a-2", code="staff", member_ids=[duplicate.member_id, survivor.member_id]
            )
        )
        gold = pb.TierDefinition(code="gold", name="Gold", rank=1, spend_threshold_minor=50_00)
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-1", tier=gold))
        await members.publish_gateway("cheque.committed", receipt(duplicate.member_id, "1", 60_00, utcnow()))
        await wait_for_purchases(members, duplicate.member_id, 1, 60_00)

        merged = await members.stub.MergeMembers(merge("m-1", survivor.member_id, duplicate.member_id))
        assert (merged.cards_moved, merged.segments_moved, merged.tier_changes_moved, merged.consents_moved) == (
            0,
            1,
            1,
            2,
        )
        assert merged.survivor.tier == "gold", "the survivor is judged on the purchases it received"
        consents = {(c.channel, c.granted, c.source) for c in merged.survivor.consents}
        assert consents == {
            (pb.CONTACT_CHANNEL_SMS, False, "web"),
            (pb.CONTACT_CHANNEL_EMAIL, True, "web"),
        }, "the duplicate's answers are newer than the survivor's"
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=survivor.phone))).context
        assert list(context.segments) == ["staff", "vip"]
        sizes = [(await members.stub.GetSegment(pb.GetSegmentRequest(code=c))).segment.size for c in ("vip", "staff")]
        assert sizes == [1, 1]
        history = (await members.stub.ListTierHistory(pb.ListTierHistoryRequest(member_id=survivor.member_id))).changes
        assert [(c.old_tier, c.new_tier) for c in history] == [("basic", "gold"), ("basic", "gold")], (
            "the duplicate's change moved, and the survivor's own qualification is recorded"
        )
        duplicate_history = await members.stub.ListTierHistory(pb.ListTierHistoryRequest(member_id=duplicate.member_id))
        assert list(duplicate_history.changes) == []
        gone = (await members.stub.GetMember(pb.GetMemberRequest(member_id=duplicate.member_id))).member
        assert list(gone.consents) == []
        async with members.engine.connect() as connection:
            audit = (await connection.execute(select(store.MemberMergeRow.__table__))).mappings().one()
        assert (audit["segments_moved"], audit["tier_changes_moved"], audit["consents_moved"]) == (1, 1, 2)
        [event] = await members.events("member.merged")
        assert (event["segments_moved"], event["tier_changes_moved"], event["consents_moved"]) == (1, 1, 2)
