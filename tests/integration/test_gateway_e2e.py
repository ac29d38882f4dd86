"""End to end over HTTP: ``alignq serve`` (scheduler, a worker and the gateway as real processes), a tiny model.

The official ``openai`` client gets a completion and a stream, ``curl -N`` sees the SSE progress in
order, /metrics shows the deployment's counters moving after the calls, and SIGTERM stops it all.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import anyio
import httpx
import openai
import pytest
from gateway_support import free_port
from prometheus_client.parser import text_string_to_metric_families

from middleware.client import Client
from middleware.runtime.launcher import stop_process

pytestmark = pytest.mark.anyio
ALIGNQ = str(pathlib.Path(sys.executable).with_name("alignq"))


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(values: dict, name: str) -> float:
    return sum(value for (sample, _), value in values.items() if sample == name)


async def test_end_to_end_with_real_services(redis_url: str, tiny_llama_dir: pathlib.Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [ALIGNQ, "serve", "--port", str(port), "--redis-url", redis_url, "--workers", "1",
               "--model", str(tiny_llama_dir), "--reward-model", "python:workers.scorers:distinct_words",
               "--device", "cpu", "--num-threads", "1", "--max-new-tokens", "8", "--window-ms", "20",
               "--heartbeat-ms", "500"]
    base_url = f"http://127.0.0.1:{port}"
    serve = await anyio.open_process(command, env=env, stdout=None, stderr=None)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            with anyio.fail_after(120):
                while True:
                    assert serve.returncode is None, "alignq serve exited"
                    try:
                        if (await http.get(f"{base_url}/healthz")).json()["status"] == "ok":
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.2)
            before = scrape((await http.get(f"{base_url}/metrics")).text)

            async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as client:
                with anyio.fail_after(120):
                    completion = await client.chat.completions.create(
                        model="alignq", messages=[{"role": "user", "content": "Name three colours."}], n=2,
                        max_tokens=8, extra_body={"budget": 4, "method": "bon"})
                alignq = completion.model_extra["alignq"]
                assert alignq["status"] == "ok" and alignq["samples_used"] == 4
                assert 1 <= len(completion.choices) <= 2
                assert completion.choices[0].message.content is not None
                assert alignq["rewards"][0] == alignq["reward"] == max(alignq["rewards"])
                assert completion.usage.completion_tokens > 0

                progress, text, request_ids = [], "", set()
                with anyio.fail_after(120):
                    stream = await client.chat.completions.create(
                        model="alignq", messages=[{"role": "user", "content": "Say hello."}], stream=True,
                        max_tokens=8, extra_body={"budget": 4, "method": "bon"})
                    async for chunk in stream:
                        if not chunk.choices and (chunk.model_extra or {}).get("alignq"):
                            progress.append(chunk.model_extra["alignq"]["event"])
                            request_ids.add(chunk.model_extra["alignq"]["request_id"])
                        text += "".join(c.delta.content or "" for c in chunk.choices)
                assert progress == ["queued", "explored", "allocated"]
                (request_id,) = request_ids
                stored = (await http.get(f"{base_url}/v1/align/{request_id}")).json()
                assert stored["status"] == "ok" and stored["response"] == text  # the streamed text is the best sample
                assert stored["samples_used"] == 4

                with anyio.fail_after(120):
                    aisp = await client.completions.create(model="alignq", prompt="Once upon a time", max_tokens=8,
                                                           extra_body={"budget": 4, "method": "aisp"})
                assert aisp.model_extra["alignq"]["method"] == "aisp" and aisp.model_extra["alignq"]["status"] == "ok"

            async with Client(redis_url) as sdk:  # the Python SDK against the same deployment
                with anyio.fail_after(120):
                    kinds = [event.kind.value async for event in sdk.stream("Count to three.", budget=4, max_new_tokens=8)]
            assert kinds == ["queued", "explored", "allocated", "done"]

            curl = shutil.which("curl")
            if curl is not None:
                payload = json.dumps({"messages": [{"role": "user", "content": "curl"}], "stream": True,
                                      "budget": 3, "max_tokens": 8})
                with anyio.fail_after(120):
                    run = await anyio.run_process([curl, "-sN", f"{base_url}/v1/chat/completions", "-H",
                                                   "Content-Type: application/json", "-d", payload])
                data = [line[6:] for line in run.stdout.decode().splitlines() if line.startswith("data: ")]
                assert data[-1] == "[DONE]"
                events = [json.loads(d)["alignq"]["event"] for d in data[:-1] if not json.loads(d)["choices"]]
                assert events == ["queued", "explored", "allocated"]

            with anyio.fail_after(30):
                while True:  # the scheduler flushes its telemetry about once a second
                    after = scrape((await http.get(f"{base_url}/metrics")).text)
                    if total(after, "alignq_requests_total") >= total(before, "alignq_requests_total") + 5:
                        break
                    await anyio.sleep(0.3)
            assert total(after, "alignq_samples_generated_total") >= 11
            assert after[("alignq_gateway_requests_total", (("code", "200"), ("endpoint", "/v1/chat/completions")))] >= 3
            assert after[("alignq_window_prompts_count", ())] >= 1
            assert after[("alignq_live_instances", (("role", "worker"),))] == 1
    finally:
        await stop_process(serve, grace_s=30)
    assert serve.returncode == 0  # a graceful stop of every service
