"""``alignq pool build`` and ``alignq bench allocation`` as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RESULT_KEYS = {"k", "method", "budget", "median_bwr", "q1_bwr", "q3_bwr", "frac_bwr_gt_half", "median_est",
               "median_est_over_budget", "mean_gain"}


def alignq(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", "from middleware.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, timeout=timeout_s, env=env)


def test_bench_allocation_json_and_plot(tmp_path: Path) -> None:
    pool = tmp_path / "bernoulli.jsonl"
    built = alignq("pool", "build", "--synthetic", "bernoulli", "--samples", "256", "-o", str(pool))
    assert built.returncode == 0, built.stderr
    plot = tmp_path / "allocation.png"
    done = alignq("bench", "allocation", "--pool", str(pool), "--k", "3,5", "--budget", "16", "--runs", "20",
                  "--batches", "6", "--methods", "adabon-integral,adabon-eb", "--json", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = report["results"]
    assert {(r["k"], r["method"]) for r in rows} == {(k, m) for k in (3, 5)
                                                     for m in ("adabon-integral", "adabon-eb", "null", "oracle")}
    assert all(RESULT_KEYS <= set(r) and r["budget"] == 16 for r in rows)
    assert all(0 <= r["q1_bwr"] <= r["median_bwr"] <= r["q3_bwr"] <= 1 for r in rows)
    eb = next(r for r in rows if r["k"] == 5 and r["method"] == "adabon-eb")
    assert eb["median_bwr"] > 0.5 and eb["mean_gain"] > 0  # unsolved prompts get the budget
    assert set(report["allocation_ms_256_prompts"]) == {"uniform", "adabon-integral", "adabon-eb"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pool", "synthetic:nope"], "unknown synthetic pool"),
        (["--pool", "synthetic:alike", "--k", "5,x"], "--k"),
        (["--pool", "synthetic:alike", "--methods", "magic"], "unknown allocator"),
        (["--pool", "/no/such/pool.jsonl"], "alignq pool build"),
        (["--pool", "synthetic:alike", "--k", "99"], "exceeds"),
    ],
)
def test_bench_allocation_bad_usage_exits_2_with_one_line(args: list[str], message: str) -> None:
    done = alignq("bench", "allocation", "--runs", "2", "--batches", "1", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_pool_build_with_a_real_engine_resumes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Say hi."}\n{"id": "b", "prompt": "What is 2 + 2?", "metadata": {"answer": "4"}}\n')
    pool = tmp_path / "pool.jsonl"
    common = ["--prompts", str(prompts), "--samples", "3", "--max-new-tokens", "4", "--model", str(tiny_llama_dir),
              "--reward", "python:workers.scorers:distinct_words", "--threads", "1", "-o", str(pool)]
    first = alignq("pool", "build", *common)
    assert first.returncode == 0, first.stderr
    lines = pool.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["model"] == str(tiny_llama_dir)
    row = json.loads(lines[2])
    assert row["prompt_id"] == "b" and row["metadata"] == {"answer": "4"}
    assert len(row["texts"]) == len(row["rewards"]) == len(row["num_tokens"]) == 3
    assert all(1 <= n <= 4 for n in row["num_tokens"]) and all(0 <= r <= 1 for r in row["rewards"])

    with prompts.open("a") as out:
        out.write('{"id": "c", "prompt": "Name a colour."}\n')
    second = alignq("pool", "build", *common)
    assert second.returncode == 0, second.stderr
    resumed = pool.read_text().splitlines()
    assert resumed[:3] == lines and json.loads(resumed[3])["prompt_id"] == "c"  # only the new prompt ran

    changed = alignq("pool", "build", *common, "--seed", "7")
    assert changed.returncode == 2 and "seed" in changed.stderr
    shown = alignq("pool", "show", str(pool), "--json")
    assert [json.loads(line)["prompt_id"] for line in shown.stdout.splitlines()] == ["a", "b", "c"]


def test_bench_allocation_reports_budget_equivalence_and_cross_validated_priors(tmp_path: Path) -> None:
    pool = tmp_path / "bernoulli.jsonl"
    assert alignq("pool", "build", "--synthetic", "bernoulli", "--samples", "128", "-o", str(pool)).returncode == 0
    done = alignq("bench", "allocation", "--pool", str(pool), "--k", "4", "--budget", "16", "--runs", "10",
                  "--batches", "6", "--methods", "adabon,adabon-eb+prior@0.25", "--cross-validate", "3",
                  "--prior-features", "hash", "--saving-grid", "0.75,1.25", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cross_validate"] == 3 and len(report["prior_held_out_r2"]) == 1
    ((r, low, high),) = report["prior_held_out_r"]  # one target (logit rate): r and its 95% interval
    assert -1 <= low <= r <= high <= 1
    for row in report["results"]:
        assert {"budget_equivalence", "budget_equivalence_ci", "budget_saving", "budget_saving_ci",
                "median_bwr_ci"} <= set(row)
    prior = next(r for r in report["results"] if r["method"] == "adabon-eb+prior@0.25")
    assert prior["num_explore"] == 4 and prior["budget_equivalence"] > 1.0


def test_prior_methods_need_cross_validation() -> None:
    done = alignq("bench", "allocation", "--pool", "synthetic:bernoulli", "--runs", "2", "--batches", "1",
                  "--methods", "adabon+prior")
    assert done.returncode == 2 and "--cross-validate" in done.stderr
