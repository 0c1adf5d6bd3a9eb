"""Channels to peer services, opened lazily with tracing and a retry policy."""

from __future__ import annotations

import json

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from loyalty.runtime.settings import Settings

# Every mutating RPC in the suite is idempotent by its request id, so a call that
# never reached a peer (UNAVAILABLE) is safe to try again.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class Channels:
    """One shared channel per peer service for the life of the calling service."""

    def __init__(self, settings: Settings, tracer_provider: TracerProvider) -> None:
        self._settings = settings
        self._tracer_provider = tracer_provider
        self._open: dict[str, grpc.aio.Channel] = {}

    def get(self, service: str) -> grpc.aio.Channel:
        channel = self._open.get(service)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                self._settings.address(service),
                options=[
                    ("grpc.service_config", _SERVICE_CONFIG),
                    ("grpc.enable_retries", 1),
                    ("grpc.keepalive_time_ms", 30_000),
                    # A restarted peer is back within seconds; the default backoff
                    # (growing to two minutes) would keep calls failing long after.
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 2_000),
                ],
                interceptors=aio_client_interceptors(tracer_provider=self._tracer_provider),  # type: ignore[no-untyped-call]
            )
            self._open[service] = channel
        return channel

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close(grace=None)
        self._open.clear()
