"""AccountsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.accounts.v1 import accounts_service_pb2_grpc as pb_grpc
from loyalty.runtime.errors import Violations
from loyalty.runtime.idempotency import IdempotentCalls
from loyalty.runtime.outbox import OutboxRelay
from loyalty.runtime.paging import Cursor, page_size
from loyalty.runtime.timeutil import timestamp_field, to_timestamp, utcnow
from services.accounts import service, store
from services.accounts.domain import Accrual, AccrualSource, Balance, EntryKind, check_accrual, check_currency

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
}


def balance_to_proto(balance: Balance) -> pb.Balance:
    return pb.Balance(
        holder_id=balance.holder_id,
        currency=balance.currency,
        active=balance.active,
        pending=balance.pending,
        held=balance.held,
        available=balance.available,
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


class AccountsApi(pb_grpc.AccountsServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        default_currency: str,
        registry: CollectorRegistry,
    ) -> None:
        self._points_accrued = Counter(
            "loyalty_points_accrued",
            "Points credited, in the currency's smallest unit.",
            ["currency"],
            registry=registry,
        )
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
            committed=lambda response: self._points_accrued.labels(response.entry.currency).inc(response.entry.amount),
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
