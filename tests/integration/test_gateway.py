"""The HTTP gateway with real Redis and a real uvicorn server.

Most tests drive a scripted stand-in scheduler (gateway_support.StandInScheduler) so they control
when each event arrives; ``test_end_to_end_with_real_services`` runs the real scheduler and worker.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable

import anyio
import httpx
import openai
import pytest
from gateway_support import (
    KEYS,
    StandInScheduler,
    against_stand_in,
    publish_answer,
    running_gateway,
    with_scheduler,
)
from prometheus_client.parser import text_string_to_metric_families

from schemas import AlignRequest, AlignResult, ErrorCode, ErrorInfo, Method, ResultStatus

pytestmark = pytest.mark.anyio


def openai_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def with_openai(checks: Callable[[openai.AsyncOpenAI], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
    """A body for ``against_stand_in``: ``checks`` with an OpenAI client on the gateway."""
    async def body(base_url: str) -> None:
        async with openai_client(base_url) as client:
            await checks(client)

    return body


async def test_chat_completion_with_the_openai_client(redis_url: str) -> None:
    async def checks(client: openai.AsyncOpenAI) -> None:
        completion = await client.chat.completions.create(
            model="alignq", messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            n=2, max_tokens=12, temperature=0.7, seed=5,
            extra_body={"budget": 8, "method": "bon", "priority": 3, "deadline_ms": 60_000})
        assert [c.message.content for c in completion.choices] == ["the best answer here", "fine answer to Hi?"]
        assert [c.index for c in completion.choices] == [0, 1]
        assert completion.choices[0].finish_reason == "stop"
        assert completion.object == "chat.completion" and completion.model == "alignq"
        alignq = completion.model_extra["alignq"]
        assert alignq["reward"] == 0.9 and alignq["rewards"] == [0.9, 0.5] and alignq["samples_used"] == 4
        assert completion.id == f"chatcmpl-{alignq['request_id']}"
        assert completion.usage.completion_tokens == 4 + 4 + 4 + 3  # every sample's tokens, not just the choices'
        assert completion.usage.prompt_tokens > 0
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        assert [model.id async for model in client.models.list()] == ["alignq"]

    scheduler = await against_stand_in(redis_url, with_openai(checks))
    request = scheduler.requests[0]
    assert (request.budget, request.method, request.priority, request.deadline_ms) == (8, Method.BON, 3, 60_000)
    assert (request.max_new_tokens, request.temperature, request.seed) == (12, 0.7, 5)
    assert [(m.role, m.content) for m in request.prompt] == [("system", "Be brief."), ("user", "Hi?")]


async def test_chat_stream_with_the_openai_client(redis_url: str) -> None:
    async def checks(client: openai.AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(
            model="alignq", messages=[{"role": "user", "content": "Stream?"}], stream=True,
            stream_options={"include_usage": True}, extra_body={"budget": 4, "method": "bon"})
        progress, text, finish, usage = [], "", None, None
        async for chunk in stream:
            extra = chunk.model_extra or {}
            if not chunk.choices and extra.get("alignq"):
                progress.append(extra["alignq"]["event"])
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert progress == ["queued", "explored", "allocated"]
        assert text == "the best answer here"
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens > 0

    await against_stand_in(redis_url, with_openai(checks))


async def test_text_completions(redis_url: str) -> None:
    async def checks(client: openai.AsyncOpenAI) -> None:
        completion = await client.completions.create(model="alignq", prompt="Once upon", best_of=6, n=1)
        assert completion.choices[0].text == "the best answer here"
        assert completion.object == "text_completion"
        stream = await client.completions.create(model="alignq", prompt=["Once more"], stream=True,
                                                 extra_body={"method": "uniform"})
        pieces = [c.choices[0].text async for c in stream if c.choices]
        assert "".join(pieces) == "the best answer here"

    scheduler = await against_stand_in(redis_url, with_openai(checks))
    assert scheduler.requests[0].budget == 6 and scheduler.requests[0].prompt == "Once upon"
    assert scheduler.requests[1].method == Method.UNIFORM


async def test_curl_sees_progress_before_the_answer_exists(redis_url: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    seen_progress = anyio.Event()

    async def hold_answer(request: AlignRequest) -> None:
        await seen_progress.wait()  # the answer is only written after curl printed the progress

    async def body(base_url: str) -> None:
        payload = json.dumps({"model": "alignq", "messages": [{"role": "user", "content": "curl?"}],
                              "stream": True, "budget": 4, "alignq_progress": "comments"})
        lines: list[str] = []
        async with await anyio.open_process(
            [curl, "-sN", f"{base_url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", payload]
        ) as process:
            buffer = b""
            async for data in process.stdout:
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                lines.extend(line.decode() for line in complete if line.strip())
                if sum(line.startswith(": alignq") for line in lines) == 3:
                    seen_progress.set()
        progress = [json.loads(line[len(": alignq "):])["event"] for line in lines if line.startswith(": alignq")]
        assert progress == ["queued", "explored", "allocated"]
        data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "the best answer here"
        assert lines.index(next(line for line in lines if line.startswith(": alignq"))) < lines.index(f"data: {data[0]}")

    await against_stand_in(redis_url, body, scheduler=StandInScheduler(redis_url, before_answer=hold_answer))


async def test_api_keys(redis_url: str) -> None:
    async def body(base_url: str) -> None:
        for key in (None, "sk-bad"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient() as http:
                response = await http.post(f"{base_url}/v1/chat/completions", headers=headers,
                                           json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
        async with openai_client(base_url, "sk-bad") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="alignq", messages=[{"role": "user", "content": "hi"}])
        async with openai_client(base_url, "sk-other") as client:
            completion = await client.chat.completions.create(
                model="alignq", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "the best answer here"
        async with httpx.AsyncClient() as http:  # probes and scrapers need no key
            assert (await http.get(f"{base_url}/healthz")).status_code == 200
            assert (await http.get(f"{base_url}/metrics")).status_code == 200

    scheduler = await against_stand_in(redis_url, body, api_keys=["sk-good", "sk-other"])
    assert len(scheduler.requests) == 1  # the rejected calls queued nothing


async def test_overloaded_is_429_with_retry_after(redis_url: str) -> None:
    with running_gateway(redis_url, max_pending=2) as base_url:
        async with httpx.AsyncClient() as http:
            redis = StandInScheduler(redis_url).redis
            await redis.zadd(KEYS.pending_requests, {"a": 1, "b": 2})
            response = await http.post(f"{base_url}/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "overloaded"
            async with openai_client(base_url) as client:
                with pytest.raises(openai.RateLimitError):
                    await client.chat.completions.create(model="alignq", messages=[{"role": "user", "content": "x"}])
            response = await http.post(f"{base_url}/v1/align/batch", json={"requests": [{"prompt": "a"}]})
            assert response.status_code == 429
            assert await redis.xlen(KEYS.requests) == 0
            await redis.aclose()


@pytest.mark.parametrize(("path", "payload", "param"), [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "budget": 0}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "method": "beam"}, "method"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/align/batch", {"requests": [{"prompt": "ok"}, {"budget": 3}]}, "requests"),
])
async def test_bad_input_is_400_in_openai_shape(redis_url: str, path: str, payload: dict, param: str | None) -> None:
    with running_gateway(redis_url) as base_url:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base_url}{path}", json=payload)
            raw = await http.post(f"{base_url}{path}", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert (error["param"] or "").startswith(param) or param in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert raw.status_code == 400


async def test_oversize_body_is_413(redis_url: str) -> None:
    from middleware.gateway.http import MAX_BODY_BYTES

    with running_gateway(redis_url) as base_url:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base_url}/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                                       headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


async def test_deadline_is_504(redis_url: str) -> None:
    def late(request: AlignRequest) -> AlignResult:
        return AlignResult(request_id=request.request_id, status=ResultStatus.ERROR, method=request.method,
                           error=ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="deadline passed, no sample"))

    async def body(base_url: str) -> None:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base_url}/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "hi"}], "deadline_ms": 5})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"

    await against_stand_in(redis_url, body, scheduler=StandInScheduler(redis_url, answer=late))
    # nobody answers within request_timeout_s: also 504
    with running_gateway(redis_url, request_timeout_s=0.5) as base_url:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base_url}/v1/completions", json={"prompt": "nobody home"})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


async def test_batch_streams_results_as_they_finish(redis_url: str) -> None:
    async def in_reverse(request: AlignRequest) -> None:
        await anyio.sleep(0.5 * (3 - int(request.prompt.split()[-1])))  # item 3 first, item 0 last

    async def body(base_url: str) -> None:
        payload = {"requests": [{"prompt": f"item {i}"} for i in range(4)],
                   "defaults": {"budget": 2, "method": "uniform"}}
        async with httpx.AsyncClient(timeout=30) as http, \
                http.stream("POST", f"{base_url}/v1/align/batch", json=payload) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) async for line in response.aiter_lines() if line]
        assert [line["index"] for line in lines] == [3, 2, 1, 0]
        assert all(line["result"]["status"] == "ok" for line in lines)
        assert {line["request_id"] for line in lines} == {r.request_id for r in scheduler.requests}

    scheduler = StandInScheduler(redis_url, before_answer=in_reverse, method_events=False)
    await against_stand_in(redis_url, body, scheduler=scheduler)
    assert all(r.budget == 2 and r.method == Method.UNIFORM for r in scheduler.requests)


async def test_result_by_id(redis_url: str) -> None:
    with running_gateway(redis_url) as base_url:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base_url}/v1/align/unknown-id")).status_code == 404
            stand_in = StandInScheduler(redis_url)
            from middleware.client import Client

            async with Client(stand_in.redis) as client:
                request_id = await client.submit("by id")
            response = await http.get(f"{base_url}/v1/align/{request_id}")
            assert response.status_code == 202 and response.json()["status"] == "pending"
            request = AlignRequest(prompt="by id", request_id=request_id)
            from gateway_support import default_answer

            await publish_answer(stand_in.redis, default_answer(request))
            response = await http.get(f"{base_url}/v1/align/{request_id}", params={"wait_s": 2})
            assert response.status_code == 200
            assert AlignResult.model_validate(response.json()).response == "the best answer here"
            await stand_in.aclose()


async def test_healthz_and_metrics_move(redis_url: str) -> None:
    scheduler = StandInScheduler(redis_url)

    async def body(base_url: str) -> None:
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{base_url}/healthz")).json()
            assert health["status"] == "degraded" and health["workers"] == 0 and health["gateways"] == 1
            await scheduler.redis.set(KEYS.heartbeat("scheduler", "s1"), b"1", ex=10)
            await scheduler.redis.set(KEYS.heartbeat("worker", "w1"), b"1", ex=10)
            health = (await http.get(f"{base_url}/healthz")).json()
            assert health == {"status": "ok", "redis": "ok", "schedulers": 1, "workers": 1, "gateways": 1,
                              "pending": 0}

            def scrape(text: str) -> dict:
                return {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in text_string_to_metric_families(text) for s in f.samples}

            before = scrape((await http.get(f"{base_url}/metrics")).text)
            key = ("alignq_gateway_requests_total", (("code", "200"), ("endpoint", "/v1/chat/completions")))
            assert before.get(key, 0) == 0
            response = await http.post(f"{base_url}/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "count me"}]})
            assert response.status_code == 200
            after = scrape((await http.get(f"{base_url}/metrics")).text)
            assert after[key] == 1
            assert after[("alignq_queue_pending", ())] == 0
            assert after[("alignq_live_instances", (("role", "worker"),))] == 1
            assert after[("alignq_gateway_request_seconds_count", (("endpoint", "/v1/chat/completions"),))] == 1

    await against_stand_in(redis_url, body, scheduler=scheduler)


async def test_sigterm_lets_an_in_flight_stream_finish(redis_url: str) -> None:
    import os
    import signal
    import sys

    from gateway_support import free_port

    port = free_port()
    code = ("import sys; from middleware.gateway.app import run_gateway; from middleware.settings import GatewaySettings; "
            f"sys.exit(run_gateway(GatewaySettings(port={port})))")
    env = {**os.environ, "ALIGNQ_REDIS_URL": redis_url}
    terminated = anyio.Event()

    async def answer_after_sigterm(request: AlignRequest) -> None:
        await terminated.wait()
        await anyio.sleep(0.5)

    scheduler = StandInScheduler(redis_url, before_answer=answer_after_sigterm)
    async with await anyio.open_process([sys.executable, "-c", code], env=env) as process:

        async def body() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                for _ in range(200):
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)
                payload = {"messages": [{"role": "user", "content": "finish me"}], "stream": True}
                async with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=payload) as response:
                    lines = []
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if '"queued"' in line and not terminated.is_set():
                            process.send_signal(signal.SIGTERM)
                            terminated.set()
            data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert data[-1] == "[DONE]"  # the stream in flight at SIGTERM was finished, not cut
            chunks = [json.loads(d) for d in data[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
                "the best answer here"

        await with_scheduler(scheduler, body)
        with anyio.fail_after(15):
            assert await process.wait() == 0


def test_run_gateway_needs_a_redis_url() -> None:
    from middleware.errors import UsageError
    from middleware.gateway.app import run_gateway
    from middleware.settings import GatewaySettings

    with pytest.raises(UsageError, match="ALIGNQ_REDIS_URL"):
        run_gateway(GatewaySettings(redis_url=None))


async def test_batch_beyond_max_pending_reports_the_rejected_items(redis_url: str) -> None:
    async def slowly(request: AlignRequest) -> None:
        await anyio.sleep(0.5)  # no slot frees while the batch is being submitted

    async def body(base_url: str) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{base_url}/v1/align/batch",
                                       json={"requests": [{"prompt": f"p{i}"} for i in range(4)]})
        lines = [json.loads(line) for line in response.text.splitlines() if line]
        rejected = sorted(line["index"] for line in lines if "error" in line)
        answered = sorted(line["index"] for line in lines if "result" in line)
        assert rejected == [2, 3] and answered == [0, 1]
        assert all(line["error"]["code"] == "overloaded" for line in lines if "error" in line)

    await against_stand_in(redis_url, body, scheduler=StandInScheduler(redis_url, before_answer=slowly, method_events=False),
                           max_pending=2)
