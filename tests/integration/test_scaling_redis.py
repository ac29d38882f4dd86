"""Past one Redis (issue 17), against real servers on loopback: a Sentinel failover with kill -9, and a
3-primary Cluster with S = 3 shards under kill -9 chaos. The chaos test's guarantees are checked with
its own ``check_result``: one result and one terminal event per request, answered once in the logs,
no duplicate samples, nothing left pending or un-acked, no dead letters.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from collections import Counter

import anyio
import pytest
from chaos_support import KEYS
from test_chaos import chaos_request, check_result
from topology_support import ClusterSet, SentinelSet, TopologyFleet

from middleware.client import Client
from schemas import PAYLOAD_FIELD, SCHEDULER_GROUP, AlignRequest, DeadLetter, Keys, ResultStatus, decode

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FLEET_ENV = {"ALIGNQ_WINDOW_MS": "100", "ALIGNQ_MAX_WINDOW": "8", "ALIGNQ_MAX_NEW_TOKENS": "8",
             "ALIGNQ_TOP_P": "1.0", "ALIGNQ_MAX_DELIVERIES": "10"}
WAVE_SIZE = 8


def requests_of(wave: int) -> list[AlignRequest]:
    return [chaos_request(i) for i in range(wave * WAVE_SIZE, (wave + 1) * WAVE_SIZE)]


def dead_letters(sync: object, keys: Keys) -> list[DeadLetter]:
    return [decode(DeadLetter, fields[PAYLOAD_FIELD]) for shard in keys.shards
            for _, fields in sync.xrange(keys.for_shard(shard).dead_letters)]  # type: ignore[attr-defined]


async def test_sentinel_failover_kill_9_primary_every_accepted_prompt_answered_once(
        tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with SentinelSet(tmp_path / "redis", base_port=17300) as sentinels:
        url = sentinels.url()
        sync = sentinels.master_client()
        fleet = TopologyFleet(url, tmp_path / "logs", tiny_llama_dir, sync_client=sync,
                              ALIGNQ_REDIS_MIN_REPLICAS="1", **FLEET_ENV)
        accepted: list[AlignRequest] = []
        results = {}
        try:
            fleet.start("scheduler", "s0")
            for slot in ("w0", "w1"):
                fleet.start("worker", slot)
            await anyio.to_thread.run_sync(fleet.wait_ready, ["s0", "w0", "w1"], 120.0)
            async with Client(url, min_replicas=1, reconnect_timeout_s=30, poll_interval_s=0.5) as client:
                await client.submit_many(requests_of(0))
                accepted += requests_of(0)
                await anyio.sleep(0.5)  # windows in flight: jobs out, some answers on their way
                old_port = sentinels.primary.port
                sentinels.kill_primary()
                killed_at = time.monotonic()

                async def submit_during_failover() -> None:  # rides through: retried until a primary answers
                    await client.submit_many(requests_of(1))
                    accepted.extend(requests_of(1))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit_during_failover)
                    with anyio.fail_after(20):
                        while await anyio.to_thread.run_sync(sentinels.primary_port) in (old_port, -1):
                            await anyio.sleep(0.1)
                    failover_s = time.monotonic() - killed_at
                    # The old primary comes back as a replica of the new one (as a restarted pod would):
                    # with MIN_REPLICAS=1 nothing is acknowledged until some replica holds it.
                    new_port = await anyio.to_thread.run_sync(sentinels.primary_port)
                    await anyio.to_thread.run_sync(lambda: sentinels.primary.start(
                        "--appendonly", "no", "--save", "", "--replicaof", "127.0.0.1", str(new_port)))
                await client.submit_many(requests_of(2))  # after the failover: the services still serve
                accepted += requests_of(2)
                ids = [request.request_id for request in accepted]
                async for result in client.results_as_completed(ids, timeout_s=45):
                    results[result.request_id] = result
            alive = {slot: service.process.poll() is None for slot, service in fleet.services.items()}
        finally:
            exit_codes = fleet.stop_all()
        sync = sentinels.master_client()
        answered_logs = fleet.answered_counts()
        problems = [p for request in accepted for p in check_result(sync, request, answered_logs)]
        num_unacked = sync.xpending(KEYS.requests, SCHEDULER_GROUP)["pending"]
        num_pending = sync.zcard(KEYS.pending_requests)
        letters = dead_letters(sync, KEYS)
        sync.close()
    statuses = Counter(result.status for result in results.values())
    summary = f"failover_s={failover_s:.1f} statuses={dict(statuses)} exit_codes={exit_codes}"
    print("FAILOVER", summary)
    assert problems == [], f"{summary}\n{problems}\n{fleet.log_tail('s0')}"
    assert len(results) == 3 * WAVE_SIZE and statuses[ResultStatus.OK] >= 3 * WAVE_SIZE - 3, summary
    assert all(alive.values()), f"a service died across the failover: {alive}"
    assert num_unacked == 0 and num_pending == 0 and letters == [], summary
    assert "redis primary changed" in fleet.log_text("scheduler"), "the scheduler did not notice the failover"
    assert all(code in (0, None) for code in exit_codes.values()), summary


async def test_cluster_three_shards_kill_9_chaos_keeps_the_guarantees(tiny_llama_dir: pathlib.Path,
                                                                      tmp_path: pathlib.Path) -> None:
    if shutil.which("redis-cli") is None:  # .ci/run installs redis-server (with redis-cli) from apt
        pytest.skip("redis-cli not on PATH: `redis-cli --cluster create` builds the cluster")
    keys = Keys.sharded(num_shards=3, cluster=True)
    num_waves = 4
    with ClusterSet(tmp_path / "redis", base_port=17400) as cluster:
        url = cluster.url()
        sync = cluster.client()
        # s0 serves every shard, s1 only shards 1 and 2 (ALIGNQ_SHARD_IDS): shard 0 has one scheduler
        fleet = TopologyFleet(url, tmp_path / "logs", tiny_llama_dir, sync_client=sync, ALIGNQ_SHARDS="3",
                              **FLEET_ENV)
        requests: list[AlignRequest] = []
        results = {}
        kills: list[str] = []
        try:
            fleet.start("scheduler", "s0")
            fleet.start("scheduler", "s1", ALIGNQ_SHARD_IDS="1,2")
            for slot in ("w0", "w1"):
                fleet.start("worker", slot)
            await anyio.to_thread.run_sync(fleet.wait_ready, ["s0", "s1", "w0", "w1"], 120.0)
            async with Client(url, num_shards=3, poll_interval_s=0.5) as client:
                for wave, victim in zip(range(num_waves), ("s1", "w1", "s0", None)):
                    await client.submit_many(requests_of(wave))
                    requests.extend(requests_of(wave))
                    await anyio.sleep(1.0)
                    if victim is not None:  # kill -9 mid-flight; s0 and w1 return under their ids, s1 as new
                        role = fleet.services[victim].role
                        await anyio.to_thread.run_sync(fleet.kill, victim)
                        fleet.start(role, victim, keep_id=victim != "s1",
                                    **({"ALIGNQ_SHARD_IDS": "1,2"} if victim == "s1" else {}))
                        kills.append(victim)
                ids = [request.request_id for request in requests]
                async for result in client.results_as_completed(ids, timeout_s=50):
                    results[result.request_id] = result
            with anyio.move_on_after(10):  # the last answers' acks
                while any(sync.zcard(keys.for_shard(s).pending_requests) for s in keys.shards):
                    await anyio.sleep(0.1)
        finally:
            exit_codes = fleet.stop_all()  # closes the fleet's client
        sync = cluster.client()
        answered_logs = fleet.answered_counts()
        problems = [p for request in requests for p in check_result(sync, request, answered_logs, keys=keys)]
        num_unacked = sum(sync.xpending(keys.for_shard(s).requests, SCHEDULER_GROUP)["pending"] for s in keys.shards)
        num_pending = sum(sync.zcard(keys.for_shard(s).pending_requests) for s in keys.shards)
        per_shard = Counter(keys.shard_of(request.request_id) for request in requests)
        letters = dead_letters(sync, keys)
        sync.close()
    statuses = Counter(result.status for result in results.values())
    summary = f"kills={kills} per_shard={dict(per_shard)} statuses={dict(statuses)} exit_codes={exit_codes}"
    print("CLUSTER", summary)
    assert len(per_shard) == 3, f"requests should land on every shard: {summary}"
    assert problems == [], f"{summary}\n{problems}\n{fleet.log_tail('s0')}"
    assert len(results) == num_waves * WAVE_SIZE and statuses[ResultStatus.OK] >= len(results) - 3, summary
    assert num_unacked == 0 and num_pending == 0 and letters == [], summary
    assert all(code in (0, None) for code in exit_codes.values()), summary


async def test_cluster_client_waits_on_events_and_results_across_shards(tmp_path: pathlib.Path) -> None:
    """The SDK's event router reads one slot per XREAD on a cluster; cancel and result work per shard."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not on PATH")
    with ClusterSet(tmp_path / "redis", base_port=17450) as cluster:
        async with Client(cluster.url(), num_shards=3, poll_interval_s=0.2) as client:
            ids = [await client.submit(f"prompt {i}", request_id=f"r{i}") for i in range(6)]
            assert len({client.keys.shard_of(client.wire_id(rid)) for rid in ids}) > 1
            events = [client.events(rid, timeout_s=10) for rid in ids]  # waiters on several shards at once
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    seen: list[str] = []

                    async def wait_for(stream: object, rid: str) -> None:
                        async for event in stream:  # type: ignore[attr-defined]
                            if event.is_terminal:
                                seen.append(rid)

                    for rid, stream in zip(ids, events):
                        tg.start_soon(wait_for, stream, rid)
                    await anyio.sleep(0.3)
                    for rid in ids:  # no scheduler runs: cancelling answers each request once
                        assert int(await client.cancel(rid)) == 1
            assert sorted(seen) == sorted(ids)
            results = [r async for r in client.results_as_completed(ids, timeout_s=5)]
            assert {r.status for r in results} == {ResultStatus.CANCELLED}
