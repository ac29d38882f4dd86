"""The openai backend's loop is a pipeline, job by job. With the server on other hardware, a job is scored
and published as soon as its own samples are back, never held for a slower job that started with it;
with the server on this host's cores (colocated), a burst is scored once, after its last job. Against a
real llama-server: the slow job asks for many tokens of a story, the fast ones for two tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import redis.asyncio as aioredis
from backend_support import LlamaServer, llama_server_binary
from gateway_support import free_port
from test_worker_service import KEYS, make_job, push, replies

from schemas import WORKER_GROUP, JobKind
from workers.service import Worker, serve_worker
from workers.settings import WorkerSettings

pytestmark = pytest.mark.anyio

SLOW_TOKENS = 192


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    server = LlamaServer(llama_server_binary(), free_port(), slots=8, threads=1)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def run_burst(redis, redis_url: str, server: LlamaServer, *, colocated: bool) -> tuple[Worker, list, list]:
    """A slow job and three fast ones, all taken in one read: (worker, the first three replies, all four)."""
    settings = WorkerSettings(redis_url=redis_url, backend="openai", backend_url=server.url,
                              backend_colocated=colocated, reward_model="python:backend_support:reward_plus",
                              device="cpu", num_threads=1, heartbeat_ms=200, claim_idle_ms=5000,
                              shutdown_grace_s=10.0, backend_timeout_s=120.0)
    slow = make_job("slow", kind=JobKind.UNIFORM, num_samples=2, max_new_tokens=SLOW_TOKENS, temperature=0.8,
                    prompt="Write a long, detailed story about a dragon who learns to bake bread. Use many words.")
    fast = [make_job(f"fast{i}", kind=JobKind.UNIFORM, num_samples=2, max_new_tokens=2, prompt=f"Say hi {i}")
            for i in range(3)]
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    await push(redis, slow, *fast)  # waiting before the worker starts: one read takes all four
    worker = Worker(settings, worker_id="w-pipeline")
    stop, ready = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_worker(settings, stop=stop, ready=ready, worker=worker))
        with anyio.fail_after(60):
            await ready.wait()
        first = await replies(redis, 3, timeout_s=120)
        everything = await replies(redis, 4, timeout_s=120)
        stop.set()
    assert worker.runner.colocated is colocated
    slow_reply = next(r for r in everything if r.job_id == slow.job_id)
    assert slow_reply.error is None and [s.index for s in slow_reply.samples] == [0, 1]
    assert sum(s.num_tokens for s in slow_reply.samples) > 2 * 2  # it really was the longer job
    assert all(10.0 <= s.reward < 11.0 for r in everything for s in r.samples)  # scored by the worker
    assert worker.stats.num_samples == 8 and worker.stats.num_jobs_done == 4
    assert (await redis.xpending(KEYS.jobs, WORKER_GROUP))["pending"] == 0  # every job acked
    return worker, first, everything


async def test_a_job_is_published_when_its_own_samples_are_back(redis, redis_url, llama_server):
    """A server on other hardware: each job is scored as soon as it is back."""
    worker, first, everything = await run_burst(redis, redis_url, llama_server, colocated=False)
    assert {r.job_id for r in first} == {f"fast{i}:uniform:0" for i in range(3)}  # not held for the slow one...
    assert everything[-1].job_id == "slow:uniform:0"
    assert worker.stats.num_batches >= 2  # ...but scored and published before it was back


async def test_a_colocated_server_gets_a_burst_scored_after_its_last_job(redis, redis_url, llama_server):
    """llama-server on this host's cores: no reward call while a job of the burst still generates."""
    worker, _, _ = await run_burst(redis, redis_url, llama_server, colocated=True)
    assert worker.stats.num_batches == 1 and worker.stats.max_batch_jobs == 4  # one reward call, all four


def test_loopback_urls_mean_a_colocated_server() -> None:
    from workers.backends.openai import is_loopback_url

    assert all(is_loopback_url(u) for u in ("http://127.0.0.1:8080/v1", "http://localhost/v1", "http://[::1]:80/v1",
                                            "http://127.3.2.1/v1"))
    assert not any(is_loopback_url(u) for u in ("http://vllm:8000/v1", "https://api.example.com/v1",
                                                "http://10.0.0.5:8000/v1"))
