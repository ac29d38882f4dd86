"""Smoke tests of ``alignq bench ingest`` and ``alignq bench throughput`` at tiny sizes.

They check the report's shape and that its numbers are sane (positive, consistent with each other,
keys cleaned up), never timings: speed is what the benchmarks measure, not what tests assert.
"""

from __future__ import annotations

import contextlib
import json
import pathlib

import pytest
import redis

from middleware.bench.ingest import parse_redis_benchmark_csv, percentile, realistic_explore_rewards
from middleware.cli import main

REDIS_BENCHMARK_CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
    '"XADD bench:stream * m xxxx","165562.92","0.089","0.048","0.087","0.127","0.175","4.103"\n'
)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_parse_redis_benchmark_csv_reads_rps() -> None:
    assert parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV) == pytest.approx(165562.92)
    with pytest.raises(RuntimeError, match="could not parse"):
        parse_redis_benchmark_csv("ERR unknown command\n")


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) == 0.0


def test_realistic_explore_rewards_mix_preference_and_verifiable() -> None:
    rewards = realistic_explore_rewards(20, 12)
    assert len(rewards) == 20 and all(len(values) == 12 for values in rewards.values())
    verifiable = [values for index, values in enumerate(rewards.values()) if index % 2]
    assert all(set(values) <= {0.0, 1.0} for values in verifiable)
    assert any(len(set(values)) == 1 for values in rewards.values())  # ties: the KDE floor is exercised


def test_ingest_reports_rates_and_cleans_up(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["bench", "ingest", "--requests", "300", "--chunk-size", "100",
                              "--redis-benchmark-requests", "5000", "--repeats", "3", "--window", "64",
                              "--redis-url", redis_url, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    for key in ("submit_per_s", "submit_many_per_s", "redis_benchmark_xadd_per_s", "submit_many_over_redis",
                "submit_p50_ms", "submit_p99_ms", "allocation_ms_64"):
        assert report[key] > 0, key
    assert report["requests_queued"] == 2 * 300 + 200 + 1  # both phases and the warm-up, all accepted
    assert report["submit_p50_ms"] <= report["submit_p99_ms"]
    assert report["submit_many_over_redis"] == pytest.approx(
        report["submit_many_per_s"] / report["redis_benchmark_xadd_per_s"])
    assert report["hardware"]["cpu_count"] >= 1
    assert report["submit_many_cpu_us"]["client"] > 0 and report["redis_benchmark_standard_xadd_per_s"] > 0
    if report["submit_many_cpu_us"]["server"] is not None:  # a Redis on this host: its CPU time is in /proc
        assert report["submit_many_over_redis_cpu"] > 0
    connection = redis.Redis.from_url(redis_url)
    try:
        assert connection.dbsize() == 0, "the benchmark left keys behind"
    finally:
        connection.close()


def test_ingest_rejects_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["bench", "ingest", "--requests", "0"], capsys)
    assert code == 2 and out == ""
    assert "--requests" in err and len(err.strip().splitlines()) == 1


def test_throughput_rejects_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["bench", "throughput", "--modes", "hf_loop,warp"], capsys)
    assert code == 2 and "--modes" in err

@pytest.mark.timeout(280)
def test_throughput_three_ways_on_tiny_models(
    redis_url: str, tiny_llama_dir: pathlib.Path, tiny_reward_dir: pathlib.Path, tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALIGNQ_HEARTBEAT_MS", "200")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Name a colour."}\nCount to three.\n', encoding="utf-8")
    plot = tmp_path / "throughput.png"
    code, out, err = run_cli(["bench", "throughput", "--prompts", str(prompts), "--budget", "3",
                              "--max-new-tokens", "4", "--threads", "1", "--repeats", "2", "--dtype", "float32", "--device", "cpu",
                              "--model", str(tiny_llama_dir), "--reward", f"hf:{tiny_reward_dir}",
                              "--redis-url", redis_url, "--timeout-s", "200", "--json", "--plot", str(plot)], capsys)
    assert code == 0, err
    report = json.loads(out)
    for mode in ("hf_loop", "engine", "middleware"):
        row = report[mode]
        assert row["num_samples"] == 3 * 3, mode  # every prompt got its whole budget
        assert 3 * 3 <= row["num_tokens"] <= 3 * 3 * 4, mode  # 1..max_new_tokens tokens per sample
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["wall_s"] * 1.001
        assert row["cpu_s"] > 0 and row["samples_per_cpu_s"] > 0, mode
        assert len(row["runs_samples_per_s"]) == 2 and row["samples_per_s"] in row["runs_samples_per_s"]
    assert len(report["engine_over_hf_runs"]) == 2
    assert min(report["engine_over_hf_runs"]) <= report["engine_over_hf"] <= max(report["engine_over_hf_runs"])
    assert report["middleware_over_engine"] > 0 and report["middleware_over_engine_per_cpu_s"] > 0
    hardware = report["hardware"]
    assert hardware["threads"] == 1 and hardware["dtype"] == "float32" and hardware["device"] == "cpu"
    assert plot.read_bytes().startswith(b"\x89PNG")
    connection = redis.Redis.from_url(redis_url)
    try:
        assert connection.dbsize() == 0, "the benchmark left keys behind"
    finally:
        connection.close()


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (the launcher starts its children in sessions of their own)."""
    children = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_sigterm_to_a_throughput_bench_stops_the_services_it_started(redis_url: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    bench = subprocess.Popen(
        [sys.executable, "-c", "from middleware.cli import main; main()", "bench", "throughput", "--modes",
         "middleware", "--num-prompts", "1", "--budget", "2", "--max-new-tokens", "2", "--threads", "1",
         "--redis-url", redis_url, "--timeout-s", "120"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    services: list[int] = []
    try:
        give_up_at = time.monotonic() + 60
        while len(child_pids(bench.pid)) < 2 and time.monotonic() < give_up_at:  # a scheduler and a worker
            time.sleep(0.1)
        services = child_pids(bench.pid)
        assert len(services) >= 2
        os.kill(bench.pid, signal.SIGTERM)
        assert bench.wait(timeout=60) == 130  # stopped like Ctrl-C, after its launcher stopped the services
        assert not [pid for pid in services if pathlib.Path(f"/proc/{pid}").exists()
                    and pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"]
    finally:
        bench.kill()
        bench.wait()
        for pid in services:  # whatever the outcome, leave no service behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
