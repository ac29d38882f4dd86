"""Batch packing and Job <-> model-call conversion of the worker service (no Redis)."""

from __future__ import annotations

import math
import pathlib

import msgpack
import pytest
import torch

from schemas import AispParams, ChatMessage, ErrorCode, Job, JobKind, encode
from workers.aisp import AispConfig, AispResult
from workers.engine import GeneratedSample
from workers.jobs import (
    BatchRunner,
    HeldJob,
    aisp_config,
    expired_reply,
    salvage_error_reply,
    sample_set_from_aisp,
    take_batch,
    to_generation_request,
)


def make_job(request_id: str = "r1", *, num_samples: int = 4, kind: JobKind = JobKind.EXPLORE,
             sample_offset: int = 0, **fields: object) -> Job:
    options = {"job_id": f"{request_id}:{kind}:{sample_offset}", "request_id": request_id, "scheduler_id": "s1",
               "kind": kind, "prompt": "Say something", "num_samples": num_samples, "sample_offset": sample_offset,
               "max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    options.update(fields)
    return Job(**options)  # type: ignore[arg-type]


def held(*sizes: int) -> list[HeldJob]:
    return [HeldJob(f"{i}-0", make_job(f"r{i}", num_samples=n)) for i, n in enumerate(sizes)]


def names(jobs: list[HeldJob]) -> list[str]:
    return [h.job.request_id for h in jobs]


def test_take_batch_packs_in_order_within_job_and_sample_limits() -> None:
    queue = held(4, 4, 4, 4, 4)
    batch = take_batch(queue, max_jobs=3, max_samples=100)
    assert names(batch) == ["r0", "r1", "r2"] and names(queue) == ["r3", "r4"]
    queue = held(8, 8, 8)
    assert names(take_batch(queue, max_jobs=10, max_samples=16)) == ["r0", "r1"] and names(queue) == ["r2"]


def test_take_batch_always_takes_the_oldest_job_even_when_it_is_too_big() -> None:
    queue = held(500, 2)
    assert names(take_batch(queue, max_jobs=8, max_samples=64)) == ["r0"]
    assert names(take_batch(queue, max_jobs=8, max_samples=64)) == ["r1"] and queue == []


def test_take_batch_lets_small_jobs_pass_a_big_one_which_then_heads_the_next_batch() -> None:
    queue = held(10, 60, 10)
    assert names(take_batch(queue, max_jobs=8, max_samples=32)) == ["r0", "r2"]
    assert names(queue) == ["r1"]
    assert names(take_batch(queue, max_jobs=8, max_samples=32)) == ["r1"]


def test_generation_request_carries_seed_offset_params_and_chat_prompt() -> None:
    job = make_job(prompt=[ChatMessage(role="system", content="Be brief"), ChatMessage(role="user", content="Hi")],
                   sample_offset=12, temperature=0.5, top_p=0.9, seed=99, metadata={"answer": "4"})
    request = to_generation_request(job)
    assert request.key == job.job_id and request.sample_offset == 12 and request.seed == 99
    assert (request.temperature, request.top_p, request.max_new_tokens) == (0.5, 0.9, 5)
    assert request.prompt == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    assert request.metadata == {"answer": "4"}


def test_aisp_config_takes_job_overrides_on_worker_defaults() -> None:
    defaults = AispConfig(num_rollouts=8, sigma=0.2, lam=0.3)
    assert aisp_config(defaults, None) is defaults
    config = aisp_config(defaults, AispParams(num_rollouts=4, lam=1.0))
    assert (config.num_rollouts, config.lam, config.sigma, config.alpha) == (4, 1.0, 0.2, defaults.alpha)


def test_aisp_reply_shifts_indices_by_the_job_offset_and_keeps_stats() -> None:
    job = make_job(kind=JobKind.AISP, sample_offset=100, num_samples=4)
    result = AispResult(key=job.job_id, samples=[GeneratedSample(i, f"t{i}", float(i), 3, True) for i in range(4)],
                        best_index=3, ess=[1.5, 1.9], iteration_mean=[0.5, 2.5], iteration_best=[1.0, 3.0],
                        generate_s=0.2, score_s=0.1)
    reply = sample_set_from_aisp(job, result, "w")
    assert [s.index for s in reply.samples] == [100, 101, 102, 103] and reply.error is None
    assert reply.stats["aisp_ess"] == [1.5, 1.9] and reply.stats["aisp_num_iterations"] == 2
    failed = sample_set_from_aisp(job, AispResult(job.job_id, result.samples[:2], 1, [1.5], [0.5], [1.0], 0.1, 0.1,
                                                  error="reward failed: NaN"), "w")
    assert failed.error.code == ErrorCode.REWARD_FAILED and len(failed.samples) == 2


def test_expired_reply_and_salvaged_reply_for_an_invalid_but_nameable_job() -> None:
    job = make_job(deadline_at_ms=1_000)
    reply = expired_reply(job, "w", 1_500)
    assert reply.error.code == ErrorCode.DEADLINE_EXCEEDED and "500 ms" in reply.error.message and not reply.samples
    raw = make_job().model_dump(mode="python")
    raw["temperature"] = -1
    scheduler_id, salvaged = salvage_error_reply(msgpack.packb(raw), "w", ValueError("temperature"))
    assert scheduler_id == "s1" and salvaged.job_id == job.job_id and salvaged.error.code == ErrorCode.INTERNAL
    assert salvage_error_reply(b"\xc1garbage", "w", ValueError("x")) is None
    assert salvage_error_reply(msgpack.packb({"job_id": "j"}), "w", ValueError("x")) is None
    assert salvage_error_reply(encode(job)[:-3], "w", ValueError("x")) is None


@pytest.fixture(scope="module")
def runner(tiny_llama_dir: pathlib.Path) -> BatchRunner:
    from workers.models import load_policy, load_reward

    torch.set_num_threads(1)
    policy = load_policy(str(tiny_llama_dir), device="cpu", dtype="float32")
    return BatchRunner(policy, load_reward("python:workers.scorers:distinct_words"), worker_id="w", max_batch=8,
                       aisp_defaults=AispConfig(num_rollouts=2))


def test_runner_answers_every_job_when_one_breaks_the_batch(runner: BatchRunner) -> None:
    good = [make_job("a", num_samples=2), make_job("b", num_samples=3, sample_offset=2)]
    broken = Job.model_construct(**{**make_job("bad").model_dump(), "temperature": math.nan})  # slipped past checks
    calls_before = runner.num_engine_calls
    replies = runner.run([good[0], broken, good[1]])
    assert [r.job_id for r in replies] == [good[0].job_id, broken.job_id, good[1].job_id]
    assert replies[1].error.code == ErrorCode.INTERNAL and "temperature" in replies[1].error.message
    assert [s.index for s in replies[0].samples] == [0, 1] and [s.index for s in replies[2].samples] == [2, 3, 4]
    assert runner.num_engine_calls - calls_before == 2  # the whole batch failed; then one call per good job
    assert [s.text for s in runner.run([good[1]])[0].samples] == [s.text for s in replies[2].samples]


def test_runner_runs_engine_and_aisp_jobs_of_one_batch(runner: BatchRunner) -> None:
    jobs = [make_job("bon", num_samples=2), make_job("aisp", kind=JobKind.AISP, num_samples=4, sample_offset=0,
                                                    aisp=AispParams(num_rollouts=2))]
    bon, aisp = runner.run(jobs)
    assert bon.error is None and len(bon.samples) == 2
    assert aisp.error is None and aisp.kind == JobKind.AISP and [s.index for s in aisp.samples] == [0, 1, 2, 3]
    assert aisp.stats["aisp_num_iterations"] == 2 and all(math.isfinite(s.reward) for s in aisp.samples)
