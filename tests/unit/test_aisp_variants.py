"""AISP's sampled rollouts, elite, window schedule and the bench statistics (tiny models, hand-computed numbers)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from middleware.bench.aisp_stats import (
    best_curve,
    bootstrap_mean_ci,
    paired_diff,
    per_prompt_best,
    rollouts_to_match,
    summarize,
)
from workers.aisp import AispConfig, AispRequest, AispResult, run_aisp
from workers.aisp_window import WindowSchedule, rank_rising, rising_score, run_aisp_window
from workers.models import Policy, load_policy

torch.set_num_threads(1)

PROMPTS = ["Tell me a story about a cat.", "What is two plus two? Answer briefly, please.", "Name three colours."]
_POLICIES: dict[pathlib.Path, Policy] = {}


@pytest.fixture
def llama(tiny_llama_dir: pathlib.Path) -> Policy:
    if tiny_llama_dir not in _POLICIES:
        _POLICIES[tiny_llama_dir] = load_policy(str(tiny_llama_dir), device="cpu", dtype="float32")
    return _POLICIES[tiny_llama_dir]


@pytest.fixture
def llama64(tiny_llama_dir: pathlib.Path) -> Policy:
    """float64: batch-independence checks. In float32 some CPUs (oneDNN on AMD EPYC) block a matmul by
    batch shape, so a batch moves logits by an ulp and a token on a top-p boundary can flip."""
    key = tiny_llama_dir / "float64"
    if key not in _POLICIES:
        _POLICIES[key] = load_policy(str(tiny_llama_dir), device="cpu", dtype="float64")
    return _POLICIES[key]


class DistinctWords:
    def score(self, prompts: Sequence[Any], responses: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        out = []
        for text in responses:
            words = text.split()
            out.append(len(set(words)) / len(words) * min(1.0, len(words) / 8) if words else 0.0)
        return out


def _result(key: str, best: list[float], mean: list[float]) -> AispResult:
    return AispResult(key, [], -1, [1.0] * len(best), mean, best, 0.0, 0.0)


# --- statistics ---------------------------------------------------------------------------------

def test_per_prompt_best_and_paired_diff_hand_computed() -> None:
    # 2 seeds × 2 prompts, seed-major
    a = [[0.1, 0.5], [0.3, 0.2], [0.4, 0.0], [0.1, 0.1]]
    b = [[0.2, 0.2], [0.1, 0.1], [0.3, 0.1], [0.2, 0.0]]
    assert per_prompt_best(a, 2, 2) == pytest.approx([0.45, 0.2])
    assert per_prompt_best(a, 2, 1) == pytest.approx([0.25, 0.2])
    diff = paired_diff(a, b, 2, 2)
    assert diff["mean"] == pytest.approx(((0.45 - 0.25) + (0.2 - 0.15)) / 2)
    assert diff["prompts_ahead"] == 2 and diff["prompts_behind"] == 0
    low, high = diff["ci95"]
    assert 0.05 - 1e-9 <= low <= diff["mean"] <= high <= 0.2 + 1e-9
    with pytest.raises(ValueError, match="whole number"):
        per_prompt_best(a[:3], 2, 2)


def test_bootstrap_interval_properties() -> None:
    assert bootstrap_mean_ci([0.3] * 5) == pytest.approx([0.3, 0.3])
    values = [0.0] * 50 + [1.0] * 50
    low, high = bootstrap_mean_ci(values)
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62  # ±1.96·0.05
    assert bootstrap_mean_ci(values) == bootstrap_mean_ci(values)  # seeded


def test_summarize_reports_interval_at_largest_count() -> None:
    aisp = [[0.1, 0.5, 0.2, 0.9], [0.3, 0.1, 0.4, 0.0]]
    bon = [[0.2, 0.3, 0.6, 0.1], [0.0, 0.2, 0.1, 0.3]]
    summary = summarize(aisp, bon, n=2, k=2, num_prompts=2)
    assert summary["aisp_best_mean"] == pytest.approx(0.65) and summary["bon_best_mean"] == pytest.approx(0.45)
    assert summary["diff_mean"] == pytest.approx(0.2) and len(summary["diff_ci95"]) == 2
    assert summary["diff_ci95"] == pytest.approx([0.1, 0.3])  # two prompts: +0.3 and +0.1
    assert [c["diff_mean"] for c in summary["curve"]] == pytest.approx([0.15, 0.2])
    assert summary["rollouts_to_match_bon"] == 3
    assert rollouts_to_match(best_curve(bon), 0.65) is None


# --- window schedule ------------------------------------------------------------------------------

def test_rising_score_and_rank() -> None:
    assert rising_score([], []) == (float("inf"), float("inf"))
    assert rising_score([0.3], [0.1]) == (0.0, 0.0)
    assert rising_score([0.3, 0.5, 0.4], [0.1, 0.2, 0.35]) == pytest.approx((0.0, 0.15))
    assert rising_score([0.3, 0.2, 0.6], [0.1, 0.2, 0.1]) == pytest.approx((0.3, -0.1))
    assert rank_rising([(0.0, 0.1), (0.2, -1.0), (0.0, 0.1), (0.0, 0.3)]) == [1, 3, 0, 2]


def test_window_schedule_spends_budget_on_rising_prompts() -> None:
    schedule = WindowSchedule(budget=4 * 2 * 3, num_prompts=4, share=0.5)  # 4 prompts, n = 2, k = 3
    schedule.first_round([2, 2, 2, 2])
    results = [_result("a", [0.1, 0.3], [0.0, 0.1]), _result("b", [0.5, 0.4], [0.2, 0.1]),
               _result("c", [0.2, 0.2], [0.1, 0.3]), _result("d", [0.1, 0.15], [0.1, 0.1])]
    assert schedule(results, [2, 2, 2, 2]) == {"a", "d"}  # gains 0.2 and 0.05; b and c did not rise
    assert schedule.used == 12 and schedule.rounds == [2]
    for _ in range(10):
        if not schedule(results, [2, 2, 2, 2]):
            break
    assert schedule.used == 24 and schedule.rounds == [2, 2, 2, 2]
    assert schedule(results, [2, 2, 2, 2]) == set()
    with pytest.raises(ValueError, match="below one iteration"):
        WindowSchedule(budget=3, num_prompts=2).first_round([2, 2])


def test_window_run_keeps_budget(llama: Policy) -> None:
    requests = [AispRequest(f"p{i}", p, budget=2 * 6, max_new_tokens=5, seed=i) for i, p in enumerate(PROMPTS)]
    config = AispConfig(num_rollouts=2, sigma=1.0)
    results, schedule = run_aisp_window(llama, DistinctWords(), requests, config, budget=3 * 2 * 3, share=0.3)
    used = sum(len(r.samples) for r in results)
    assert used == schedule.used == 18
    assert all(1 <= len(r.ess) <= 6 for r in results) and schedule.rounds == [1] * 6
    assert [[s.index for s in r.samples] for r in results] == [list(range(len(r.samples))) for r in results]


# --- sampled rollouts and elite ---------------------------------------------------------------------

def test_sampled_rollouts_seeded_and_batch_independent(llama64: Policy) -> None:
    llama = llama64
    config = AispConfig(num_rollouts=3, sigma=1e-9, sigma_is_relative=False, temperature=1.0, top_p=0.9)
    requests = [AispRequest(f"p{i}", p, budget=6, max_new_tokens=8, seed=20 + i) for i, p in enumerate(PROMPTS)]
    batched = run_aisp(llama, DistinctWords(), requests, config)
    again = run_aisp(llama, DistinctWords(), requests, config)
    assert [[s.text for s in r.samples] for r in batched] == [[s.text for s in r.samples] for r in again]
    for request, together in zip(requests, batched):
        [alone] = run_aisp(llama, DistinctWords(), [request], config)
        assert [s.text for s in alone.samples] == [s.text for s in together.samples]
    # σ ≈ 0: greedy rollouts are all the same text; sampled ones differ
    assert all(len({s.text for s in r.samples}) > 1 for r in batched)
    greedy = run_aisp(llama, DistinctWords(), requests, AispConfig(num_rollouts=3, sigma=1e-9, sigma_is_relative=False))
    assert all(len({s.text for s in r.samples}) == 1 for r in greedy)
    with pytest.raises(ValueError, match="temperature"):
        AispConfig(temperature=-1.0).validate()


def test_keep_elite_leaves_first_iteration_alone(llama: Policy) -> None:
    requests = [AispRequest("a", PROMPTS[0], budget=12, max_new_tokens=6, seed=5)]
    [plain] = run_aisp(llama, DistinctWords(), requests, AispConfig(num_rollouts=4, sigma=1.0))
    [elite] = run_aisp(llama, DistinctWords(), requests, AispConfig(num_rollouts=4, sigma=1.0, keep_elite=True))
    assert [s.text for s in plain.samples[:4]] == [s.text for s in elite.samples[:4]]
    assert len(elite.samples) == 12 and len(elite.ess) == 3
    assert all(1.0 <= e <= 5.0 + 1e-9 for e in elite.ess)  # n + 1 weights from the second iteration on


def test_bench_cli_variants_and_window(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from middleware.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    saved = tmp_path / "out" / "report.json"
    argv = ["bench", "aisp", "--prompts", str(prompts), "--model", str(tiny_llama_dir), "--reward",
            "python:workers.scorers:distinct_words", "--n", "2", "--k", "2", "--seeds", "2", "--max-new-tokens", "5",
            "--sigma", "1.0", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--json", "--window",
            "--variant", "sampled temperature=0.8 top_p=0.95", "--variant", "split n=4 k=1 keep_elite=true",
            "--save", str(saved)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(saved.read_text(encoding="utf-8")) == report
    assert len(report["diff_ci95"]) == 2 and report["diff_ci95"][0] <= report["diff_mean"] <= report["diff_ci95"][1]
    assert report["aisp_rollouts_per_s"] > 0 and report["bon_samples_per_s"] > 0
    assert [v["name"] for v in report["variants"]] == ["sampled", "split"]
    assert report["variants"][1]["settings"]["n"] == 4 and len(report["variants"][1]["vs_base"]["ci95"]) == 2
    window = report["window"]
    assert window["rollouts_used_by_seed"] == [12, 12] and len(window["gain_ci95"]) == 2
    for bad in (["--variant", "odd n=3"], ["--variant", "odd colour=3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv[:-6] + bad)
        assert exit_info.value.code == 2


def test_bench_merge_of_seed_runs_equals_one_run(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from middleware.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]), encoding="utf-8")
    common = ["bench", "aisp", "--prompts", str(prompts), "--model", str(tiny_llama_dir), "--reward",
              "python:workers.scorers:distinct_words", "--n", "2", "--k", "2", "--max-new-tokens", "4",
              "--sigma", "1.0", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--json",
              "--variant", "elite keep_elite=true"]
    reports = []
    for extra in (["--seeds", "2"], ["--seeds", "1", "--save", str(tmp_path / "s0.json")],
                  ["--seeds", "1", "--first-seed", "1", "--save", str(tmp_path / "s1.json")],
                  ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json")],
                  ["--seeds", "2", "--num-prompts", "1", "--save", str(tmp_path / "p0.json")],
                  ["--seeds", "2", "--num-prompts", "1", "--prompt-offset", "1", "--save", str(tmp_path / "p1.json")],
                  ["--merge", str(tmp_path / "p0.json"), str(tmp_path / "p1.json")]):
        with pytest.raises(SystemExit) as exit_info:
            main(common + extra)
        assert exit_info.value.code == 0
        reports.append(json.loads(capsys.readouterr().out))
    whole = reports[0]
    for merged in (reports[3], reports[6]):  # seeds merged, prompt ranges merged
        assert merged["seeds"] == 2 and merged["num_prompts"] == 2
        assert merged["raw"]["bon"]["runs"] == whole["raw"]["bon"]["runs"]
        for key in ("aisp_best_mean", "bon_best_mean", "diff_mean", "diff_ci95", "rollouts_to_match_bon"):
            assert merged[key] == pytest.approx(whole[key])
        assert merged["variants"][0]["vs_base"]["ci95"] == pytest.approx(whole["variants"][0]["vs_base"]["ci95"])
        assert merged["variants"][0]["aisp_best_mean"] == pytest.approx(whole["variants"][0]["aisp_best_mean"])
