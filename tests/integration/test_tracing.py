"""OpenTelemetry end to end: real gateway, scheduler and worker processes export over OTLP/HTTP to a
real collector (tests/integration/otlp_collector.py), and each request is ONE connected trace that
spans all three services: gateway -> queue -> window -> explore -> allocate -> exploit -> answer,
with the worker's job spans under the scheduler's stage spans and batch spans linked to the jobs.
"""

from __future__ import annotations

import itertools
import pathlib
import time

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otlp_collector import CollectedSpan, OtlpCollector
from tenancy_support import deployment

from middleware.client import Client
from schemas import PAYLOAD_FIELD, AlignRequest, decode
from schemas.tracing import traceparent_of

pytestmark = pytest.mark.timeout(240)

SCHEDULER_STAGES = ["queue", "window", "explore", "allocate", "exploit", "answer"]
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


def trace_of(spans: list[CollectedSpan], request_id: str) -> list[CollectedSpan]:
    (root,) = [s for s in spans if s.service == "alignq-gateway" and s.attributes.get("alignq.request_id") == request_id]
    return [s for s in spans if s.trace_id == root.trace_id]


def check_connected_trace(spans: list[CollectedSpan], trace: list[CollectedSpan], *, external_parent: str = "") -> None:
    ids = {s.span_id for s in trace}
    roots = [s for s in trace if s.parent_span_id not in ids]
    assert len(roots) == 1 and roots[0].service == "alignq-gateway", [(s.service, s.name) for s in roots]
    assert roots[0].parent_span_id == external_parent
    assert {s.service for s in trace} == {"alignq-gateway", "alignq-scheduler", "alignq-worker"}
    by_id = {s.span_id: s for s in trace}
    (request,) = [s for s in trace if s.name == "alignq.request"]
    assert by_id[request.parent_span_id].service == "alignq-gateway"
    stages = sorted((s for s in trace if s.parent_span_id == request.span_id), key=lambda s: (s.start_ns, s.end_ns))
    assert [s.name for s in stages] == SCHEDULER_STAGES
    for earlier, later in itertools.pairwise(stages):
        assert earlier.end_ns <= later.start_ns + 1_000_000  # one stage after the other (1 ms of clock slack)
    jobs = [s for s in trace if s.name == "job"]
    assert {by_id[j.parent_span_id].name for j in jobs} == {"explore", "exploit"}
    assert all(s.service == "alignq-worker" for s in jobs)
    for job in jobs:
        assert sorted(s.name for s in trace if s.parent_span_id == job.span_id) == ["generate", "score"]
    linked = {link for s in spans if s.name == "batch" for link in s.links}
    assert all((job.trace_id, job.span_id) in linked for job in jobs)  # every job is linked from its batch


def test_one_connected_trace_per_request_across_processes(redis_url: str, tmp_path: pathlib.Path,
                                                          tiny_llama_dir: pathlib.Path) -> None:
    with OtlpCollector() as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with deployment(redis_url, tmp_path, tiny_llama_dir, **env) as d, \
                httpx.Client(base_url=d.base_url, timeout=60) as http:
            body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "budget": 4}
            assert http.post("/v1/chat/completions", json={**body, "request_id": "t-1"}).status_code == 200
            streamed = http.post("/v1/chat/completions", json={**body, "request_id": "t-2", "stream": True})
            assert streamed.status_code == 200
            caller = {"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"}  # the caller's own trace
            assert http.post("/v1/chat/completions", headers=caller,
                             json={**body, "request_id": "t-3"}).status_code == 200
            sdk_caller = TracerProvider().get_tracer("caller").start_span("caller")  # an app's span, SDK in hand
            with trace.use_span(sdk_caller, end_on_exit=True):
                anyio.run(align_with_sdk, redis_url, "t-4")
            deadline = time.monotonic() + 30
            while True:  # spans are exported in batches every 100 ms
                spans = collector.snapshot()
                answers = [s for s in spans if s.name == "answer"]
                jobs = [s for s in spans if s.name == "job"]
                if len(answers) >= 4 and len(jobs) >= 8 and sum(s.service == "alignq-gateway" for s in spans) >= 3:
                    break
                assert time.monotonic() < deadline, f"spans missing: {sorted({(s.service, s.name) for s in spans})}"
                time.sleep(0.2)
    spans = collector.snapshot()
    check_connected_trace(spans, trace_of(spans, "t-1"))
    check_connected_trace(spans, trace_of(spans, "t-2"))
    continued = trace_of(spans, "t-3")
    assert continued[0].trace_id == CALLER_TRACE_ID
    check_connected_trace(spans, continued, external_parent=CALLER_SPAN_ID)
    assert len({s.trace_id for s in spans if s.name == "alignq.request"}) == 4  # one trace per request
    # the SDK's request is a child of the caller's active span: no gateway span in between
    (request,) = [s for s in spans if s.name == "alignq.request" and s.trace_id == f"{sdk_caller.context.trace_id:032x}"]
    assert request.parent_span_id == f"{sdk_caller.context.span_id:016x}" and request.service == "alignq-scheduler"
    in_trace = [s for s in spans if s.trace_id == request.trace_id]
    assert {s.service for s in in_trace} == {"alignq-scheduler", "alignq-worker"} and any(s.name == "job" for s in in_trace)


async def align_with_sdk(redis_url: str, request_id: str) -> None:
    async with Client(redis_url) as client:
        result = await client.align("Name a colour.", request_id=request_id, budget=4, max_new_tokens=8, timeout_s=60)
        assert result.request_id == request_id


@pytest.mark.anyio
async def test_sdk_requests_carry_the_callers_active_span(redis_url: str) -> None:
    span = TracerProvider().get_tracer("caller").start_span("caller")
    async with Client(redis_url, tenant="acme") as client:
        with trace.use_span(span, end_on_exit=True):
            await client.submit("one", request_id="one")
            await client.submit_many(["many", {"prompt": "as dict"}, [{"role": "user", "content": "chat"}]])
            await client.submit("explicit", traceparent=f"00-{'1' * 32}-{'2' * 16}-01")
        await client.submit("after the span")
        entries = await client.redis.xrange(client.keys.requests)
    traceparents = [decode(AlignRequest, fields[PAYLOAD_FIELD]).traceparent for _, fields in entries]
    assert traceparents == [traceparent_of(span)] * 4 + [f"00-{'1' * 32}-{'2' * 16}-01", None]
