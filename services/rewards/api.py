"""RewardsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.common.v1 import coupon_pb2
from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1 import rewards_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import DomainError, Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.paging import page_size
from loyalty.runtime.ratelimit import InMemoryRateLimiter, RateLimiter
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.rewards import service, store
from services.rewards.domain import (
    WRONG_CODE_LIMIT,
    WRONG_CODE_WINDOW_SECONDS,
    WRONG_PIN_LIMIT,
    WRONG_PIN_WINDOW_SECONDS,
    Badge,
    BadgeAward,
    ChipProgram,
    Coupon,
    CouponStatus,
    GiftCard,
    GiftCardState,
    Rejection,
    Reservation,
    ReservationStatus,
    Series,
    SeriesKind,
    hash_pin,
    too_many_wrong_codes,
    too_many_wrong_pins,
    wrong_code_key,
    wrong_pin_key,
)

_COUPON_STATUS = {
    CouponStatus.ACTIVE: pb.COUPON_STATUS_ACTIVE,
    CouponStatus.REDEEMED: pb.COUPON_STATUS_REDEEMED,
}
_REJECTION = {
    Rejection.NOT_FOUND: pb.COUPON_REJECTION_NOT_FOUND,
    Rejection.OTHER_MEMBER: pb.COUPON_REJECTION_OTHER_MEMBER,
    Rejection.ALREADY_USED: pb.COUPON_REJECTION_ALREADY_USED,
    Rejection.NOT_YET_VALID: pb.COUPON_REJECTION_NOT_YET_VALID,
    Rejection.EXPIRED: pb.COUPON_REJECTION_EXPIRED,
    Rejection.NOT_APPLICABLE: pb.COUPON_REJECTION_NOT_APPLICABLE,
    Rejection.MEMBER_REQUIRED: pb.COUPON_REJECTION_MEMBER_REQUIRED,
    Rejection.MEMBER_LIMIT_REACHED: pb.COUPON_REJECTION_MEMBER_LIMIT_REACHED,
    Rejection.RESERVED: pb.COUPON_REJECTION_RESERVED,
}
_RESERVATION_STATUS = {
    ReservationStatus.ACTIVE: pb.RESERVATION_STATUS_ACTIVE,
    ReservationStatus.REDEEMED: pb.RESERVATION_STATUS_REDEEMED,
    ReservationStatus.RELEASED: pb.RESERVATION_STATUS_RELEASED,
    ReservationStatus.RETURNED: pb.RESERVATION_STATUS_RETURNED,
}
_SERIES_KIND = {SeriesKind.MASS: pb.COUPON_SERIES_KIND_MASS, SeriesKind.UNIQUE: pb.COUPON_SERIES_KIND_UNIQUE}
_GIFT_CARD_STATE = {
    GiftCardState.INACTIVE: pb.GIFT_CARD_STATUS_INACTIVE,
    GiftCardState.ACTIVE: pb.GIFT_CARD_STATUS_ACTIVE,
    GiftCardState.EXPIRED: pb.GIFT_CARD_STATUS_EXPIRED,
}

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def benefit_to_proto(series: Series) -> coupon_pb2.CouponBenefit:
    return coupon_pb2.CouponBenefit.FromString(series.benefit)


def series_to_proto(series: Series) -> pb.CouponSeries:
    return pb.CouponSeries(
        series_id=series.series_id,
        name=series.name,
        kind=_SERIES_KIND[series.kind],
        campaign_id=series.campaign_id or "",
        benefit=benefit_to_proto(series),
        uses_per_code=series.uses_per_code,
        uses_per_member=series.uses_per_member,
        valid_from=to_timestamp(series.valid_from),
        valid_until=to_timestamp(series.valid_until),
        validity_days=series.validity_days,
        mass_code=series.mass_code or "",
        code_alphabet=series.code_alphabet,
        code_length=series.code_length,
    )


def coupon_to_proto(coupon: Coupon) -> pb.Coupon:
    return pb.Coupon(
        code=coupon.code,
        member_id=coupon.member_id or "",
        status=_COUPON_STATUS[coupon.status],
        valid_from=to_timestamp(coupon.valid_from),
        valid_until=to_timestamp(coupon.valid_until),
        series_id=coupon.series.series_id,
        campaign_id=coupon.series.campaign_id or "",
        benefit=benefit_to_proto(coupon.series),
        uses=coupon.uses,
        uses_per_code=coupon.series.uses_per_code,
        partner_id=coupon.partner_id or "",
    )


def reservation_to_proto(reservation: Reservation, now: datetime) -> pb.CouponReservation:
    """The reservation as of ``now``: an active one past its end is answered EXPIRED."""
    lapsed = reservation.status is ReservationStatus.ACTIVE and not reservation.is_live(now)
    return pb.CouponReservation(
        reservation_id=reservation.reservation_id,
        code=reservation.code,
        member_id=reservation.member_id or "",
        receipt_ref=reservation.receipt_ref,
        expire_time=to_timestamp(reservation.expires_at),
        status=pb.RESERVATION_STATUS_EXPIRED if lapsed else _RESERVATION_STATUS[reservation.status],
    )


def job_to_proto(job: store.CodeJob) -> pb.CodeGenerationJob:
    return pb.CodeGenerationJob(
        job_id=job.job_id,
        series_id=job.series_id,
        requested=job.requested,
        generated=job.generated,
        status=pb.CODE_GENERATION_JOB_STATUS_DONE if job.finished_at else pb.CODE_GENERATION_JOB_STATUS_RUNNING,
        create_time=to_timestamp(job.created_at),
        finish_time=to_timestamp(job.finished_at),
    )


def gift_card_to_proto(card: GiftCard, now: datetime) -> pb.GiftCard:
    return pb.GiftCard(
        card_number=card.card_number,
        batch_id=card.batch_id,
        currency_code=card.currency_code,
        balance_minor=card.balance_minor,
        status=_GIFT_CARD_STATE[card.state(now)],
        expire_time=to_timestamp(card.expires_at),
        has_pin=card.pin_hash is not None,
    )


def badge_to_proto(badge: Badge) -> pb.Badge:
    return pb.Badge(badge_id=badge.badge_id, name=badge.name, description=badge.description)


def award_to_proto(award: BadgeAward) -> pb.BadgeAward:
    return pb.BadgeAward(
        badge=badge_to_proto(award.badge), member_id=award.member_id, award_time=to_timestamp(award.awarded_at)
    )


def chip_program_to_proto(program: ChipProgram) -> pb.ChipProgram:
    return pb.ChipProgram(
        chip_program_id=program.chip_program_id,
        name=program.name,
        currency_code=program.currency_code,
        spend_per_chip_minor=program.spend_per_chip_minor,
        chips_per_exchange=program.chips_per_exchange,
        exchange_series_id=program.exchange_series_id,
    )


def _benefit_fields(benefit: coupon_pb2.CouponBenefit) -> service.BenefitFields:
    kind = benefit.WhichOneof("kind")
    return service.BenefitFields(
        kind=kind,
        value=getattr(benefit, kind) if kind else 0,
        skus=list(benefit.skus),
        category_ids=list(benefit.category_ids),
        product_list_ids=list(benefit.product_list_ids),
        min_receipt_total_minor=benefit.min_receipt_total_minor,
    )


def _receipt_total(request: pb.ValidateCouponRequest | pb.ReserveCouponRequest) -> int | None:
    return request.receipt_total_minor if request.HasField("receipt_total_minor") else None


class RewardsApi(pb_grpc.RewardsServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        on_commit: Callable[[], None] | None = None,
        limiter: RateLimiter | None = None,
        on_code_job: Callable[[], None] | None = None,
    ) -> None:
        """``on_commit`` wakes the outbox relay; ``on_code_job`` wakes the code generation runner."""
        self._sessions = sessions
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, on_commit)
        self._limiter = limiter or InMemoryRateLimiter()
        self._on_code_job = on_code_job

    # Guessing protection: unknown codes count per terminal, wrong PINs per card.

    async def _refuse_if_guessing(self, terminal_id: str) -> None:
        key = wrong_code_key(terminal_id)
        wait = await self._limiter.retry_after(key, WRONG_CODE_LIMIT, WRONG_CODE_WINDOW_SECONDS)
        if wait:
            raise too_many_wrong_codes(wait)

    async def _count_wrong_code(self, terminal_id: str) -> None:
        await self._limiter.hit(wrong_code_key(terminal_id), WRONG_CODE_LIMIT, WRONG_CODE_WINDOW_SECONDS)

    async def _guarded_card_call(self, card_number: str, terminal_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """Runs a call naming a card: unknown numbers count as wrong codes of the terminal,
        wrong PINs against the card; either limit reached refuses the call up front."""
        await self._refuse_if_guessing(terminal_id)
        pin_key = wrong_pin_key(card_number)
        wait = await self._limiter.retry_after(pin_key, WRONG_PIN_LIMIT, WRONG_PIN_WINDOW_SECONDS)
        if wait:
            raise too_many_wrong_pins(wait)
        try:
            result = await call()
        except DomainError as error:
            if error.reason == "GIFT_CARD_NOT_FOUND":
                await self._count_wrong_code(terminal_id)
            elif error.reason == "GIFT_CARD_WRONG_PIN":
                await self._limiter.hit(pin_key, WRONG_PIN_LIMIT, WRONG_PIN_WINDOW_SECONDS)
            raise
        return result

    # Coupon series

    async def CreateCouponSeries(
        self, request: pb.CreateCouponSeriesRequest, context: Context
    ) -> pb.CreateCouponSeriesResponse:
        violations = Violations()
        valid_from = timestamp_field(request, "valid_from", violations)
        valid_until = timestamp_field(request, "valid_until", violations)
        kinds = {value: kind for kind, value in _SERIES_KIND.items()}
        terms = service.parse_series(
            name=request.name,
            kind=kinds.get(request.kind),
            campaign_id=request.campaign_id,
            benefit=request.benefit.SerializeToString(deterministic=True),
            benefit_fields=_benefit_fields(request.benefit),
            uses_per_code=request.uses_per_code,
            uses_per_member=request.uses_per_member,
            valid_from=valid_from,
            valid_until=valid_until,
            validity_days=request.validity_days,
            mass_code=request.mass_code,
            code_alphabet=request.code_alphabet,
            code_length=request.code_length,
            violations=violations,
        )

        async def work(session: AsyncSession) -> pb.CreateCouponSeriesResponse:
            series = await service.create_series(session, terms, utcnow())
            return pb.CreateCouponSeriesResponse(series=series_to_proto(series))

        return await self._idempotent.run("CreateCouponSeries", request, pb.CreateCouponSeriesResponse, work)

    async def GetCouponSeries(self, request: pb.GetCouponSeriesRequest, context: Context) -> pb.GetCouponSeriesResponse:
        async with self._sessions() as session:
            series = await service.get_series(session, request.series_id)
        return pb.GetCouponSeriesResponse(series=series_to_proto(series))

    async def IssueCoupon(self, request: pb.IssueCouponRequest, context: Context) -> pb.IssueCouponResponse:
        violations = Violations()
        violations.check(bool(request.series_id), "series_id", "required")
        violations.check_length(request.member_id, "member_id", store.MAX_MEMBER_ID_LENGTH)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.IssueCouponResponse:
            owners = [request.member_id or None]
            (coupon,) = await service.issue_coupons(session, request.series_id, owners, utcnow())
            return pb.IssueCouponResponse(coupon=coupon_to_proto(coupon))

        return await self._idempotent.run("IssueCoupon", request, pb.IssueCouponResponse, work)

    async def IssueCoupons(self, request: pb.IssueCouponsRequest, context: Context) -> pb.IssueCouponsResponse:
        violations = Violations()
        violations.check(bool(request.series_id), "series_id", "required")
        members = service.parse_member_ids(request.member_ids, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.IssueCouponsResponse:
            coupons = await service.issue_coupons(session, request.series_id, members, utcnow())
            return pb.IssueCouponsResponse(coupons=[coupon_to_proto(coupon) for coupon in coupons])

        return await self._idempotent.run("IssueCoupons", request, pb.IssueCouponsResponse, work)

    async def GenerateCodes(self, request: pb.GenerateCodesRequest, context: Context) -> pb.GenerateCodesResponse:
        violations = Violations()
        violations.check(bool(request.series_id), "series_id", "required")
        count = service.parse_code_count(request.count, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.GenerateCodesResponse:
            job = await service.start_code_job(session, request.series_id, count, utcnow())
            return pb.GenerateCodesResponse(job=job_to_proto(job))

        response = await self._idempotent.run("GenerateCodes", request, pb.GenerateCodesResponse, work)
        if self._on_code_job is not None:
            self._on_code_job()
        return response

    async def GetCodeGenerationJob(
        self, request: pb.GetCodeGenerationJobRequest, context: Context
    ) -> pb.GetCodeGenerationJobResponse:
        async with self._sessions() as session:
            job = await service.get_code_job(session, request.job_id)
        return pb.GetCodeGenerationJobResponse(job=job_to_proto(job))

    async def ListCoupons(self, request: pb.ListCouponsRequest, context: Context) -> pb.ListCouponsResponse:
        violations = Violations()
        limit = page_size(request.page_size, violations)
        # Codes are the keys of the listing: the token is the last code of the previous page.
        violations.check_length(request.page_token, "page_token", store.MAX_CODE_LENGTH)
        violations.raise_if_any()
        async with self._sessions() as session:
            coupons = await service.list_coupons(session, request.series_id, request.page_token, limit + 1)
        page = coupons[:limit]
        return pb.ListCouponsResponse(
            coupons=[coupon_to_proto(coupon) for coupon in page],
            next_page_token=page[-1].code if len(coupons) > limit else "",
        )

    async def ImportPromoCodes(
        self, request: pb.ImportPromoCodesRequest, context: Context
    ) -> pb.ImportPromoCodesResponse:
        violations = Violations()
        violations.check(bool(request.series_id), "series_id", "required")
        codes = service.parse_promo_import(request.partner_id, request.codes, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.ImportPromoCodesResponse:
            imported, duplicates = await service.import_promo_codes(
                session, request.series_id, request.partner_id, codes, utcnow()
            )
            return pb.ImportPromoCodesResponse(imported=imported, duplicate_codes=duplicates)

        return await self._idempotent.run("ImportPromoCodes", request, pb.ImportPromoCodesResponse, work)

    async def GetPartnerUsageReport(
        self, request: pb.GetPartnerUsageReportRequest, context: Context
    ) -> pb.GetPartnerUsageReportResponse:
        async with self._sessions() as session:
            rows = await service.partner_usage(session, request.series_id)
        return pb.GetPartnerUsageReportResponse(
            partners=[
                pb.PartnerUsage(
                    partner_id=row.partner_id, codes=row.codes, used_codes=row.used_codes, redemptions=row.redemptions
                )
                for row in rows
            ]
        )

    # The coupon lifecycle at the register

    async def ValidateCoupon(self, request: pb.ValidateCouponRequest, context: Context) -> pb.ValidateCouponResponse:
        receipt_total = _receipt_total(request)
        code = service.parse_lookup(request.code, request.terminal_id, receipt_total)
        await self._refuse_if_guessing(request.terminal_id)
        async with self._sessions() as session:
            check = await service.validate_coupon(
                session, code, request.member_id, utcnow(), request.receipt_ref, receipt_total
            )
        if check.rejection is Rejection.NOT_FOUND:
            await self._count_wrong_code(request.terminal_id)
        rejection = pb.COUPON_REJECTION_UNSPECIFIED if check.rejection is None else _REJECTION[check.rejection]
        return pb.ValidateCouponResponse(
            valid=check.valid,
            rejection=rejection,
            coupon=coupon_to_proto(check.coupon) if check.coupon else None,
        )

    async def ReserveCoupon(self, request: pb.ReserveCouponRequest, context: Context) -> pb.ReserveCouponResponse:
        receipt_total = _receipt_total(request)
        code, member_id, ttl = service.parse_reservation_request(
            request.code,
            request.member_id,
            request.receipt_ref,
            request.ttl_seconds,
            request.terminal_id,
            receipt_total,
        )
        await self._refuse_if_guessing(request.terminal_id)

        async def work(session: AsyncSession) -> pb.ReserveCouponResponse:
            now = utcnow()
            reserved = await service.reserve_coupon(
                session, code, member_id, request.receipt_ref, ttl, now, receipt_total
            )
            return pb.ReserveCouponResponse(
                reservation=reservation_to_proto(reserved.reservation, now), coupon=coupon_to_proto(reserved.coupon)
            )

        try:
            return await self._idempotent.run("ReserveCoupon", request, pb.ReserveCouponResponse, work)
        except DomainError as refused:
            if refused.reason == "COUPON_NOT_FOUND":
                await self._count_wrong_code(request.terminal_id)
            raise

    async def RedeemCoupon(self, request: pb.RedeemCouponRequest, context: Context) -> pb.RedeemCouponResponse:
        reservation_id = service.parse_reservation_id(request.reservation_id)

        async def work(session: AsyncSession) -> pb.RedeemCouponResponse:
            now = utcnow()
            redeemed = await service.redeem_coupon(session, reservation_id, now)
            return pb.RedeemCouponResponse(
                coupon=coupon_to_proto(redeemed.coupon), reservation=reservation_to_proto(redeemed.reservation, now)
            )

        return await self._idempotent.run("RedeemCoupon", request, pb.RedeemCouponResponse, work)

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Context
    ) -> pb.ReleaseReservationResponse:
        reservation_id = service.parse_reservation_id(request.reservation_id)

        async def work(session: AsyncSession) -> pb.ReleaseReservationResponse:
            now = utcnow()
            released = await service.release_reservation(session, reservation_id, now)
            return pb.ReleaseReservationResponse(reservation=reservation_to_proto(released, now))

        return await self._idempotent.run("ReleaseReservation", request, pb.ReleaseReservationResponse, work)

    async def ReinstateCoupon(self, request: pb.ReinstateCouponRequest, context: Context) -> pb.ReinstateCouponResponse:
        code, receipt_ref = service.parse_reinstatement(request.code, request.receipt_ref)

        async def work(session: AsyncSession) -> pb.ReinstateCouponResponse:
            coupon = await service.reinstate_coupon(session, code, receipt_ref, utcnow())
            return pb.ReinstateCouponResponse(coupon=coupon_to_proto(coupon))

        return await self._idempotent.run("ReinstateCoupon", request, pb.ReinstateCouponResponse, work)

    # Gift cards

    async def IssueGiftCards(self, request: pb.IssueGiftCardsRequest, context: Context) -> pb.IssueGiftCardsResponse:
        violations = Violations()
        service.parse_gift_card_batch(request.count, request.currency_code, request.validity_days, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.IssueGiftCardsResponse:
            now = utcnow()
            batch_id, cards = await service.issue_gift_cards(
                session, request.count, request.currency_code, request.validity_days, now
            )
            return pb.IssueGiftCardsResponse(batch_id=batch_id, cards=[gift_card_to_proto(c, now) for c in cards])

        return await self._idempotent.run("IssueGiftCards", request, pb.IssueGiftCardsResponse, work)

    async def ActivateGiftCard(
        self, request: pb.ActivateGiftCardRequest, context: Context
    ) -> pb.ActivateGiftCardResponse:
        violations = Violations()
        card_number = service.parse_card_number(request.card_number, violations)
        service.parse_amount(request.amount_minor, violations)
        service.parse_pin(request.pin, violations)
        service.parse_receipt_ref(request.receipt_ref, violations)
        violations.raise_if_any()
        # Salted, so hashing before the idempotency check changes nothing a retry compares.
        pin_hash = await asyncio.to_thread(hash_pin, request.pin) if request.pin else None

        async def work(session: AsyncSession) -> pb.ActivateGiftCardResponse:
            now = utcnow()
            card = await service.activate_gift_card(
                session, card_number, request.amount_minor, pin_hash, request.receipt_ref, now
            )
            return pb.ActivateGiftCardResponse(card=gift_card_to_proto(card, now))

        return await self._idempotent.run("ActivateGiftCard", request, pb.ActivateGiftCardResponse, work)

    async def GetGiftCard(self, request: pb.GetGiftCardRequest, context: Context) -> pb.GetGiftCardResponse:
        violations = Violations()
        card_number = service.parse_card_number(request.card_number, violations)
        violations.check_length(request.terminal_id, "terminal_id", store.MAX_REF_ID_LENGTH)
        violations.check_length(request.pin, "pin", store.MAX_REF_ID_LENGTH)
        violations.raise_if_any()

        async def read() -> GiftCard:
            async with self._sessions() as session:
                return await service.read_gift_card(session, card_number, request.pin)

        card: GiftCard = await self._guarded_card_call(card_number, request.terminal_id, read)
        return pb.GetGiftCardResponse(card=gift_card_to_proto(card, utcnow()))

    async def SpendGiftCard(self, request: pb.SpendGiftCardRequest, context: Context) -> pb.SpendGiftCardResponse:
        violations = Violations()
        card_number = service.parse_card_number(request.card_number, violations)
        service.parse_amount(request.amount_minor, violations)
        service.parse_receipt_ref(request.receipt_ref, violations)
        violations.check_length(request.terminal_id, "terminal_id", store.MAX_REF_ID_LENGTH)
        violations.check_length(request.pin, "pin", store.MAX_REF_ID_LENGTH)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.SpendGiftCardResponse:
            now = utcnow()
            card = await service.spend_gift_card(
                session, card_number, request.pin, request.amount_minor, request.receipt_ref, now
            )
            return pb.SpendGiftCardResponse(card=gift_card_to_proto(card, now), spent_minor=request.amount_minor)

        async def spend() -> pb.SpendGiftCardResponse:
            return await self._idempotent.run("SpendGiftCard", request, pb.SpendGiftCardResponse, work)

        response: pb.SpendGiftCardResponse = await self._guarded_card_call(card_number, request.terminal_id, spend)
        return response

    async def RefundGiftCard(self, request: pb.RefundGiftCardRequest, context: Context) -> pb.RefundGiftCardResponse:
        violations = Violations()
        card_number = service.parse_card_number(request.card_number, violations)
        service.parse_amount(request.amount_minor, violations)
        service.parse_receipt_ref(request.receipt_ref, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.RefundGiftCardResponse:
            now = utcnow()
            card = await service.refund_gift_card(session, card_number, request.amount_minor, request.receipt_ref, now)
            return pb.RefundGiftCardResponse(card=gift_card_to_proto(card, now), refunded_minor=request.amount_minor)

        return await self._idempotent.run("RefundGiftCard", request, pb.RefundGiftCardResponse, work)

    # Badges and chips

    async def CreateBadge(self, request: pb.CreateBadgeRequest, context: Context) -> pb.CreateBadgeResponse:
        violations = Violations()
        service.parse_badge(request.name, request.description, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.CreateBadgeResponse:
            badge = await service.create_badge(session, request.name, request.description, utcnow())
            return pb.CreateBadgeResponse(badge=badge_to_proto(badge))

        return await self._idempotent.run("CreateBadge", request, pb.CreateBadgeResponse, work)

    async def AwardBadge(self, request: pb.AwardBadgeRequest, context: Context) -> pb.AwardBadgeResponse:
        violations = Violations()
        service.parse_member_id(request.member_id, violations)
        violations.check(bool(request.badge_id), "badge_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.AwardBadgeResponse:
            award, new = await service.award_badge(session, request.member_id, request.badge_id, utcnow())
            return pb.AwardBadgeResponse(award=award_to_proto(award), newly_awarded=new)

        return await self._idempotent.run("AwardBadge", request, pb.AwardBadgeResponse, work)

    async def ListMemberBadges(
        self, request: pb.ListMemberBadgesRequest, context: Context
    ) -> pb.ListMemberBadgesResponse:
        violations = Violations()
        service.parse_member_id(request.member_id, violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            awards = await service.member_badges(session, request.member_id)
        return pb.ListMemberBadgesResponse(awards=[award_to_proto(award) for award in awards])

    async def CreateChipProgram(
        self, request: pb.CreateChipProgramRequest, context: Context
    ) -> pb.CreateChipProgramResponse:
        violations = Violations()
        service.parse_chip_program(
            request.name,
            request.currency_code,
            request.spend_per_chip_minor,
            request.chips_per_exchange,
            request.exchange_series_id,
            violations,
        )
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.CreateChipProgramResponse:
            program = await service.create_chip_program(
                session,
                request.name,
                request.currency_code,
                request.spend_per_chip_minor,
                request.chips_per_exchange,
                request.exchange_series_id,
                utcnow(),
            )
            return pb.CreateChipProgramResponse(program=chip_program_to_proto(program))

        return await self._idempotent.run("CreateChipProgram", request, pb.CreateChipProgramResponse, work)

    async def GetChipBalances(self, request: pb.GetChipBalancesRequest, context: Context) -> pb.GetChipBalancesResponse:
        violations = Violations()
        service.parse_member_id(request.member_id, violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            balances = await service.chip_balances(session, request.member_id)
        return pb.GetChipBalancesResponse(
            balances=[pb.ChipBalance(program=chip_program_to_proto(p), chips=chips) for p, chips in balances]
        )

    async def ExchangeChips(self, request: pb.ExchangeChipsRequest, context: Context) -> pb.ExchangeChipsResponse:
        violations = Violations()
        service.parse_member_id(request.member_id, violations)
        violations.check(bool(request.chip_program_id), "chip_program_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.ExchangeChipsResponse:
            program, chips, coupon = await service.exchange_chips(
                session, request.member_id, request.chip_program_id, utcnow()
            )
            return pb.ExchangeChipsResponse(
                balance=pb.ChipBalance(program=chip_program_to_proto(program), chips=chips),
                coupon=coupon_to_proto(coupon),
            )

        return await self._idempotent.run("ExchangeChips", request, pb.ExchangeChipsResponse, work)
