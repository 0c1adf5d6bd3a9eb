"""The gateway's calls to the other services, with their errors turned into ours.

Every call takes the time it may use: the calculation shares one deadline budget across
its calls, the saga gives each step the default.
"""

from __future__ import annotations

from collections.abc import Sequence

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.common.v1 import coupon_pb2, receipt_pb2
from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.members.v1 import members_service_pb2 as members
from loyalty.members.v1 import members_service_pb2_grpc as members_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.rules.v1 import rules_service_pb2 as rules
from loyalty.rules.v1 import rules_service_pb2_grpc as rules_grpc
from loyalty.runtime.clients import Channels
from loyalty.runtime.errors import call_remote

DOWNSTREAM_TIMEOUT_SECONDS = 3.0


def rules_subject(member: members.MemberContext) -> rules.Subject:
    """The member as the rules' conditions read it (member.card_type, member.attributes,
    the days to and since the birthday)."""
    subject = rules.Subject(
        member_id=member.member_id,
        tier=member.tier,
        segments=member.segments,
        card_type=member.card_type,
        birth_date=member.birth_date,
    )
    for name, value in member.attributes.items():
        kind = value.WhichOneof("value")
        if kind == "string_value":
            subject.attributes[name].string_value = value.string_value
        elif kind == "int_value":
            subject.attributes[name].int_value = value.int_value
        elif kind == "bool_value":
            subject.attributes[name].bool_value = value.bool_value
    return subject


class Peers:
    def __init__(self, channels: Channels, timeout: float = DOWNSTREAM_TIMEOUT_SECONDS) -> None:
        self._members = members_grpc.MembersServiceStub(channels.get("members"))
        self._rules = rules_grpc.RulesServiceStub(channels.get("rules"))
        self._accounts = accounts_grpc.AccountsServiceStub(channels.get("accounts"))
        self._rewards = rewards_grpc.RewardsServiceStub(channels.get("rewards"))
        self.timeout = timeout

    async def identify(self, identifier: pos.CustomerIdentifier, budget: float | None = None) -> members.MemberContext:
        which = identifier.WhichOneof("kind")
        if which == "card_number":
            request = members.IdentifyMemberRequest(card_number=identifier.card_number)
        elif which == "qr_token":
            request = members.IdentifyMemberRequest(qr_token=identifier.qr_token)
        else:
            request = members.IdentifyMemberRequest(phone=identifier.phone)
        response = await call_remote(
            lambda: self._members.IdentifyMember(request, timeout=budget or self.timeout), "identifier."
        )
        return response.context

    async def register(self, request: pos.RegisterCustomerRequest) -> tuple[members.Member, bool]:
        registered = await call_remote(
            lambda: self._members.RegisterMember(
                members.RegisterMemberRequest(
                    request_id=f"pos:{request.request_id}",
                    phone=request.phone,
                    email=request.email,
                    first_name=request.first_name,
                    channel=members.REGISTRATION_CHANNEL_POS,
                    # A customer already known is simply identified at the register.
                    return_existing=True,
                ),
                timeout=self.timeout,
            )
        )
        if request.card_number:
            await call_remote(
                lambda: self._members.IssueCard(
                    members.IssueCardRequest(
                        request_id=f"pos:{request.request_id}:card",
                        member_id=registered.member.member_id,
                        card_number=request.card_number,
                    ),
                    timeout=self.timeout,
                ),
            )
        return registered.member, registered.created

    async def evaluate(
        self,
        receipt: receipt_pb2.Receipt,
        member: members.MemberContext | None,
        coupons: Sequence[coupon_pb2.PresentedCoupon] = (),
        budget: float | None = None,
    ) -> rules.EvaluateReceiptResponse:
        subject = rules_subject(member) if member else rules.Subject()
        request = rules.EvaluateReceiptRequest(receipt=receipt, subject=subject, coupons=coupons)
        return await call_remote(lambda: self._rules.EvaluateReceipt(request, timeout=budget or self.timeout))

    async def balance(self, holder_id: str, budget: float | None = None) -> accounts.Balance:
        response = await call_remote(
            lambda: self._accounts.GetBalance(
                accounts.GetBalanceRequest(holder_id=holder_id), timeout=budget or self.timeout
            )
        )
        return response.balance

    async def history(self, holder_id: str, page_size: int, page_token: str) -> accounts.ListEntriesResponse:
        request = accounts.ListEntriesRequest(holder_id=holder_id, page_size=page_size, page_token=page_token)
        return await call_remote(lambda: self._accounts.ListEntries(request, timeout=self.timeout))

    async def place_hold(
        self, request_id: str, holder_id: str, amount: int, ttl_seconds: int, source_ref: str, budget: float
    ) -> accounts.Hold:
        request = accounts.PlaceHoldRequest(
            request_id=request_id, holder_id=holder_id, amount=amount, ttl_seconds=ttl_seconds, source_ref=source_ref
        )
        response = await call_remote(lambda: self._accounts.PlaceHold(request, timeout=budget))
        return response.hold

    async def capture_hold(self, request_id: str, hold_id: str, amount: int) -> accounts.CaptureHoldResponse:
        request = accounts.CaptureHoldRequest(request_id=request_id, hold_id=hold_id, amount=amount)
        return await call_remote(lambda: self._accounts.CaptureHold(request, timeout=self.timeout))

    async def release_hold(self, request_id: str, hold_id: str) -> accounts.Balance:
        request = accounts.ReleaseHoldRequest(request_id=request_id, hold_id=hold_id)
        response = await call_remote(lambda: self._accounts.ReleaseHold(request, timeout=self.timeout))
        return response.balance

    async def accrue(self, request: accounts.AccruePointsRequest) -> accounts.AccruePointsResponse:
        return await call_remote(lambda: self._accounts.AccruePoints(request, timeout=self.timeout))

    async def reverse(self, request_id: str, entry_id: str, amount: int, source_ref: str) -> None:
        request = accounts.ReverseOperationRequest(
            request_id=request_id, entry_id=entry_id, amount=amount, source_ref=source_ref
        )
        await call_remote(lambda: self._accounts.ReverseOperation(request, timeout=self.timeout))

    async def reserve_coupon(
        self,
        request_id: str,
        code: str,
        member_id: str,
        receipt_ref: str,
        terminal_id: str,
        ttl_seconds: int,
        budget: float,
    ) -> rewards.ReserveCouponResponse:
        request = rewards.ReserveCouponRequest(
            request_id=request_id,
            code=code,
            member_id=member_id,
            receipt_ref=receipt_ref,
            ttl_seconds=ttl_seconds,
            terminal_id=terminal_id,
        )
        return await call_remote(lambda: self._rewards.ReserveCoupon(request, timeout=budget))

    async def redeem_coupon(self, request_id: str, reservation_id: str) -> None:
        request = rewards.RedeemCouponRequest(request_id=request_id, reservation_id=reservation_id)
        await call_remote(lambda: self._rewards.RedeemCoupon(request, timeout=self.timeout))

    async def release_coupon(self, request_id: str, reservation_id: str, budget: float | None = None) -> None:
        request = rewards.ReleaseReservationRequest(request_id=request_id, reservation_id=reservation_id)
        await call_remote(lambda: self._rewards.ReleaseReservation(request, timeout=budget or self.timeout))

    async def reinstate_coupon(self, request_id: str, code: str, receipt_ref: str) -> None:
        request = rewards.ReinstateCouponRequest(request_id=request_id, code=code, receipt_ref=receipt_ref)
        await call_remote(lambda: self._rewards.ReinstateCoupon(request, timeout=self.timeout))

    async def gift_card(self, card_number: str, pin: str, terminal_id: str) -> rewards.GiftCard:
        request = rewards.GetGiftCardRequest(card_number=card_number, pin=pin, terminal_id=terminal_id)
        response = await call_remote(lambda: self._rewards.GetGiftCard(request, timeout=self.timeout))
        return response.card

    async def spend_gift_card(
        self, request_id: str, card_number: str, pin: str, amount: int, receipt_ref: str, terminal_id: str
    ) -> rewards.SpendGiftCardResponse:
        request = rewards.SpendGiftCardRequest(
            request_id=request_id,
            card_number=card_number,
            pin=pin,
            amount_minor=amount,
            receipt_ref=receipt_ref,
            terminal_id=terminal_id,
        )
        return await call_remote(lambda: self._rewards.SpendGiftCard(request, timeout=self.timeout))

    async def refund_gift_card(
        self, request_id: str, card_number: str, amount: int, receipt_ref: str
    ) -> rewards.RefundGiftCardResponse:
        request = rewards.RefundGiftCardRequest(
            request_id=request_id, card_number=card_number, amount_minor=amount, receipt_ref=receipt_ref
        )
        return await call_remote(lambda: self._rewards.RefundGiftCard(request, timeout=self.timeout))
