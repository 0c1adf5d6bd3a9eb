"""PosService and ApiKeyService over gRPC: who is calling, then the use case."""

from __future__ import annotations

import hmac
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.gateway.v1 import api_key_service_pb2 as keys_pb
from loyalty.gateway.v1 import api_key_service_pb2_grpc as keys_grpc
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.runtime.errors import Unauthenticated
from loyalty.runtime.idempotency import IdempotentCalls
from services.gateway.auth import API_KEY_HEADER, ApiKeys, Terminal
from services.gateway.service import PointOfSale

Context = grpc.aio.ServicerContext[Any, Any]


def _header(context: Context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""


class PosApi(pos_grpc.PosServiceServicer):
    def __init__(self, point_of_sale: PointOfSale, keys: ApiKeys) -> None:
        self._pos = point_of_sale
        self._keys = keys

    async def _terminal(self, context: Context) -> Terminal:
        return await self._keys.authenticate(_header(context, API_KEY_HEADER))

    async def Identify(self, request: pos.IdentifyRequest, context: Context) -> pos.IdentifyResponse:
        await self._terminal(context)
        return pos.IdentifyResponse(customer=await self._pos.identify(request.identifier))

    async def RegisterCustomer(
        self, request: pos.RegisterCustomerRequest, context: Context
    ) -> pos.RegisterCustomerResponse:
        await self._terminal(context)
        return await self._pos.register(request)

    async def CalculateCheque(
        self, request: pos.CalculateChequeRequest, context: Context
    ) -> pos.CalculateChequeResponse:
        return await self._pos.calculate(await self._terminal(context), request)

    async def CommitCheque(self, request: pos.CommitChequeRequest, context: Context) -> pos.CommitChequeResponse:
        return await self._pos.commit(await self._terminal(context), request)

    async def ReturnCheque(self, request: pos.ReturnChequeRequest, context: Context) -> pos.ReturnChequeResponse:
        return await self._pos.return_cheque(await self._terminal(context), request)

    async def CancelCheque(self, request: pos.CancelChequeRequest, context: Context) -> pos.CancelChequeResponse:
        return await self._pos.cancel(await self._terminal(context), request)

    async def UploadOfflineCheques(
        self, request: pos.UploadOfflineChequesRequest, context: Context
    ) -> pos.UploadOfflineChequesResponse:
        return await self._pos.upload_offline(await self._terminal(context), request)

    async def ListCustomerHistory(
        self, request: pos.ListCustomerHistoryRequest, context: Context
    ) -> pos.ListCustomerHistoryResponse:
        await self._terminal(context)
        return await self._pos.history(request)

    async def GetGiftCardBalance(
        self, request: pos.GetGiftCardBalanceRequest, context: Context
    ) -> pos.GetGiftCardBalanceResponse:
        return await self._pos.gift_card_balance(await self._terminal(context), request)

    async def PayWithGiftCard(
        self, request: pos.PayWithGiftCardRequest, context: Context
    ) -> pos.PayWithGiftCardResponse:
        return await self._pos.pay_with_gift_card(await self._terminal(context), request)

    async def RefundGiftCardPayment(
        self, request: pos.RefundGiftCardPaymentRequest, context: Context
    ) -> pos.RefundGiftCardPaymentResponse:
        return await self._pos.refund_gift_card(await self._terminal(context), request)


class ApiKeyApi(keys_grpc.ApiKeyServiceServicer):
    def __init__(self, keys: ApiKeys, idempotent: IdempotentCalls, admin_token: str | None) -> None:
        self._keys = keys
        self._idempotent = idempotent
        self._admin_token = admin_token

    def _check_admin(self, context: Context) -> None:
        if not self._admin_token:
            raise Unauthenticated("ADMIN_API_DISABLED", "no admin token is configured; use `loyalty api-key`")
        presented = _header(context, "authorization").removeprefix("Bearer ")
        if not hmac.compare_digest(presented.encode(), self._admin_token.encode()):
            raise Unauthenticated("ADMIN_TOKEN_INVALID", "send the admin token as `authorization: Bearer <token>`")

    async def CreateApiKey(
        self, request: keys_pb.CreateApiKeyRequest, context: Context
    ) -> keys_pb.CreateApiKeyResponse:
        self._check_admin(context)
        ApiKeys.check_creation(request.partner_id, request.store_ids, request.description)

        async def work(session: AsyncSession) -> keys_pb.CreateApiKeyResponse:
            return await self._keys.create(session, request.partner_id, request.store_ids, request.description)

        return await self._idempotent.run("CreateApiKey", request, keys_pb.CreateApiKeyResponse, work)

    async def RevokeApiKey(
        self, request: keys_pb.RevokeApiKeyRequest, context: Context
    ) -> keys_pb.RevokeApiKeyResponse:
        self._check_admin(context)
        return keys_pb.RevokeApiKeyResponse(api_key=await self._keys.revoke(request.key_id))

    async def ListApiKeys(self, request: keys_pb.ListApiKeysRequest, context: Context) -> keys_pb.ListApiKeysResponse:
        self._check_admin(context)
        return await self._keys.list(request)
