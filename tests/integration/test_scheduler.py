"""The scheduler service against a real Redis, with a synthetic worker that speaks the worker protocol.

The synthetic worker replaces only the model: it reads ``keys.jobs`` in group ``workers`` and replies
exactly as the worker service does (one MULTI: XADD the SampleSet to the scheduler's stream, HSET the
kept samples, XACK). Rewards are Bernoulli draws, deterministic in (request, sample index), with the
success rate in the request's metadata ``p`` — so tests know which prompts are easy.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from middleware.client import Client
from middleware.runtime.embedded_redis import EmbeddedRedis
from middleware.runtime.launcher import alignq_command
from middleware.scheduler.service import ANSWER_LUA, Scheduler
from middleware.settings import SchedulerSettings
from schemas import (
    PAYLOAD_FIELD,
    SCHEDULER_GROUP,
    WORKER_GROUP,
    AlignRequest,
    AlignResult,
    DeadLetter,
    ErrorCode,
    Event,
    EventKind,
    Job,
    JobKind,
    Keys,
    ResultStatus,
    Sample,
    SampleSet,
    SchemaError,
    decode,
    encode,
)
from schemas.transport import StreamConsumer

pytestmark = pytest.mark.anyio
KEYS = Keys("alignq")


def synthetic_reward(request_id: str, index: int, p: float) -> float:
    digest = hashlib.blake2b(f"{request_id}/{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return 1.0 if u < p else 0.0


class SyntheticWorker:
    """Replies to jobs like workers/service.py, with synthetic samples and an optional delay per job kind."""

    def __init__(self, redis: aioredis.Redis, *, delays_s: dict[JobKind, float] | None = None) -> None:
        self.redis = redis
        self.delays_s = delays_s or {}
        self.jobs_run: Counter[str] = Counter()
        self.consumer = StreamConsumer(redis, KEYS.jobs, WORKER_GROUP, "synthetic")

    async def run(self) -> None:
        await self.consumer.ensure_group()
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    entries = await self.consumer.read(count=64, block_ms=50)
                except (RedisConnectionError, OSError):  # Redis restarting
                    await anyio.sleep(0.1)
                    continue
                for entry in entries:
                    tg.start_soon(self._run_job, entry.entry_id, decode(Job, entry.payload))

    async def _run_job(self, entry_id: str, job: Job) -> None:
        await anyio.sleep(self.delays_s.get(job.kind, 0.0))
        self.jobs_run[job.job_id] += 1
        p = float(job.metadata.get("p", 0.5))
        num_samples = job.num_samples if job.kind != JobKind.AISP else (job.num_samples // 4) * 4
        samples = [Sample(index=job.sample_offset + i, text=f"{job.request_id} sample {job.sample_offset + i}",
                          reward=synthetic_reward(job.request_id, job.sample_offset + i, p), num_tokens=5)
                   for i in range(num_samples)]
        sample_set = SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id="synthetic", kind=job.kind,
                               samples=samples, generate_s=0.01, score_s=0.002)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(KEYS.samples(job.scheduler_id), {PAYLOAD_FIELD: encode(sample_set)}, maxlen=10_000,
                      approximate=True)
            if samples:
                pipe.hset(KEYS.kept_samples(job.request_id), mapping={str(s.index): encode(s) for s in samples})
                pipe.expire(KEYS.kept_samples(job.request_id), 3600)
            pipe.xack(KEYS.jobs, WORKER_GROUP, entry_id)
            await pipe.execute()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_settings(redis_url: str, **overrides: object) -> SchedulerSettings:
    options = {"redis_url": redis_url, "window_ms": 30, "max_window": 8, "default_budget": 8,
               "explore_fraction": 0.5, "claim_idle_ms": 400, "heartbeat_ms": 100, "shutdown_grace_s": 5.0}
    options.update(overrides)
    return SchedulerSettings(**options)  # type: ignore[arg-type]


@asynccontextmanager
async def running(redis: aioredis.Redis, settings: SchedulerSettings, *, num_schedulers: int = 1,
                  worker: SyntheticWorker | None = None) -> AsyncIterator[list[Scheduler]]:
    """Schedulers and a synthetic worker in one task group; schedulers drain on exit."""
    worker = worker or SyntheticWorker(redis)
    schedulers = [Scheduler(settings, redis=redis, scheduler_id=f"s{i}") for i in range(num_schedulers)]
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        for scheduler in schedulers:
            ready = anyio.Event()
            tg.start_soon(partial(scheduler.run, stop=stop, ready=ready))
            await ready.wait()
        yield schedulers
        stop.set()
        with anyio.fail_after(10):
            while any(s.core.num_in_flight for s in schedulers):
                await anyio.sleep(0.02)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


async def all_events(redis: aioredis.Redis, request_id: str) -> list[Event]:
    return [decode(Event, fields[PAYLOAD_FIELD]) for _, fields in await redis.xrange(KEYS.events(request_id))]


async def has_event(redis: aioredis.Redis, request_id: str, kind: EventKind) -> bool:
    return any(event.kind == kind for event in await all_events(redis, request_id))


async def results_of(client: Client, request_ids: list[str], timeout_s: float = 20) -> list[AlignResult]:
    with anyio.fail_after(timeout_s):
        return [await client.result(rid, timeout_s=timeout_s, raise_on_error=False) for rid in request_ids]


async def test_bon_answers_each_prompt_once_with_the_argmax_and_spends_the_window_budget(
        redis: aioredis.Redis) -> None:
    async with running(redis, make_settings(_url(redis), max_window=12, window_ms=200)) as (scheduler,), Client(redis) as client:
        budgets = [4 + 2 * (i % 4) for i in range(12)]
        ids = await client.submit_many([{"prompt": f"q{i}", "budget": b, "metadata": {"p": 0.2 + 0.05 * i}}
                                        for i, b in enumerate(budgets)])
        results = await results_of(client, ids)
    assert [r.status for r in results] == [ResultStatus.OK] * 12
    assert sum(r.samples_used for r in results) == sum(budgets)  # one window: Σ samples = Σ budgets
    for result, budget in zip(results, budgets):
        events = await all_events(redis, result.request_id)
        assert [e.kind for e in events] == [EventKind.QUEUED, EventKind.EXPLORED, EventKind.ALLOCATED, EventKind.DONE]
        best = max(result.samples, key=lambda s: s.reward)
        assert (result.reward, result.best_index, result.response) == (best.reward, best.index, best.text)
        assert len({s.index for s in result.samples}) == result.samples_used
        assert result.explore_samples == max(2, round(0.5 * budget))
        assert result.explore_samples + result.exploit_samples == result.samples_used
        assert events[-1].result == result
        assert await redis.exists(KEYS.kept_samples(result.request_id)) == 0  # freed once answered
    assert scheduler.num_answered == 12
    assert await redis.zcard(KEYS.pending_requests) == 0
    assert (await redis.xpending(KEYS.requests, SCHEDULER_GROUP))["pending"] == 0


def _url(redis: aioredis.Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


async def test_easy_prompts_are_answered_before_stage2_ends(redis: aioredis.Redis) -> None:
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 0.6})
    async with running(redis, make_settings(_url(redis), max_window=3, window_ms=500), worker=worker), Client(redis) as client:
        easy, hard1, hard2 = await client.submit_many([
            {"prompt": "easy", "metadata": {"p": 1.0}}, {"prompt": "hard", "metadata": {"p": 0.0}},
            {"prompt": "hard too", "metadata": {"p": 0.0}}])
        results = await results_of(client, [easy, hard1, hard2])
    easy_events = await all_events(redis, easy)
    hard_events = await all_events(redis, hard1)
    assert easy_events[2].kind == EventKind.ALLOCATED and easy_events[2].data["num_samples"] == 0
    assert results[0].samples_used == 4 and results[1].samples_used + results[2].samples_used == 20
    assert easy_events[-1].at_ms + 400 < hard_events[-1].at_ms  # did not wait for the 0.6 s stage 2


async def test_client_stream_yields_queued_explored_allocated_done(redis: aioredis.Redis) -> None:
    async with running(redis, make_settings(_url(redis), window_ms=10)), Client(redis) as client:
        with anyio.fail_after(20):
            events = [event async for event in client.stream("hello", budget=6, timeout_s=20)]
    assert [e.kind for e in events] == [EventKind.QUEUED, EventKind.EXPLORED, EventKind.ALLOCATED, EventKind.DONE]
    assert set(events[1].data) == {"reward_mean", "reward_std", "num_samples"} and events[1].data["num_samples"] == 3
    assert events[2].data == {"num_samples": 3} and events[3].result.samples_used == 6


async def test_uniform_and_aisp_requests(redis: aioredis.Redis) -> None:
    worker = SyntheticWorker(redis)
    async with running(redis, make_settings(_url(redis)), worker=worker), Client(redis) as client:
        uniform = await client.align("u", method="uniform", budget=5, timeout_s=20)
        aisp = await client.align("a", method="aisp", budget=10, timeout_s=20)
    assert uniform.samples_used == 5 and worker.jobs_run[f"{uniform.request_id}:uniform:0"] == 1
    assert aisp.samples_used == 8 and worker.jobs_run[f"{aisp.request_id}:aisp:0"] == 1


async def test_two_schedulers_share_the_load_and_answer_each_prompt_once(redis: aioredis.Redis) -> None:
    settings = make_settings(_url(redis), max_window=4, window_ms=20, max_in_flight=8)
    async with running(redis, settings, num_schedulers=2) as schedulers, Client(redis) as client:
        ids = await client.submit_many([{"prompt": f"p{i}", "budget": 4} for i in range(40)])
        results = await results_of(client, ids, timeout_s=40)
    assert [r.request_id for r in results] == ids
    assert all(r.status == ResultStatus.OK for r in results)
    assert sum(s.num_answered for s in schedulers) == 40 and all(s.num_answered > 0 for s in schedulers)
    for rid in ids:
        assert [e.kind for e in await all_events(redis, rid)].count(EventKind.DONE) == 1


async def test_bad_input_gets_error_results_or_dead_letters_and_the_service_keeps_running(
        redis: aioredis.Redis) -> None:
    async with running(redis, make_settings(_url(redis), max_budget=32, max_prompt_chars=50)):
        good_before = AlignRequest(prompt="fine", budget=4)
        bad_payloads = {
            "garbage": b"\xc1\xff not msgpack",
            "no_id": encode(AlignRequest(prompt="x")).replace(b"request_id", b"request_iX"),
        }
        too_big = AlignRequest(request_id="too-big", prompt="x", budget=33)
        too_long = AlignRequest(request_id="too-long", prompt="y" * 51)
        import msgpack

        unknown_method = msgpack.packb({**AlignRequest(request_id="bad-method", prompt="z").model_dump(mode="python"),
                                        "method": "magic"})
        wrong_version = msgpack.packb({**AlignRequest(request_id="v2", prompt="z").model_dump(mode="python"),
                                       "schema_version": 99})
        for payload in [encode(good_before), *bad_payloads.values(), encode(too_big), encode(too_long),
                        unknown_method, wrong_version]:
            await redis.xadd(KEYS.requests, {PAYLOAD_FIELD: payload})
        await redis.xadd(KEYS.requests, {b"other": b"field"})
        async with Client(redis) as client:
            good_after = await client.align("still serving", budget=4, timeout_s=20)
            errors = await results_of(client, ["too-big", "too-long", "bad-method", "v2"])
            assert (await client.result(good_before.request_id, timeout_s=20)).status == ResultStatus.OK
    assert good_after.status == ResultStatus.OK
    assert [r.error.code for r in errors] == [ErrorCode.BAD_REQUEST] * 4
    assert "max_budget" in errors[0].error.message and "max_prompt_chars" in errors[1].error.message
    assert "method" in errors[2].error.message and "schema_version" in errors[3].error.message
    letters = [decode(DeadLetter, f[PAYLOAD_FIELD]) for _, f in await redis.xrange(KEYS.dead_letters)]
    assert len(letters) == 3 and "msgpack" in letters[0].reason and "'m'" in letters[2].reason
    assert (await redis.xpending(KEYS.requests, SCHEDULER_GROUP))["pending"] == 0


async def test_deadline_gives_partial_or_deadline_exceeded(redis: aioredis.Redis) -> None:
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 5.0, JobKind.UNIFORM: 5.0})
    async with running(redis, make_settings(_url(redis), window_ms=10), worker=worker), Client(redis) as client:
        partial_id = await client.submit("slow stage 2", budget=8, deadline_ms=800)
        none_id = await client.submit("slow", method="uniform", budget=4, deadline_ms=300)
        partial_result, none_result = await results_of(client, [partial_id, none_id], timeout_s=5)
    assert partial_result.status == ResultStatus.PARTIAL and partial_result.samples_used == 4
    assert none_result.status == ResultStatus.ERROR and none_result.error.code == ErrorCode.DEADLINE_EXCEEDED
    assert 0.3 <= none_result.total_s < 2.0


async def test_killed_scheduler_requests_are_reclaimed_and_kept_samples_reused(redis: aioredis.Redis) -> None:
    settings = make_settings(_url(redis), max_window=4, window_ms=20, claim_idle_ms=300)
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 0.5})
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        victim = Scheduler(settings, redis=redis, scheduler_id="victim")
        victim_scope = anyio.CancelScope()  # cancelled without draining: what kill -9 leaves behind
        tg.start_soon(partial(_run_in_scope, victim, victim_scope))
        async with Client(redis) as client:
            # Never solved (p = 0): every prompt gets stage-2 samples, so none is answered before the kill.
            ids = await client.submit_many([{"prompt": f"k{i}", "budget": 8, "metadata": {"p": 0.0}}
                                            for i in range(4)])
            with anyio.fail_after(10):
                while not all([await has_event(redis, rid, EventKind.ALLOCATED) for rid in ids]):
                    await anyio.sleep(0.02)
        victim_scope.cancel()
        await anyio.sleep(0.05)
        assert (await redis.xpending(KEYS.requests, SCHEDULER_GROUP))["pending"] == 4  # left un-acked
        async with running(redis, settings, worker=SyntheticWorker(redis)) as (heir,), Client(redis) as client:
            results = await results_of(client, ids)
        tg.cancel_scope.cancel()
    assert heir.num_answered == 4 and all(r.status == ResultStatus.OK for r in results)
    assert all(r.samples_used == 8 for r in results)
    for rid in ids:  # stage 1 ran once, before the kill; the heir reused its kept samples
        assert worker.jobs_run[f"{rid}:explore:0"] == 1
        assert [e.kind for e in await all_events(redis, rid)].count(EventKind.DONE) == 1


async def test_an_heir_spends_what_the_dead_schedulers_window_granted(redis: aioredis.Redis) -> None:
    """Killed after stage 2: the heir finishes each request on its grant, the window's budget spent once.

    The easy prompt (always solved) gives its stage-2 share to the others and is answered before the kill;
    re-planned on their own budgets, the others would spend 3 x 8 and the window 4 less than its 4 x 8.
    """
    settings = make_settings(_url(redis), max_window=4, window_ms=20, claim_idle_ms=300)
    doomed = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 60})  # dies with the scheduler, stage 2 undone
    doomed.consumer = StreamConsumer(redis, KEYS.jobs, WORKER_GROUP, "doomed")
    async with anyio.create_task_group() as tg:
        doomed_scope, victim_scope = anyio.CancelScope(), anyio.CancelScope()

        async def run_doomed() -> None:
            with doomed_scope:
                await doomed.run()

        tg.start_soon(run_doomed)
        victim = Scheduler(settings, redis=redis, scheduler_id="victim")
        tg.start_soon(partial(_run_in_scope, victim, victim_scope))
        async with Client(redis) as client:
            ids = await client.submit_many([{"prompt": f"g{i}", "budget": 8, "metadata": {"p": 1.0 if i == 0 else 0.0}}
                                            for i in range(4)])
            with anyio.fail_after(10):
                while not all([await has_event(redis, rid, EventKind.ALLOCATED) for rid in ids]):
                    await anyio.sleep(0.02)
        victim_scope.cancel()
        doomed_scope.cancel()
        await anyio.sleep(0.05)
        async with running(redis, settings, worker=SyntheticWorker(redis)) as (heir,), Client(redis) as client:
            results = {r.request_id: r for r in await results_of(client, ids)}
        tg.cancel_scope.cancel()
    assert victim.num_answered == 1 and heir.num_answered == 3
    assert results[ids[0]].samples_used == 4  # explored only
    assert sorted(results[rid].samples_used for rid in ids[1:]) == [9, 9, 10]  # 8 + the easy one's 4, shared
    assert sum(r.samples_used for r in results.values()) == 4 * 8


async def _run_in_scope(scheduler: Scheduler, scope: anyio.CancelScope) -> None:
    with scope:
        await scheduler.run()


async def test_answer_published_but_not_acked_is_not_answered_twice(redis: aioredis.Redis) -> None:
    settings = make_settings(_url(redis), claim_idle_ms=200)
    ghost = StreamConsumer(redis, KEYS.requests, SCHEDULER_GROUP, "ghost")
    await ghost.ensure_group()
    async with Client(redis) as client:
        rid = await client.submit("answered by a scheduler that died before acking", budget=4)
    assert len(await ghost.read(count=1, block_ms=10)) == 1  # delivered, never acked
    first = AlignResult(request_id=rid, status=ResultStatus.OK, response="first", reward=1.0, samples_used=4)
    script = redis.register_script(ANSWER_LUA)
    keys = [KEYS.request_claim(rid), KEYS.result(rid), KEYS.events(rid), KEYS.pending_requests, KEYS.requests,
            KEYS.kept_samples(rid), KEYS.quota_samples("")]
    event = Event(request_id=rid, kind=EventKind.DONE, result=first)
    assert await script(keys=keys, args=[rid, encode(first), encode(event), 60, SCHEDULER_GROUP, "", "ghost"]) == 1
    async with running(redis, settings) as (scheduler,):
        with anyio.fail_after(10):
            while (await redis.xpending(KEYS.requests, SCHEDULER_GROUP))["pending"]:
                await anyio.sleep(0.05)
    assert scheduler.num_answered == 0
    assert [e.result.response for e in await all_events(redis, rid)] == ["first"]


async def test_entry_delivered_too_often_is_dead_lettered_with_an_error_result(redis: aioredis.Redis) -> None:
    settings = make_settings(_url(redis), claim_idle_ms=200, max_deliveries=3)
    ghost = StreamConsumer(redis, KEYS.requests, SCHEDULER_GROUP, "ghost")
    await ghost.ensure_group()
    async with Client(redis) as client:
        rid = await client.submit("poison", budget=4)
        entry = (await ghost.read(count=1, block_ms=10))[0]
        for _ in range(2):  # two more deliveries to dead consumers: 3 so far
            await redis.xclaim(KEYS.requests, SCHEDULER_GROUP, "ghost", min_idle_time=0, message_ids=[entry.entry_id])
        await anyio.sleep(0.25)
        async with running(redis, settings):
            result = await client.result(rid, timeout_s=10, raise_on_error=False)
    assert result.status == ResultStatus.ERROR and result.error.code == ErrorCode.DELIVERY_EXHAUSTED
    letters = [decode(DeadLetter, f[PAYLOAD_FIELD]) for _, f in await redis.xrange(KEYS.dead_letters)]
    assert [(d.request_id, d.entry_id) for d in letters] == [(rid, entry.entry_id)]


async def test_graceful_shutdown_finishes_in_flight_work(redis: aioredis.Redis) -> None:
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 0.3})
    settings = make_settings(_url(redis), window_ms=1000, max_window=64)
    stop = anyio.Event()
    scheduler = Scheduler(settings, redis=redis, scheduler_id="s0")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        tg.start_soon(partial(scheduler.run, stop=stop))
        async with Client(redis) as client:
            ids = await client.submit_many([f"g{i}" for i in range(5)])
            with anyio.fail_after(5):
                while scheduler.core.num_in_flight < 5:
                    await anyio.sleep(0.01)
            stop.set()  # the forming window launches at once; nothing new is taken
            late = await client.submit("after the stop")
            with anyio.fail_after(10):
                while scheduler.core.num_in_flight:
                    await anyio.sleep(0.02)
            results = await results_of(client, ids)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert all(r.status == ResultStatus.OK for r in results)
    assert await redis.exists(KEYS.result(late)) == 0 and await redis.zscore(KEYS.pending_requests, late)
    (group,) = await redis.xinfo_groups(KEYS.requests)
    assert group["pending"] + group["lag"] == 1  # the late request waits for another scheduler, not lost
    assert not math.isnan(results[0].reward)


async def test_scheduler_survives_a_redis_restart() -> None:
    server = EmbeddedRedis()
    url = server.start()
    try:
        redis = aioredis.Redis.from_url(url)
        async with running(redis, make_settings(url, window_ms=10)) as (scheduler,), Client(redis) as client:
            assert (await client.align("before", budget=4, timeout_s=10)).status == ResultStatus.OK
            server.stop()  # no persistence: streams, groups and results are gone
            await anyio.sleep(0.5)
            server = EmbeddedRedis(port=server.port)
            server.start()
            after = await client.align("after the restart", budget=4, timeout_s=20)
        assert after.status == ResultStatus.OK and scheduler.num_answered == 2
        await redis.aclose()
    finally:
        server.stop()


async def test_scheduler_process_drains_on_sigterm_and_exits_0(redis: aioredis.Redis, redis_url: str,
                                                                 tmp_path: os.PathLike) -> None:
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 0.5})
    env = {**os.environ, "ALIGNQ_REDIS_URL": redis_url, "ALIGNQ_WINDOW_MS": "20", "ALIGNQ_DEFAULT_BUDGET": "8",
           "ALIGNQ_EXPLORE_FRACTION": "0.5", "ALIGNQ_HEARTBEAT_MS": "100"}
    with open(os.path.join(tmp_path, "scheduler.log"), "wb") as log:  # noqa: ASYNC230 - setup, not I/O-bound
        process = await anyio.open_process(alignq_command("-v", "scheduler"), env=env, stdout=subprocess.DEVNULL,
                                           stderr=log)
    async with anyio.create_task_group() as tg, Client(redis) as client:
        tg.start_soon(worker.run)
        ids = await client.submit_many([{"prompt": f"t{i}", "metadata": {"p": 0.0}} for i in range(3)])
        with anyio.fail_after(20):
            while not all([await has_event(redis, rid, EventKind.ALLOCATED) for rid in ids]):
                await anyio.sleep(0.02)
        process.send_signal(signal.SIGTERM)  # mid stage 2: the window finishes before the exit
        with anyio.fail_after(15):
            code = await process.wait()
        results = await results_of(client, ids, timeout_s=1)
        tg.cancel_scope.cancel()
    await process.aclose()
    log_text = pathlib.Path(tmp_path, "scheduler.log").read_text()
    assert code == 0, log_text
    assert [r.status for r in results] == [ResultStatus.OK] * 3 and all(r.samples_used == 8 for r in results)
    assert "draining" in log_text
    assert not [key async for key in redis.scan_iter(match=KEYS.heartbeat_pattern("scheduler"))]


async def test_scheduler_gives_up_requests_whose_lease_another_scheduler_took(redis: aioredis.Redis) -> None:
    worker = SyntheticWorker(redis, delays_s={JobKind.EXPLOIT: 1.0})
    async with running(redis, make_settings(_url(redis), window_ms=10), worker=worker) as (scheduler,), \
            Client(redis) as client:
        rid = await client.submit("taken over", budget=8, metadata={"p": 0.0})
        with anyio.fail_after(10):
            while not await has_event(redis, rid, EventKind.ALLOCATED):
                await anyio.sleep(0.02)
        (entry_id,) = scheduler.core.entry_ids()
        await redis.xclaim(KEYS.requests, SCHEDULER_GROUP, "other", min_idle_time=0, message_ids=[entry_id])
        other = StreamConsumer(redis, KEYS.requests, SCHEDULER_GROUP, "other")
        with anyio.fail_after(5):
            while scheduler.core.num_in_flight:
                await other.renew([entry_id])  # "other" is alive: keeps its lease
                await anyio.sleep(0.02)
        with anyio.move_on_after(1.2):  # the stage-2 reply arrives, for a request no longer ours
            while True:
                await other.renew([entry_id])
                await anyio.sleep(0.05)
        assert await other.renew([entry_id]) == {entry_id}
    assert scheduler.num_answered == 0 and await redis.exists(KEYS.result(rid)) == 0


def fuzz_payloads() -> list[bytes]:
    """1,000 payloads from hypothesis: garbage bytes, random maps, truncated and mutated valid requests."""
    import msgpack
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = AlignRequest(prompt="fuzz", budget=4).model_dump(mode="python")
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                        st.floats(allow_nan=True), st.text(max_size=30), st.binary(max_size=30))
    values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=8), scalars, max_size=3))
    request_ids = st.one_of(st.from_regex(r"fz[a-z0-9]{1,12}", fullmatch=True), scalars)

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        message = dict(valid, request_id=draw(request_ids))
        for _ in range(draw(st.integers(min_value=0, max_value=3))):
            field = draw(st.one_of(st.sampled_from(sorted(valid)), st.text(max_size=10)))
            if draw(st.booleans()) and field in message and field != "request_id":
                del message[field]
            else:
                message[field] = draw(values)
        return msgpack.packb(message, use_bin_type=True)

    valid_bytes = msgpack.packb(valid, use_bin_type=True)
    payloads: list[bytes] = []
    strategy = st.one_of(
        st.binary(max_size=200),
        st.dictionaries(st.text(max_size=10), values, max_size=6).map(lambda d: msgpack.packb(d, use_bin_type=True)),
        st.integers(min_value=1, max_value=len(valid_bytes) - 1).map(lambda k: valid_bytes[:k]),
        mutated(),
    )

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(payload: bytes) -> None:
        payloads.append(payload)

    collect()
    return payloads


async def test_fuzzed_requests_are_answered_or_dead_lettered_and_nothing_crashes(redis: aioredis.Redis) -> None:
    from schemas import salvage_request_id

    payloads = fuzz_payloads()
    assert len(payloads) >= 900
    entry_ids = []
    async with redis.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.xadd(KEYS.requests, {PAYLOAD_FIELD: payload})
        entry_ids = [entry_id.decode() for entry_id in await pipe.execute()]
    settings = make_settings(_url(redis), max_budget=64, max_in_flight=512, max_window=64)
    async with running(redis, settings) as (scheduler,):
        with anyio.fail_after(120):
            while True:
                (group,) = await redis.xinfo_groups(KEYS.requests)
                if group["pending"] == 0 and group["lag"] == 0 and not scheduler.core.num_in_flight:
                    break
                await anyio.sleep(0.1)
    dead = {decode(DeadLetter, f[PAYLOAD_FIELD]).entry_id for _, f in await redis.xrange(KEYS.dead_letters)}
    unanswered = []
    for entry_id, payload in zip(entry_ids, payloads):
        try:  # pydantic's lax mode accepts e.g. a bytes request_id, which salvage does not
            request_id = decode(AlignRequest, payload).request_id
        except SchemaError:
            request_id = salvage_request_id(payload)
        if entry_id in dead:
            continue
        if request_id is None or not await redis.exists(KEYS.result(request_id)):
            unanswered.append((entry_id, payload[:80]))
    assert unanswered == []
    assert len(dead) > 0 and scheduler.num_answered > 0
