"""What the ledger counts: points in and out, and what is outstanding."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class LedgerMetrics:
    points_accrued: Counter
    points_redeemed: Counter
    points_outstanding: Gauge
    points_expired: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LedgerMetrics:
        return cls(
            points_accrued=Counter(
                "loyalty_points_accrued",
                "Points credited, in the currency's smallest unit.",
                ["currency"],
                registry=registry,
            ),
            points_redeemed=Counter(
                "loyalty_points_redeemed",
                "Points spent (captured holds and direct redemptions), in the currency's smallest unit.",
                ["currency"],
                registry=registry,
            ),
            points_expired=Counter(
                "loyalty_points_expired",
                "Points written off by the expiry job, in the currency's smallest unit.",
                ["currency"],
                registry=registry,
            ),
            points_outstanding=Gauge(
                "loyalty_points_outstanding",
                "Points credited and neither spent nor expired (active and pending): the program's "
                "liability, as of the last run of the outstanding_points job.",
                ["currency"],
                registry=registry,
            ),
        )
