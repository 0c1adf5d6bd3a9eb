"""AccountsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.accounts.v1 import accounts_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.accounts import service, store
from services.accounts.domain import (
    MAX_HOLD_SECONDS,
    Accrual,
    AccrualSource,
    Balance,
    EntryKind,
    Hold,
    HoldStatus,
    check_accrual,
    check_currency,
    check_holder,
    check_points,
    check_references,
)
from services.accounts.metrics import LedgerMetrics

Context = grpc.aio.ServicerContext[Any, Any]

_SOURCES = {
    pb.ACCRUAL_SOURCE_RECEIPT: AccrualSource.RECEIPT,
    pb.ACCRUAL_SOURCE_CAMPAIGN: AccrualSource.CAMPAIGN,
    pb.ACCRUAL_SOURCE_STAFF: AccrualSource.STAFF,
    pb.ACCRUAL_SOURCE_MASS_JOB: AccrualSource.MASS_JOB,
}
_ENTRY_KINDS = {
    EntryKind.ACCRUAL: pb.ENTRY_KIND_ACCRUAL,
    EntryKind.REDEMPTION: pb.ENTRY_KIND_REDEMPTION,
    EntryKind.EXPIRY: pb.ENTRY_KIND_EXPIRY,
    EntryKind.REVERSAL: pb.ENTRY_KIND_REVERSAL,
}


def balance_to_proto(balance: Balance) -> pb.Balance:
    return pb.Balance(
        holder_id=balance.holder_id,
        currency=balance.currency,
        active=balance.active,
        pending=balance.pending,
        held=balance.held,
        available=balance.available,
        negative=balance.negative,
    )


def entry_to_proto(entry: store.EntryRow, currency: str) -> pb.Entry:
    return pb.Entry(
        entry_id=entry.entry_id,
        kind=_ENTRY_KINDS[EntryKind(entry.kind)],
        amount=entry.amount,
        currency=currency,
        source_ref=entry.source_ref,
        reason=entry.reason,
        create_time=to_timestamp(entry.created_at),
    )


_HOLD_STATUS = {
    HoldStatus.ACTIVE: pb.HOLD_STATUS_ACTIVE,
    HoldStatus.CAPTURED: pb.HOLD_STATUS_CAPTURED,
    HoldStatus.RELEASED: pb.HOLD_STATUS_RELEASED,
}
DEFAULT_HOLD_SECONDS = 900


def hold_to_proto(hold: Hold, balance: Balance) -> pb.Hold:
    return pb.Hold(
        hold_id=hold.hold_id,
        holder_id=balance.holder_id,
        currency=balance.currency,
        amount=hold.amount,
        status=_HOLD_STATUS[hold.status],
        expire_time=to_timestamp(hold.expires_at),
        captured=hold.captured,
    )


def _require_hold_id(hold_id: str, violations: Violations) -> None:
    violations.check(bool(hold_id), "hold_id", "required")
    violations.check_length(hold_id, "hold_id", 36)


class AccountsApi(pb_grpc.AccountsServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        default_currency: str,
        metrics: LedgerMetrics,
    ) -> None:
        self._metrics = metrics
        self._sessions = sessions
        self._idempotent = IdempotentCalls(sessions, store.idempotency_keys, relay.notify)
        self._default_currency = default_currency

    def _currency(self, requested: str) -> str:
        currency = requested or self._default_currency
        violations = Violations()
        check_currency(currency, violations)
        violations.raise_if_any()
        return currency

    async def AccruePoints(self, request: pb.AccruePointsRequest, context: Context) -> pb.AccruePointsResponse:
        violations = Violations()
        source = _SOURCES.get(request.source)
        violations.check(source is not None, "source", "required: RECEIPT, CAMPAIGN, STAFF or MASS_JOB")
        activate_at = timestamp_field(request, "activate_time", violations) or utcnow()
        accrual = Accrual(
            holder_id=request.holder_id,
            currency=request.currency or self._default_currency,
            amount=request.amount,
            source=source or AccrualSource.RECEIPT,
            source_ref=request.source_ref,
            reason=request.reason,
            activate_at=activate_at,
            expire_at=timestamp_field(request, "expire_time", violations),
        )
        check_accrual(accrual, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.AccruePointsResponse:
            result = await service.accrue_points(session, accrual)
            return pb.AccruePointsResponse(
                entry=entry_to_proto(result.entry, accrual.currency), balance=balance_to_proto(result.balance)
            )

        return await self._idempotent.run(
            "AccruePoints",
            request,
            pb.AccruePointsResponse,
            work,
            committed=lambda response: self._metrics.points_accrued.labels(response.entry.currency).inc(
                response.entry.amount
            ),
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.GetBalanceResponse:
        currency = self._currency(request.currency)
        violations = Violations()
        violations.check(bool(request.holder_id), "holder_id", "required")
        violations.raise_if_any()
        async with self._sessions() as session:
            balance = await service.get_balance(session, request.holder_id, currency)
        return pb.GetBalanceResponse(balance=balance_to_proto(balance))

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Context) -> pb.ListEntriesResponse:
        currency = self._currency(request.currency)
        violations = Violations()
        violations.check(bool(request.holder_id), "holder_id", "required")
        size = page_size(request.page_size, violations)
        after = Cursor.decode(request.page_token, scope=f"{request.holder_id}/{currency}", violations=violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            page = await service.list_entries(session, request.holder_id, currency, size, after)
        return pb.ListEntriesResponse(
            entries=[entry_to_proto(entry, currency) for entry in page.entries],
            next_page_token=page.next_cursor.encode() if page.next_cursor else "",
        )

    async def PlaceHold(self, request: pb.PlaceHoldRequest, context: Context) -> pb.PlaceHoldResponse:
        violations = Violations()
        currency = request.currency or self._default_currency
        check_holder(request.holder_id, violations)
        check_currency(currency, violations)
        check_points(request.amount, violations)
        check_references(request.source_ref, "", violations)
        violations.check(
            0 <= request.ttl_seconds <= MAX_HOLD_SECONDS, "ttl_seconds", f"between 0 and {MAX_HOLD_SECONDS}"
        )
        violations.raise_if_any()
        ttl = timedelta(seconds=request.ttl_seconds or DEFAULT_HOLD_SECONDS)

        async def work(session: AsyncSession) -> pb.PlaceHoldResponse:
            placed = await service.place_hold(
                session, request.holder_id, currency, request.amount, ttl, request.source_ref
            )
            return pb.PlaceHoldResponse(
                hold=hold_to_proto(placed.hold, placed.balance), balance=balance_to_proto(placed.balance)
            )

        return await self._idempotent.run("PlaceHold", request, pb.PlaceHoldResponse, work)

    async def CaptureHold(self, request: pb.CaptureHoldRequest, context: Context) -> pb.CaptureHoldResponse:
        violations = Violations()
        _require_hold_id(request.hold_id, violations)
        violations.check(request.amount >= 0, "amount", "must not be negative (0 captures the whole hold)")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.CaptureHoldResponse:
            spent = await service.capture_hold(session, request.hold_id, request.amount)
            return pb.CaptureHoldResponse(
                entry=entry_to_proto(spent.entry, spent.balance.currency), balance=balance_to_proto(spent.balance)
            )

        return await self._idempotent.run(
            "CaptureHold", request, pb.CaptureHoldResponse, work, committed=self._count_redemption
        )

    async def ReleaseHold(self, request: pb.ReleaseHoldRequest, context: Context) -> pb.ReleaseHoldResponse:
        violations = Violations()
        _require_hold_id(request.hold_id, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.ReleaseHoldResponse:
            released = await service.release_hold(session, request.hold_id)
            return pb.ReleaseHoldResponse(
                hold=hold_to_proto(released.hold, released.balance), balance=balance_to_proto(released.balance)
            )

        return await self._idempotent.run("ReleaseHold", request, pb.ReleaseHoldResponse, work)

    async def RedeemPoints(self, request: pb.RedeemPointsRequest, context: Context) -> pb.RedeemPointsResponse:
        violations = Violations()
        currency = request.currency or self._default_currency
        check_holder(request.holder_id, violations)
        check_currency(currency, violations)
        check_points(request.amount, violations)
        check_references(request.source_ref, request.reason, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.RedeemPointsResponse:
            spent = await service.redeem_points(
                session, request.holder_id, currency, request.amount, request.source_ref, request.reason
            )
            return pb.RedeemPointsResponse(
                entry=entry_to_proto(spent.entry, currency), balance=balance_to_proto(spent.balance)
            )

        return await self._idempotent.run(
            "RedeemPoints", request, pb.RedeemPointsResponse, work, committed=self._count_redemption
        )

    def _count_redemption(self, response: pb.CaptureHoldResponse | pb.RedeemPointsResponse) -> None:
        self._metrics.points_redeemed.labels(response.entry.currency).inc(-response.entry.amount)

    async def ReverseOperation(
        self, request: pb.ReverseOperationRequest, context: Context
    ) -> pb.ReverseOperationResponse:
        violations = Violations()
        violations.check(bool(request.entry_id), "entry_id", "required")
        violations.check_length(request.entry_id, "entry_id", 36)
        violations.check(request.amount >= 0, "amount", "must not be negative (0 undoes all that is left)")
        check_references(request.source_ref, "", violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.ReverseOperationResponse:
            undone = await service.reverse_entry(session, request.entry_id, request.amount, request.source_ref)
            return pb.ReverseOperationResponse(
                entry=entry_to_proto(undone.entry, undone.balance.currency), balance=balance_to_proto(undone.balance)
            )

        return await self._idempotent.run("ReverseOperation", request, pb.ReverseOperationResponse, work)
