"""Continuous batching: requests join and leave a running decode batch (tiny random llama, float32)."""

from __future__ import annotations

import pathlib

import torch
from engine_support import engine_request, texts

from workers.engine import Engine, GenerationRequest, GenerationResult
from workers.models import Policy, load_policy, load_reward
from workers.reward import FunctionReward

torch.set_num_threads(1)

LONG_PROMPT = "Write a long and detailed story about a dragon who learns to bake bread in a small village."


def request(key: str, prompt: str = "Hello there", **fields) -> GenerationRequest:
    return engine_request(key, prompt, **{"max_new_tokens": 12} | fields)


def drain(engine: Engine) -> dict[str, GenerationResult]:
    results: dict[str, GenerationResult] = {}
    while engine.has_work:
        results.update((r.key, r) for r in engine.step())
    return results


def test_cancel_drops_rows_mid_decode_and_leaves_other_samples_byte_identical(llama: Policy,
                                                                              words_reward: FunctionReward) -> None:
    victim = request("victim", LONG_PROMPT, num_samples=6, max_new_tokens=20, seed=1)
    other = request("other", num_samples=5, max_new_tokens=16, seed=2, top_p=0.9)
    alone = Engine(llama, words_reward, max_batch=16).run([other])[0]
    engine = Engine(llama, words_reward, max_batch=16)
    engine.submit([victim, other])
    for _ in range(4):
        assert engine.step() == []
    assert engine.batch is not None and engine.batch.num_rows == 11
    assert engine.cancel("victim") and not engine.cancel("victim")
    first = engine.step()  # the victim's rows are gone before this step samples
    assert [(r.key, r.is_cancelled, r.samples) for r in first] == [("victim", True, [])]
    assert engine.batch.num_rows == 5
    results = drain(engine)
    assert list(results) == ["other"]
    assert [t.encode() for t in texts(results["other"])] == [t.encode() for t in texts(alone)]
    assert [s.num_tokens for s in results["other"].samples] == [s.num_tokens for s in alone.samples]


def test_a_request_joining_a_running_batch_gets_the_samples_it_gets_alone(llama: Policy,
                                                                          words_reward: FunctionReward) -> None:
    first = request("first", num_samples=3, max_new_tokens=10, seed=4)
    late = request("late", LONG_PROMPT, num_samples=4, max_new_tokens=8, seed=5)
    expected = {r.key: texts(Engine(llama, words_reward).run([r])[0]) for r in (first, late)}
    engine = Engine(llama, words_reward, max_batch=16)
    engine.submit([first])
    for _ in range(3):
        engine.step()
    engine.submit([late])  # joins at step 3 with a longer prompt: the running rows get padded
    results = drain(engine)
    assert {key: texts(r) for key, r in results.items()} == expected


def test_short_jobs_do_not_wait_for_a_long_one(llama: Policy, words_reward: FunctionReward) -> None:
    engine = Engine(llama, words_reward, max_batch=4)
    engine.submit([request("long", num_samples=2, max_new_tokens=40), request("short1", num_samples=2,
                   max_new_tokens=4), request("short2", num_samples=2, max_new_tokens=4, seed=9)])
    finished_at: dict[str, int] = {}
    step = 0
    while engine.has_work:
        step += 1
        finished_at.update((r.key, step) for r in engine.step())
    # short2 takes short1's rows as soon as they free up, while "long" keeps decoding
    assert finished_at["short1"] == 4 and finished_at["short2"] == 8 and finished_at["long"] == 40


def test_a_later_stage_reuses_the_prefilled_prompt(llama: Policy, words_reward: FunctionReward) -> None:
    explore = request("explore", LONG_PROMPT, num_samples=3, seed=5)
    exploit = request("exploit", LONG_PROMPT, num_samples=5, seed=5, sample_offset=3)
    reference = texts(Engine(llama, words_reward, prompt_cache_size=0).run([exploit])[0])
    engine = Engine(llama, words_reward)
    engine.run([explore])
    prefilled = engine.num_prefill_tokens
    assert texts(engine.run([exploit])[0]) == reference
    assert engine.num_prefill_tokens == prefilled and engine.prompt_cache.num_hits == 1


def test_runner_cancel_from_another_thread_answers_the_job_none_and_keeps_the_others(
        tiny_llama_dir: pathlib.Path) -> None:
    import threading

    from schemas import Job, JobKind
    from workers.jobs import BatchRunner

    policy = load_policy(str(tiny_llama_dir), device="cpu", dtype="float32")
    runner = BatchRunner(policy, load_reward("python:workers.scorers:distinct_words"), worker_id="w", max_batch=16)

    def job(request_id: str, num_samples: int, max_new_tokens: int) -> Job:
        return Job(job_id=f"{request_id}:explore:0", request_id=request_id, scheduler_id="s", kind=JobKind.EXPLORE,
                   prompt=LONG_PROMPT, num_samples=num_samples, sample_offset=0, max_new_tokens=max_new_tokens,
                   temperature=1.0, top_p=1.0, seed=7)

    keep, victim = job("keep", 3, 10), job("victim", 4, 30)
    [alone] = runner.run([keep])
    assert runner.submit([keep, victim]) == []
    runner.step()
    canceller = threading.Thread(target=runner.cancel, args=(victim.job_id,))
    canceller.start()
    canceller.join()
    answered = {}
    while runner.has_work:
        answered.update((j.job_id, reply) for j, reply in runner.step())
    assert answered[victim.job_id] is None
    assert [s.text for s in answered[keep.job_id].samples] == [s.text for s in alone.samples]
    assert runner.engine.num_rows_held == 0
