"""Wiring of the accounts (points ledger) service."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from loyalty.accounts.v1 import accounts_service_pb2, accounts_service_pb2_grpc
from loyalty.runtime.server import ServiceContext, ServiceDefinition
from loyalty.runtime.settings import PointCurrencyConfig
from services.accounts import store
from services.accounts.api import AccountsApi
from services.accounts.domain import (
    AccrualLimits,
    CurrencyRegistry,
    ExpiryRounding,
    LimitPolicy,
    MoneyRounding,
    PointCurrency,
)
from services.accounts.jobs import observe_outstanding_points, run_expiry, run_mass_operations
from services.accounts.metrics import LedgerMetrics

# How often a replica looks for started mass operations: a started job waits at most this long.
MASS_POLL_SECONDS = 1.0


def currency_registry(configured: dict[str, PointCurrencyConfig]) -> CurrencyRegistry:
    return CurrencyRegistry(
        {
            code: PointCurrency(
                code=code,
                name=config.name or code,
                scale=config.scale,
                money_numerator=config.money_per_unit_numerator,
                money_denominator=config.money_per_unit_denominator,
                lifetime_days=config.lifetime_days,
                expiry_rounding=ExpiryRounding(config.expiry_rounding),
                rounding=MoneyRounding(config.rounding),
                activation_delay_days=config.activation_delay_days,
                limits=AccrualLimits(
                    config.max_accrual_per_receipt, config.max_accrual_per_day, LimitPolicy(config.accrual_limit_policy)
                ),
            )
            for code, config in configured.items()
        }
    )


async def wire(context: ServiceContext, server: grpc.aio.Server) -> None:
    relay = context.start_outbox_relay(store.outbox)
    metrics = LedgerMetrics.create(context.metrics.registry)
    context.run_in_background(
        observe_outstanding_points(
            context.sessions, metrics, context.metrics.job_runs, context.settings.gauge_refresh_seconds
        ),
        "outstanding-points",
    )
    context.run_in_background(
        run_expiry(
            context.sessions,
            metrics,
            context.metrics.job_runs,
            relay,
            timedelta(days=context.settings.expiry_warning_days),
            context.settings.expiry_interval_seconds,
        ),
        "expire-lots",
    )
    currencies = currency_registry(context.settings.point_currencies)
    context.run_in_background(
        run_mass_operations(context.sessions, context.metrics.job_runs, relay, MASS_POLL_SECONDS, currencies),
        "mass-operations",
    )
    api = AccountsApi(context.sessions, relay, context.settings.default_point_currency, metrics, currencies)
    accounts_service_pb2_grpc.add_AccountsServiceServicer_to_server(api, server)


DEFINITION = ServiceDefinition(
    name="accounts",
    grpc_service_names=[accounts_service_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name],
    metadata=store.Base.metadata,
    migrations_dir=Path(__file__).parent / "migrations",
    wire=wire,
)
