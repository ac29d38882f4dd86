"""``alignq bench latency`` end to end on a tiny model: every variant answers every prompt."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_latency_reports_reward_and_percentiles(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path,
                                                      redis_url: str) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say thing {i}"}) + "\n" for i in range(4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "from middleware.cli import main; main()", "bench", "latency",
                           "--prompts", str(prompts), "--num-prompts", "4", "--budget", "4", "--max-new-tokens", "4",
                           "--concurrency", "2", "--model", str(tiny_llama_dir), "--reward",
                           "python:workers.scorers:distinct_words", "--redis-url", redis_url, "--json",
                           "--timeout-s", "120"], capture_output=True, text=True, timeout=400, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["variants"]) == {"uniform", "adabon-f0.75", "adabon-f0.25", "deadline"}
    for row in report["variants"].values():
        assert row["num_requests"] == 4 and 0 < row["p50_s"] <= row["p95_s"]
        assert row["mean_reward_ci"][0] <= row["mean_reward"] <= row["mean_reward_ci"][1]
        assert row["mean_samples"] == 4
