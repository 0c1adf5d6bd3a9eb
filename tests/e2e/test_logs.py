"""Logs are JSON lines carrying the trace id, and never personal data."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.runtime.telemetry import configure_logging
from tests import infra
from tests.e2e.scenario import golden_path

PHONE_DIGITS = "9165551234"  # the phone the golden path registers and identifies by


@pytest.fixture
def json_logs_at_debug() -> Iterator[io.StringIO]:
    """Everything the suite logs, as configured for production but at DEBUG."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    written = io.StringIO()
    configure_logging("DEBUG", "json", stream=written)
    yield written
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_no_log_line_carries_a_phone_and_every_line_is_json(
    tmp_path: Path, json_logs_at_debug: io.StringIO
) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        await golden_path(settings)
        async with infra.gateway_channel(settings) as channel:
            gateway = pos_grpc.PosServiceStub(channel)
            for phone in ("+7 916 555-12-35", "8916555123x"):  # unknown, then malformed
                with pytest.raises(grpc.aio.AioRpcError):
                    await gateway.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(phone=phone)))
    lines = [line for line in json_logs_at_debug.getvalue().splitlines() if line.strip()]
    assert len(lines) > 20, "the suite logged at DEBUG"
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message", "trace_id"} <= record.keys() for record in records)
    assert any(record["trace_id"] for record in records), "logs inside a request carry its trace"
    for line in lines:
        assert PHONE_DIGITS not in line and "916555123" not in line, line
