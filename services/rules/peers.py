"""The rules service's calls to the services that hand out rewards: coupons and badges
(rewards) and points (accounts)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from functools import partial

from loyalty.accounts.v1 import accounts_service_pb2 as accounts
from loyalty.accounts.v1 import accounts_service_pb2_grpc as accounts_grpc
from loyalty.rewards.v1 import rewards_service_pb2 as rewards
from loyalty.rewards.v1 import rewards_service_pb2_grpc as rewards_grpc
from loyalty.runtime.clients import Channels
from loyalty.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, call_remote
from loyalty.runtime.timeutil import to_timestamp, utcnow
from services.rules.domain import AwardBadge, EarnFixedPoints, ExpiryRounding, Grant, IssueCoupon

_ROUNDINGS = {
    ExpiryRounding.CURRENCY: accounts.EXPIRY_ROUNDING_UNSPECIFIED,
    ExpiryRounding.NONE: accounts.EXPIRY_ROUNDING_NONE,
    ExpiryRounding.MONTH_END: accounts.EXPIRY_ROUNDING_MONTH_END,
    ExpiryRounding.YEAR_END: accounts.EXPIRY_ROUNDING_YEAR_END,
}

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0


class Rewarder:
    def __init__(self, channels: Channels, timeout: float = TIMEOUT_SECONDS) -> None:
        self._rewards = rewards_grpc.RewardsServiceStub(channels.get("rewards"))
        self._accounts = accounts_grpc.AccountsServiceStub(channels.get("accounts"))
        self._timeout = timeout

    async def grant(self, grants: Sequence[Grant]) -> None:
        """Hands out every grant; each call is idempotent by the grant's request id, so the
        bus may redeliver the event after a failure. A refusal that a retry cannot change (an
        unknown series or badge, an ended series, an accrual limit) is logged and skipped so it
        does not hold back the others; an unavailable peer raises, and the event comes again."""
        for grant in grants:
            try:
                await call_remote(partial(self._call, grant))
            except (NotFound, FailedPrecondition, InvalidArgument) as remote:
                log.warning(
                    "campaign %s rule %s: %s refused for member %s: %s",
                    grant.campaign_id,
                    grant.rule_id,
                    type(grant.effect).__name__,
                    grant.member_id,
                    remote,
                )

    async def _call(self, grant: Grant) -> None:
        effect = grant.effect
        if isinstance(effect, IssueCoupon):
            await self._rewards.IssueCoupon(
                rewards.IssueCouponRequest(
                    request_id=grant.request_id, member_id=grant.member_id, series_id=effect.series_id
                ),
                timeout=self._timeout,
            )
        elif isinstance(effect, AwardBadge):
            await self._rewards.AwardBadge(
                rewards.AwardBadgeRequest(
                    request_id=grant.request_id, member_id=grant.member_id, badge_id=effect.badge_id
                ),
                timeout=self._timeout,
            )
        elif isinstance(effect, EarnFixedPoints):
            lot = effect.lot
            # the delay counts from the event's handling; a redelivery repeats the request id,
            # so the accounts service keeps the first answer
            delay = lot.activation_delay_days
            await self._accounts.AccruePoints(
                accounts.AccruePointsRequest(
                    request_id=grant.request_id,
                    holder_id=grant.member_id,
                    member_id=grant.member_id,
                    amount=effect.amount,
                    source=accounts.ACCRUAL_SOURCE_CAMPAIGN,
                    source_ref=f"campaign:{grant.campaign_id}",
                    reason=grant.reason,
                    currency=lot.currency,
                    activate_time=to_timestamp(utcnow() + timedelta(days=delay) if delay else None),
                    expire_time=to_timestamp(lot.expire_time),
                    lifetime_days=lot.lifetime_days,
                    expiry_rounding=_ROUNDINGS[lot.expiry_rounding],
                ),
                timeout=self._timeout,
            )
