"""A typed client of the gateway's PosService for cash registers and sales channels.

It keeps one channel for its life, sends the terminal's API key with every call, gives
every call a deadline, and retries what is safe to retry with the very same request — so
the idempotency keys in it (terminal and receipt number, return_id, request_id) make a
retry count once::

    async with PosClient("gateway:50051", api_key="lk_...") as client:
        calculated = await client.calculate(receipt, identifier=CustomerIdentifier(card_number="..."))
        committed = await client.commit(receipt, identifier=..., calculation_id=calculated.calculation_id,
                                        points_paid=calculated.points_to_pay)
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc

Response = TypeVar("Response")

API_KEY_HEADER = "x-api-key"
# Retrying these can never double-count: the gateway answers a repeated request with
# its first answer. INVALID_ARGUMENT, FAILED_PRECONDITION and the like never change.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is repeated; the delay doubles with jitter,
    and a RetryInfo from the server (a rate limit) sets the wait instead."""

    attempts: int = 4
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The wait a RESOURCE_EXHAUSTED answer asks for, if it says."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class ApiKeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds the terminal's API key to every call on the channel."""

    def __init__(self, api_key: str) -> None:
        self._metadata = (API_KEY_HEADER, api_key)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        updated = grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )
        return await continuation(updated, request)


def pos_channel(address: str, api_key: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel to the gateway that authenticates as the terminal; TLS when credentials are given."""
    interceptors: Any = [ApiKeyInterceptor(api_key)]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


class PosClient:
    """PosService with channel reuse, deadlines and safe retries."""

    def __init__(
        self,
        address: str,
        api_key: str,
        timeout_seconds: float = 2.0,
        retry: RetryPolicy = RetryPolicy(),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._channel = pos_channel(address, api_key, credentials)
        self._stub = pos_grpc.PosServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._retry = retry

    async def __aenter__(self) -> PosClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, call: Callable[..., Awaitable[Response]], request: Any) -> Response:
        backoff = self._retry.initial_backoff_seconds
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return await call(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == self._retry.attempts:
                    raise
                asked = retry_delay(error) if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                await asyncio.sleep(asked if asked is not None else backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._retry.max_backoff_seconds)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def identify(self, identifier: pos.CustomerIdentifier) -> pos.Customer:
        response = await self._call(self._stub.Identify, pos.IdentifyRequest(identifier=identifier))
        return response.customer

    async def register(
        self, request_id: str, phone: str, first_name: str = "", email: str = "", card_number: str = ""
    ) -> pos.RegisterCustomerResponse:
        request = pos.RegisterCustomerRequest(
            request_id=request_id, phone=phone, first_name=first_name, email=email, card_number=card_number
        )
        return await self._call(self._stub.RegisterCustomer, request)

    async def calculate(
        self,
        receipt: receipt_pb2.Receipt,
        identifier: pos.CustomerIdentifier | None = None,
        coupon_codes: Sequence[str] = (),
        points_to_pay: int = 0,
    ) -> pos.CalculateChequeResponse:
        request = pos.CalculateChequeRequest(
            receipt=receipt, identifier=identifier, coupon_codes=coupon_codes, points_to_pay=points_to_pay
        )
        return await self._call(self._stub.CalculateCheque, request)

    async def commit(
        self,
        receipt: receipt_pb2.Receipt,
        identifier: pos.CustomerIdentifier | None = None,
        calculation_id: str = "",
        points_paid: int = 0,
    ) -> pos.CommitChequeResponse:
        request = pos.CommitChequeRequest(
            receipt=receipt, identifier=identifier, calculation_id=calculation_id, points_paid=points_paid
        )
        return await self._call(self._stub.CommitCheque, request)

    async def return_cheque(
        self,
        return_id: str,
        original: pos.ReceiptReference,
        lines: Sequence[pos.ReturnLine] = (),
        store_id: str = "",
    ) -> pos.ReturnChequeResponse:
        request = pos.ReturnChequeRequest(return_id=return_id, original=original, lines=lines, store_id=store_id)
        return await self._call(self._stub.ReturnCheque, request)

    async def cancel_calculation(self, request_id: str, calculation_id: str) -> pos.CancelChequeResponse:
        request = pos.CancelChequeRequest(request_id=request_id, calculation_id=calculation_id)
        return await self._call(self._stub.CancelCheque, request)

    async def cancel_receipt(self, request_id: str, receipt: pos.ReceiptReference) -> pos.CancelChequeResponse:
        request = pos.CancelChequeRequest(request_id=request_id, receipt=receipt)
        return await self._call(self._stub.CancelCheque, request)

    async def upload_offline(self, cheques: Sequence[pos.OfflineCheque]) -> pos.UploadOfflineChequesResponse:
        return await self._call(self._stub.UploadOfflineCheques, pos.UploadOfflineChequesRequest(cheques=cheques))

    async def history(
        self, identifier: pos.CustomerIdentifier, page_size: int = 0, page_token: str = ""
    ) -> pos.ListCustomerHistoryResponse:
        request = pos.ListCustomerHistoryRequest(identifier=identifier, page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListCustomerHistory, request)

    async def gift_card_balance(
        self, card_number: str, pin: str = "", terminal_id: str = ""
    ) -> pos.GetGiftCardBalanceResponse:
        request = pos.GetGiftCardBalanceRequest(card_number=card_number, pin=pin, terminal_id=terminal_id)
        return await self._call(self._stub.GetGiftCardBalance, request)

    async def pay_with_gift_card(
        self,
        request_id: str,
        card_number: str,
        amount_minor: int,
        receipt: pos.ReceiptReference,
        pin: str = "",
        store_id: str = "",
    ) -> pos.PayWithGiftCardResponse:
        request = pos.PayWithGiftCardRequest(
            request_id=request_id,
            card_number=card_number,
            pin=pin,
            amount_minor=amount_minor,
            receipt=receipt,
            store_id=store_id,
        )
        return await self._call(self._stub.PayWithGiftCard, request)

    async def refund_gift_card(
        self, request_id: str, card_number: str, amount_minor: int, receipt: pos.ReceiptReference, store_id: str = ""
    ) -> pos.RefundGiftCardPaymentResponse:
        request = pos.RefundGiftCardPaymentRequest(
            request_id=request_id,
            card_number=card_number,
            amount_minor=amount_minor,
            receipt=receipt,
            store_id=store_id,
        )
        return await self._call(self._stub.RefundGiftCardPayment, request)
