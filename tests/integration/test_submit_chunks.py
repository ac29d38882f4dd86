"""One SUBMIT_LUA call per chunk (and shard) keeps admission exact, as if each request went alone.

Against a real Redis: the cut at ``max_pending`` inside a chunk, idempotent resubmits of a whole
batch, duplicates and conflicts inside one chunk, both tenant quotas counted request by request,
tenants' ids namespaced, shards each admitting their own share, a flushed script cache.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from middleware.client import Client, Conflict, Overloaded, Quota, QuotaExceeded
from schemas import PAYLOAD_FIELD, AlignRequest, Keys, decode

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
KEYS = Keys("alignq")


async def queued_ids(client: Client) -> list[str]:
    entries: list[Any] = []
    for shard in client.keys.shards:
        entries += await client.redis.xrange(client.keys.for_shard(shard).requests) or []
    return [decode(AlignRequest, fields[PAYLOAD_FIELD]).request_id for _, fields in entries]


async def test_the_cut_at_max_pending_inside_a_chunk_is_exact_and_resubmits_are_idempotent(redis_url: str) -> None:
    async with Client(redis_url, max_pending=5, submit_chunk_size=4) as client:
        items = [AlignRequest(prompt=f"p{i}", request_id=f"r{i}") for i in range(10)]
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many(items)
        # chunk 1 (r0-r3) fits, chunk 2 is cut after r4, chunk 3 is never sent
        assert excinfo.value.submitted_ids == ["r0", "r1", "r2", "r3", "r4"]
        assert excinfo.value.rejected_ids == ["r5", "r6", "r7", "r8", "r9"]
        assert excinfo.value.num_pending == 5 and excinfo.value.retry_after_s >= 0.25
        assert await queued_ids(client) == [f"r{i}" for i in range(5)]
        # the whole batch again, as a retry after a lost reply: the queued ones are duplicates, nothing doubles
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many(items)
        assert excinfo.value.submitted_ids == ["r0", "r1", "r2", "r3", "r4"]
        assert await client.redis.zcard(KEYS.pending_requests) == 5 and len(await queued_ids(client)) == 5
        await client.redis.zrem(KEYS.pending_requests, "r0", "r1")  # two answered: exactly two more fit
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many(items[5:])
        assert excinfo.value.submitted_ids == ["r5", "r6"] and excinfo.value.rejected_ids == ["r7", "r8", "r9"]


async def test_duplicates_and_conflicts_inside_one_chunk(redis_url: str) -> None:
    async with Client(redis_url) as client:
        same = AlignRequest(prompt="same", request_id="a")
        assert (await client.submit_many([same, same, "other"]))[:2] == ["a", "a"]
        assert (await queued_ids(client)).count("a") == 1
        assert await client.submit("same", request_id="a") == "a"  # one request, built either way: same fingerprint
        with pytest.raises(Conflict, match="'b'"):
            await client.submit_many([AlignRequest(prompt="first", request_id="b"),
                                      AlignRequest(prompt="second", request_id="b")])
        assert (await queued_ids(client)).count("b") == 1


async def test_quotas_count_request_by_request_inside_a_chunk(redis_url: str) -> None:
    async with Client(redis_url, tenant="t", quota=Quota(max_requests_per_minute=3)) as client:
        with pytest.raises(QuotaExceeded, match="3 requests per minute"):
            await client.submit_many([{"prompt": f"p{i}", "request_id": f"r{i}"} for i in range(5)])
        assert await queued_ids(client) == ["t/r0", "t/r1", "t/r2"]
        assert await client.submit_many([{"prompt": "p0", "request_id": "r0"}]) == ["r0"]  # a retry is not counted
        rate_keys = [key async for key in client.redis.scan_iter(match="alignq:quota:rate:t:*")]
        assert [await client.redis.get(key) for key in rate_keys] == [b"3"]
    async with Client(redis_url, tenant="s", quota=Quota(max_samples_in_flight=20)) as client:
        with pytest.raises(QuotaExceeded, match="20 samples in flight"):
            await client.submit_many([{"prompt": f"p{i}", "budget": 8} for i in range(3)])
        assert len(await client.redis.hgetall(KEYS.quota_samples("s"))) == 2
        assert await client.submit_many([{"prompt": "small", "budget": 4}])  # 16 + 4 still fits


async def test_tenants_ids_are_namespaced_in_a_batch(redis_url: str) -> None:
    async with Client(redis_url, tenant="acme") as acme:
        globex = acme.with_tenant("globex")
        assert (await acme.submit_many([{"prompt": "acme's", "request_id": "x"}, "plain"]))[0] == "x"
        assert await globex.submit_many([{"prompt": "globex's, different", "request_id": "x"}]) == ["x"]  # no conflict
        ids = await queued_ids(acme)
        assert ids[0] == "acme/x" and ids[1].startswith("acme/") and ids[2] == "globex/x"
        assert not any(i.startswith("globex/") for i in await acme.submit_many(["more"]))


async def test_shards_each_admit_their_share(redis_url: str) -> None:
    async with Client(redis_url, num_shards=3) as client:
        ids = await client.submit_many([f"p{i}" for i in range(30)])
        per_shard = [await client.redis.xlen(client.keys.for_shard(shard).requests) for shard in client.keys.shards]
        assert sum(per_shard) == 30 and all(n > 0 for n in per_shard)
        assert sorted(await queued_ids(client)) == sorted(ids)
    async with Client(redis_url, namespace="capped", num_shards=3, max_pending=30) as client:
        with pytest.raises(Overloaded) as excinfo:  # 90 over 3 shards: each admits 10 (= 30 / 3), no more
            await client.submit_many([f"q{i}" for i in range(90)])
        pending = [await client.redis.zcard(client.keys.for_shard(s).pending_requests) for s in client.keys.shards]
        assert pending == [10, 10, 10] and len(excinfo.value.submitted_ids) == 30
        assert len(excinfo.value.rejected_ids) == 60


async def test_a_flushed_script_cache_is_reloaded(redis_url: str) -> None:
    async with Client(redis_url) as client:
        await client.submit("first")
        await client.redis.script_flush()
        assert len(await client.submit_many(["a", "b"])) == 2
        await client.redis.script_flush()
        await client.submit("second")
        assert len(await queued_ids(client)) == 4


async def test_chunks_in_flight_keep_the_cut_in_order_when_the_script_cache_is_flushed(redis_url: str) -> None:
    async with Client(redis_url, max_pending=5, submit_chunk_size=2) as client:
        await client.redis.script_flush()  # every chunk written ahead of the reload gets NOSCRIPT
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many([AlignRequest(prompt=f"p{i}", request_id=f"r{i}") for i in range(9)])
        assert excinfo.value.submitted_ids == [f"r{i}" for i in range(5)]
        assert await queued_ids(client) == [f"r{i}" for i in range(5)]


async def test_a_chunk_sent_again_after_a_lost_reply_is_not_queued_twice(redis_url: str) -> None:
    from middleware.client.admission import SubmitStatus
    from middleware.client.wire_form import WireBatch

    async with Client(redis_url) as client:
        batch = WireBatch([f"p{i}" for i in range(6)], tenant=None, default_budget=8, trace_fields={})
        chunk = batch.encode(0, 6)
        assert all(wire.fresh for wire in chunk)  # made by the client: its first attempt looks nothing up
        first = await client._admit(chunk)
        assert set(first[0::3]) == {SubmitStatus.ACCEPTED}
        # the same chunk again, as after a dropped connection: every id is looked up and found pending
        again = await client._admit(chunk, first_attempt=False)
        assert set(again[0::3]) <= {SubmitStatus.ACCEPTED, SubmitStatus.DUPLICATE}
        assert await client.redis.xlen(KEYS.requests) == 6 and await client.redis.zcard(KEYS.pending_requests) == 6
        # answered meanwhile (no longer pending): a RECHECK with the answered markers finds it
        await client.redis.zrem(KEYS.pending_requests, chunk[0].wire_id)
        await client.redis.set(KEYS.request_claim(chunk[0].wire_id), "answered")
        assert (await client._admit(chunk[:1], first_attempt=False))[0] == SubmitStatus.ACCEPTED  # compact: queued
        assert await client.redis.xlen(KEYS.requests) == 6


@pytest.mark.slow
async def test_chunks_on_a_redis_cluster(tmp_path: pathlib.Path) -> None:
    import shutil

    from topology_support import ClusterSet

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not on PATH: `redis-cli --cluster create` builds the cluster")
    with ClusterSet(tmp_path / "redis", base_port=17460) as cluster:
        async with Client(cluster.url(), num_shards=3, max_pending=1000, submit_chunk_size=7) as client:
            ids = await client.submit_many([f"p{i}" for i in range(50)] + [AlignRequest(prompt="m", request_id="m")])
            assert len(set(ids)) == 51 and ids[-1] == "m"
            assert sorted(await queued_ids(client)) == sorted(ids)
            assert await client.submit_many([AlignRequest(prompt="m", request_id="m")]) == ["m"]  # duplicate
            assert len(await queued_ids(client)) == 51
