"""Cancellation end to end: scheduler, worker and gateway as real processes, a tiny model.

A budget-64, 64-token request cancelled one second after submit (by DELETE, ``alignq cancel`` or the
SDK) is answered ``cancelled`` at once, the samples generated for it stay far below its budget, and
the worker is free again right after. A streaming or waiting HTTP client that disconnects cancels its
request. Cancelling an answered request is a no-op that says so; an unknown one is 404 / exit 1.
"""

from __future__ import annotations

import pathlib
import time

import anyio
import httpx
import pytest
from chaos_support import alignq_executable
from tenancy_support import deployment, samples_generated

from middleware.client import CancelOutcome, Client, RequestCancelled

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

LONG = {"budget": 64, "max_new_tokens": 64, "seed": 3}
CANCEL_AFTER_S = 1.0
ANSWERED_WITHIN_S = 5.0


def long_chat(request_id: str, **fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "Tell me a very long story about queues."}],
            "max_tokens": 64, "budget": 64, "request_id": request_id, **fields}


async def wait_status(http: httpx.AsyncClient, request_id: str, status: str, within_s: float) -> dict:
    with anyio.fail_after(within_s):
        while True:
            response = await http.get(f"/v1/align/{request_id}")
            if response.status_code == 200 and response.json()["status"] == status:
                return response.json()
            await anyio.sleep(0.1)


async def test_cancelled_requests_stop_costing_samples(redis_url: str, tmp_path: pathlib.Path,
                                                       tiny_llama_dir: pathlib.Path) -> None:
    with deployment(redis_url, tmp_path, tiny_llama_dir) as d:
        async with httpx.AsyncClient(base_url=d.base_url, timeout=60) as http, Client(redis_url) as sdk:
            # DELETE one second after submit: 200 JSON, the waiter gets `cancelled` within seconds.
            await sdk.submit("Tell me a very long story about queues.", request_id="long-1", **LONG)
            await anyio.sleep(CANCEL_AFTER_S)
            started = time.monotonic()
            deleted = await http.delete("/v1/align/long-1")
            assert deleted.status_code == 200
            assert deleted.json() == {"request_id": "long-1", "cancelled": True, "status": "cancelled"}
            with pytest.raises(RequestCancelled):
                await sdk.result("long-1", timeout_s=ANSWERED_WITHIN_S)
            assert time.monotonic() - started < ANSWERED_WITHIN_S
            assert (await http.get("/v1/align/long-1")).json()["status"] == "cancelled"
            again = await http.delete("/v1/align/long-1")  # a no-op that says so
            assert again.status_code == 200 and again.json()["cancelled"] is False
            assert (await http.delete("/v1/align/never-submitted")).status_code == 404

            # `alignq cancel ID` and the SDK.
            await sdk.submit("Another long story, please.", request_id="long-2", **LONG)
            await sdk.submit("And a third long story.", request_id="long-3", **LONG)
            await anyio.sleep(CANCEL_AFTER_S)
            run = await anyio.run_process([*alignq_executable(), "cancel", "long-2", "--redis-url", redis_url],
                                          check=False)
            assert run.returncode == 0, run.stderr
            assert b'"cancelled": true' in run.stdout
            assert await sdk.cancel("long-3") == CancelOutcome.CANCELLED
            assert (await sdk.result("long-3", raise_on_error=False)).status.value == "cancelled"

            # A streaming client that disconnects after the first progress chunk cancels its request.
            async with http.stream("POST", "/v1/chat/completions", json=long_chat("stream-1", stream=True)) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave: the connection closes with the block
            await wait_status(http, "stream-1", "cancelled", ANSWERED_WITHIN_S)

            # So does a waiting (non-streaming) client that gives up.
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/chat/completions", json=long_chat("wait-1"), timeout=httpx.Timeout(60, read=1.5))
            await wait_status(http, "wait-1", "cancelled", ANSWERED_WITHIN_S)

            # The worker is free: a short request is answered, and cancelling it afterwards is a no-op.
            with anyio.fail_after(90):
                short = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "budget": 2,
                    "request_id": "short-1"})
            assert short.status_code == 200 and short.json()["alignq"]["status"] == "ok"
            assert (await http.delete("/v1/align/short-1")).json() == {
                "request_id": "short-1", "cancelled": False, "status": "ok"}
            run = await anyio.run_process([*alignq_executable(), "cancel", "short-1", "--redis-url", redis_url],
                                          check=False)
            assert run.returncode == 0 and b'"status": "ok"' in run.stdout
            run = await anyio.run_process([*alignq_executable(), "cancel", "nope", "--redis-url", redis_url],
                                          check=False)
            assert run.returncode == 1 and run.stderr.decode().count("\n") == 1

            generated = {rid: samples_generated(redis_url, rid) for rid in ("long-1", "long-2", "long-3",
                                                                           "stream-1", "wait-1")}
            print(f"samples generated for cancelled budget-64 requests: {generated}")
            assert all(n <= 16 for n in generated.values()), generated  # far below the budget of 64
            assert samples_generated(redis_url, "short-1") == 2
