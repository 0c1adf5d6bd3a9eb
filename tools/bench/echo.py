"""The ceiling: a bare grpc.aio server answering every unary call with its request bytes, in a
process of its own, and the client call measured like a sale. Nothing but Python gRPC on this
machine: no interceptors, no (de)serialisation, no database.

    python -m tools.bench.echo --port 50099      # the server alone
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

import grpc

from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from tools.bench import dataset

METHOD = "/bench.v1.EchoService/Echo"


def payload(lines: int = 20) -> bytes:
    """A CalculateChequeRequest of a `lines`-line receipt: the size a register sends."""
    receipt = receipt_pb2.Receipt(
        store_id=dataset.store_of(0),
        terminal_id="echo-terminal",
        receipt_number="000000001",
        currency_code="RUB",
        lines=[
            receipt_pb2.ReceiptLine(
                position=position,
                sku=dataset.sku_of(position),
                price_minor=dataset.price_of(position),
                quantity_milli=1000,
            )
            for position in range(1, lines + 1)
        ],
    )
    request = pos.CalculateChequeRequest(
        receipt=receipt, identifier=pos.CustomerIdentifier(card_number=dataset.card_of(1))
    )
    return request.SerializeToString()


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.v1.EchoService", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def start_server(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tools.bench.echo", "--port", str(port)])


def echo_call(channel: grpc.aio.Channel, body: bytes) -> Callable[[], Awaitable[bytes]]:
    call = channel.unary_unary(METHOD, None, None)

    async def once() -> bytes:
        answer: bytes = await call(body, timeout=10)
        return answer

    return once


async def wait_ready(channel: grpc.aio.Channel, seconds: float = 30) -> None:
    async with asyncio.timeout(seconds):
        await channel.channel_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
