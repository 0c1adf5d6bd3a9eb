"""PosService over gRPC: the cash register's contract, translated to use cases."""

from __future__ import annotations

from typing import Any

import grpc

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from services.gateway.service import PointOfSale

Context = grpc.aio.ServicerContext[Any, Any]


class PosApi(pos_grpc.PosServiceServicer):
    def __init__(self, point_of_sale: PointOfSale) -> None:
        self._pos = point_of_sale

    async def Identify(self, request: pos.IdentifyRequest, context: Context) -> pos.IdentifyResponse:
        return pos.IdentifyResponse(customer=await self._pos.identify(request.identifier))

    async def CalculateCheque(
        self, request: pos.CalculateChequeRequest, context: Context
    ) -> pos.CalculateChequeResponse:
        return await self._pos.calculate(request)

    async def CommitCheque(self, request: pos.CommitChequeRequest, context: Context) -> pos.CommitChequeResponse:
        return await self._pos.commit(request)
