"""The openai backend's loop is a pipeline, job by job: a job is scored and published as soon as its own
samples are back, never held for a slower job that started with it. A fake OpenAI server (stdlib HTTP,
one thread per request) answers "slow" prompts late."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest
import redis.asyncio as aioredis
from test_worker_service import KEYS, make_job, push, replies

from schemas import WORKER_GROUP, JobKind
from workers.service import Worker, serve_worker
from workers.settings import WorkerSettings

pytestmark = pytest.mark.anyio

SLOW_S = 3.0


class FakeServer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(SLOW_S if "slow" in body["prompt"] else 0.05)
        reply = json.dumps({"choices": [{"text": f" answer {body['seed']}", "finish_reason": "stop"}],
                            "usage": {"completion_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_job_is_published_when_its_own_samples_are_back(redis, redis_url, fake_server):
    settings = WorkerSettings(redis_url=redis_url, backend="openai", backend_url=fake_server, backend_model="fake",
                              reward_model="python:backend_support:reward_plus", device="cpu", num_threads=1,
                              heartbeat_ms=200, claim_idle_ms=5000, shutdown_grace_s=10.0)
    slow = make_job("slow", kind=JobKind.UNIFORM, num_samples=2, prompt="a slow prompt")
    fast = [make_job(f"fast{i}", kind=JobKind.UNIFORM, num_samples=2, prompt=f"a fast prompt {i}") for i in range(3)]
    await redis.xgroup_create(KEYS.jobs, WORKER_GROUP, id="0", mkstream=True)
    await push(redis, slow, *fast)  # waiting before the worker starts: one read takes all four
    worker = Worker(settings, worker_id="w-pipeline")
    stop, ready = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_worker(settings, stop=stop, ready=ready, worker=worker))
        with anyio.fail_after(60):
            await ready.wait()
        started = time.monotonic()
        first = await replies(redis, 3, timeout_s=SLOW_S * 5)
        fast_s = time.monotonic() - started
        everything = await replies(redis, 4, timeout_s=SLOW_S * 5)
        stop.set()
    assert {r.job_id for r in first} == {job.job_id for job in fast}  # not held for the slow one
    assert fast_s < SLOW_S, f"the fast jobs waited {fast_s:.1f} s, as long as the slow one"
    assert everything[-1].job_id == slow.job_id and everything[-1].error is None
    assert [s.index for s in everything[-1].samples] == [0, 1]
    assert all(10.0 <= s.reward < 11.0 for r in everything for s in r.samples)  # scored by the worker
    assert worker.stats.num_samples == 8 and worker.stats.num_jobs_done == 4
    assert (await redis.xpending(KEYS.jobs, WORKER_GROUP))["pending"] == 0  # every job acked
