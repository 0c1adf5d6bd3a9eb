"""Configured point currencies through the real accounts service: the registry, default
lifetimes rounded to the end of a month or year, and the return window."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loyalty.accounts.v1 import accounts_service_pb2 as pb
from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceStub
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.timeutil import utcnow
from services.accounts import store
from tests import infra
from tests.integration.test_ledger_adjustments import tables

if TYPE_CHECKING:
    from loyalty.accounts.v1.accounts_service_pb2_grpc import AccountsServiceAsyncStub

CURRENCIES: dict[str, dict[str, object]] = {
    "PROMO": {
        "name": "Promo points",
        "money_per_unit_numerator": 1,
        "money_per_unit_denominator": 2,
        "lifetime_days": 30,
        "expiry_rounding": "month_end",
        "rounding": "half_up",
    },
    "BONUS": {"name": "Bonus points", "scale": 2, "activation_delay_days": 14},
}


@asynccontextmanager
async def configured_stub(
    tmp_path: Path, database_url: str, currencies: dict[str, dict[str, object]] = CURRENCIES
) -> AsyncIterator[AccountsServiceAsyncStub]:
    settings = infra.suite_settings(tmp_path, point_currencies=currencies)
    settings.accounts.database_url = SecretStr(database_url)
    async with (
        infra.running_suite(settings, ("accounts",)),
        grpc.aio.insecure_channel(settings.address("accounts")) as channel,
    ):
        yield AccountsServiceStub(channel)


def accrue(key: str, currency: str, **fields: object) -> pb.AccruePointsRequest:
    return pb.AccruePointsRequest(
        request_id=key,
        holder_id="member-1",
        currency=currency,
        amount=100,
        source=pb.ACCRUAL_SOURCE_CAMPAIGN,
        source_ref=key,
        **fields,  # type: ignore[arg-type]
    )


def end_of_month_after(days: int) -> datetime:
    moment = utcnow() + timedelta(days=days)
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)


async def test_the_registry_lists_each_currency_with_its_policy(tmp_path: Path, database_url: str) -> None:
    async with configured_stub(tmp_path, database_url) as stub:
        listed = (await stub.ListPointCurrencies(pb.ListPointCurrenciesRequest())).currencies
        assert [currency.code for currency in listed] == ["BONUS", "PROMO"]
        bonus, promo = listed
        assert (bonus.scale, bonus.activation_delay_days, bonus.lifetime_days) == (2, 14, 0)
        assert (promo.name, promo.money_per_unit_numerator, promo.money_per_unit_denominator) == ("Promo points", 1, 2)
        assert (promo.lifetime_days, promo.expiry_rounding, promo.money_rounding) == (
            30,
            pb.EXPIRY_ROUNDING_MONTH_END,
            pb.MONEY_ROUNDING_HALF_UP,
        )


async def test_accruals_follow_the_fixed_relative_and_rounded_expiry_policies(
    tmp_path: Path, database_url: str
) -> None:
    async with configured_stub(tmp_path, database_url) as stub, tables(database_url) as sessions:
        december = datetime(utcnow().year + 1, 12, 31, tzinfo=UTC)
        fixed = accrue("fixed", "PROMO")
        fixed.expire_time.FromDatetime(december)
        await stub.AccruePoints(fixed)
        await stub.AccruePoints(accrue("default", "PROMO"))
        await stub.AccruePoints(accrue("relative", "PROMO", lifetime_days=10, expiry_rounding=pb.EXPIRY_ROUNDING_NONE))
        await stub.AccruePoints(accrue("year", "PROMO", lifetime_days=10, expiry_rounding=pb.EXPIRY_ROUNDING_YEAR_END))
        window = await stub.AccruePoints(accrue("window", "BONUS"))
        assert (window.balance.pending, window.balance.available) == (100, 0), "spendable after the return window"

        async with sessions() as session:
            lots = dict((await session.execute(select(store.LotRow.source_ref, store.LotRow.expire_at))).tuples().all())
            activation = await session.scalar(
                select(store.LotRow.activate_at).where(store.LotRow.source_ref == "window")
            )
        assert lots["fixed"] == december, "a fixed date is never moved"
        assert lots["default"] == end_of_month_after(30), "the currency's lifetime, to the end of that month"
        relative = lots["relative"]
        assert relative is not None and abs(relative - (utcnow() + timedelta(days=10))) < timedelta(minutes=1)
        assert lots["year"] == datetime((utcnow() + timedelta(days=10)).year + 1, 1, 1, tzinfo=UTC)
        assert lots["window"] is None, "BONUS has no default lifetime"
        assert activation is not None and abs(activation - (utcnow() + timedelta(days=14))) < timedelta(minutes=1)


async def test_a_lifetime_out_of_range_is_invalid(tmp_path: Path, database_url: str) -> None:
    async with configured_stub(tmp_path, database_url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AccruePoints(accrue("bad", "PROMO", lifetime_days=-1, expiry_rounding=7))
        remote = read_remote_error(refused.value)
        assert remote.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {violation.field for violation in remote.violations} == {"lifetime_days", "expiry_rounding"}
