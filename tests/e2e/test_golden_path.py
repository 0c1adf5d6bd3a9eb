"""The golden path through the real gateway over real gRPC, in the embedded shape
(one process, SQLite, in-process bus), plus the error contract at the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.settings import Settings
from services import demo
from tests import infra
from tests.e2e.scenario import golden_path, receipt, set_up_program

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Settings]:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        yield settings


async def test_golden_path_embedded(suite: Settings) -> None:
    await golden_path(suite)


async def test_bad_input_is_rejected_with_the_field_and_nothing_is_written(suite: Settings) -> None:
    async with infra.gateway_channel(suite) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        bad = receipt("0003", 1000)
        bad.lines[0].quantity_milli = -1
        bad.lines[0].price_minor = -5
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=bad))
        error = read_remote_error(invalid.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in error.violations} == {
            "receipt.lines[0].quantity_milli",
            "receipt.lines[0].price_minor",
        }
        assert "Traceback" not in (invalid.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0004")))
        assert "receipt.lines" in [v.field for v in read_remote_error(empty.value).violations]

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await gateway.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(card_number="7700000000016")))
        assert (unknown.value.code(), read_remote_error(unknown.value).reason) == (
            grpc.StatusCode.NOT_FOUND,
            "CARD_NOT_FOUND",
        )

        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await gateway.Identify(pos.IdentifyRequest(identifier=pos.CustomerIdentifier(phone="12ab")))
        assert [v.field for v in read_remote_error(malformed.value).violations] == ["identifier.phone"]

        with pytest.raises(grpc.aio.AioRpcError) as unknown_phone:
            await gateway.CommitCheque(
                pos.CommitChequeRequest(
                    receipt=receipt("0005", 1000), identifier=pos.CustomerIdentifier(phone="+79160000000")
                )
            )
        assert read_remote_error(unknown_phone.value).reason == "MEMBER_NOT_FOUND"

        # None of the rejected receipts was recorded: the same numbers commit normally now.
        accepted = await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0005", 1000)))
        assert accepted.state == pos.CHEQUE_STATE_COMPLETED


async def test_a_receipt_number_reused_with_other_content_is_refused(suite: Settings) -> None:
    program = await set_up_program(suite)
    async with infra.gateway_channel(suite) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        by_card = pos.CustomerIdentifier(card_number=program.card_number)
        await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0100", 10_000), identifier=by_card))
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await gateway.CommitCheque(pos.CommitChequeRequest(receipt=receipt("0100", 99_000), identifier=by_card))
        assert (reused.value.code(), read_remote_error(reused.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "RECEIPT_NUMBER_REUSED",
        )
        identified = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
        assert identified.customer.available_points == 500


async def test_concurrent_commits_of_one_receipt_accrue_once(suite: Settings) -> None:
    program = await set_up_program(suite)
    async with infra.gateway_channel(suite) as channel:
        gateway = pos_grpc.PosServiceStub(channel)
        by_card = pos.CustomerIdentifier(card_number=program.card_number)
        commit = pos.CommitChequeRequest(receipt=receipt("0200", 10_000, 10_000), identifier=by_card)
        answers = await asyncio.gather(*(gateway.CommitCheque(commit) for _ in range(10)))
        assert {answer.points_earned_total for answer in answers} == {1000}
        assert len({answer.commit_time.ToNanoseconds() for answer in answers}) == 1
        identified = await gateway.Identify(pos.IdentifyRequest(identifier=by_card))
        assert identified.customer.available_points == 1000


def readme_block(marker: str) -> str:
    text = README.read_text()
    block = text[text.index(marker) :]
    body = block[block.index("```sh\n") + len("```sh\n") :]
    return body[: body.index("\n```")]


async def test_the_readme_buf_curl_calculation_runs_against_the_embedded_suite(suite: Settings) -> None:
    """A gRPC client not written here, knowing the API only from server reflection, runs
    the README's example as written (only the port and the data directory differ)."""
    card = await demo.seed(suite)
    command = (
        readme_block("<!-- buf-curl-calculation")
        .replace("127.0.0.1:50051", suite.address("gateway"))
        .replace("var/demo-api-key", str(demo.demo_key_file(suite)))
    )
    curl = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=README.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await curl.communicate()
    assert curl.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["calculationId"]
    assert answer["customer"]["cardNumber"] == card
    assert answer["pointsEarnedTotal"] == "2000", "the demo program gives 5% of 400.00 as points"
    assert [line["position"] for line in answer["lines"]] == [1]
