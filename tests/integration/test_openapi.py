"""The gateway's OpenAPI document tells the truth: schemathesis, every check, against the real app.

A real uvicorn server on a real Redis, with an API key, and a stand-in scheduler that answers every
request (``gateway_support``): schemathesis generates valid and invalid calls from the document and
checks statuses, headers (``Allow`` on 405), media types and bodies against it. Any failure, and
any 5xx, fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import httpx
from gateway_support import StandInScheduler, running_gateway

API_KEY = "sk-openapi-test-key"
MAX_EXAMPLES = 25  # per operation and phase; the coverage phase adds its boundary cases


@contextmanager
def answering_scheduler(redis_url: str) -> Iterator[None]:
    """A stand-in scheduler in a thread of its own (its own event loop) until the block ends."""
    stop = threading.Event()

    async def serve() -> None:
        scheduler = StandInScheduler(redis_url)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(scheduler.run)
                while not stop.is_set():
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            await scheduler.aclose()

    thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def test_the_document_drops_422_and_documents_what_is_sent(redis_url: str) -> None:
    with running_gateway(redis_url, api_keys=[API_KEY]) as base_url:
        document = httpx.get(f"{base_url}/openapi.json").json()
        allow = httpx.request("PUT", f"{base_url}/v1/align/some-id",
                              headers={"Authorization": f"Bearer {API_KEY}"}).headers.get("allow")
    operations = {(method, path): operation for path, item in document["paths"].items()
                  for method, operation in item.items()}
    assert not any("422" in operation["responses"] for operation in operations.values())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for key in (("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("post", "/v1/align/batch")):
        assert {"400", "401", "413", "429"} <= set(operations[key]["responses"]), key
    assert {"200", "202", "400", "401", "404"} <= set(operations[("get", "/v1/align/{request_id}")]["responses"])
    assert "text/event-stream" in operations[("post", "/v1/chat/completions")]["responses"]["200"]["content"]
    assert "text/plain" in operations[("get", "/metrics")]["responses"]["200"]["content"]
    assert allow == "DELETE, GET"
    batch_item = document["components"]["schemas"]["BatchItem"]
    assert "prompt" in batch_item["required"] and batch_item["additionalProperties"] is False


def test_schemathesis_finds_no_failure_and_no_server_error(redis_url: str) -> None:
    with running_gateway(redis_url, api_keys=[API_KEY], request_timeout_s=10.0) as base_url, \
            answering_scheduler(redis_url):
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json", "--checks", "all",
             "-H", f"Authorization: Bearer {API_KEY}", "--max-examples", str(MAX_EXAMPLES), "--seed", "1",
             "--workers", "1", "--request-timeout", "30", "--no-color"],
            capture_output=True, text=True, timeout=900, check=False)
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "No issues found" in done.stdout and "ST101" not in done.stdout, report
