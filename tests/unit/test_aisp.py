"""AISP's controlled decoding and loop on tiny random models (float32, one thread)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from workers.aisp import AispConfig, AispProgress, AispRequest, perturb_prelogits, run_aisp, split_budget
from workers.errors import RewardError
from workers.models import Policy, load_policy

torch.set_num_threads(1)

PROMPTS = ["Tell me a story about a cat.", "Hi", "What is two plus two? Answer briefly, please, with a number."]


_POLICIES: dict[pathlib.Path, Policy] = {}


def _load(path: pathlib.Path) -> Policy:
    if path not in _POLICIES:
        _POLICIES[path] = load_policy(str(path), device="cpu", dtype="float32")
    return _POLICIES[path]


@pytest.fixture
def llama(tiny_llama_dir: pathlib.Path) -> Policy:
    return _load(tiny_llama_dir)


class DistinctWords:
    """Model-free reward: share of distinct words times a length term; raises on metadata 'fail'."""

    def score(self, prompts: Sequence[Any], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        if metadata and any(m.get("fail") for m in metadata):
            raise RewardError("scorer exploded")
        out = []
        for text in responses:
            words = text.split()
            out.append(len(set(words)) / len(words) * min(1.0, len(words) / 8) if words else 0.0)
        return out


def _head_hooks(policy: Policy) -> int:
    return len(policy.model.get_output_embeddings()._forward_pre_hooks)


def test_split_budget_rule() -> None:
    assert split_budget(32, 8) == (8, 4)
    assert split_budget(30, 8) == (8, 3)
    assert split_budget(5, 8) == (5, 1)
    assert split_budget(1, 8) == (1, 1)
    with pytest.raises(ValueError):
        split_budget(0, 8)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_sigma_reproduces_greedy_generate(kind: str, tiny_llama_dir: pathlib.Path,
                                               tiny_gpt2_dir: pathlib.Path) -> None:
    policy = _load(tiny_llama_dir if kind == "llama" else tiny_gpt2_dir)
    config = AispConfig(num_rollouts=3, sigma=1e-12, sigma_is_relative=False, max_u_norm=None)
    requests = [AispRequest(key=f"p{i}", prompt=p, budget=6, max_new_tokens=12, seed=i) for i, p in enumerate(PROMPTS)]
    results = run_aisp(policy, DistinctWords(), requests, config)
    tokenizer = policy.tokenizer
    for request, result in zip(requests, results):
        ids = torch.tensor([policy.encode(request.prompt)])
        with torch.inference_mode():
            out = policy.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                        pad_token_id=tokenizer.eos_token_id)
        generated = out[0, ids.shape[1]:].tolist()
        expected = tokenizer.decode([t for t in generated if t != tokenizer.eos_token_id], skip_special_tokens=True)
        assert len(result.samples) == 6
        assert {s.text for s in result.samples} == {expected}
        assert {s.num_tokens for s in result.samples} == {len(generated)}
    assert _head_hooks(policy) == 0


def test_hook_removed_on_exception(llama: Policy) -> None:
    class Stop(BaseException):
        pass

    class Exploding:
        def score(self, prompts: Any, responses: Any, metadata: Any = None) -> list[float]:
            raise Stop

    with pytest.raises(RuntimeError), perturb_prelogits(llama.model) as state:
        assert _head_hooks(llama) == 1 and state.delta is None
        raise RuntimeError
    assert _head_hooks(llama) == 0
    with pytest.raises(Stop):
        run_aisp(llama, Exploding(), [AispRequest("a", "Hello there", budget=2, max_new_tokens=3)], AispConfig())
    assert _head_hooks(llama) == 0


def test_perturbation_changes_outputs_and_results_are_complete(llama: Policy) -> None:
    config = AispConfig(num_rollouts=4, sigma=1.0)
    [result] = run_aisp(llama, DistinctWords(), [AispRequest("a", PROMPTS[0], budget=12, max_new_tokens=10)], config)
    assert [s.index for s in result.samples] == list(range(12))
    assert len({s.text for s in result.samples}) > 1  # σ = ‖z‖ explores
    assert len(result.ess) == 3 and all(1.0 <= e <= 4.0 + 1e-9 for e in result.ess)
    best = max(result.samples, key=lambda s: s.reward)
    assert result.best_index == best.index and result.iteration_best[0] == max(s.reward for s in result.samples[:4])
    assert all(s.num_tokens <= 10 for s in result.samples)


def test_reward_failure_is_isolated(llama: Policy) -> None:
    requests = [AispRequest("ok", PROMPTS[0], budget=4, max_new_tokens=4),
                AispRequest("bad", PROMPTS[2], budget=4, max_new_tokens=4, metadata={"fail": True})]
    ok, bad = run_aisp(llama, DistinctWords(), requests, AispConfig(num_rollouts=2))
    assert ok.error is None and len(ok.samples) == 4
    assert bad.error is not None and "scorer exploded" in bad.error and bad.samples == []


def test_batched_equals_alone(llama: Policy) -> None:
    config = AispConfig(num_rollouts=4, sigma=0.8)
    requests = [AispRequest(f"p{i}", p, budget=8, max_new_tokens=8, seed=10 + i) for i, p in enumerate(PROMPTS)]
    batched = run_aisp(llama, DistinctWords(), requests, config)
    for request, together in zip(requests, batched):
        [alone] = run_aisp(llama, DistinctWords(), [request], config)
        assert [s.text for s in alone.samples] == [s.text for s in together.samples]
        assert [s.reward for s in alone.samples] == [s.reward for s in together.samples]
        assert alone.ess == pytest.approx(together.ess, rel=1e-4)
    assert len({s.text for r in batched for s in r.samples}) > 3


class DirectionReward:
    """Mean projection of the response tokens' output embeddings on ``direction`` (re-tokenised text).

    Adding v ∥ direction to a pre-logit raises exactly the logits of the tokens this reward likes, so
    it prefers one direction in pre-logit space.
    """

    def __init__(self, policy: Policy, direction: torch.Tensor) -> None:
        self.tokenizer = policy.tokenizer
        projection = policy.model.get_output_embeddings().weight.detach() @ direction
        self.projection = projection / projection.std()

    def score(self, prompts: Any, responses: Sequence[str], metadata: Any = None) -> list[float]:
        out = []
        for text in responses:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(float(self.projection[ids].mean()) if ids else 0.0)
        return out


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mean_moves_towards_rewarded_direction(llama: Policy, sign: float) -> None:
    # σ = 2‖z‖: the random tiny model's greedy output barely moves below ~‖z‖ (tied embeddings repeat tokens)
    direction = sign * torch.nn.functional.normalize(torch.randn(llama.model.config.hidden_size,
                                                                 generator=torch.Generator().manual_seed(3)), dim=0)
    prompts = PROMPTS + ["Name a color.", "Why is the sky blue?", "Write a haiku about rain."]
    progress: list[AispProgress] = []
    config = AispConfig(num_rollouts=16, sigma=2.0, lam=0.5, max_u_norm=None, sigma_decay=1.0)
    requests = [AispRequest(f"p{i}", p, budget=16 * 6, max_new_tokens=4, seed=i) for i, p in enumerate(prompts)]
    results = run_aisp(llama, DirectionReward(llama, direction), requests, config, on_iteration=progress.append)
    assert [p.iteration for p in progress if p.key == "p0"] == list(range(6))
    final = [p.mean for p in progress if p.iteration == 5]
    # mean cosine of u_t with the rewarded direction: ~N(0, 0.026) for a U that ignores it
    cosine = sum(float(torch.nn.functional.cosine_similarity(u, direction[None], dim=-1).mean()) for u in final)
    assert cosine / len(final) > 0.08
    first = sum(r.iteration_mean[0] for r in results) / len(results)
    last = sum(sum(r.iteration_mean[-2:]) / 2 for r in results) / len(results)
    assert last > first + 0.2, (first, last)


def test_bench_summary_hand_computed() -> None:
    from middleware.bench.aisp import summarize

    aisp = [[0.1, 0.5, 0.2, 0.9], [0.3, 0.1, 0.4, 0.0]]
    bon = [[0.2, 0.3, 0.6, 0.1], [0.0, 0.2, 0.1, 0.3]]
    summary = summarize(aisp, bon, n=2, k=2)
    assert summary["aisp_best_by_rollout"] == pytest.approx([0.2, 0.4, 0.45, 0.65])
    assert summary["bon_best_by_rollout"] == pytest.approx([0.1, 0.25, 0.4, 0.45])
    assert summary["aisp_best_mean"] == pytest.approx(0.65) and summary["bon_best_mean"] == pytest.approx(0.45)
    assert summary["rollouts_to_match_bon"] == 3
    assert [c["rollouts"] for c in summary["curve"]] == [2, 4]
    assert summarize(bon, aisp, n=2, k=2)["rollouts_to_match_bon"] is None


def test_bench_cli_json_and_plot(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from middleware.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me a story."}\n{"prompt": "What is two plus two?"}\n', encoding="utf-8")
    plot = tmp_path / "aisp.png"
    argv = ["bench", "aisp", "--prompts", str(prompts), "--model", str(tiny_llama_dir), "--reward",
            "python:workers.scorers:distinct_words", "--n", "3", "--k", "2", "--seeds", "2", "--max-new-tokens", "6",
            "--sigma", "1.0", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--json", "--plot", str(plot),
            "--sweep", "--sweep-sigmas", "0.5", "--sweep-lams", "0.3,1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and report["k"] == 2
    assert [c["rollouts"] for c in report["curve"]] == [3, 6]
    assert report["aisp_best_mean"] == report["curve"][-1]["aisp_best_mean"]
    assert report["curve"][0]["bon_best_mean"] <= report["bon_best_mean"]
    assert 0.0 <= report["greedy_mean"] <= 1.0
    assert report["rollouts_to_match_bon"] is None or 1 <= report["rollouts_to_match_bon"] <= 6
    assert min(report["aisp_wall_s"], report["bon_wall_s"], report["greedy_wall_s"]) > 0
    assert [(row["sigma"], row["lam"]) for row in report["sweep"]] == [(0.5, 0.3), (0.5, 1.0)]
    assert plot.stat().st_size > 1000
    assert _head_hooks(_load(tiny_llama_dir)) == 0


def test_bench_cli_bad_prompts_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from middleware.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n', encoding="utf-8")
    for argv in (["bench", "aisp", "--prompts", str(bad)], ["bench", "aisp", "--prompts", str(tmp_path / "missing")],
                 ["bench", "aisp", "--prompts", str(bad), "--n", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_sigma_decay_shrinks_exploration(llama: Policy) -> None:
    config = AispConfig(num_rollouts=4, sigma=1.0, sigma_decay=1e-9)
    [result] = run_aisp(llama, DistinctWords(), [AispRequest("a", PROMPTS[0], budget=8, max_new_tokens=6)], config)
    first, second = result.samples[:4], result.samples[4:]
    assert len({s.text for s in first}) > 1  # σ = ‖z‖ explores
    assert len({s.text for s in second}) == 1  # σ ≈ 0: every rollout decodes U itself
    with pytest.raises(ValueError, match="sigma_decay"):
        run_aisp(llama, DistinctWords(), [], AispConfig(sigma_decay=0.0))
