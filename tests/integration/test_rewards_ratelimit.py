"""The Redis rate limiter a cluster uses: counts shared by every replica, windows expiring in Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from loyalty.rewards.v1 import rewards_service_pb2 as pb
from loyalty.rewards.v1.rewards_service_pb2_grpc import RewardsServiceStub
from loyalty.runtime.errors import read_remote_error
from loyalty.runtime.ratelimit import InMemoryRateLimiter, RedisRateLimiter, create_rate_limiter
from loyalty.runtime.settings import Settings
from services.rewards.domain import WRONG_CODE_LIMIT, WRONG_CODE_WINDOW_SECONDS, wrong_code_key
from tests import infra


async def test_replicas_share_one_count_and_the_window_expires_in_redis(redis_prefix: str) -> None:
    first, second = RedisRateLimiter(infra.REDIS_URL, redis_prefix), RedisRateLimiter(infra.REDIS_URL, redis_prefix)
    try:
        results = await asyncio.gather(*(limiter.hit("pos-1", 5, 30) for limiter in [first, second] * 4))
        assert sum(1 for wait in results if wait == 0.0) == 5, "exactly the limit passes across both replicas"
        assert all(0 < wait <= 30 for wait in results if wait), results
        assert 0 < await second.retry_after("pos-1", 5, 30) <= 30
        assert await first.retry_after("pos-2", 5, 30) == 0.0

        client = aioredis.from_url(infra.REDIS_URL)
        try:
            key = f"{redis_prefix}:ratelimit:pos-1"
            assert int(await client.get(key)) == 8
            assert 0 < await client.pttl(key) <= 30_000, "the counter expires with its window"
            await client.delete(key)
        finally:
            await client.aclose()
        assert await first.retry_after("pos-1", 5, 30) == 0.0, "a closed window allows again"
    finally:
        await first.close()
        await second.close()


async def test_a_short_window_closes_by_itself(redis_prefix: str) -> None:
    limiter = RedisRateLimiter(infra.REDIS_URL, redis_prefix)
    try:
        assert await limiter.hit("pin:card-1", 1, 0.2) == 0.0
        assert await limiter.hit("pin:card-1", 1, 0.2) > 0

        async def reopened() -> bool:
            return await limiter.retry_after("pin:card-1", 1, 0.2) == 0.0

        await infra.wait_until(reopened, what="the window to expire in Redis")
    finally:
        await limiter.close()


async def test_the_cluster_counts_in_redis_and_the_embedded_suite_in_memory() -> None:
    for settings, kind in [(Settings(event_bus="redis"), RedisRateLimiter), (Settings(), InMemoryRateLimiter)]:
        limiter = create_rate_limiter(settings)
        assert type(limiter) is kind
        await limiter.close()


async def test_an_unreachable_redis_lets_events_through() -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{infra.free_port()}/0", "nowhere")
    try:
        assert [await limiter.hit("pos-1", 1, 60) for _ in range(3)] == [0.0, 0.0, 0.0]
        assert await limiter.retry_after("pos-1", 1, 60) == 0.0
    finally:
        await limiter.close()


async def test_in_a_cluster_the_service_counts_wrong_codes_in_redis_for_every_replica(
    tmp_path: Path, redis_prefix: str
) -> None:
    settings = infra.suite_settings(tmp_path, event_bus="redis", redis_url=infra.REDIS_URL, stream_prefix=redis_prefix)
    async with (
        infra.running_suite(settings, ("rewards",)),
        grpc.aio.insecure_channel(settings.address("rewards")) as channel,
    ):
        stub = RewardsServiceStub(channel)
        for guess in range(WRONG_CODE_LIMIT):
            answer = await stub.ValidateCoupon(pb.ValidateCouponRequest(code=f"WRONG{guess}", terminal_id="pos-9"))
            assert answer.rejection == pb.COUPON_REJECTION_NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ValidateCoupon(pb.ValidateCouponRequest(code="WRONG", terminal_id="pos-9"))
        assert read_remote_error(refused.value).reason == "TOO_MANY_WRONG_CODES"

        another_replica = RedisRateLimiter(infra.REDIS_URL, redis_prefix)
        try:
            wait = await another_replica.retry_after(
                wrong_code_key("pos-9"), WRONG_CODE_LIMIT, WRONG_CODE_WINDOW_SECONDS
            )
        finally:
            await another_replica.close()
        assert 0 < wait <= WRONG_CODE_WINDOW_SECONDS, "another replica sees the same count and refuses too"
