"""The members service's calls to the accounts service: moving a merged duplicate's points."""

from __future__ import annotations

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.runtime.clients import Channels
from loyalty.runtime.errors import call_remote

TIMEOUT_SECONDS = 10.0


class Accounts:
    def __init__(self, channels: Channels, timeout: float = TIMEOUT_SECONDS) -> None:
        self._accounts = accounts_grpc.AccountsServiceStub(channels.get("accounts"))
        self._timeout = timeout

    async def merge(self, from_holder_id: str, to_holder_id: str, reason: str) -> None:
        """Moves every point of one holder to another. The request id names the pair, and a
        duplicate is merged once, so a retried merge gets accounts' first answer back."""
        request = accounts.MergeAccountsRequest(
            request_id=f"members-merge:{from_holder_id}:{to_holder_id}",
            from_holder_id=from_holder_id,
            to_holder_id=to_holder_id,
            reason=reason,
        )
        await call_remote(lambda: self._accounts.MergeAccounts(request, timeout=self._timeout))
