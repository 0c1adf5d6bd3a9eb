"""Statements for a period and the liability report, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.runtime import db
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.paging import Cursor
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.accounts import service
from services.accounts.domain import Accrual, AccrualSource
from tests import infra
from tests.integration.test_accounts_store import accounts_stub

JANUARY = datetime(2031, 1, 1, tzinfo=UTC)
FEBRUARY = datetime(2031, 2, 1, tzinfo=UTC)
DAY = timedelta(days=1)


async def accrue_at(
    sessions: async_sessionmaker[AsyncSession],
    moment: datetime,
    amount: int,
    holder: str = "m-1",
    currency: str = "BONUS",
    activate_in: timedelta = timedelta(0),
    expire_in: timedelta | None = None,
) -> str:
    accrual = Accrual(
        holder,
        currency,
        amount,
        AccrualSource.RECEIPT,
        f"r:{amount}",
        "",
        moment + activate_in,
        moment + expire_in if expire_in else None,
    )
    with mock.patch.object(service, "utcnow", lambda: moment):
        async with sessions() as session, session.begin():
            return (await service.accrue_points(session, accrual)).entry.entry_id


async def redeem_at(sessions: async_sessionmaker[AsyncSession], moment: datetime, amount: int) -> None:
    with mock.patch.object(service, "utcnow", lambda: moment):
        async with sessions() as session, session.begin():
            await service.redeem_points(session, "m-1", "BONUS", amount, "pay", "")


async def test_a_statement_opens_where_the_last_closed_and_pages_through_its_period(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        await accrue_at(sessions, JANUARY - DAY, 1000)
        for day in range(5):
            await accrue_at(sessions, JANUARY + day * DAY, 10 * (day + 1))
        await redeem_at(sessions, JANUARY + 10 * DAY, 300)
        await accrue_at(sessions, FEBRUARY, 7)

        listed = []
        after: Cursor | None = None
        while True:
            async with sessions() as session:
                statement = await service.get_statement(session, "m-1", "BONUS", JANUARY, FEBRUARY, 4, after)
            listed.extend(statement.entries)
            assert (statement.opening, statement.credits, statement.debits) == (1000, 150, -300)
            assert statement.closing == 850
            if (after := statement.next_cursor) is None:
                break
        assert [entry.amount for entry in listed] == [10, 20, 30, 40, 50, -300], "oldest first, each once"

        async with sessions() as session:
            february = await service.get_statement(session, "m-1", "BONUS", FEBRUARY, FEBRUARY + DAY, 50, None)
        assert (february.opening, february.closing) == (850, 857), "a period opens where the last one closed"


async def test_the_liability_report_counts_points_owed_and_what_expires_soon(database_url: str) -> None:
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        now = utcnow()
        await accrue_at(sessions, now - DAY, 100, expire_in=DAY * 11)  # expires in 10 days
        await accrue_at(sessions, now - DAY, 200, expire_in=DAY * 61)  # in 60 days
        await accrue_at(sessions, now - DAY, 400, holder="m-2")  # never
        await accrue_at(sessions, now - DAY, 50, holder="m-2", activate_in=DAY * 15, expire_in=DAY * 40)
        await accrue_at(sessions, now - DAY * 9, 999, expire_in=DAY * 2)  # already expired
        earned = await accrue_at(sessions, now - DAY, 80, holder="m-3", currency="MILES")
        with mock.patch.object(service, "utcnow", lambda: now - DAY):
            async with sessions() as session, session.begin():
                await service.redeem_points(session, "m-3", "MILES", 80, "pay", "")
                await service.reverse_entry(session, earned, 0, "return")
        async with sessions() as session:
            _as_of, lines = await service.liability_report(session)
        by_currency = {line.currency: line for line in lines}
        bonus, miles = by_currency["BONUS"], by_currency["MILES"]
        assert (bonus.active, bonus.pending, bonus.negative) == (700, 50, 0)
        assert (bonus.expiring_30_days, bonus.expiring_90_days) == (100, 350)
        assert (miles.active, miles.negative) == (0, 80)


async def test_a_statement_needs_a_period_and_its_token_fits_only_that_period(
    tmp_path: Path, database_url: str
) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetStatement(pb.GetStatementRequest(holder_id="m-1", end_time=to_timestamp(JANUARY)))
        remote = read_remote_error(refused.value)
        assert {violation.field for violation in remote.violations} == {"start_time"}
        for index in range(3):
            await stub.AccruePoints(
                pb.AccruePointsRequest(
                    request_id=f"a{index}", holder_id="m-1", amount=5, source=pb.ACCRUAL_SOURCE_RECEIPT
                )
            )
        start, end = to_timestamp(utcnow() - DAY), to_timestamp(utcnow() + DAY)
        first = await stub.GetStatement(
            pb.GetStatementRequest(holder_id="m-1", start_time=start, end_time=end, page_size=2)
        )
        assert (len(first.entries), first.closing_balance) == (2, 15)
        other = Timestamp()
        other.FromDatetime(utcnow() + 2 * DAY)
        with pytest.raises(grpc.aio.AioRpcError) as mismatched:
            await stub.GetStatement(
                pb.GetStatementRequest(
                    holder_id="m-1", start_time=start, end_time=other, page_token=first.next_page_token
                )
            )
        assert {v.field for v in read_remote_error(mismatched.value).violations} == {"page_token"}
        report = await stub.GetLiabilityReport(pb.GetLiabilityReportRequest())
        assert [(line.currency, line.active) for line in report.currencies] == [("BONUS", 15)]


async def test_the_expiry_forecast_sums_outstanding_lots_by_month_currency_and_partner(database_url: str) -> None:
    """As of 15 January 2031: what is left of each lot, pending ones included, by the UTC
    month of its last spendable instant; a lot already expired, one that never expires and
    one past the range are not in it."""
    now = datetime(2031, 1, 15, 12, tzinfo=UTC)
    async with infra.migrated_engine("accounts", database_url) as engine:
        sessions = db.create_session_factory(engine)
        start = now - DAY * 20
        await accrue_at(sessions, start, 100, expire_in=datetime(2031, 1, 31, 23, tzinfo=UTC) - start)
        await accrue_at(sessions, start, 50, expire_in=FEBRUARY - start)  # "at the end of January"
        await accrue_at(sessions, start, 30, activate_in=DAY * 30, expire_in=datetime(2031, 3, 5, tzinfo=UTC) - start)
        await accrue_at(sessions, start, 20, expire_in=datetime(2031, 1, 10, tzinfo=UTC) - start)  # expired
        await accrue_at(sessions, start, 10)  # never expires
        await accrue_at(sessions, start, 5, expire_in=datetime(2032, 1, 2, tzinfo=UTC) - start)  # past the range
        await accrue_at(sessions, start, 40, holder="m-2", currency="MILES", expire_in=DAY * 25)  # 29 January
        partner = Accrual(
            "m-2", "BONUS", 70, AccrualSource.RECEIPT, "p", "", start, datetime(2031, 2, 10, tzinfo=UTC), partner_id="P"
        )
        with mock.patch.object(service, "utcnow", lambda: start):
            async with sessions() as session, session.begin():
                await service.accrue_points(session, partner)
        await redeem_at(sessions, now, 60)  # soonest-expiring first: 60 of January's 100
        with mock.patch.object(service, "utcnow", lambda: now):
            async with sessions() as session:
                as_of, lines = await service.expiry_forecast(session, JANUARY.date(), 12)
                _, longer = await service.expiry_forecast(session, FEBRUARY.date(), 12)
        assert as_of == now
        assert [(line.month.isoformat()[:7], line.currency, line.partner_id, line.points) for line in lines] == [
            ("2031-01", "BONUS", "", 40 + 50),
            ("2031-01", "MILES", "", 40),
            ("2031-02", "BONUS", "P", 70),
            ("2031-03", "BONUS", "", 30),
        ]
        assert [(line.month.isoformat()[:7], line.points) for line in longer][-1] == ("2032-01", 5)


async def test_the_expiry_forecast_over_grpc_takes_a_month_range(tmp_path: Path, database_url: str) -> None:
    async with accounts_stub(tmp_path, database_url) as stub:
        expire = utcnow() + DAY * 100
        await stub.AccruePoints(
            pb.AccruePointsRequest(
                request_id="a",
                holder_id="m-1",
                amount=25,
                source=pb.ACCRUAL_SOURCE_RECEIPT,
                expire_time=to_timestamp(expire),
            )
        )
        forecast = await stub.GetExpiryForecast(pb.GetExpiryForecastRequest(months=6))
        assert [(line.month, line.currency, line.partner_id, line.points) for line in forecast.lines] == [
            (expire.strftime("%Y-%m"), "BONUS", "", 25)
        ]
        later = pb.GetExpiryForecastRequest(first_month=(expire + DAY * 31).strftime("%Y-%m"))
        assert list((await stub.GetExpiryForecast(later)).lines) == []
        for bad, field in (
            (pb.GetExpiryForecastRequest(first_month="2031-13"), "first_month"),
            (pb.GetExpiryForecastRequest(first_month="January"), "first_month"),
            (pb.GetExpiryForecastRequest(months=121), "months"),
            (pb.GetExpiryForecastRequest(months=-1), "months"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetExpiryForecast(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert {violation.field for violation in read_remote_error(refused.value).violations} == {field}
