"""The worker service against a real Redis, with tiny real models: batching, replies, bad input,
dead letters, the lease, a SIGKILLed worker's job reclaimed, SIGTERM draining the batch in flight."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import redis.asyncio as aioredis

from schemas import (
    PAYLOAD_FIELD,
    WORKER_GROUP,
    DeadLetter,
    ErrorCode,
    Job,
    JobKind,
    Keys,
    Sample,
    SampleSet,
    decode,
    encode,
    now_ms,
)
from workers.service import Worker, serve_worker
from workers.settings import WorkerSettings

pytestmark = pytest.mark.anyio

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KEYS = Keys()
SCHEDULER = "sched-1"
if str(HERE) not in sys.path:  # the test reward ``python:nan_scorer:score_batch``
    sys.path.insert(0, str(HERE))


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_settings(redis_url: str, model_dir: pathlib.Path, **overrides: object) -> WorkerSettings:
    options = {"redis_url": redis_url, "model": str(model_dir), "reward_model": "python:nan_scorer:score_batch",
               "device": "cpu", "dtype": "float32", "num_threads": 1, "max_batch": 16, "claim_idle_ms": 1000,
               "heartbeat_ms": 200, "shutdown_grace_s": 20.0}
    options.update(overrides)
    return WorkerSettings(**options)  # type: ignore[arg-type]


def make_job(request_id: str = "r1", *, kind: JobKind = JobKind.EXPLORE, sample_offset: int = 0,
             num_samples: int = 3, **fields: object) -> Job:
    options = {"job_id": f"{request_id}:{kind}:{sample_offset}", "request_id": request_id, "scheduler_id": SCHEDULER,
               "kind": kind, "prompt": f"Tell me about {request_id}", "num_samples": num_samples,
               "sample_offset": sample_offset, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 11}
    options.update(fields)
    return Job(**options)  # type: ignore[arg-type]


async def push(redis: aioredis.Redis, *jobs: Job) -> list[str]:
    ids = []
    for job in jobs:
        ids.append((await redis.xadd(KEYS.jobs, {PAYLOAD_FIELD: encode(job)})).decode())
    return ids


async def replies(redis: aioredis.Redis, count: int, *, timeout_s: float = 60.0) -> list[SampleSet]:
    """The first ``count`` SampleSets on the scheduler's stream (waits for them)."""
    found: list[SampleSet] = []
    cursor = "0"
    with anyio.fail_after(timeout_s):
        while len(found) < count:
            reply = await redis.xread({KEYS.samples(SCHEDULER): cursor}, block=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    found.append(decode(SampleSet, fields[PAYLOAD_FIELD]))
    return found


async def num_pending(redis: aioredis.Redis) -> int:
    return int((await redis.xpending(KEYS.jobs, WORKER_GROUP))["pending"])


async def wait_held_by(redis: aioredis.Redis, consumer: str, *, timeout_s: float = 60.0) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            try:
                pending = await redis.xpending_range(KEYS.jobs, WORKER_GROUP, min="-", max="+", count=10)
            except aioredis.ResponseError:  # no group yet
                pending = []
            if any(p["consumer"].decode() == consumer for p in pending):
                return
            await anyio.sleep(0.05)


@asynccontextmanager
async def running(settings: WorkerSettings, worker_id: str = "w1") -> AsyncIterator[Worker]:
    worker = Worker(settings, worker_id=worker_id)
    stop, ready = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_worker(settings, stop=stop, ready=ready, worker=worker))
        with anyio.fail_after(60):
            await ready.wait()
        try:
            yield worker
        finally:
            stop.set()


async def test_burst_of_jobs_is_one_engine_batch_with_replies_kept_and_acked(redis, redis_url, tiny_llama_dir):
    jobs = [make_job(f"r{i}", sample_offset=4 * (i % 2), num_samples=2 + i % 3) for i in range(6)]
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    await push(redis, *jobs)  # waiting before the worker starts: one read takes them all
    async with running(make_settings(redis_url, tiny_llama_dir)) as worker:
        got = {s.job_id: s for s in await replies(redis, len(jobs))}
        assert worker.stats.num_batches == 1 and worker.stats.max_batch_jobs == 6
        assert worker.runner is not None and worker.runner.num_engine_calls == 1
        with anyio.fail_after(5):  # the next heartbeat reports them
            while (beat := json.loads(await redis.get(KEYS.heartbeat("worker", "w1"))))["num_jobs_done"] < 6:
                await anyio.sleep(0.05)
        assert beat["num_jobs_done"] == 6 and beat["host"] and beat["pid"] == os.getpid()
        assert 0 < await redis.pttl(KEYS.heartbeat("worker", "w1")) <= 600  # 3 × heartbeat_ms
        # a job's samples do not depend on its batch: the engine alone gives the same texts
        alone = await anyio.to_thread.run_sync(worker.runner.run, [jobs[3]])
    assert set(got) == {j.job_id for j in jobs}
    for job in jobs:
        sample_set = got[job.job_id]
        assert sample_set.error is None and sample_set.worker_id == "w1" and sample_set.kind == JobKind.EXPLORE
        assert [s.index for s in sample_set.samples] == list(range(job.sample_offset, job.sample_offset + job.num_samples))
        kept = await redis.hgetall(KEYS.kept_samples(job.request_id))
        assert {int(k) for k in kept} == {s.index for s in sample_set.samples}
        assert {decode(Sample, v) for v in kept.values()} == set(sample_set.samples)
        assert 0 < await redis.ttl(KEYS.kept_samples(job.request_id)) <= 3600
    assert [s.text for s in alone[0].samples] == [s.text for s in got[jobs[3].job_id].samples]
    assert await num_pending(redis) == 0
    assert await redis.exists(KEYS.heartbeat("worker", "w1")) == 0  # removed on a clean stop


async def test_bad_input_is_answered_or_dead_lettered_and_the_worker_keeps_serving(redis, redis_url, tiny_llama_dir):
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    garbage_id = (await redis.xadd(KEYS.jobs, {PAYLOAD_FIELD: b"\xc1 not msgpack"})).decode()
    nameable = make_job("r-bad").model_dump(mode="python")
    nameable["num_samples"] = 0  # fails validation, but names its scheduler: it hears of it
    import msgpack

    await redis.xadd(KEYS.jobs, {PAYLOAD_FIELD: msgpack.packb(nameable)})
    expired = make_job("r-late", deadline_at_ms=now_ms() - 1000)
    nan = make_job("r-nan", metadata={"nan": True})
    good = make_job("r-good")
    await push(redis, expired, nan, good)
    async with running(make_settings(redis_url, tiny_llama_dir)) as worker:
        got = {s.request_id: s for s in await replies(redis, 4)}
        assert got["r-bad"].error.code == ErrorCode.INTERNAL and "num_samples" in got["r-bad"].error.message
        assert got["r-late"].error.code == ErrorCode.DEADLINE_EXCEEDED and not got["r-late"].samples
        assert got["r-nan"].error.code == ErrorCode.REWARD_FAILED and not got["r-nan"].samples
        assert got["r-good"].error is None and len(got["r-good"].samples) == 3
        assert worker.stats.num_expired == 1 and worker.stats.num_dead_letters == 2
        letters = [decode(DeadLetter, f[PAYLOAD_FIELD]) for _, f in await redis.xrange(KEYS.dead_letters)]
        assert len(letters) == 2 and letters[0].entry_id == garbage_id and "undecodable" in letters[0].reason
        assert letters[1].request_id is None and "num_samples" in letters[1].reason
        # still serving
        await push(redis, make_job("r-after"))
        after = await replies(redis, 5)
        assert after[-1].request_id == "r-after" and after[-1].error is None
        await anyio.sleep(0.1)
        await redis.delete(KEYS.jobs)  # under the worker's blocked XREADGROUP (UNBLOCKED), group and all
        await anyio.sleep(0.1)
        await push(redis, make_job("r-recreated"))
        assert (await replies(redis, 6))[-1].request_id == "r-recreated"
    assert await num_pending(redis) == 0
    assert not await redis.exists(KEYS.kept_samples("r-nan"))


async def test_job_delivered_too_often_is_dead_lettered_with_an_error_reply(redis, redis_url, tiny_llama_dir):
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    [entry_id] = await push(redis, make_job("r-cursed"))
    await redis.xreadgroup(WORKER_GROUP, "ghost", {KEYS.jobs: ">"}, count=1)
    # three deliveries so far (workers that died), idle long enough to be reclaimed
    await redis.xclaim(KEYS.jobs, WORKER_GROUP, "ghost", 0, [entry_id], idle=5000, retrycount=3)
    async with running(make_settings(redis_url, tiny_llama_dir, max_deliveries=3)) as worker:
        [reply] = await replies(redis, 1)
        assert worker.stats.num_reclaimed == 1 and worker.stats.num_batches == 0
    assert reply.error.code == ErrorCode.DELIVERY_EXHAUSTED and not reply.samples
    [(_, fields)] = await redis.xrange(KEYS.dead_letters)
    letter = decode(DeadLetter, fields[PAYLOAD_FIELD])
    assert letter.entry_id == entry_id and letter.request_id == "r-cursed" and "4 times" in letter.reason
    assert await num_pending(redis) == 0


async def test_long_job_keeps_its_lease_while_its_worker_lives(redis, redis_url, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("NAN_SCORER_SLEEP", "1")
    async with running(make_settings(redis_url, tiny_llama_dir), "w-long") as worker:
        await push(redis, make_job("r-long", metadata={"sleep_s": 3}))  # three times claim_idle_ms
        await wait_held_by(redis, "w-long")
        stolen = []
        while not await redis.xlen(KEYS.samples(SCHEDULER)):  # another worker's reclaim, every 100 ms
            stolen += await redis.xautoclaim(KEYS.jobs, WORKER_GROUP, "thief", min_idle_time=1000, justid=True)
            await anyio.sleep(0.1)
        [reply] = await replies(redis, 1)
        assert worker.stats.num_reclaimed == 0
    assert stolen == []
    assert reply.worker_id == "w-long" and reply.error is None and reply.generate_s + reply.score_s >= 3
    assert await num_pending(redis) == 0


async def test_batch_past_the_grace_period_is_abandoned_unacked(redis, redis_url, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("NAN_SCORER_SLEEP", "1")
    settings = make_settings(redis_url, tiny_llama_dir, shutdown_grace_s=0.3)
    async with running(settings, "w-slow") as worker:
        await push(redis, make_job("r-slow", metadata={"sleep_s": 4}))
        await wait_held_by(redis, "w-slow")
        await anyio.sleep(0.3)
        stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 3  # did not wait for the 4 s job
    assert worker._is_batch_abandoned and worker.stats.num_jobs_done == 0
    assert await redis.xlen(KEYS.samples(SCHEDULER)) == 0 and await num_pending(redis) == 1  # for another worker


async def test_restarted_worker_takes_its_own_pending_jobs_first(redis, redis_url, tiny_llama_dir):
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    await push(redis, make_job("r-mine"))
    await redis.xreadgroup(WORKER_GROUP, "w-stable", {KEYS.jobs: ">"}, count=1)  # then the process died
    settings = make_settings(redis_url, tiny_llama_dir, worker_id="w-stable", claim_idle_ms=600_000)
    async with running(settings, "w-stable") as worker:  # same consumer name: no claim_idle_ms wait
        [reply] = await replies(redis, 1, timeout_s=20)
        assert worker.stats.num_reclaimed == 0
    assert reply.request_id == "r-mine" and reply.error is None and await num_pending(redis) == 0


async def test_worker_keeps_serving_across_a_redis_restart(tiny_llama_dir, monkeypatch):
    from middleware.runtime.embedded_redis import EmbeddedRedis

    monkeypatch.setenv("NAN_SCORER_SLEEP", "1")
    server = EmbeddedRedis()
    url = server.start()
    redis = aioredis.Redis.from_url(url)
    try:
        async with running(make_settings(url, tiny_llama_dir)) as worker:
            await push(redis, make_job("r-before", metadata={"sleep_s": 1.5}))
            await wait_held_by(redis, "w1")
            server.stop()  # mid-job, no persistence: the stream and its group are gone
            await anyio.sleep(0.3)
            server = EmbeddedRedis(port=server.port)
            server.start()
            try:  # the test's own pooled connection is stale: redis-py < 6 raises once, newer ones retry
                await redis.ping()
            except aioredis.ConnectionError:
                await redis.ping()
            [before] = await replies(redis, 1, timeout_s=30)  # published once Redis was back
            await push(redis, make_job("r-after"))
            [_, after] = await replies(redis, 2, timeout_s=30)
        assert before.request_id == "r-before" and before.error is None and len(before.samples) == 3
        assert after.request_id == "r-after" and after.error is None and worker.stats.num_jobs_done == 2
    finally:
        await redis.aclose()
        server.stop()


async def test_auto_threads_split_the_cores_between_the_workers_on_a_host(redis, redis_url, tiny_llama_dir):
    import socket

    import torch

    from workers.consumer import count_workers_on_host

    host = socket.gethostname()
    for worker_id, beat_host in (("peer-1", host), ("peer-2", host), ("far-1", "elsewhere")):
        await redis.set(KEYS.heartbeat("worker", worker_id), json.dumps({"worker_id": worker_id, "host": beat_host}))
    await redis.set(KEYS.heartbeat("worker-loading", "peer-3"), json.dumps({"worker_id": "peer-3", "host": host}))
    await redis.set(KEYS.heartbeat("worker", "junk"), b"\xff not json")
    assert await count_workers_on_host(redis, KEYS, host, "me") == 4  # 3 peers here + me
    assert await count_workers_on_host(redis, KEYS, host, "peer-1") == 3
    await redis.delete(*(KEYS.heartbeat("worker", w) for w in ("peer-2", "junk")),
                       KEYS.heartbeat("worker-loading", "peer-3"))
    try:
        async with running(make_settings(redis_url, tiny_llama_dir, num_threads=0)) as worker:
            assert worker.num_threads == max(1, (os.cpu_count() or 1) // 2)  # peer-1 and this one
            assert torch.get_num_threads() == worker.num_threads
    finally:
        torch.set_num_threads(1)


def start_worker_process(redis_url: str, model_dir: pathlib.Path, worker_id: str, *, command: list[str] | None = None,
                         **env: str) -> subprocess.Popen:
    """A worker in its own process: ``python -m workers`` unless ``command`` says otherwise."""
    environment = {**os.environ, "ALIGNQ_REDIS_URL": redis_url, "ALIGNQ_MODEL": str(model_dir),
                   "ALIGNQ_REWARD_MODEL": "python:nan_scorer:score_batch", "ALIGNQ_DEVICE": "cpu",
                   "ALIGNQ_DTYPE": "float32", "ALIGNQ_NUM_THREADS": "1", "ALIGNQ_CLAIM_IDLE_MS": "1000",
                   "ALIGNQ_HEARTBEAT_MS": "200", "ALIGNQ_WORKER_ID": worker_id, "NAN_SCORER_SLEEP": "1",
                   "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen(command or [sys.executable, "-m", "workers"], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(redis: aioredis.Redis, worker_id: str, process: subprocess.Popen) -> None:
    with anyio.fail_after(120):
        while not await redis.exists(KEYS.heartbeat("worker", worker_id)):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            await anyio.sleep(0.1)


async def test_sigkilled_workers_job_is_reclaimed_and_completed_by_another(redis, redis_url, tiny_llama_dir):
    job = make_job("r-orphan", num_samples=4, metadata={"sleep_s": 30})
    process = start_worker_process(redis_url, tiny_llama_dir, "w-doomed")
    try:
        await wait_ready(redis, "w-doomed", process)
        await push(redis, job)
        await wait_held_by(redis, "w-doomed")
        await anyio.sleep(0.5)  # generating or scoring: mid-job
        process.kill()
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stderr.close()
    started = time.monotonic()
    async with running(make_settings(redis_url, tiny_llama_dir), "w-heir") as heir:  # no pause in this process
        [reply] = await replies(redis, 1)
        assert heir.stats.num_reclaimed == 1
        again = await anyio.to_thread.run_sync(heir.runner.run, [job])
    assert time.monotonic() - started >= 0.9  # only after claim_idle_ms
    assert reply.worker_id == "w-heir" and reply.error is None
    assert [s.index for s in reply.samples] == [0, 1, 2, 3]
    assert [s.text for s in reply.samples] == [s.text for s in again[0].samples]  # same seed, same samples
    assert await num_pending(redis) == 0


async def test_sigterm_finishes_the_batch_in_flight_hands_back_the_rest_and_exits_0(redis, redis_url, tiny_llama_dir):
    from middleware.runtime.launcher import alignq_command

    process = start_worker_process(redis_url, tiny_llama_dir, "w-term", command=alignq_command("-v", "worker"),
                                   ALIGNQ_MAX_BATCH_JOBS="1",  # `alignq worker`, as compose runs it
                                   ALIGNQ_MAX_BATCH="3")  # the first job's 3 samples fill the batch: no row to join
    try:
        await wait_ready(redis, "w-term", process)
        first, second = make_job("r-first", metadata={"sleep_s": 2}), make_job("r-second")
        [_, second_id] = await push(redis, first, second)
        with anyio.fail_after(30):  # the first in flight, the second queued behind it
            while await num_pending(redis) < 2:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        returncode = await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
        stderr = process.stderr.read().decode()
    finally:
        process.kill()
        process.stderr.close()
    assert returncode == 0, stderr[-2000:]
    [reply] = await replies(redis, 1, timeout_s=1)
    assert reply.request_id == "r-first" and reply.error is None and len(reply.samples) == 3
    # the second was never started: still pending, and already stale for another worker's XAUTOCLAIM
    [pending] = await redis.xpending_range(KEYS.jobs, WORKER_GROUP, min="-", max="+", count=10)
    assert pending["message_id"].decode() == second_id and pending["time_since_delivered"] >= 1000
    assert await redis.exists(KEYS.heartbeat("worker", "w-term")) == 0
