"""AccountsService over gRPC: proto in, use case, proto out."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
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
    MAX_HOLDER_ID_LENGTH,
    MAX_LIFETIME_DAYS,
    Accrual,
    AccrualSource,
    Adjustment,
    Balance,
    CurrencyRegistry,
    EntryKind,
    ExpiryRounding,
    Hold,
    HoldStatus,
    LotRestriction,
    MassOperationKind,
    MassOperationStatus,
    MoneyRounding,
    PointCurrency,
    SpendContext,
    check_accrual,
    check_adjustment,
    check_block,
    check_currency,
    check_holder,
    check_mass_items,
    check_points,
    check_references,
    check_staff,
    check_transfer_parties,
    expiry_of,
    forecast_range,
)
from services.accounts.metrics import LedgerMetrics

Context = grpc.aio.ServicerContext[Any, Any]

_MASS_KINDS = {
    pb.MASS_OPERATION_KIND_ACCRUAL: MassOperationKind.ACCRUAL,
    pb.MASS_OPERATION_KIND_DEDUCTION: MassOperationKind.DEDUCTION,
}
_MASS_STATUSES = {
    MassOperationStatus.DRAFT.value: pb.MASS_OPERATION_STATUS_DRAFT,
    MassOperationStatus.RUNNING.value: pb.MASS_OPERATION_STATUS_RUNNING,
    MassOperationStatus.DONE.value: pb.MASS_OPERATION_STATUS_DONE,
    MassOperationStatus.CANCELLED.value: pb.MASS_OPERATION_STATUS_CANCELLED,
}


def mass_operation_to_proto(view: service.MassOperationView) -> pb.MassOperation:
    operation = view.operation
    return pb.MassOperation(
        operation_id=operation.operation_id,
        kind=next(key for key, kind in _MASS_KINDS.items() if kind.value == operation.kind),
        currency=operation.currency,
        actor=operation.actor,
        reason=operation.reason,
        status=_MASS_STATUSES[operation.status],
        total=operation.total,
        applied=view.applied,
        failed=view.failed,
        cancelled=view.cancelled,
        capped_points=view.capped,
        failures=[
            pb.MassOperationFailure(index=item.item_index, holder_id=item.holder_id, reason=item.failure or "")
            for item in view.failures
        ],
    )


def _mass_items(items: Any, violations: Violations) -> list[tuple[str, int]]:
    pairs = [(item.holder_id, item.amount) for item in items]
    check_mass_items(pairs, violations)
    return pairs


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
    EntryKind.ADJUSTMENT: pb.ENTRY_KIND_ADJUSTMENT,
    EntryKind.TRANSFER: pb.ENTRY_KIND_TRANSFER,
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
        blocked=balance.blocked,
        next_expiries=[
            pb.ExpiryDay(day=expiry.day.isoformat(), amount=expiry.amount) for expiry in balance.next_expiries
        ],
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


_EXPIRY_ROUNDING = {
    pb.EXPIRY_ROUNDING_NONE: ExpiryRounding.NONE,
    pb.EXPIRY_ROUNDING_MONTH_END: ExpiryRounding.MONTH_END,
    pb.EXPIRY_ROUNDING_YEAR_END: ExpiryRounding.YEAR_END,
}
_MONEY_ROUNDING = {
    MoneyRounding.FLOOR: pb.MONEY_ROUNDING_FLOOR,
    MoneyRounding.HALF_UP: pb.MONEY_ROUNDING_HALF_UP,
    MoneyRounding.CEILING: pb.MONEY_ROUNDING_CEILING,
}


def currency_to_proto(currency: PointCurrency) -> pb.PointCurrency:
    return pb.PointCurrency(
        code=currency.code,
        name=currency.name,
        scale=currency.scale,
        money_per_unit_numerator=currency.money_numerator,
        money_per_unit_denominator=currency.money_denominator,
        lifetime_days=currency.lifetime_days or 0,
        expiry_rounding={v: k for k, v in _EXPIRY_ROUNDING.items()}[currency.expiry_rounding],
        money_rounding=_MONEY_ROUNDING[currency.rounding],
        activation_delay_days=currency.activation_delay_days,
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


def _period(
    request: pb.GetStatementRequest | pb.GetPartnerSettlementRequest, violations: Violations
) -> tuple[datetime | None, datetime | None]:
    """A required [start_time, end_time) period of a report request."""
    start = timestamp_field(request, "start_time", violations)
    end = timestamp_field(request, "end_time", violations)
    violations.check(request.HasField("start_time"), "start_time", "required")
    violations.check(request.HasField("end_time"), "end_time", "required")
    if start is not None and end is not None:
        violations.check(end > start, "end_time", "must be after start_time")
    return start, end


class AccountsApi(pb_grpc.AccountsServiceServicer):
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relay: OutboxRelay,
        default_currency: str,
        metrics: LedgerMetrics,
        currencies: CurrencyRegistry | None = None,
    ) -> None:
        self._currencies = currencies or CurrencyRegistry({})
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
        currency = request.currency or self._default_currency
        activate_at = timestamp_field(request, "activate_time", violations) or self._currencies.get(
            currency
        ).activation(utcnow())
        violations.check(
            0 <= request.lifetime_days <= MAX_LIFETIME_DAYS, "lifetime_days", f"between 0 and {MAX_LIFETIME_DAYS}"
        )
        violations.check(
            request.expiry_rounding == pb.EXPIRY_ROUNDING_UNSPECIFIED or request.expiry_rounding in _EXPIRY_ROUNDING,
            "expiry_rounding",
            "NONE, MONTH_END or YEAR_END",
        )
        expire_at = expiry_of(
            activate_at,
            self._currencies.get(currency),
            fixed=timestamp_field(request, "expire_time", violations),
            lifetime_days=min(max(request.lifetime_days, 0), MAX_LIFETIME_DAYS),
            rounding=_EXPIRY_ROUNDING.get(request.expiry_rounding),
        )
        accrual = Accrual(
            holder_id=request.holder_id,
            currency=currency,
            amount=request.amount,
            source=source or AccrualSource.RECEIPT,
            source_ref=request.source_ref,
            reason=request.reason,
            activate_at=activate_at,
            expire_at=expire_at,
            member_id=request.member_id,
            restriction=LotRestriction(frozenset(request.store_ids), request.max_receipt_share_bp),
            partner_id=request.partner_id,
        )
        check_accrual(accrual, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.AccruePointsResponse:
            result = await service.accrue_points(session, accrual, self._currencies.get(accrual.currency).limits)
            return pb.AccruePointsResponse(
                entry=entry_to_proto(result.entry, accrual.currency),
                balance=balance_to_proto(result.balance),
                capped=result.capped,
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
        self._check_receipt(request, violations)
        violations.check(
            0 <= request.ttl_seconds <= MAX_HOLD_SECONDS, "ttl_seconds", f"between 0 and {MAX_HOLD_SECONDS}"
        )
        violations.raise_if_any()
        ttl = timedelta(seconds=request.ttl_seconds or DEFAULT_HOLD_SECONDS)

        async def work(session: AsyncSession) -> pb.PlaceHoldResponse:
            placed = await service.place_hold(
                session,
                request.holder_id,
                currency,
                request.amount,
                ttl,
                request.source_ref,
                request.member_id,
                SpendContext(
                    self._currencies.get(currency), request.store_id, request.receipt_amount, request.partner_id
                ),
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
            spent = await service.capture_hold(session, request.hold_id, request.amount, self._currencies)
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
        self._check_receipt(request, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.RedeemPointsResponse:
            spent = await service.redeem_points(
                session,
                request.holder_id,
                currency,
                request.amount,
                request.source_ref,
                request.reason,
                request.member_id,
                SpendContext(
                    self._currencies.get(currency), request.store_id, request.receipt_amount, request.partner_id
                ),
            )
            return pb.RedeemPointsResponse(
                entry=entry_to_proto(spent.entry, currency), balance=balance_to_proto(spent.balance)
            )

        return await self._idempotent.run(
            "RedeemPoints", request, pb.RedeemPointsResponse, work, committed=self._count_redemption
        )

    @staticmethod
    def _check_receipt(request: pb.PlaceHoldRequest | pb.RedeemPointsRequest, violations: Violations) -> None:
        violations.check_length(request.member_id, "member_id", MAX_HOLDER_ID_LENGTH)
        violations.check_length(request.store_id, "store_id", MAX_HOLDER_ID_LENGTH)
        violations.check_length(request.partner_id, "partner_id", MAX_HOLDER_ID_LENGTH)
        violations.check(request.receipt_amount >= 0, "receipt_amount", "must not be negative")

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

    async def AdjustPoints(self, request: pb.AdjustPointsRequest, context: Context) -> pb.AdjustPointsResponse:
        violations = Violations()
        now = utcnow()
        currency = request.currency or self._default_currency
        adjustment = Adjustment(
            holder_id=request.holder_id,
            currency=currency,
            amount=request.amount,
            actor=request.actor,
            reason=request.reason,
            member_id=request.member_id,
            source_ref=request.source_ref,
            expire_at=timestamp_field(request, "expire_time", violations),
        )
        check_adjustment(adjustment, now, violations)
        violations.raise_if_any()
        if adjustment.amount > 0 and adjustment.expire_at is None:
            adjustment = replace(adjustment, expire_at=expiry_of(now, self._currencies.get(currency)))

        async def work(session: AsyncSession) -> pb.AdjustPointsResponse:
            adjusted = await service.adjust_points(session, adjustment)
            return pb.AdjustPointsResponse(
                entry=entry_to_proto(adjusted.entry, adjustment.currency), balance=balance_to_proto(adjusted.balance)
            )

        return await self._idempotent.run("AdjustPoints", request, pb.AdjustPointsResponse, work)

    async def ListPointCurrencies(
        self, request: pb.ListPointCurrenciesRequest, context: Context
    ) -> pb.ListPointCurrenciesResponse:
        codes = sorted({*self._currencies.currencies, self._default_currency})
        return pb.ListPointCurrenciesResponse(
            currencies=[currency_to_proto(self._currencies.get(code)) for code in codes]
        )

    async def TransferPoints(self, request: pb.TransferPointsRequest, context: Context) -> pb.TransferPointsResponse:
        violations = Violations()
        currency = request.currency or self._default_currency
        check_transfer_parties(request.from_holder_id, request.to_holder_id, violations)
        check_currency(currency, violations)
        check_points(request.amount, violations)
        check_references("", request.reason, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.TransferPointsResponse:
            moved = await service.transfer_points(
                session, request.from_holder_id, request.to_holder_id, currency, request.amount, request.reason
            )
            return pb.TransferPointsResponse(
                debit_entry=entry_to_proto(moved.debit, currency) if moved.debit else None,
                credit_entries=[entry_to_proto(entry, currency) for entry in moved.credits],
                from_balance=balance_to_proto(moved.from_balance),
                to_balance=balance_to_proto(moved.to_balance),
            )

        return await self._idempotent.run("TransferPoints", request, pb.TransferPointsResponse, work)

    async def MergeAccounts(self, request: pb.MergeAccountsRequest, context: Context) -> pb.MergeAccountsResponse:
        violations = Violations()
        check_transfer_parties(request.from_holder_id, request.to_holder_id, violations)
        check_references("", request.reason, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.MergeAccountsResponse:
            merged = await service.merge_accounts(session, request.from_holder_id, request.to_holder_id, request.reason)
            return pb.MergeAccountsResponse(balances=[balance_to_proto(result.to_balance) for result in merged])

        return await self._idempotent.run("MergeAccounts", request, pb.MergeAccountsResponse, work)

    async def GetStatement(self, request: pb.GetStatementRequest, context: Context) -> pb.GetStatementResponse:
        currency = self._currency(request.currency)
        violations = Violations()
        violations.check(bool(request.holder_id), "holder_id", "required")
        start, end = _period(request, violations)
        size = page_size(request.page_size, violations)
        violations.raise_if_any()
        assert start is not None and end is not None
        scope = service.statement_scope(request.holder_id, currency, start, end)
        after = Cursor.decode(request.page_token, scope=scope, violations=violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            statement = await service.get_statement(session, request.holder_id, currency, start, end, size, after)
        return pb.GetStatementResponse(
            opening_balance=statement.opening,
            credits=statement.credits,
            debits=statement.debits,
            closing_balance=statement.closing,
            entries=[entry_to_proto(entry, currency) for entry in statement.entries],
            next_page_token=statement.next_cursor.encode() if statement.next_cursor else "",
        )

    async def GetLiabilityReport(
        self, request: pb.GetLiabilityReportRequest, context: Context
    ) -> pb.GetLiabilityReportResponse:
        async with self._sessions() as session:
            as_of, lines = await service.liability_report(session)
        return pb.GetLiabilityReportResponse(
            as_of_time=to_timestamp(as_of),
            currencies=[
                pb.CurrencyLiability(
                    currency=line.currency,
                    active=line.active,
                    pending=line.pending,
                    negative=line.negative,
                    expiring_30_days=line.expiring_30_days,
                    expiring_90_days=line.expiring_90_days,
                )
                for line in lines
            ],
        )

    async def GetExpiryForecast(
        self, request: pb.GetExpiryForecastRequest, context: Context
    ) -> pb.GetExpiryForecastResponse:
        violations = Violations()
        first, months = forecast_range(request.first_month, request.months, utcnow(), violations)
        violations.raise_if_any()
        async with self._sessions() as session:
            as_of, lines = await service.expiry_forecast(session, first, months)
        return pb.GetExpiryForecastResponse(
            as_of_time=to_timestamp(as_of),
            lines=[
                pb.ExpiryForecastLine(
                    month=line.month.strftime("%Y-%m"),
                    currency=line.currency,
                    partner_id=line.partner_id,
                    points=line.points,
                )
                for line in lines
            ],
        )

    async def GetPartnerSettlement(
        self, request: pb.GetPartnerSettlementRequest, context: Context
    ) -> pb.GetPartnerSettlementResponse:
        violations = Violations()
        start, end = _period(request, violations)
        violations.raise_if_any()
        assert start is not None and end is not None
        async with self._sessions() as session:
            settlements = await service.partner_settlements(session, start, end)
        return pb.GetPartnerSettlementResponse(
            lines=[
                pb.PartnerSettlementLine(
                    issuer_partner_id=line.issuer_partner_id,
                    spender_partner_id=line.spender_partner_id,
                    currency=line.currency,
                    points=line.points,
                    money_amount=self._currencies.get(line.currency).to_money(line.points),
                )
                for line in settlements
            ]
        )

    async def BlockAccount(self, request: pb.BlockAccountRequest, context: Context) -> pb.BlockAccountResponse:
        currency = request.currency or self._default_currency
        violations = Violations()
        check_block(request.holder_id, currency, request.actor, request.reason, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.BlockAccountResponse:
            balance = await service.set_blocked(
                session, request.holder_id, currency, True, request.actor, request.reason
            )
            return pb.BlockAccountResponse(balance=balance_to_proto(balance))

        return await self._idempotent.run("BlockAccount", request, pb.BlockAccountResponse, work)

    async def UnblockAccount(self, request: pb.UnblockAccountRequest, context: Context) -> pb.UnblockAccountResponse:
        currency = request.currency or self._default_currency
        violations = Violations()
        check_block(request.holder_id, currency, request.actor, request.reason, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.UnblockAccountResponse:
            balance = await service.set_blocked(
                session, request.holder_id, currency, False, request.actor, request.reason
            )
            return pb.UnblockAccountResponse(balance=balance_to_proto(balance))

        return await self._idempotent.run("UnblockAccount", request, pb.UnblockAccountResponse, work)

    async def CreateMassOperation(
        self, request: pb.CreateMassOperationRequest, context: Context
    ) -> pb.CreateMassOperationResponse:
        violations = Violations()
        now = utcnow()
        currency = request.currency or self._default_currency
        kind = _MASS_KINDS.get(request.kind)
        violations.check(kind is not None, "kind", "required: accrual or deduction")
        check_currency(currency, violations)
        check_staff(request.actor, request.reason, violations)
        expire_at = timestamp_field(request, "expire_time", violations)
        if expire_at is not None:
            violations.check(kind == MassOperationKind.ACCRUAL, "expire_time", "only an accrual has an expiry")
            violations.check(expire_at > now, "expire_time", "must be in the future")
        items = _mass_items(request.items, violations)
        violations.raise_if_any()
        assert kind is not None
        if kind == MassOperationKind.ACCRUAL and expire_at is None:
            expire_at = expiry_of(now, self._currencies.get(currency))

        async def work(session: AsyncSession) -> pb.CreateMassOperationResponse:
            view = await service.create_mass_operation(
                session, kind, currency, request.actor, request.reason, expire_at, items, request.start
            )
            return pb.CreateMassOperationResponse(operation=mass_operation_to_proto(view))

        return await self._idempotent.run("CreateMassOperation", request, pb.CreateMassOperationResponse, work)

    async def AddMassOperationItems(
        self, request: pb.AddMassOperationItemsRequest, context: Context
    ) -> pb.AddMassOperationItemsResponse:
        violations = Violations()
        violations.check(bool(request.operation_id), "operation_id", "required")
        items = _mass_items(request.items, violations)
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.AddMassOperationItemsResponse:
            view = await service.add_mass_items(session, request.operation_id, items)
            return pb.AddMassOperationItemsResponse(operation=mass_operation_to_proto(view))

        return await self._idempotent.run("AddMassOperationItems", request, pb.AddMassOperationItemsResponse, work)

    async def StartMassOperation(
        self, request: pb.StartMassOperationRequest, context: Context
    ) -> pb.StartMassOperationResponse:
        violations = Violations()
        violations.check(bool(request.operation_id), "operation_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.StartMassOperationResponse:
            view = await service.start_mass_operation(session, request.operation_id)
            return pb.StartMassOperationResponse(operation=mass_operation_to_proto(view))

        return await self._idempotent.run("StartMassOperation", request, pb.StartMassOperationResponse, work)

    async def CancelMassOperation(
        self, request: pb.CancelMassOperationRequest, context: Context
    ) -> pb.CancelMassOperationResponse:
        violations = Violations()
        violations.check(bool(request.operation_id), "operation_id", "required")
        violations.raise_if_any()

        async def work(session: AsyncSession) -> pb.CancelMassOperationResponse:
            view = await service.cancel_mass_operation(session, request.operation_id)
            return pb.CancelMassOperationResponse(operation=mass_operation_to_proto(view))

        return await self._idempotent.run("CancelMassOperation", request, pb.CancelMassOperationResponse, work)

    async def GetMassOperation(
        self, request: pb.GetMassOperationRequest, context: Context
    ) -> pb.GetMassOperationResponse:
        violations = Violations()
        violations.check(bool(request.operation_id), "operation_id", "required")
        violations.raise_if_any()
        async with self._sessions() as session:
            view = await service.mass_operation_view(session, request.operation_id)
        return pb.GetMassOperationResponse(operation=mass_operation_to_proto(view))
