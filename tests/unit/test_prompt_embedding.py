"""Explore replies carry the reward encoder's prompt embedding when the worker is asked to (spread prior)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from schemas import Job, JobKind
from workers.jobs import BatchRunner


def make_job(kind: JobKind, offset: int = 0) -> Job:
    return Job(job_id=f"r:{kind}:{offset}", request_id="r", scheduler_id="s1", kind=kind, prompt="How do I boil an egg?",
               num_samples=2, sample_offset=offset, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=3)


@pytest.mark.slow
def test_explore_replies_carry_the_prompt_embedding(tiny_llama_dir: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.models import load_policy, load_reward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    policy = load_policy(str(tiny_llama_dir), device="cpu", dtype="float32")
    reward = load_reward(device="cpu")  # the default: the MiniLM embedding reward
    runner = BatchRunner(policy, reward, worker_id="w", max_batch=8, embed_prompts=True)
    explore, exploit = runner.run([make_job(JobKind.EXPLORE), make_job(JobKind.EXPLOIT, 2)])
    vector = explore.stats["prompt_embedding"]
    assert len(vector) == 384 and abs(sum(v * v for v in vector) - 1.0) < 1e-3  # unit length
    assert "prompt_embedding" not in exploit.stats and len(explore.samples) == 2
    plain = BatchRunner(policy, load_reward("python:workers.scorers:distinct_words"), worker_id="w", max_batch=8,
                        embed_prompts=True)
    assert "prompt_embedding" not in plain.run([make_job(JobKind.EXPLORE)])[0].stats  # no encoder: nothing sent
