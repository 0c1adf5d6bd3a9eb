"""What the gateway counts about receipts, beyond the request metrics every server has."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class GatewayMetrics:
    receipts: Counter
    degraded_answers: Counter
    unfinished_receipts: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            receipts=Counter(
                "loyalty_receipts",
                "Receipts by operation (calculate, commit) and outcome: completed, committed (effects "
                "still owed) or rejected.",
                ["operation", "outcome"],
                registry=registry,
            ),
            degraded_answers=Counter(
                "loyalty_degraded_answers",
                "Answers given without something a peer could not provide in time, by what was missing.",
                ["reason"],
                registry=registry,
            ),
            unfinished_receipts=Gauge(
                "loyalty_saga_unfinished_receipts",
                "Committed receipts whose effects are not all applied yet, as of the last resume run.",
                registry=registry,
            ),
        )
