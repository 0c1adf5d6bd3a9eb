"""The gateway's calls to the other services, with their errors turned into ours."""

from __future__ import annotations

import grpc

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.common.v1 import receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime.clients import Channels
from loyalty.runtime.errors import reraise_remote
from services.gateway.domain import CommitPlan

DOWNSTREAM_TIMEOUT_SECONDS = 3.0


class Peers:
    def __init__(self, channels: Channels, timeout: float = DOWNSTREAM_TIMEOUT_SECONDS) -> None:
        self._members = members_grpc.MembersServiceStub(channels.get("members"))
        self._rules = rules_grpc.RulesServiceStub(channels.get("rules"))
        self._accounts = accounts_grpc.AccountsServiceStub(channels.get("accounts"))
        self._timeout = timeout

    async def identify(self, identifier: pos.CustomerIdentifier) -> members.MemberContext:
        which = identifier.WhichOneof("kind")
        request = (
            members.IdentifyMemberRequest(card_number=identifier.card_number)
            if which == "card_number"
            else members.IdentifyMemberRequest(phone=identifier.phone)
        )
        try:
            response = await self._members.IdentifyMember(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise reraise_remote(error, field_prefix="identifier.") from error
        return response.context

    async def evaluate(
        self, receipt: receipt_pb2.Receipt, member: members.MemberContext | None
    ) -> rules.EvaluateReceiptResponse:
        subject = (
            rules.Subject(member_id=member.member_id, tier=member.tier, segments=member.segments)
            if member
            else rules.Subject()
        )
        try:
            return await self._rules.EvaluateReceipt(
                rules.EvaluateReceiptRequest(receipt=receipt, subject=subject), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise reraise_remote(error) from error

    async def balance(self, holder_id: str) -> accounts.Balance:
        try:
            response = await self._accounts.GetBalance(
                accounts.GetBalanceRequest(holder_id=holder_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise reraise_remote(error) from error
        return response.balance

    async def accrue(self, plan: CommitPlan) -> None:
        try:
            await self._accounts.AccruePoints(
                accounts.AccruePointsRequest(
                    request_id=plan.key.step_request_id("accrue_points"),
                    holder_id=plan.holder_id,
                    amount=plan.points,
                    source=accounts.ACCRUAL_SOURCE_RECEIPT,
                    source_ref=plan.key.ref,
                    reason="points earned on a receipt",
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise reraise_remote(error) from error
