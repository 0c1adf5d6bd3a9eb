"""Cards over real gRPC, on SQLite and PostgreSQL: block and unblock, replacement keeping the
member, card types with expiry, batch emission by the job, anonymous cards registered later,
and identification by a signed QR token."""

from __future__ import annotations

from pathlib import Path

import grpc
from sqlalchemy import func, select, update

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.timeutil import utcnow
from services.members import jobs, service, store
from services.members.domain import batch_card_number, is_valid_card_number
from tests import infra
from tests.integration.test_members_api import members_service, refusal


async def test_a_blocked_card_is_refused_and_a_replacement_keeps_the_member(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register()
        card = (await members.stub.IssueCard(pb.IssueCardRequest(request_id="c-1", member_id=member.member_id))).card
        blocked = (
            await members.stub.BlockCard(
                pb.BlockCardRequest(request_id="b-1", card_number=card.card_number, reason="lost")
            )
        ).card
        assert (blocked.status, blocked.block_reason) == (pb.CARD_STATUS_BLOCKED, "lost")
        refused = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number)))
        assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CARD_BLOCKED")
        await members.stub.UnblockCard(pb.UnblockCardRequest(request_id="u-1", card_number=card.card_number))
        found = await members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number))
        assert found.context.member_id == member.member_id

        replaced = await members.stub.ReplaceCard(
            pb.ReplaceCardRequest(request_id="r-1", card_number=card.card_number, reason="damaged")
        )
        assert (replaced.old_card.status, replaced.old_card.replaced_by) == (
            pb.CARD_STATUS_REPLACED,
            replaced.new_card.card_number,
        )
        assert replaced.new_card.member_id == member.member_id
        new_context = (
            await members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=replaced.new_card.card_number))
        ).context
        assert (new_context.member_id, new_context.account_holder_id) == (member.member_id, member.account_holder_id)
        old_refused = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number)))
        assert old_refused.reason == "CARD_REPLACED"
        twice = await refusal(
            members.stub.ReplaceCard(
                pb.ReplaceCardRequest(request_id="r-2", card_number=card.card_number, reason="again")
            )
        )
        assert twice.reason == "CARD_REPLACED"
        history = (await members.stub.ListMemberCards(pb.ListMemberCardsRequest(member_id=member.member_id))).cards
        assert [c.card_number for c in history] == [card.card_number, replaced.new_card.card_number]
        assert await members.events("card.blocked") == [
            {"member_id": member.member_id, "card_number": card.card_number, "reason": "lost"}
        ]
        assert await members.events("card.replaced") == [
            {
                "member_id": member.member_id,
                "old_card_number": card.card_number,
                "new_card_number": replaced.new_card.card_number,
            }
        ]
        missing = await refusal(
            members.stub.BlockCard(pb.BlockCardRequest(request_id="b-2", card_number="7700000000016", reason="x"))
        )
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "CARD_NOT_FOUND")


async def test_card_types_set_the_expiry_and_an_expired_card_is_refused(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        member = await members.register()
        await members.stub.SetCardType(
            pb.SetCardTypeRequest(request_id="t-1", card_type=pb.CardType(code="vip", name="VIP", validity_days=365))
        )
        types = (await members.stub.ListCardTypes(pb.ListCardTypesRequest())).card_types
        assert [(t.code, t.validity_days) for t in types] == [("vip", 365)]
        card = (
            await members.stub.IssueCard(
                pb.IssueCardRequest(request_id="c-1", member_id=member.member_id, card_type="vip")
            )
        ).card
        assert card.card_type == "vip"
        assert 364 * 86400 < card.expire_time.seconds - card.issue_time.seconds <= 365 * 86400
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number))).context
        assert context.card_type == "vip"
        unknown = await refusal(
            members.stub.IssueCard(pb.IssueCardRequest(request_id="c-2", member_id=member.member_id, card_type="gold"))
        )
        assert unknown.reason == "CARD_TYPE_NOT_FOUND"
        async with members.engine.begin() as connection:
            await connection.execute(
                update(store.CardRow).where(store.CardRow.card_number == card.card_number).values(expires_at=utcnow())
            )
        expired = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number)))
        assert expired.reason == "CARD_EXPIRED"


async def test_a_batch_is_emitted_once_with_check_digits_and_its_cards_are_issued(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url, card_emission_interval_seconds=0.1) as members:
        member = await members.register()
        pre_printed = batch_card_number("2990", 5, 8)
        await members.stub.IssueCard(
            pb.IssueCardRequest(request_id="pre", member_id=member.member_id, card_number=pre_printed)
        )
        ordered = (
            await members.stub.EmitCardBatch(
                pb.EmitCardBatchRequest(
                    request_id="batch-1", prefix="2990", first_sequence=0, count=50, sequence_digits=8
                )
            )
        ).batch
        assert ordered.status == pb.CARD_BATCH_STATUS_PENDING

        async def done() -> bool:
            batch = (await members.stub.GetCardBatch(pb.GetCardBatchRequest(batch_id=ordered.batch_id))).batch
            return batch.status == pb.CARD_BATCH_STATUS_DONE

        await infra.wait_until(done, "the batch to be emitted")
        batch = (await members.stub.GetCardBatch(pb.GetCardBatchRequest(batch_id=ordered.batch_id))).batch
        assert (batch.emitted, batch.skipped) == (49, 1), "the pre-printed card in the range is left as it was"
        async with members.engine.connect() as connection:
            numbers = list(
                await connection.scalars(
                    select(store.CardRow.card_number).where(store.CardRow.batch_id == batch.batch_id)
                )
            )
        assert len(numbers) == len(set(numbers)) == 49
        assert all(is_valid_card_number(number) and len(number) == 13 for number in numbers)

        overlapping = await refusal(
            members.stub.EmitCardBatch(
                pb.EmitCardBatchRequest(
                    request_id="batch-2", prefix="2990", first_sequence=49, count=10, sequence_digits=8
                )
            )
        )
        assert overlapping.reason == "CARD_RANGE_OVERLAPS"
        stock = batch_card_number("2990", 7, 8)
        unissued = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=stock)))
        assert unissued.reason == "CARD_NOT_ISSUED"
        issued = (
            await members.stub.IssueCard(
                pb.IssueCardRequest(request_id="c-1", member_id=member.member_id, card_number=stock)
            )
        ).card
        assert (issued.status, issued.member_id) == (pb.CARD_STATUS_ACTIVE, member.member_id)
        taken = await refusal(
            members.stub.IssueCard(pb.IssueCardRequest(request_id="c-2", member_id=member.member_id, card_number=stock))
        )
        assert taken.reason == "CARD_NUMBER_TAKEN"

        invalid = await refusal(
            members.stub.EmitCardBatch(
                pb.EmitCardBatchRequest(request_id="batch-3", prefix="29a", count=0, sequence_digits=20)
            )
        )
        assert {v.field for v in invalid.violations} == {"prefix", "count", "sequence_digits"}


async def test_the_emission_job_resumes_where_the_last_chunk_ended(database_url: str) -> None:
    async with infra.migrated_engine("members", database_url) as engine:
        sessions = db.create_session_factory(engine)
        async with sessions() as session, session.begin():
            order = service.parse_batch_order("", "31", 1000, 25, 6)
            batch = await service.order_card_batch(session, order)
        async with sessions() as session, session.begin():
            first = await service.emit_next_chunk(session, 10)
        assert first is not None and (first[0].emitted, first[0].status, first[1]) == (10, service.BATCH_PENDING, 10)
        assert await jobs.emit_card_batches(sessions, chunk=10) == 15
        async with sessions() as session:
            done = await service.get_card_batch(session, batch.batch_id)
            count = await session.scalar(select(func.count()).select_from(store.CardRow))
        assert (done.emitted, done.skipped, done.status, count) == (25, 0, service.BATCH_DONE, 25)
        assert await jobs.emit_card_batches(sessions, chunk=10) == 0


async def test_an_anonymous_card_becomes_a_person_keeping_its_member(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url) as members:
        card = (await members.stub.IssueAnonymousCard(pb.IssueAnonymousCardRequest(request_id="a-1"))).card
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(card_number=card.card_number))).context
        assert context.member_id == card.member_id
        anonymous = (await members.stub.GetMember(pb.GetMemberRequest(member_id=card.member_id))).member
        assert anonymous.participation_type == pb.PARTICIPATION_TYPE_ANONYMOUS
        person = (
            await members.stub.RegisterMember(
                pb.RegisterMemberRequest(
                    request_id="r-1", phone="+79161234567", first_name="Anna", card_number=card.card_number
                )
            )
        ).member
        assert (person.member_id, person.phone, person.participation_type) == (
            card.member_id,
            "+79161234567",
            pb.PARTICIPATION_TYPE_PERSONAL,
        )
        assert [event["member_id"] for event in await members.events("member.registered")] == [card.member_id]
        again = await refusal(
            members.stub.RegisterMember(
                pb.RegisterMemberRequest(request_id="r-2", phone="+79160000000", card_number=card.card_number)
            )
        )
        assert again.reason == "CARD_NOT_ANONYMOUS"
        other = (await members.stub.IssueAnonymousCard(pb.IssueAnonymousCardRequest(request_id="a-2"))).card
        duplicate = await refusal(
            members.stub.RegisterMember(
                pb.RegisterMemberRequest(request_id="r-3", phone="+79161234567", card_number=other.card_number)
            )
        )
        assert (duplicate.code, duplicate.reason) == (grpc.StatusCode.ALREADY_EXISTS, "MEMBER_ALREADY_EXISTS")


async def test_a_qr_token_identifies_its_member_until_it_expires(tmp_path: Path, database_url: str) -> None:
    async with members_service(tmp_path, database_url, qr_token_secret="s3cret", qr_token_ttl_seconds=1) as members:
        member = await members.register()
        issued = await members.stub.IssueQrToken(pb.IssueQrTokenRequest(member_id=member.member_id))
        context = (await members.stub.IdentifyMember(pb.IdentifyMemberRequest(qr_token=issued.qr_token))).context
        assert context.member_id == member.member_id
        forged_body = issued.qr_token.rsplit(".", 1)[0].replace(member.member_id, "someone-else")
        forged = await refusal(
            members.stub.IdentifyMember(pb.IdentifyMemberRequest(qr_token=forged_body + "." + issued.qr_token[-22:]))
        )
        assert (forged.code, [v.field for v in forged.violations]) == (grpc.StatusCode.INVALID_ARGUMENT, ["qr_token"])

        async def expired() -> bool:
            try:
                await members.stub.IdentifyMember(pb.IdentifyMemberRequest(qr_token=issued.qr_token))
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False

        await infra.wait_until(expired, "the token to expire", seconds=5)
        late = await refusal(members.stub.IdentifyMember(pb.IdentifyMemberRequest(qr_token=issued.qr_token)))
        assert late.reason == "QR_TOKEN_EXPIRED"


async def test_identifications_are_cached_until_this_replica_changes_something(
    tmp_path: Path, database_url: str
) -> None:
    async with members_service(tmp_path, database_url, identify_cache_seconds=600) as members:
        member = await members.register()
        card = (await members.stub.IssueCard(pb.IssueCardRequest(request_id="c-1", member_id=member.member_id))).card
        by_card = pb.IdentifyMemberRequest(card_number=card.card_number)
        assert (await members.stub.IdentifyMember(by_card)).context.tier == "basic"
        async with members.engine.begin() as connection:
            # A change made behind this replica's back, as another replica would.
            await connection.execute(
                update(store.MemberRow).where(store.MemberRow.member_id == member.member_id).values(tier="gold")
            )
        assert (await members.stub.IdentifyMember(by_card)).context.tier == "basic", "answered from the cache"
        await members.stub.BlockCard(pb.BlockCardRequest(request_id="b-1", card_number=card.card_number, reason="lost"))
        refused = await refusal(members.stub.IdentifyMember(by_card))
        assert refused.reason == "CARD_BLOCKED", "a change through this replica clears the cache"
        await members.stub.UnblockCard(pb.UnblockCardRequest(request_id="u-1", card_number=card.card_number))
        assert (await members.stub.IdentifyMember(by_card)).context.tier == "gold"

        # A purchase counted from the gateway's stream drops that member's cached answers.
        platinum = pb.TierDefinition(code="platinum", name="Platinum", rank=5, spend_threshold_minor=100)
        await members.stub.SetTierDefinition(pb.SetTierDefinitionRequest(request_id="t-1", tier=platinum))
        assert (await members.stub.IdentifyMember(by_card)).context.tier == "gold"
        await members.publish_gateway(
            "cheque.committed",
            {"terminal_id": "pos-1", "receipt_number": "1", "member_id": member.member_id, "paid_minor": 100},
        )

        async def upgraded() -> bool:
            return (await members.stub.IdentifyMember(by_card)).context.tier == "platinum"

        await infra.wait_until(upgraded, "the cached identification to be dropped")
