"""Shard-aware key names (schemas.keys) and the Sentinel/Cluster URL schemes (schemas.topology)."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from schemas import Keys
from schemas.keys import Lane, parse_shard_ids, shard_tag
from schemas.topology import cluster_client, is_cluster_url, parse_hosts, sentinel_client

REQUEST_ID = "acme/order-1"


def test_one_shard_without_a_cluster_keeps_the_unsharded_names() -> None:
    for keys in (Keys(), Keys.sharded("alignq", 1)):
        assert keys.requests == "alignq:requests" and keys.jobs == "alignq:jobs"
        assert keys.result(REQUEST_ID) == "alignq:result:acme/order-1"
        assert keys.events(REQUEST_ID) == "alignq:events:acme/order-1"
        assert keys.pending_requests == "alignq:pending" and keys.dead_letters == "alignq:dead"
        assert keys.samples("s0") == "alignq:samples:s0" and keys.quota_samples("t") == "alignq:quota:samples:t"


def slots_of_one_request(keys: Keys, request_id: str) -> set[int]:
    """Every name the submit, answer and cancel scripts and the worker's reply transaction touch."""
    shard = keys.for_request(request_id)
    names = [shard.pending_requests, shard.requests, shard.request_stream(Lane.HIGH), shard.request_claim(request_id),
             shard.fingerprints(86_400, 1), shard.quota_rate("t", 1), shard.quota_samples("t"),
             shard.result(request_id), shard.events(request_id), shard.kept_samples(request_id),
             shard.cancelled(request_id), shard.samples("sched-1"), shard.job_stream("m", Lane.LOW),
             shard.jobs, shard.dead_letters]
    return {key_slot(name.encode()) for name in names}


@pytest.mark.parametrize(("num_shards", "cluster"), [(1, True), (3, False), (3, True), (8, True)])
def test_every_key_of_a_request_is_in_one_slot(num_shards: int, cluster: bool) -> None:
    keys = Keys.sharded("alignq", num_shards, cluster=cluster)
    for i in range(50):
        assert len(slots_of_one_request(keys, f"t/r{i}")) == 1


def test_requests_spread_over_shards_and_shards_over_the_slot_range() -> None:
    keys = Keys.sharded("alignq", 3)
    counts = Counter(keys.shard_of(f"t/{i}") for i in range(3000))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 900
    assert keys.shard_of(REQUEST_ID) == keys.shard_of(REQUEST_ID)
    # redis-cli --cluster create gives 3 primaries a third of the slots each: one shard per primary
    thirds = {key_slot(shard_tag(shard, 3).encode()) * 3 // 16384 for shard in range(3)}
    assert thirds == {0, 1, 2}


def test_for_stream_finds_the_shard_of_a_tagged_name() -> None:
    keys = Keys.sharded("alignq", 4)
    for shard in keys.shards:
        assert keys.for_stream(keys.for_shard(shard).job_stream(None, Lane.HIGH)).shard == shard
    assert Keys().for_stream("alignq:jobs") == Keys()
    with pytest.raises(ValueError):
        keys.for_shard(4)
    with pytest.raises(ValueError):
        Keys.sharded("alignq", 0)


def test_heartbeats_and_metrics_stay_global() -> None:
    keys = Keys.sharded("alignq", 3, cluster=True)
    assert keys.heartbeat("worker", "w0") == "alignq:heartbeat:worker:w0" and keys.metrics == "alignq:metrics"


def test_parse_shard_ids() -> None:
    assert parse_shard_ids("", 3) == [0, 1, 2]
    assert parse_shard_ids(" 2, 0,2", 3) == [0, 2]
    for bad in ("3", "-1", "a,b", ","):
        with pytest.raises(ValueError):
            parse_shard_ids(bad, 3)


def test_parse_hosts() -> None:
    assert parse_hosts("a:1,b:2", 26379) == (None, [("a", 1), ("b", 2)])
    assert parse_hosts(":s%40cret@a", 26379) == ("s@cret", [("a", 26379)])
    for bad in ("", "a:x", ":1"):
        with pytest.raises(ValueError):
            parse_hosts(bad, 6379)


@pytest.mark.anyio
async def test_sentinel_and_cluster_urls_build_clients_or_say_what_is_wrong() -> None:
    client = sentinel_client("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/2")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.service_name == "mymaster" and kwargs["db"] == 2 and kwargs["password"] == "pw"
    assert [s.connection_pool.connection_kwargs["port"] for s in client.watched_by.sentinels] == [26379, 26380]
    await client.aclose()
    with pytest.raises(ValueError, match="service name"):
        sentinel_client("redis+sentinel://127.0.0.1:26379")
    assert is_cluster_url("redis+cluster://a:1") and not is_cluster_url("redis://a:1")
    with pytest.raises(ValueError, match="only db 0"):
        cluster_client("redis+cluster://127.0.0.1:7000/3")


def test_settings_reject_shard_ids_outside_the_shards() -> None:
    from pydantic import ValidationError

    from middleware.settings import SchedulerSettings
    from workers.settings import WorkerSettings

    assert SchedulerSettings(shards=3, shard_ids="0,2").shard_ids == "0,2"
    for settings in (SchedulerSettings, WorkerSettings):
        with pytest.raises(ValidationError, match="outside 0..2"):
            settings(shards=3, shard_ids="3")
