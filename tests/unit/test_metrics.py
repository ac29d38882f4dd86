"""Telemetry: what services record, how it sums across processes in Redis, how it renders."""

from __future__ import annotations

import urllib.request

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from middleware.metrics import (
    Telemetry,
    families_from_fields,
    render_families,
    render_metrics,
)
from middleware.runtime.exporter import maybe_start_process_exporter
from schemas import (
    AlignResult,
    ErrorCode,
    ErrorInfo,
    JobKind,
    Keys,
    Method,
    ResultStatus,
    Sample,
    SampleSet,
)


def parse(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def bon_result(**overrides: object) -> AlignResult:
    samples = [Sample(index=5, text="b", reward=0.9, num_tokens=4), Sample(index=1, text="a", reward=0.6, num_tokens=4),
               Sample(index=0, text="c", reward=0.2, num_tokens=4)]
    fields: dict[str, object] = {"request_id": "r1", "status": ResultStatus.OK, "method": Method.BON, "response": "b",
                                 "reward": 0.9, "best_index": 5, "samples_used": 6, "samples": samples,
                                 "explore_samples": 3, "exploit_samples": 3, "queued_s": 0.3, "total_s": 2.0}
    fields.update(overrides)
    return AlignResult(**fields)


def test_records_render_as_prometheus_text() -> None:
    telemetry = Telemetry()
    telemetry.record_window(2, {"a": [0.0, 1.0], "b": [0.5, 0.5]}, {"a": 3, "b": 0})
    telemetry.record_result(bon_result())
    telemetry.record_result(AlignResult(request_id="r2", status=ResultStatus.ERROR, method=Method.UNIFORM,
                                        error=ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="late"), total_s=9))
    telemetry.record_sample_set(SampleSet(job_id="j", request_id="r1", worker_id="w", kind=JobKind.AISP,
                                          samples=[Sample(index=0, text="x", reward=1, num_tokens=10)] * 2,
                                          generate_s=3.0, score_s=1.0, stats={"aisp_ess": [4.0, 2.0]}))
    values = parse(render_families(families_from_fields(telemetry.totals)))

    assert values[("alignq_requests_total", (("method", "bon"), ("status", "ok")))] == 1
    assert values[("alignq_requests_total", (("method", "uniform"), ("status", "error")))] == 1
    assert values[("alignq_request_errors_total", (("code", "deadline_exceeded"),))] == 1
    assert values[("alignq_window_prompts_count", ())] == 1
    assert values[("alignq_window_prompts_bucket", (("le", "2.0"),))] == 1
    assert values[("alignq_window_prompts_bucket", (("le", "1.0"),))] == 0
    # allocated 0 and 3: cumulative buckets
    assert values[("alignq_allocated_samples_bucket", (("le", "0.0"),))] == 1
    assert values[("alignq_allocated_samples_bucket", (("le", "2.0"),))] == 1
    assert values[("alignq_allocated_samples_bucket", (("le", "4.0"),))] == 2
    assert values[("alignq_allocated_samples_bucket", (("le", "+Inf"),))] == 2
    assert values[("alignq_allocated_samples_sum", ())] == 3
    assert values[("alignq_explore_reward_mean_sum", ())] == pytest.approx(1.0)  # 0.5 + 0.5
    assert values[("alignq_explore_reward_std_sum", ())] == pytest.approx(0.5)  # 0.5 + 0
    # best of stage 1 (indices < 3) is 0.6, final best 0.9
    assert values[("alignq_stage2_reward_gain_sum", ())] == pytest.approx(0.3)
    assert values[("alignq_stage2_improved_total", ())] == 1
    assert values[("alignq_aisp_ess_count", ())] == 2 and values[("alignq_aisp_ess_sum", ())] == 6
    assert values[("alignq_samples_generated_total", (("kind", "aisp"),))] == 2
    assert values[("alignq_tokens_per_second", ())] == pytest.approx(20 / 3)
    assert values[("alignq_reward_time_share", ())] == pytest.approx(0.25)
    assert values[("alignq_request_seconds_bucket", (("le", "10.0"), ("method", "uniform")))] == 1


def test_wrong_labels_are_a_bug_not_a_new_series() -> None:
    with pytest.raises(ValueError, match="labels"):
        Telemetry().increment("alignq_requests_total", status="ok")


@pytest.mark.anyio
async def test_processes_sum_into_redis_and_the_gateway_renders_it(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys("alignq")
    scheduler_a, scheduler_b = Telemetry(redis, keys), Telemetry(redis, keys)
    scheduler_a.record_result(bon_result())
    scheduler_b.record_result(bon_result(request_id="r2"))
    scheduler_b.record_window(4)
    await scheduler_a.flush()
    await scheduler_b.flush()
    await scheduler_b.flush()  # nothing new: no double count
    await redis.zadd(keys.pending_requests, {"p1": 1000, "p2": 2000})
    await redis.set(keys.heartbeat("worker", "w1"), b"1", ex=10)
    await redis.set(keys.heartbeat("worker", "w2"), b"1", ex=10)
    await redis.set(keys.heartbeat("scheduler", "s1"), b"1", ex=10)

    values = parse(await render_metrics(redis, keys))
    assert values[("alignq_requests_total", (("method", "bon"), ("status", "ok")))] == 2
    assert values[("alignq_window_prompts_count", ())] == 1
    assert values[("alignq_queue_pending", ())] == 2
    assert values[("alignq_queue_oldest_age_seconds", ())] > 1e6  # submitted at t=1 s
    assert values[("alignq_live_instances", (("role", "worker"),))] == 2
    assert values[("alignq_live_instances", (("role", "scheduler"),))] == 1
    assert values[("alignq_stream_length", (("stream", "requests"),))] == 0
    await redis.aclose()


@pytest.mark.anyio
async def test_failed_flush_keeps_the_increments(redis_url: str) -> None:
    # nothing listens on port 1; no client-side retries
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    telemetry = Telemetry(dead, Keys("alignq"))
    telemetry.increment("alignq_stage2_improved_total", 2)
    with pytest.raises(RedisConnectionError):
        await telemetry.flush()
    telemetry.redis = aioredis.Redis.from_url(redis_url)
    await telemetry.flush()
    assert parse(await render_metrics(telemetry.redis, Keys("alignq")))[("alignq_stage2_improved_total", ())] == 2
    await telemetry.redis.aclose()
    await dead.aclose()


def test_process_exporter_serves_own_totals() -> None:
    telemetry = Telemetry()
    telemetry.record_http("/v1/chat/completions", 200, 0.2)
    port = maybe_start_process_exporter(telemetry, port=0)
    assert port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    values = parse(body)
    assert values[("alignq_gateway_requests_total", (("code", "200"), ("endpoint", "/v1/chat/completions")))] == 1
