"""MembersService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.members.v1 import members_service_pb2 as pb
from loyalty.members.v1 import members_service_pb2_grpc as pb_grpc
from loyalty.runtime.cache import TtlCache
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.members import service, store
from services.members.domain import (
    AttributeDefinition,
    AttributeScalar,
    AttributeType,
    CalendarPeriod,
    Card,
    CardStatus,
    CardType,
    Consent,
    Member,
    MemberStatus,
    Participation,
    TierDefinition,
    TierMetric,
)

_MEMBER_STATUS = {
    MemberStatus.ACTIVE: pb.MEMBER_STATUS_ACTIVE,
    MemberStatus.BLOCKED: pb.MEMBER_STATUS_BLOCKED,
}
_CARD_STATUS = {
    CardStatus.ACTIVE: pb.CARD_STATUS_ACTIVE,
    CardStatus.BLOCKED: pb.CARD_STATUS_BLOCKED,
    CardStatus.REPLACED: pb.CARD_STATUS_REPLACED,
    CardStatus.EXPIRED: pb.CARD_STATUS_EXPIRED,
    CardStatus.UNISSUED: pb.CARD_STATUS_UNISSUED,
}
_PARTICIPATION = {
    Participation.PERSONAL: pb.PARTICIPATION_TYPE_PERSONAL,
    Participation.FAMILY: pb.PARTICIPATION_TYPE_FAMILY,
    Participation.ANONYMOUS: pb.PARTICIPATION_TYPE_ANONYMOUS,
}
_CHANNEL_NAMES = {
    pb.CONTACT_CHANNEL_SMS: "sms",
    pb.CONTACT_CHANNEL_EMAIL: "email",
    pb.CONTACT_CHANNEL_PUSH: "push",
    pb.CONTACT_CHANNEL_VIBER: "viber",
    pb.CONTACT_CHANNEL_TELEGRAM: "telegram",
}
_CHANNELS = {name: channel for channel, name in _CHANNEL_NAMES.items()}
_ATTRIBUTE_TYPES = {
    AttributeType.STRING: pb.ATTRIBUTE_TYPE_STRING,
    AttributeType.INT: pb.ATTRIBUTE_TYPE_INT,
    AttributeType.BOOL: pb.ATTRIBUTE_TYPE_BOOL,
    AttributeType.DATE: pb.ATTRIBUTE_TYPE_DATE,
    AttributeType.ENUM: pb.ATTRIBUTE_TYPE_ENUM,
}
_ATTRIBUTE_TYPES_FROM_PROTO = {proto: kind for kind, proto in _ATTRIBUTE_TYPES.items()}
_TIER_METRICS = {TierMetric.SPEND: pb.TIER_METRIC_SPEND, TierMetric.POINTS: pb.TIER_METRIC_POINTS}
_TIER_METRICS_FROM_PROTO = {pb.TIER_METRIC_UNSPECIFIED: TierMetric.SPEND} | {
    proto: metric for metric, proto in _TIER_METRICS.items()
}
_CALENDAR_PERIODS = {
    CalendarPeriod.NONE: pb.CALENDAR_PERIOD_UNSPECIFIED,
    CalendarPeriod.YEAR: pb.CALENDAR_PERIOD_YEAR,
    CalendarPeriod.QUARTER: pb.CALENDAR_PERIOD_QUARTER,
    CalendarPeriod.MONTH: pb.CALENDAR_PERIOD_MONTH,
}
_CALENDAR_PERIODS_FROM_PROTO = {proto: period for period, proto in _CALENDAR_PERIODS.items()}
_INVITATION_STATUS = {
    service.INVITATION_PENDING: pb.INVITATION_STATUS_PENDING,
    service.INVITATION_ACCEPTED: pb.INVITATION_STATUS_ACCEPTED,
    service.INVITATION_DECLINED: pb.INVITATION_STATUS_DECLINED,
    service.INVITATION_EXPIRED: pb.INVITATION_STATUS_EXPIRED,
}
_BATCH_STATUS = {service.BATCH_PENDING: pb.CARD_BATCH_STATUS_PENDING, service.BATCH_DONE: pb.CARD_BATCH_STATUS_DONE}
_PROFILE_TEXT_FIELDS = (
    "phone",
    "email",
    "first_name",
    "last_name",
    "time_zone",
    "locale",
    "birth_date",
    "push_token",
    "telegram_chat_id",
)

Context = grpc.aio.ServicerContext[Any, Any]
ResponseT = TypeVar("ResponseT", bound=Message)


def consent_to_proto(consent: Consent) -> pb.Consent:
    return pb.Consent(
        channel=_CHANNELS[consent.channel],
        granted=consent.granted,
        update_time=to_timestamp(consent.updated_at),
        source=consent.source,
    )


def consents_from_proto(consents: Sequence[pb.Consent]) -> list[service.ConsentInput]:
    return [
        service.ConsentInput(_CHANNEL_NAMES.get(consent.channel, ""), consent.granted, consent.source)
        for consent in consents
    ]


def attribute_to_proto(value: AttributeScalar) -> pb.AttributeValue:
    if isinstance(value, bool):
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return pb.AttributeValue(int_value=value)
    return pb.AttributeValue(string_value=value)


def attribute_from_proto(value: pb.AttributeValue) -> AttributeScalar | None:
    """The value sent; None when no field of the oneof is set."""
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def attributes_to_proto(attributes: Mapping[str, AttributeScalar]) -> dict[str, pb.AttributeValue]:
    return {code: attribute_to_proto(value) for code, value in attributes.items()}


def attribute_definition_to_proto(definition: AttributeDefinition) -> pb.AttributeDefinition:
    return pb.AttributeDefinition(
        code=definition.code,
        name=definition.name,
        type=_ATTRIBUTE_TYPES[definition.type],
        allowed_values=definition.allowed_values,
    )


def invitation_to_proto(invitation: store.Invitation) -> pb.HouseholdInvitation:
    return pb.HouseholdInvitation(
        invitation_id=invitation.invitation_id,
        household_id=invitation.household_id,
        member_id=invitation.member_id,
        invited_by=invitation.invited_by,
        status=_INVITATION_STATUS[invitation.status],
        create_time=to_timestamp(invitation.created_at),
        expire_time=to_timestamp(invitation.expires_at),
        decide_time=to_timestamp(invitation.decided_at),
    )


def member_to_proto(member: Member) -> pb.Member:
    return pb.Member(
        member_id=member.member_id,
        phone=member.phone or "",
        email=member.email or "",
        first_name=member.first_name,
        last_name=member.last_name,
        status=_MEMBER_STATUS[member.status],
        tier=member.tier,
        registration_channel=member.registration_channel,  # type: ignore[arg-type]
        create_time=to_timestamp(member.created_at),
        account_holder_id=member.account_holder_id,
        consents=[consent_to_proto(consent) for consent in member.consents],
        time_zone=member.time_zone,
        locale=member.locale,
        birth_date=member.birth_date,
        push_token=member.push_token,
        telegram_chat_id=member.telegram_chat_id,
        participation_type=_PARTICIPATION[member.participation],
        household_id=member.household_id or "",
        block_reason=member.block_reason,
        erase_time=to_timestamp(member.erased_at),
        tier_expire_time=to_timestamp(member.tier_expires_at),
        merged_into=member.merged_into or "",
        rfm=pb.RfmScore(recency=member.rfm.recency, frequency=member.rfm.frequency, monetary=member.rfm.monetary)
        if member.rfm
        else None,
        attributes=attributes_to_proto(member.attributes),
        referral_code=member.referral_code or "",
        referred_by=member.referred_by or "",
        referred_count=member.referred_count,
    )


def card_to_proto(card: Card) -> pb.Card:
    return pb.Card(
        card_number=card.card_number,
        member_id=card.member_id or "",
        status=_CARD_STATUS[card.status],
        issue_time=to_timestamp(card.issued_at),
        card_type=card.card_type,
        expire_time=to_timestamp(card.expires_at),
        block_reason=card.block_reason,
        replaced_by=card.replaced_by,
    )


def batch_to_proto(batch: store.CardBatch) -> pb.CardBatch:
    return pb.CardBatch(
        batch_id=batch.batch_id,
        card_type=batch.card_type,
        prefix=batch.prefix,
        first_sequence=batch.first_sequence,
        count=batch.count,
        sequence_digits=batch.sequence_digits,
        emitted=batch.emitted,
        skipped=batch.skipped,
        status=_BATCH_STATUS[batch.status],
        create_time=to_timestamp(batch.created_at),
    )


def tier_to_proto(tier: TierDefinition) -> pb.TierDefinition:
    return pb.TierDefinition(
        code=tier.code,
        name=tier.name,
        rank=tier.rank,
        spend_threshold_minor=tier.spend_threshold_minor,
        window_months=tier.window_months,
        duration_days=tier.duration_days,
        downgrade_after_inactive_days=tier.downgrade_after_inactive_days,
        metric=_TIER_METRICS[tier.metric],
        points_threshold=tier.points_threshold,
        calendar_period=_CALENDAR_PERIODS[tier.calendar_period],
    )


def household_to_proto(household: store.Household) -> pb.Household:
    return pb.Household(
        household_id=household.household_id,
        name=household.name,
        owner_member_id=household.owner_member_id,
        member_ids=household.member_ids,
    )


def segment_to_proto(segment: service.Segment) -> pb.Segment:
    return pb.Segment(code=segment.code, name=segment.name, size=segment.size, expression=segment.expression)


def partner_to_proto(partner: service.Partner) -> pb.Partner:
    return pb.Partner(
        partner_id=partner.partner_id,
        name=partner.name,
        store_ids=partner.store_ids,
        stores=[
            pb.Store(
                store_id=item.store_id, region=item.region, time_zone=item.time_zone, terminal_ids=item.terminal_ids
            )
            for item in partner.stores
        ],
    )


def require(**fields: str) -> None:
    violations = Violations()
    for name, value in fields.items():
        violations.check(bool(value), name, "required")
    violations.raise_if_any()


class MembersApi(pb_grpc.MembersServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        qr_secret: bytes,
        qr_ttl_seconds: int,
        identities: TtlCache[pb.MemberContext],
        merge_accounts: service.MergeAccounts,
    ) -> None:
        self._sessions = sessions
        self._merge_accounts = merge_accounts
        self._identities = identities

        def committed() -> None:
            relay.notify()
            self._identities.clear()

        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, committed)
        self._qr_secret = qr_secret
        self._qr_ttl = timedelta(seconds=qr_ttl_seconds)

    async def _read(self, work: Callable[[AsyncSession], Awaitable[ResponseT]]) -> ResponseT:
        async with self._sessions() as session:
            return await work(session)

    # Members ---------------------------------------------------------------------

    async def RegisterMember(self, request: pb.RegisterMemberRequest, context: Context) -> pb.RegisterMemberResponse:
        registration = service.parse_registration(
            request.phone,
            request.email,
            request.first_name,
            request.last_name,
            request.channel,
            request.referral_code,
            consents_from_proto(request.consents),
            request.time_zone,
            request.locale,
            request.birth_date,
            request.card_number,
        )

        async def work(session: AsyncSession) -> pb.RegisterMemberResponse:
            member, created = await service.register_member(
                session, registration, return_existing=request.return_existing
            )
            return pb.RegisterMemberResponse(member=member_to_proto(member), created=created)

        return await self._idempotent.run("RegisterMember", request, pb.RegisterMemberResponse, work)

    async def GetMember(self, request: pb.GetMemberRequest, context: Context) -> pb.GetMemberResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.GetMemberResponse:
            return pb.GetMemberResponse(member=member_to_proto(await service.get_member(session, request.member_id)))

        return await self._read(work)

    async def UpdateMember(self, request: pb.UpdateMemberRequest, context: Context) -> pb.UpdateMemberResponse:
        require(member_id=request.member_id)
        values = {name: getattr(request.member, name) for name in _PROFILE_TEXT_FIELDS}
        change = service.parse_profile_change(
            list(request.update_mask.paths),
            values,
            consents_from_proto(request.member.consents),
            {code: attribute_from_proto(value) for code, value in request.member.attributes.items()},
        )

        async def work(session: AsyncSession) -> pb.UpdateMemberResponse:
            member = await service.update_member(session, request.member_id, change)
            return pb.UpdateMemberResponse(member=member_to_proto(member))

        return await self._idempotent.run("UpdateMember", request, pb.UpdateMemberResponse, work)

    async def BlockMember(self, request: pb.BlockMemberRequest, context: Context) -> pb.BlockMemberResponse:
        require(member_id=request.member_id)
        service.check_reason(request.reason)

        async def work(session: AsyncSession) -> pb.BlockMemberResponse:
            member = await service.block_member(session, request.member_id, request.reason.strip())
            return pb.BlockMemberResponse(member=member_to_proto(member))

        return await self._idempotent.run("BlockMember", request, pb.BlockMemberResponse, work)

    async def MergeMembers(self, request: pb.MergeMembersRequest, context: Context) -> pb.MergeMembersResponse:
        service.check_merge(request.survivor_id, request.duplicate_id, request.actor, request.reason)

        async def work(session: AsyncSession) -> pb.MergeMembersResponse:
            survivor, moved = await service.merge_members(
                session,
                request.survivor_id,
                request.duplicate_id,
                request.actor.strip(),
                request.reason.strip(),
                self._merge_accounts,
            )
            return pb.MergeMembersResponse(
                survivor=member_to_proto(survivor),
                cards_moved=moved.cards,
                segments_moved=moved.segments,
                tier_changes_moved=moved.tier_changes,
                consents_moved=moved.consents,
            )

        return await self._idempotent.run("MergeMembers", request, pb.MergeMembersResponse, work)

    async def UnblockMember(self, request: pb.UnblockMemberRequest, context: Context) -> pb.UnblockMemberResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.UnblockMemberResponse:
            member = await service.unblock_member(session, request.member_id)
            return pb.UnblockMemberResponse(member=member_to_proto(member))

        return await self._idempotent.run("UnblockMember", request, pb.UnblockMemberResponse, work)

    async def EraseMember(self, request: pb.EraseMemberRequest, context: Context) -> pb.EraseMemberResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.EraseMemberResponse:
            member = await service.erase_member(session, request.member_id)
            return pb.EraseMemberResponse(member=member_to_proto(member))

        return await self._idempotent.run("EraseMember", request, pb.EraseMemberResponse, work)

    # Cards -------------------------------------------------------------------------

    async def IssueCard(self, request: pb.IssueCardRequest, context: Context) -> pb.IssueCardResponse:
        require(member_id=request.member_id)
        if request.card_number:
            service.check_card_number(request.card_number)

        async def work(session: AsyncSession) -> pb.IssueCardResponse:
            card = await service.issue_card(session, request.member_id, request.card_number, request.card_type)
            return pb.IssueCardResponse(card=card_to_proto(card))

        return await self._idempotent.run("IssueCard", request, pb.IssueCardResponse, work)

    async def IssueAnonymousCard(
        self, request: pb.IssueAnonymousCardRequest, context: Context
    ) -> pb.IssueAnonymousCardResponse:
        if request.card_number:
            service.check_card_number(request.card_number)

        async def work(session: AsyncSession) -> pb.IssueAnonymousCardResponse:
            card = await service.issue_anonymous_card(session, request.card_number, request.card_type)
            return pb.IssueAnonymousCardResponse(card=card_to_proto(card))

        return await self._idempotent.run("IssueAnonymousCard", request, pb.IssueAnonymousCardResponse, work)

    async def BlockCard(self, request: pb.BlockCardRequest, context: Context) -> pb.BlockCardResponse:
        service.check_card_number(request.card_number)
        service.check_reason(request.reason)

        async def work(session: AsyncSession) -> pb.BlockCardResponse:
            card = await service.block_card(session, request.card_number, request.reason.strip())
            return pb.BlockCardResponse(card=card_to_proto(card))

        return await self._idempotent.run("BlockCard", request, pb.BlockCardResponse, work)

    async def UnblockCard(self, request: pb.UnblockCardRequest, context: Context) -> pb.UnblockCardResponse:
        service.check_card_number(request.card_number)

        async def work(session: AsyncSession) -> pb.UnblockCardResponse:
            return pb.UnblockCardResponse(card=card_to_proto(await service.unblock_card(session, request.card_number)))

        return await self._idempotent.run("UnblockCard", request, pb.UnblockCardResponse, work)

    async def ReplaceCard(self, request: pb.ReplaceCardRequest, context: Context) -> pb.ReplaceCardResponse:
        service.check_card_number(request.card_number)
        if request.new_card_number:
            service.check_card_number(request.new_card_number, "new_card_number")
        service.check_reason(request.reason)

        async def work(session: AsyncSession) -> pb.ReplaceCardResponse:
            old, new = await service.replace_card(
                session, request.card_number, request.new_card_number, request.reason.strip()
            )
            return pb.ReplaceCardResponse(old_card=card_to_proto(old), new_card=card_to_proto(new))

        return await self._idempotent.run("ReplaceCard", request, pb.ReplaceCardResponse, work)

    async def ListMemberCards(self, request: pb.ListMemberCardsRequest, context: Context) -> pb.ListMemberCardsResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.ListMemberCardsResponse:
            cards = await service.list_member_cards(session, request.member_id)
            return pb.ListMemberCardsResponse(cards=[card_to_proto(card) for card in cards])

        return await self._read(work)

    async def SetCardType(self, request: pb.SetCardTypeRequest, context: Context) -> pb.SetCardTypeResponse:
        card_type = service.parse_card_type(
            request.card_type.code, request.card_type.name, request.card_type.validity_days
        )

        async def work(session: AsyncSession) -> pb.SetCardTypeResponse:
            stored = await service.set_card_type(session, card_type)
            return pb.SetCardTypeResponse(
                card_type=pb.CardType(code=stored.code, name=stored.name, validity_days=stored.validity_days)
            )

        return await self._idempotent.run("SetCardType", request, pb.SetCardTypeResponse, work)

    async def ListCardTypes(self, request: pb.ListCardTypesRequest, context: Context) -> pb.ListCardTypesResponse:
        async def work(session: AsyncSession) -> pb.ListCardTypesResponse:
            types: list[CardType] = await store.list_card_types(session)
            return pb.ListCardTypesResponse(
                card_types=[pb.CardType(code=t.code, name=t.name, validity_days=t.validity_days) for t in types]
            )

        return await self._read(work)

    async def EmitCardBatch(self, request: pb.EmitCardBatchRequest, context: Context) -> pb.EmitCardBatchResponse:
        order = service.parse_batch_order(
            request.card_type, request.prefix, request.first_sequence, request.count, request.sequence_digits
        )

        async def work(session: AsyncSession) -> pb.EmitCardBatchResponse:
            return pb.EmitCardBatchResponse(batch=batch_to_proto(await service.order_card_batch(session, order)))

        return await self._idempotent.run("EmitCardBatch", request, pb.EmitCardBatchResponse, work)

    async def GetCardBatch(self, request: pb.GetCardBatchRequest, context: Context) -> pb.GetCardBatchResponse:
        require(batch_id=request.batch_id)

        async def work(session: AsyncSession) -> pb.GetCardBatchResponse:
            batch = await service.get_card_batch(session, request.batch_id)
            return pb.GetCardBatchResponse(batch=batch_to_proto(batch))

        return await self._read(work)

    # Identification --------------------------------------------------------------

    async def IdentifyMember(self, request: pb.IdentifyMemberRequest, context: Context) -> pb.IdentifyMemberResponse:
        which = request.WhichOneof("identifier")
        if which == "card_number":
            service.check_card_number(request.card_number)
            key = ("card", request.card_number)
        elif which == "phone":
            phone = service.parse_phone(request.phone)
            key = ("phone", phone)
        elif which == "qr_token" and request.qr_token:
            # Checked on every call (it expires); cached under the member it names.
            member_id = service.check_qr_token(request.qr_token, self._qr_secret)
            key = ("member", member_id)
        else:
            violations = Violations()
            violations.add("identifier", "give a card_number, a phone or a qr_token")
            violations.raise_if_any()
        cached = self._identities.get(key)
        if cached is not None:
            return pb.IdentifyMemberResponse(context=cached)
        async with self._sessions() as session:
            if which == "card_number":
                found = await service.identify_by_card(session, request.card_number)
            elif which == "phone":
                found = await service.identify_by_phone(session, phone)
            else:
                found = await service.identify_by_member_id(session, member_id)
        member = found.member
        member_context = pb.MemberContext(
            member_id=member.member_id,
            status=_MEMBER_STATUS[member.status],
            tier=member.tier,
            segments=found.segments,
            account_holder_id=member.account_holder_id,
            card_number=found.card_number,
            card_type=found.card_type,
            household_id=member.household_id or "",
            attributes=attributes_to_proto(member.attributes),
            birth_date=member.birth_date,
        )
        self._identities.put(key, member.member_id, member_context)
        return pb.IdentifyMemberResponse(context=member_context)

    async def IssueQrToken(self, request: pb.IssueQrTokenRequest, context: Context) -> pb.IssueQrTokenResponse:
        require(member_id=request.member_id)
        async with self._sessions() as session:
            token, expires_at = await service.issue_qr_token(session, request.member_id, self._qr_secret, self._qr_ttl)
        return pb.IssueQrTokenResponse(qr_token=token, expire_time=to_timestamp(expires_at))

    # Tiers and statistics ----------------------------------------------------------

    async def SetTierDefinition(
        self, request: pb.SetTierDefinitionRequest, context: Context
    ) -> pb.SetTierDefinitionResponse:
        tier = request.tier
        violations = Violations()
        violations.check(tier.metric in _TIER_METRICS_FROM_PROTO, "tier.metric", "SPEND or POINTS")
        violations.check(
            tier.calendar_period in _CALENDAR_PERIODS_FROM_PROTO, "tier.calendar_period", "a calendar period"
        )
        violations.raise_if_any()
        definition = service.parse_tier_definition(
            TierDefinition(
                tier.code,
                tier.name,
                tier.rank,
                tier.spend_threshold_minor,
                tier.window_months,
                tier.duration_days,
                tier.downgrade_after_inactive_days,
                _TIER_METRICS_FROM_PROTO[tier.metric],
                tier.points_threshold,
                _CALENDAR_PERIODS_FROM_PROTO[tier.calendar_period],
            )
        )

        async def work(session: AsyncSession) -> pb.SetTierDefinitionResponse:
            stored = await service.set_tier_definition(session, definition)
            return pb.SetTierDefinitionResponse(tier=tier_to_proto(stored))

        return await self._idempotent.run("SetTierDefinition", request, pb.SetTierDefinitionResponse, work)

    async def ListTierDefinitions(
        self, request: pb.ListTierDefinitionsRequest, context: Context
    ) -> pb.ListTierDefinitionsResponse:
        async def work(session: AsyncSession) -> pb.ListTierDefinitionsResponse:
            tiers = await store.list_tier_definitions(session)
            return pb.ListTierDefinitionsResponse(tiers=[tier_to_proto(tier) for tier in tiers])

        return await self._read(work)

    async def ListTierHistory(self, request: pb.ListTierHistoryRequest, context: Context) -> pb.ListTierHistoryResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.ListTierHistoryResponse:
            changes = await service.tier_history(session, request.member_id)
            return pb.ListTierHistoryResponse(
                changes=[
                    pb.TierChange(
                        old_tier=change.old_tier,
                        new_tier=change.new_tier,
                        reason=change.reason,
                        change_time=to_timestamp(change.changed_at),
                    )
                    for change in changes
                ]
            )

        return await self._read(work)

    async def GetMemberStatistics(
        self, request: pb.GetMemberStatisticsRequest, context: Context
    ) -> pb.GetMemberStatisticsResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.GetMemberStatisticsResponse:
            stats = await service.statistics(session, request.member_id, utcnow())
            return pb.GetMemberStatisticsResponse(
                purchase_count=stats.purchase_count,
                total_spend_minor=stats.total_spend_minor,
                spend_last_30_days_minor=stats.spend_last_30_days_minor,
                spend_last_365_days_minor=stats.spend_last_365_days_minor,
                first_purchase_time=to_timestamp(stats.first_purchase_at),
                last_purchase_time=to_timestamp(stats.last_purchase_at),
                points_earned=stats.points_earned,
            )

        return await self._read(work)

    # Households --------------------------------------------------------------------

    async def CreateHousehold(self, request: pb.CreateHouseholdRequest, context: Context) -> pb.CreateHouseholdResponse:
        require(owner_member_id=request.owner_member_id)
        violations = Violations()
        violations.check_length(request.name, "name", service.MAX_NAME_LENGTH)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.CreateHouseholdResponse:
            household = await service.create_household(session, request.owner_member_id, request.name)
            return pb.CreateHouseholdResponse(household=household_to_proto(household))

        return await self._idempotent.run("CreateHousehold", request, pb.CreateHouseholdResponse, work)

    async def JoinHousehold(self, request: pb.JoinHouseholdRequest, context: Context) -> pb.JoinHouseholdResponse:
        require(household_id=request.household_id, member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.JoinHouseholdResponse:
            household = await service.join_household(session, request.household_id, request.member_id)
            return pb.JoinHouseholdResponse(household=household_to_proto(household))

        return await self._idempotent.run("JoinHousehold", request, pb.JoinHouseholdResponse, work)

    async def LeaveHousehold(self, request: pb.LeaveHouseholdRequest, context: Context) -> pb.LeaveHouseholdResponse:
        require(member_id=request.member_id)

        async def work(session: AsyncSession) -> pb.LeaveHouseholdResponse:
            member = await service.leave_household(session, request.member_id)
            return pb.LeaveHouseholdResponse(member=member_to_proto(member))

        return await self._idempotent.run("LeaveHousehold", request, pb.LeaveHouseholdResponse, work)

    async def GetHousehold(self, request: pb.GetHouseholdRequest, context: Context) -> pb.GetHouseholdResponse:
        require(household_id=request.household_id)

        async def work(session: AsyncSession) -> pb.GetHouseholdResponse:
            household = await service.get_household(session, request.household_id)
            return pb.GetHouseholdResponse(household=household_to_proto(household))

        return await self._read(work)

    # Segments ----------------------------------------------------------------------

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Context) -> pb.CreateSegmentResponse:
        service.check_code(request.code, "code")
        violations = Violations()
        violations.check(bool(request.name.strip()), "name", "required")
        violations.check_length(request.name, "name", service.MAX_NAME_LENGTH)
        violations.raise_if_any()
        # The expression is checked in the transaction: its trial run needs the attributes defined.

        async def work(session: AsyncSession) -> pb.CreateSegmentResponse:
            segment = await service.create_segment(session, request.code, request.name, request.expression)
            return pb.CreateSegmentResponse(segment=segment_to_proto(segment))

        return await self._idempotent.run("CreateSegment", request, pb.CreateSegmentResponse, work)

    async def AddSegmentMembers(
        self, request: pb.AddSegmentMembersRequest, context: Context
    ) -> pb.AddSegmentMembersResponse:
        service.check_code(request.code, "code")
        phones = service.check_segment_members(request.member_ids, request.phones)

        async def work(session: AsyncSession) -> pb.AddSegmentMembersResponse:
            segment, added, unknown = await service.add_segment_members(
                session, request.code, request.member_ids, phones
            )
            return pb.AddSegmentMembersResponse(segment=segment_to_proto(segment), added=added, unknown=unknown)

        return await self._idempotent.run("AddSegmentMembers", request, pb.AddSegmentMembersResponse, work)

    async def RemoveSegmentMembers(
        self, request: pb.RemoveSegmentMembersRequest, context: Context
    ) -> pb.RemoveSegmentMembersResponse:
        service.check_code(request.code, "code")
        service.check_segment_members(request.member_ids, ())

        async def work(session: AsyncSession) -> pb.RemoveSegmentMembersResponse:
            segment = await service.remove_segment_members(session, request.code, request.member_ids)
            return pb.RemoveSegmentMembersResponse(segment=segment_to_proto(segment))

        return await self._idempotent.run("RemoveSegmentMembers", request, pb.RemoveSegmentMembersResponse, work)

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Context) -> pb.GetSegmentResponse:
        require(code=request.code)

        async def work(session: AsyncSession) -> pb.GetSegmentResponse:
            return pb.GetSegmentResponse(segment=segment_to_proto(await service.get_segment(session, request.code)))

        return await self._read(work)

    # Partners ----------------------------------------------------------------------

    async def SetPartner(self, request: pb.SetPartnerRequest, context: Context) -> pb.SetPartnerResponse:
        partner = service.parse_partner(
            request.partner.partner_id,
            request.partner.name,
            list(request.partner.store_ids),
            [
                store.Store(item.store_id, item.region, item.time_zone, tuple(item.terminal_ids))
                for item in request.partner.stores
            ],
        )

        async def work(session: AsyncSession) -> pb.SetPartnerResponse:
            return pb.SetPartnerResponse(partner=partner_to_proto(await service.set_partner(session, partner)))

        return await self._idempotent.run("SetPartner", request, pb.SetPartnerResponse, work)

    async def GetPartner(self, request: pb.GetPartnerRequest, context: Context) -> pb.GetPartnerResponse:
        require(partner_id=request.partner_id)

        async def work(session: AsyncSession) -> pb.GetPartnerResponse:
            partner = await service.get_partner(session, request.partner_id)
            return pb.GetPartnerResponse(partner=partner_to_proto(partner))

        return await self._read(work)

    async def ResolveTerminal(self, request: pb.ResolveTerminalRequest, context: Context) -> pb.ResolveTerminalResponse:
        require(terminal_id=request.terminal_id)

        async def work(session: AsyncSession) -> pb.ResolveTerminalResponse:
            terminal = await service.resolve_terminal(session, request.terminal_id)
            return pb.ResolveTerminalResponse(
                terminal_id=terminal.terminal_id,
                store_id=terminal.store_id,
                partner_id=terminal.partner_id,
                region=terminal.region,
                time_zone=terminal.time_zone,
            )

        return await self._read(work)

    # Custom attributes -------------------------------------------------------------

    async def SetAttributeDefinition(
        self, request: pb.SetAttributeDefinitionRequest, context: Context
    ) -> pb.SetAttributeDefinitionResponse:
        given = request.definition
        definition = service.parse_attribute_definition(
            given.code, given.name, _ATTRIBUTE_TYPES_FROM_PROTO.get(given.type), list(given.allowed_values)
        )

        async def work(session: AsyncSession) -> pb.SetAttributeDefinitionResponse:
            stored = await service.set_attribute_definition(session, definition)
            return pb.SetAttributeDefinitionResponse(definition=attribute_definition_to_proto(stored))

        return await self._idempotent.run("SetAttributeDefinition", request, pb.SetAttributeDefinitionResponse, work)

    async def ListAttributeDefinitions(
        self, request: pb.ListAttributeDefinitionsRequest, context: Context
    ) -> pb.ListAttributeDefinitionsResponse:
        async def work(session: AsyncSession) -> pb.ListAttributeDefinitionsResponse:
            definitions = await store.list_attribute_definitions(session)
            return pb.ListAttributeDefinitionsResponse(
                definitions=[attribute_definition_to_proto(definition) for definition in definitions]
            )

        return await self._read(work)

    # Referrals ---------------------------------------------------------------------

    async def LookupReferralCode(
        self, request: pb.LookupReferralCodeRequest, context: Context
    ) -> pb.LookupReferralCodeResponse:
        async def work(session: AsyncSession) -> pb.LookupReferralCodeResponse:
            member_id = await service.lookup_referral_code(session, request.referral_code)
            return pb.LookupReferralCodeResponse(member_id=member_id)

        return await self._read(work)

    # Household invitations ---------------------------------------------------------

    async def InviteToHousehold(
        self, request: pb.InviteToHouseholdRequest, context: Context
    ) -> pb.InviteToHouseholdResponse:
        require(household_id=request.household_id, invited_by=request.invited_by)
        phone = service.check_invitation(request.member_id, request.phone, request.valid_days)

        async def work(session: AsyncSession) -> pb.InviteToHouseholdResponse:
            invitation = await service.invite_to_household(
                session, request.household_id, request.invited_by, request.member_id, phone, request.valid_days
            )
            return pb.InviteToHouseholdResponse(invitation=invitation_to_proto(invitation))

        return await self._idempotent.run("InviteToHousehold", request, pb.InviteToHouseholdResponse, work)

    async def AcceptHouseholdInvitation(
        self, request: pb.AcceptHouseholdInvitationRequest, context: Context
    ) -> pb.AcceptHouseholdInvitationResponse:
        require(invitation_id=request.invitation_id)

        async def work(session: AsyncSession) -> pb.AcceptHouseholdInvitationResponse:
            invitation, household = await service.accept_invitation(session, request.invitation_id)
            return pb.AcceptHouseholdInvitationResponse(
                invitation=invitation_to_proto(invitation), household=household_to_proto(household)
            )

        return await self._idempotent.run(
            "AcceptHouseholdInvitation", request, pb.AcceptHouseholdInvitationResponse, work
        )

    async def DeclineHouseholdInvitation(
        self, request: pb.DeclineHouseholdInvitationRequest, context: Context
    ) -> pb.DeclineHouseholdInvitationResponse:
        require(invitation_id=request.invitation_id)

        async def work(session: AsyncSession) -> pb.DeclineHouseholdInvitationResponse:
            invitation = await service.decline_invitation(session, request.invitation_id)
            return pb.DeclineHouseholdInvitationResponse(invitation=invitation_to_proto(invitation))

        return await self._idempotent.run(
            "DeclineHouseholdInvitation", request, pb.DeclineHouseholdInvitationResponse, work
        )

    async def ListHouseholdInvitations(
        self, request: pb.ListHouseholdInvitationsRequest, context: Context
    ) -> pb.ListHouseholdInvitationsResponse:
        async def work(session: AsyncSession) -> pb.ListHouseholdInvitationsResponse:
            invitations = await service.list_invitations(session, request.member_id, request.household_id)
            return pb.ListHouseholdInvitationsResponse(invitations=[invitation_to_proto(item) for item in invitations])

        return await self._read(work)
