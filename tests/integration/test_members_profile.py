"""Typed custom attributes, members' own referral codes and erasure down to the last stored
answer, over real gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from sqlalchemy import select

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.members import jobs, store
from services.members.domain import REFERRAL_ALPHABET
from tests.integration.test_members_api import Members, mask, members_service, refusal
from tests.integration.test_members_tiers import receipt, wait_for_purchases

PET = pb.AttributeDefinition(code="pet", name="Pet", type=pb.ATTRIBUTE_TYPE_ENUM, allowed_values=["cat", "dog"])
KIDS = pb.AttributeDefinition(code="kids", name="Children", type=pb.ATTRIBUTE_TYPE_INT)
CAR = pb.AttributeDefinition(code="car_owner", name="Has a car", type=pb.ATTRIBUTE_TYPE_BOOL)
WEDDING = pb.AttributeDefinition(code="wedding", name="Wedding day", type=pb.ATTRIBUTE_TYPE_DATE)


async def define(members: Members, *definitions: pb.AttributeDefinition) -> None:
    for definition in definitions:
        await members.stub.SetAttributeDefinition(
            pb.SetAttributeDefinitionRequest(request_id=f"def-{definition.code}", definition=definition)
        )


def set_attributes(request_id: str, member_id: str, **values: pb.AttributeValue) -> pb.UpdateMemberRequest:
    return pb.UpdateMemberRequest(
        request_id=request_id,
        member_id=member_id,
        member=pb.Member(attributes=values),
        update_mask=mask(*(f"attributes.{code}" for code in values)),
    )


async def test_typed_attributes_are_checked_set_cleared_and_reach_the_member_context(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        await define(members, PET, KIDS, CAR, WEDDING)
        listed = (await members.stub.ListAttributeDefinitions(pb.ListAttributeDefinitionsRequest())).definitions
        assert [d.code for d in listed] == ["car_owner", "kids", "pet", "wedding"]
        member = await members.register()

        updated = (
            await members.stub.UpdateMember(
                set_attributes(
                    "a-1",
                    member.member_id,
                    pet=pb.AttributeValue(string_value="dog"),
                    kids=pb.AttributeValue(int_value=2),
                    car_owner=pb.AttributeValue(bool_value=False),
                    wedding=pb.AttributeValue(string_value="2015-06-20"),
                )
            )
        ).member
        assert dict(updated.attributes) == {
            "pet": pb.AttributeValue(string_value="dog"),
            "kids": pb.AttributeValue(int_value=2),
            "car_owner": pb.AttributeValue(bool_value=False),
            "wedding": pb.AttributeValue(string_value="2015-06-20"),
        }
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=member.phone))).context
        assert dict(context.attributes) == dict(updated.attributes)

        wrong = await refusal(
            members.stub.UpdateMember(
                set_attributes(
                    "a-2",
                    member.member_id,
                    pet=pb.AttributeValue(string_value="hamster"),
                    kids=pb.AttributeValue(string_value="two"),
                    car_owner=pb.AttributeValue(int_value=1),
                    wedding=pb.AttributeValue(string_value="20.06.2015"),
                )
            )
        )
        assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in wrong.violations} == {
            "member.attributes[pet]",
            "member.attributes[kids]",
            "member.attributes[car_owner]",
            "member.attributes[wedding]",
        }
        unknown = await refusal(
            members.stub.UpdateMember(set_attributes("a-3", member.member_id, shoe=pb.AttributeValue(int_value=42)))
        )
        assert (unknown.code, [v.field for v in unknown.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["update_mask"],
        )
        empty = await refusal(
            members.stub.UpdateMember(set_attributes("a-4", member.member_id, pet=pb.AttributeValue()))
        )
        assert [v.field for v in empty.violations] == ["member.attributes[pet]"]

        # Named in the mask and absent from the map: cleared. Other attributes stay.
        cleared = (
            await members.stub.UpdateMember(
                pb.UpdateMemberRequest(
                    request_id="a-5",
                    member_id=member.member_id,
                    member=pb.Member(attributes={"kids": pb.AttributeValue(int_value=3)}),
                    update_mask=mask("attributes.pet", "attributes.kids"),
                )
            )
        ).member
        assert set(cleared.attributes) == {"kids", "car_owner", "wedding"}
        assert cleared.attributes["kids"].int_value == 3
        fetched = (await members.stub.GetMember(pb.GetMemberRequest(member_id=member.member_id))).member
        assert fetched.attributes == cleared.attributes
        changes = await members.events("member.updated")
        assert [event["attributes"] for event in changes] == [
            {"pet": "dog", "kids": 2, "car_owner": False, "wedding": "2015-06-20"},
            {"kids": 3, "car_owner": False, "wedding": "2015-06-20"},
        ], "one event per change; refused updates emit nothing"

        retyped = await refusal(
            members.stub.SetAttributeDefinition(
                pb.SetAttributeDefinitionRequest(
                    request_id="def-kids-2",
                    definition=pb.AttributeDefinition(code="kids", name="Kids", type=pb.ATTRIBUTE_TYPE_STRING),
                )
            )
        )
        assert (retyped.code, retyped.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ATTRIBUTE_TYPE_FIXED")
        bad_definition = await refusal(
            members.stub.SetAttributeDefinition(
                pb.SetAttributeDefinitionRequest(
                    request_id="def-bad",
                    definition=pb.AttributeDefinition(code="Bad Code", type=pb.ATTRIBUTE_TYPE_ENUM),
                )
            )
        )
        assert {v.field for v in bad_definition.violations} == {
            "definition.code",
            "definition.name",
            "definition.allowed_values",
        }


async def test_a_dynamic_segment_reads_attributes(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        await define(members, PET, KIDS)
        dog_owner = await members.register("+79161111111")
        cat_owner = await members.register("+79162222222")
        await members.register("+79163333333")
        await members.stub.UpdateMember(
            set_attributes("a-1", dog_owner.member_id, pet=pb.AttributeValue(string_value="dog"))
        )
        await members.stub.UpdateMember(
            set_attributes(
                "a-2",
                cat_owner.member_id,
                pet=pb.AttributeValue(string_value="cat"),
                kids=pb.AttributeValue(int_value=3),
            )
        )
        await members.stub.CreateSegment(
            pb.CreateSegmentRequest(
                request_id="s-1",
                code="dogs",
                name="Dog owners",
                expression='has(member.attributes.pet) && member.attributes.pet == "dog"',
            )
        )
        # Trial-run with a value of every defined attribute: comparing an int attribute with
        # a string, or naming an attribute never defined, is refused at creation.
        for index, expression in enumerate(('member.attributes.kids > "two"', "member.attributes.shoe == 42")):
            mistyped = await refusal(
                members.stub.CreateSegment(
                    pb.CreateSegmentRequest(request_id=f"bad-{index}", code="kids", name="Kids", expression=expression)
                )
            )
            assert [v.field for v in mistyped.violations] == ["expression"]
        await members.stub.CreateSegment(
            pb.CreateSegmentRequest(
                request_id="s-3", code="families", name="Families", expression="member.attributes.kids >= 2"
            )
        )

        sessions = db.create_session_factory(members.engine)
        await jobs.recompute_profiles(sessions)
        for member, segments in ((dog_owner, ["dogs"]), (cat_owner, ["families"])):
            context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(phone=member.phone))).context
            assert list(context.segments) == segments


async def test_each_member_has_a_referral_code_that_records_the_inviter(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        inviter = await members.register("+79161111111")
        other = await members.register("+79162222222")
        code = inviter.referral_code
        assert len(code) == 8 and set(code) <= set(REFERRAL_ALPHABET)
        assert other.referral_code != code
        found = await members.stub.LookupReferralCode(pb.LookupReferralCodeRequest(referral_code=code.lower()))
        assert found.member_id == inviter.member_id

        friends = await asyncio.gather(
            *(
                members.register(f"+7916333333{index}", referral_code=f"{code[:4]}-{code[4:].lower()}")
                for index in range(3)
            )
        )
        assert {friend.referred_by for friend in friends} == {inviter.member_id}
        counted = (await members.stub.GetMember(pb.GetMemberRequest(member_id=inviter.member_id))).member
        assert counted.referred_count == 3, "concurrent registrations with one code are all counted"
        registered = {event["member_id"]: event for event in await members.events("member.registered")}
        assert registered[friends[0].member_id]["referrer_id"] == inviter.member_id
        assert registered[friends[0].member_id]["referral_code"] == code
        assert registered[other.member_id]["referrer_id"] == ""

        unknown = await refusal(
            members.stub.RegisterMember(
                pb.RegisterMemberRequest(request_id="r-x", phone="+79164444444", referral_code="ZZZZZZZZ")
            )
        )
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
        malformed = await refusal(
            members.stub.RegisterMember(
                pb.RegisterMemberRequest(request_id="r-y", phone="+79164444444", referral_code="O0-I1")
            )
        )
        assert [v.field for v in malformed.violations] == ["referral_code"]
        assert (
            await members.stub.GetMember(pb.GetMemberRequest(member_id=inviter.member_id))
        ).member.referred_count == 3

        # An anonymous card's holder registering with a code is counted as well.
        card = (await members.stub.IssueAnonymousCard(pb.IssueAnonymousCardRequest(request_id="anon-1"))).card
        claimed = await members.register("+79165555555", card_number=card.card_number, referral_code=code)
        assert (claimed.member_id, claimed.referred_by) == (card.member_id, inviter.member_id)
        assert len(claimed.referral_code) == 8
        after = (await members.stub.GetMember(pb.GetMemberRequest(member_id=inviter.member_id))).member
        assert after.referred_count == 4

        lookup_missing = await refusal(
            members.stub.LookupReferralCode(pb.LookupReferralCodeRequest(referral_code="ZZZZZZZZ"))
        )
        assert lookup_missing.reason == "REFERRAL_CODE_NOT_FOUND"


async def test_after_erasure_no_personal_data_is_left_anywhere_in_the_members_database(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url) as members:
        await define(members, PET)
        phone, email, first, last = "+79167654321", "zoya.erased@example.com", "Zoya", "Kuznetsova"
        registered = await members.stub.RegisterMember(
            pb.RegisterMemberRequest(
                request_id="erase-me", phone="8 916 765-43-21", email=email, first_name=first, last_name=last
            )
        )
        member_id, code = registered.member.member_id, registered.member.referral_code
        await members.stub.UpdateMember(
            pb.UpdateMemberRequest(
                request_id="erase-me-2",
                member_id=member_id,
                member=pb.Member(
                    last_name="Ivanova-Kuznetsova", attributes={"pet": pb.AttributeValue(string_value="cat")}
                ),
                update_mask=mask("last_name", "attributes.pet"),
            )
        )
        await members.stub.BlockMember(pb.BlockMemberRequest(request_id="erase-me-3", member_id=member_id, reason="x"))
        await members.stub.UnblockMember(pb.UnblockMemberRequest(request_id="erase-me-4", member_id=member_id))
        await members.stub.IssueCard(pb.IssueCardRequest(request_id="erase-me-5", member_id=member_id))
        await members.publish_gateway("cheque.committed", receipt(member_id, "1", 10_00, utcnow()))
        await wait_for_purchases(members, member_id, 1, 10_00)
        # Someone else's stored answer stays.
        bystander = await members.stub.RegisterMember(
            pb.RegisterMemberRequest(request_id="bystander", phone="+79160000009", first_name="Petr")
        )

        await members.stub.EraseMember(pb.EraseMemberRequest(request_id="erase-now", member_id=member_id))

        needles = [phone, phone[1:], email, first, last, "Ivanova", code]
        found: list[str] = []
        async with members.engine.connect() as connection:
            for table in store.Base.metadata.sorted_tables:
                for row in await connection.execute(select(table)):
                    for column, value in row._mapping.items():
                        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                        found.extend(f"{table.name}.{column}: {n}" for n in needles if n.lower() in text.lower())
        assert found == []
        assert (
            await members.stub.RegisterMember(
                pb.RegisterMemberRequest(request_id="bystander", phone="+79160000009", first_name="Petr")
            )
            == bystander
        ), "the answers of other members are kept for their retries"
        gone = await refusal(members.stub.LookupReferralCode(pb.LookupReferralCodeRequest(referral_code=code)))
        assert gone.reason == "REFERRAL_CODE_NOT_FOUND"
        stats = await members.stub.GetMemberStatistics(pb.GetMemberStatisticsRequest(member_id=member_id))
        assert stats.purchase_count == 1
