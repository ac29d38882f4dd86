"""submit_many admits a chunk in one script call, with the per-request checks of a single submit."""

from __future__ import annotations

import pytest

from middleware.client import Client
from middleware.errors import Conflict, Overloaded
from schemas import AlignRequest, Keys

KEYS = Keys("alignq")
pytestmark = pytest.mark.anyio


async def evalsha_calls(client: Client) -> int:
    stats = await client.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_one_script_call_per_chunk_and_resubmits_are_idempotent(redis_url: str) -> None:
    async with Client(redis_url, submit_chunk_size=100) as client:
        items = [AlignRequest(prompt=f"p{i}", request_id=f"id-{i}") for i in range(250)]
        before = await evalsha_calls(client)
        ids = await client.submit_many(items)
        assert await evalsha_calls(client) - before == 3  # chunks of 100, 100, 50
        assert ids == [f"id-{i}" for i in range(250)]
        assert await client.redis.xlen(KEYS.requests) == 250
        assert await client.submit_many(items) == ids  # a retried batch: duplicates, nothing written
        assert await client.redis.xlen(KEYS.requests) == 250 and await client.redis.zcard(KEYS.pending_requests) == 250
        with pytest.raises(Conflict):  # same id, another prompt
            await client.submit_many([AlignRequest(prompt="new", request_id="fresh"),
                                      AlignRequest(prompt="other", request_id="id-3")])
        assert await client.redis.xlen(KEYS.requests) == 251  # the item before the conflict stays queued


async def test_backpressure_is_exact_inside_one_chunk(redis_url: str) -> None:
    async with Client(redis_url, max_pending=5, submit_chunk_size=500) as client:
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many([AlignRequest(prompt=f"p{i}", request_id=f"r{i}") for i in range(8)])
        assert excinfo.value.submitted_ids == [f"r{i}" for i in range(5)]
        assert excinfo.value.rejected_ids == ["r5", "r6", "r7"]
        assert await client.redis.xlen(KEYS.requests) == 5
