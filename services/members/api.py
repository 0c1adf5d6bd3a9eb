"""MembersService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.members.v1 import members_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import to_timestamp
from services.members import service, store
from services.members.domain import Card, CardStatus, Member, MemberStatus

_MEMBER_STATUS = {
    MemberStatus.ACTIVE: pb.MEMBER_STATUS_ACTIVE,
    MemberStatus.BLOCKED: pb.MEMBER_STATUS_BLOCKED,
}
_CARD_STATUS = {CardStatus.ACTIVE: pb.CARD_STATUS_ACTIVE, CardStatus.BLOCKED: pb.CARD_STATUS_BLOCKED}

Context = grpc.aio.ServicerContext[Any, Any]


def member_to_proto(member: Member) -> pb.Member:
    return pb.Member(
        member_id=member.member_id,
        phone=member.phone,
        email=member.email or "",
        first_name=member.first_name,
        last_name=member.last_name,
        status=_MEMBER_STATUS[member.status],
        tier=member.tier,
        registration_channel=member.registration_channel,  # type: ignore[arg-type]
        create_time=to_timestamp(member.created_at),
        account_holder_id=member.account_holder_id,
    )


def card_to_proto(card: Card) -> pb.Card:
    return pb.Card(
        card_number=card.card_number,
        member_id=card.member_id,
        status=_CARD_STATUS[card.status],
        issue_time=to_timestamp(card.issued_at),
    )


class MembersApi(pb_grpc.MembersServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession], relay: OutboxRelay) -> None:
        self._sessions = sessions
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, relay.notify)

    async def RegisterMember(self, request: pb.RegisterMemberRequest, context: Context) -> pb.RegisterMemberResponse:
        registration = service.parse_registration(
            request.phone,
            request.email,
            request.first_name,
            request.last_name,
            request.channel,
            request.referral_code,
        )

        async def work(session: AsyncSession) -> pb.RegisterMemberResponse:
            member, created = await service.register_member(session, registration)
            return pb.RegisterMemberResponse(member=member_to_proto(member), created=created)

        return await self._idempotent.run("RegisterMember", request, pb.RegisterMemberResponse, work)

    async def GetMember(self, request: pb.GetMemberRequest, context: Context) -> pb.GetMemberResponse:
        violations = Violations()
        violations.check(bool(request.member_id), "member_id", "required")
        violations.raise_if_any()
        async with self._sessions() as session:
            member = await service.get_member(session, request.member_id)
        return pb.GetMemberResponse(member=member_to_proto(member))

    async def IssueCard(self, request: pb.IssueCardRequest, context: Context) -> pb.IssueCardResponse:
        violations = Violations()
        violations.check(bool(request.member_id), "member_id", "required")
        violations.raise_if_any()
        if request.card_number:
            service.check_card_number(request.card_number)

        async def work(session: AsyncSession) -> pb.IssueCardResponse:
            card = await service.issue_card(session, request.member_id, request.card_number)
            return pb.IssueCardResponse(card=card_to_proto(card))

        return await self._idempotent.run("IssueCard", request, pb.IssueCardResponse, work)

    async def IdentifyMember(self, request: pb.IdentifyMemberRequest, context: Context) -> pb.IdentifyMemberResponse:
        which = request.WhichOneof("identifier")
        if which == "card_number":
            service.check_card_number(request.card_number)
        elif which == "phone":
            phone = service.parse_phone(request.phone)
        else:
            violations = Violations()
            violations.add("identifier", "give a card_number or a phone")
            violations.raise_if_any()
        async with self._sessions() as session:
            if which == "card_number":
                found = await service.identify_by_card(session, request.card_number)
            else:
                found = await service.identify_by_phone(session, phone)
        member = found.member
        return pb.IdentifyMemberResponse(
            context=pb.MemberContext(
                member_id=member.member_id,
                status=_MEMBER_STATUS[member.status],
                tier=member.tier,
                account_holder_id=member.account_holder_id,
                card_number=found.card_number,
            )
        )
