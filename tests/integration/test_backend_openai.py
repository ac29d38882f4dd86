"""The ``openai`` backend end to end: a real llama-server (SmolLM2 GGUF), a real scheduler and workers
on Redis. Answers for bon and uniform, a server killed mid-run, AISP refused fast without an hf
worker, two models behind one gateway."""

from __future__ import annotations

import os
import pathlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import httpx
import pytest
from backend_support import LlamaServer, llama_server_binary
from gateway_support import free_port, running_gateway

from middleware.client import BadRequest, Client, ModelNotFound, RequestFailed
from middleware.scheduler.service import Scheduler
from middleware.settings import SchedulerSettings
from schemas import ErrorCode, Job, JobKind, ResultStatus
from workers.backends.openai import OpenAIBackend
from workers.service import Worker, serve_worker
from workers.settings import WorkerSettings

# The first run on a machine may build llama-server (scripts/build-llama-server.sh, ~15 min on 2 cores).
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(1800)]

HERE = pathlib.Path(__file__).resolve().parent
ALIGNQ = str(pathlib.Path(sys.executable).with_name("alignq"))
PROMPTS = ["What is the capital of France?", "Name a fruit.", "Say hello.", "Count to three.",
           "What colour is the sky?", "Give me a word that rhymes with cat.", "What is 2 + 2?",
           "Name a planet.", "Write one word about rain.", "Who wrote Hamlet?"]
CHAT = [[{"role": "user", "content": "Tell me a fun fact."}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is snow white?"}]]
TWELVE = [*PROMPTS, *CHAT]  # ten text prompts (/completions), two chats (/chat/completions)


@pytest.fixture(scope="module")
def llama_server() -> LlamaServer:
    server = LlamaServer(llama_server_binary(), free_port(), slots=16, threads=1)
    server.start()
    yield server
    server.stop()


def openai_worker(redis_url: str, server: LlamaServer, **overrides: object) -> WorkerSettings:
    options = {"redis_url": redis_url, "backend": "openai", "backend_url": server.url, "device": "cpu",
               "reward_model": "python:backend_support:reward_plus", "num_threads": 1, "heartbeat_ms": 200,
               "claim_idle_ms": 1000, "shutdown_grace_s": 5.0, "backend_timeout_s": 60.0}
    return WorkerSettings(**{**options, **overrides})  # type: ignore[arg-type]


@asynccontextmanager
async def deployment(redis_url: str, *workers: WorkerSettings) -> AsyncIterator[tuple[Client, list[Worker]]]:
    """A scheduler and the given workers in this process, all ready; stopped on exit."""
    settings = SchedulerSettings(redis_url=redis_url, window_ms=20, heartbeat_ms=200, claim_idle_ms=1000,
                                 max_new_tokens=8, default_budget=4)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(Scheduler(settings).run, stop=stop))
        started = []
        for worker_settings in workers:
            worker, ready = Worker(worker_settings), anyio.Event()
            tg.start_soon(partial(serve_worker, worker_settings, stop=stop, ready=ready, worker=worker))
            with anyio.fail_after(60):
                await ready.wait()
            started.append(worker)
        async with Client(redis_url, poll_interval_s=0.05) as client:
            yield client, started
        stop.set()


async def answer_all(client: Client, items: list[dict], *, timeout_s: float = 180.0) -> list:
    ids = await client.submit_many(items)
    results = {}

    async def wait(rid: str) -> None:
        results[rid] = await client.result(rid, timeout_s=timeout_s)

    async with anyio.create_task_group() as tg:
        for rid in ids:
            tg.start_soon(wait, rid)
    return [results[rid] for rid in ids]


@pytest.mark.parametrize("method", ["bon", "uniform"])
async def test_twelve_prompts_answered_once_each_through_llama_server(redis_url: str, llama_server: LlamaServer,
                                                                      method: str) -> None:
    async with deployment(redis_url, openai_worker(redis_url, llama_server)) as (client, (worker,)):
        assert isinstance(worker.runner, OpenAIBackend)  # no policy model in this worker, only the reward
        assert worker.model_name == "SmolLM2-135M-Instruct"  # named after the model llama-server reports
        items = [{"prompt": p, "method": method, "budget": 4, "max_new_tokens": 8, "seed": i}
                 for i, p in enumerate(TWELVE)]
        results = await answer_all(client, items)
    assert len({r.request_id for r in results}) == 12
    for result in results:
        assert result.status == ResultStatus.OK, result.error
        assert len({s.index for s in result.samples}) == len(result.samples) == result.samples_used  # none twice
        assert result.samples_used == 4 if method == "uniform" else result.samples_used >= 1
        assert result.num_tokens > 0 and all(0 < s.num_tokens <= 8 for s in result.samples)  # the server's counts
        assert 10.0 <= result.reward < 11.0  # scored by this worker's reward
    assert sum(r.samples_used for r in results) <= 48  # bon moves budget between a window's prompts
    assert worker.stats.num_samples >= sum(r.samples_used for r in results)


async def test_sample_i_is_reproducible_from_the_seed(redis_url: str, llama_server: LlamaServer) -> None:
    async with deployment(redis_url, openai_worker(redis_url, llama_server)) as (client, _):
        item = {"prompt": "Write a word.", "method": "uniform", "budget": 3, "max_new_tokens": 6,
                "temperature": 1.0, "seed": 42}
        first, again, other = await answer_all(client, [item, item, {**item, "seed": 43}])

    def texts(result) -> list[str]:
        return [s.text for s in sorted(result.samples, key=lambda s: s.index)]

    assert texts(first) == texts(again)
    assert texts(first) != texts(other)


async def test_llama_server_killed_mid_run_loses_nothing(redis_url: str, llama_server: LlamaServer) -> None:
    async with deployment(redis_url, openai_worker(redis_url, llama_server)) as (client, (worker,)):
        items = [{"prompt": p, "method": "uniform", "budget": 4, "max_new_tokens": 24, "seed": i}
                 for i, p in enumerate(TWELVE)]
        ids = await client.submit_many(items)
        with anyio.fail_after(60):
            while not worker.in_flight:  # a batch is being generated
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)
        llama_server.kill()
        await anyio.sleep(1.5)  # requests in flight fail, retries meet refused connections
        await anyio.to_thread.run_sync(llama_server.start)
        results = [await client.result(rid, timeout_s=180) for rid in ids]
        assert worker.runner.num_retries > 0  # the outage was felt
    assert [r.status for r in results] == [ResultStatus.OK] * 12
    assert all(r.samples_used == 4 for r in results)


async def test_aisp_fails_fast_when_only_openai_workers_live(redis_url: str, llama_server: LlamaServer) -> None:
    async with deployment(redis_url, openai_worker(redis_url, llama_server)) as (client, (worker,)):
        started = time.monotonic()
        with pytest.raises(BadRequest, match="aisp needs a worker with the in-process hf backend"):
            await client.submit("Tell me a joke.", method="aisp", budget=4)
        assert time.monotonic() - started < 3
        with running_gateway(redis_url) as base:
            async with httpx.AsyncClient(timeout=30) as http:
                reply = await http.post(f"{base}/v1/chat/completions", json={
                    "model": "alignq", "messages": [{"role": "user", "content": "Hi"}], "method": "aisp"})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_request"
        assert time.monotonic() - started < 10
        # an aisp job that reaches an openai worker anyway (its hf worker just died) is refused, not hung
        job = Job(job_id="j1", request_id="r1", scheduler_id="s1", kind=JobKind.AISP, prompt="Hi", num_samples=4,
                  max_new_tokens=4, temperature=1.0, top_p=1.0, seed=1)
        (reply_set,) = await anyio.to_thread.run_sync(worker.runner.run, [job])
        assert reply_set.error is not None and reply_set.error.code == ErrorCode.BAD_REQUEST


async def test_a_4xx_from_the_server_is_the_requests_error(redis_url: str, llama_server: LlamaServer) -> None:
    settings = openai_worker(redis_url, llama_server)
    async with deployment(redis_url, settings) as (client, (_worker,)):
        too_long = "word " * 1500  # past the slot's 512 tokens of context: llama-server answers 400
        with pytest.raises(RequestFailed) as failed:
            await client.result(await client.submit(too_long, method="uniform", budget=2), timeout_s=60)
    error = failed.value.result.error
    assert error is not None and error.code == ErrorCode.BACKEND_FAILED
    assert error.message == ("inference server answered 400: the request exceeds the available context size. "
                             "try increasing the context size or enable context shift")  # the server's own words


async def test_two_models_behind_one_gateway(redis_url: str, llama_server: LlamaServer,
                                             tiny_llama_dir: pathlib.Path) -> None:
    """``smol``: an ``alignq worker`` process with the openai backend (its ALIGNQ_MODEL does not exist:
    it never loads a policy); ``tiny``: an in-process hf worker. Rewards tell who answered."""
    env = {**os.environ, "ALIGNQ_REDIS_URL": redis_url, "ALIGNQ_BACKEND": "openai",
           "ALIGNQ_BACKEND_URL": llama_server.url, "ALIGNQ_MODEL_NAME": "smol", "ALIGNQ_MODEL": "/nonexistent.gguf",
           "ALIGNQ_REWARD_MODEL": "python:backend_support:reward_plus", "ALIGNQ_HEARTBEAT_MS": "200",
           "ALIGNQ_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    tiny = WorkerSettings(redis_url=redis_url, model=str(tiny_llama_dir), model_name="tiny", serves_default=False,
                          reward_model="python:backend_support:reward_minus", device="cpu", dtype="float32",
                          num_threads=1, heartbeat_ms=200, claim_idle_ms=1000, shutdown_grace_s=5.0)
    smol = await anyio.open_process([ALIGNQ, "worker"], env=env, stdout=None, stderr=None)
    try:
        async with deployment(redis_url, tiny) as (client, _):
            with anyio.fail_after(120):
                while "smol" not in await _served(client):
                    assert smol.returncode is None, "alignq worker (openai) exited"
                    await anyio.sleep(0.2)
            with running_gateway(redis_url) as base:
                async with httpx.AsyncClient(base_url=f"{base}/v1", timeout=120) as http:
                    listed = {m["id"] for m in (await http.get("/models")).json()["data"]}
                    assert {"smol", "tiny"} <= listed
                    for model, low, high in (("smol", 10, 11), ("tiny", -11, -10), ("alignq", 10, 11)):
                        reply = await http.post("/chat/completions", json={
                            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                            "budget": 2, "method": "uniform"})
                        assert reply.status_code == 200, reply.text
                        assert low <= reply.json()["alignq"]["reward"] < high, model  # answered by that model
                    unknown = await http.post("/completions", json={"model": "nope", "prompt": "Hi"})
                    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
                    aisp = await http.post("/completions", json={"model": "smol", "prompt": "Hi", "method": "aisp"})
                    assert aisp.status_code == 400 and aisp.json()["error"]["code"] == "bad_request"
            with pytest.raises(ModelNotFound):
                await client.submit("Hi", model="nope")
            cli = await anyio.run_process([ALIGNQ, "submit", "--redis-url", redis_url, "--model", "nope", "Hi"],
                                          check=False)
            assert cli.returncode == 1 and cli.stdout == b""
            assert cli.stderr.decode().count("\n") == 1 and "'nope' is not served" in cli.stderr.decode()
    finally:
        if smol.returncode is None:
            smol.terminate()
            with anyio.move_on_after(20):
                await smol.wait()
            if smol.returncode is None:
                smol.kill()


async def _served(client: Client) -> set[str]:
    from middleware.client.models import served_models

    return set(await served_models(client.redis, client.keys))
