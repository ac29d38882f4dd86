"""The spread model shared through a real Redis: concurrent adds are never lost; a fit comes back."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from redis.asyncio import Redis

from middleware.scheduler.prior import RidgeStats, SpreadModel
from middleware.scheduler.prior_store import (
    add_stats,
    decode_stats,
    encode_stats,
    load_stats,
    sync_spread_model,
)
from schemas.keys import Keys

pytestmark = pytest.mark.anyio


def test_stats_round_trip_without_pickle() -> None:
    stats = RidgeStats.from_rows(np.arange(6.0).reshape(3, 2), np.ones((3, 1)))
    back = decode_stats(encode_stats(stats))
    assert back.count == 3 and np.array_equal(back.xx, stats.xx) and np.array_equal(back.xy, stats.xy)


async def test_concurrent_adds_all_land(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    key = Keys("t").spread_model(None, "continuous")
    try:
        row = RidgeStats.from_rows(np.ones((1, 3)), np.ones((1, 2)))
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(add_stats, redis, key, row)
        total = await load_stats(redis, key)
        assert total is not None and total.count == 12 and np.allclose(total.xx, 12.0)
    finally:
        await redis.aclose()


async def test_two_schedulers_share_one_model(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    keys = Keys("t")
    rng = np.random.default_rng(0)
    first, second = SpreadModel(), SpreadModel()
    try:
        for i in range(12):
            spread = rng.uniform(0.1, 2.0)
            (first if i % 2 else second).observe(f"prompt number {i} " + "word " * i, list(rng.normal(0, spread, 16)))
        assert await sync_spread_model(first, redis, keys) == 6
        assert not first.has_fit  # 6 prompts: below the minimum
        assert await sync_spread_model(second, redis, keys) == 6
        assert second.fit_for("continuous:hash") is not None and second.fit_for("bernoulli:hash") is None
        await sync_spread_model(first, redis, keys)  # nothing new: reads the shared sum
        assert first.fit_for("continuous:hash").count == 12
        assert await redis.exists(keys.spread_model(None, "continuous:hash"))
    finally:
        await redis.aclose()


async def test_each_policy_model_learns_its_own_spreads(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    keys = Keys("t-models")
    rng = np.random.default_rng(1)
    writer, reader = SpreadModel(), SpreadModel()
    try:
        for i in range(10):
            writer.observe(f"prompt {i} " + "word " * i, list(rng.normal(0, 1.0 + i, 16)), model="policy-a")
        assert await sync_spread_model(writer, redis, keys) == 10
        assert writer.fit_for("continuous:hash", "policy-a") is not None
        assert writer.fit_for("continuous:hash") is None  # the default model learned nothing
        assert await redis.exists(keys.spread_model("policy-a", "continuous:hash"))
        assert not await redis.exists(keys.spread_model(None, "continuous:hash"))
        assert reader.fit_for("continuous:hash", "policy-a") is None  # asked: the next sync loads it
        await sync_spread_model(reader, redis, keys)
        fit = reader.fit_for("continuous:hash", "policy-a")
        assert fit is not None and fit.count == 10 and reader.has_fit_for(["policy-a"])
        assert not reader.has_fit_for(["policy-a", None])
    finally:
        await redis.aclose()
