"""``alignq run`` end to end: real Redis, a real scheduler, real ``alignq worker`` processes, real models.

Fast tests use the tiny random Llama and the ``distinct_words`` python scorer; one slow test runs the
default models (SmolLM2-135M + MiniLM reward) on embedded Redis.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from middleware.runtime.launcher import KILL_TIMEOUT_S, SHUTDOWN_TIMEOUT_S
from schemas import PAYLOAD_FIELD, AlignResult, Event, EventKind, Keys, decode

KEYS = Keys("alignq")
FAST_REWARD = "python:workers.scorers:distinct_words"
ALIGNQ = [sys.executable, "-c", "from middleware.cli import main; main()"]


def alignq(*args: str, env: dict[str, str] | None = None, timeout_s: float = 240) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNQ_")}
    full_env.update(env or {})
    return subprocess.run([*ALIGNQ, *args], env=full_env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def write_prompts(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fast_env(tiny_llama_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    return {"ALIGNQ_MODEL": str(tiny_llama_dir), "ALIGNQ_REWARD_MODEL": FAST_REWARD, "ALIGNQ_DEVICE": "cpu",
            "ALIGNQ_NUM_THREADS": "1", "ALIGNQ_MAX_NEW_TOKENS": "8", "ALIGNQ_HEARTBEAT_MS": "200", **extra}


def alignq_children(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds ``marker`` (what a run started)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_bad_input_line_exits_2_before_starting_anything(tmp_path: pathlib.Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "x", "budget": 0}])
    done = alignq("run", str(prompts))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0] and "budget" in lines[0]
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    done = alignq("run", str(tmp_path / "q.jsonl"))
    assert done.returncode == 2 and "line 2: not JSON" in done.stderr
    done = alignq("run", str(prompts), "--workers", "0")
    assert done.returncode == 2 and "--workers" in done.stderr


def test_run_answers_every_prompt_once_with_its_best_sample(tiny_llama_dir: pathlib.Path, redis_url: str,
                                                            tmp_path: pathlib.Path) -> None:
    budgets = [4, 6, 8, 4, 6, 8, 4, 6, 8, 4, 6, 8]
    rows = [{"request_id": f"r{i}", "prompt": f"Tell me fact number {i} about the sea.", "budget": b}
            for i, b in enumerate(budgets)]
    rows[3]["prompt"] = [{"role": "user", "content": "Chat-style prompt"}]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    # One window for all twelve: the window's samples must add up to the sum of its budgets.
    env = fast_env(tiny_llama_dir, ALIGNQ_REDIS_URL=redis_url, ALIGNQ_MAX_WINDOW="12", ALIGNQ_WINDOW_MS="3000")
    done = alignq("run", str(prompts), "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["request_id"] for line in lines) == sorted(row["request_id"] for row in rows)
    assert all(line["status"] == "ok" and line["method"] == "bon" for line in lines)
    assert sum(line["samples_used"] for line in lines) == sum(budgets)
    assert set(lines[0]["timings"]) == {"queued_s", "total_s", "generate_s", "score_s"}
    client = redis.Redis.from_url(redis_url)
    try:
        for line in lines:
            events = [decode(Event, f[PAYLOAD_FIELD]) for _, f in client.xrange(KEYS.events(line["request_id"]))]
            kinds = [event.kind for event in events]
            assert kinds[0] == EventKind.QUEUED and kinds.count(EventKind.DONE) == 1 and kinds[-1] == EventKind.DONE
            result: AlignResult = events[-1].result
            assert len({s.index for s in result.samples}) == result.samples_used == line["samples_used"]
            best = max(result.samples, key=lambda s: s.reward)
            assert line["reward"] == best.reward and line["response"] == best.text
            assert result.explore_samples + result.exploit_samples == result.samples_used
    finally:
        client.close()
    assert "prompt" in done.stderr  # the progress bar


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below ``pid`` (/proc/PID/task/TID/children)."""
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for task in pathlib.Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    found[child] = (pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
                                    .replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue
                stack.append(child)
    return found


def is_running(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_run_on_embedded_redis_reports_errors_and_stops_everything(tiny_llama_dir: pathlib.Path,
                                                                   tmp_path: pathlib.Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"request_id": "fine", "prompt": "Hello there", "method": "uniform", "budget": 3},
        {"request_id": "late", "prompt": "Too late", "deadline_ms": 1},
    ])
    marker = f"alignq-test-{uuid.uuid4().hex}"
    done = alignq("run", str(prompts), "-q", env=fast_env(tiny_llama_dir, ALIGNQ_TEST_MARKER=marker))
    assert done.returncode == 1, done.stderr[-3000:]  # one error result
    lines = {row["request_id"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert lines["fine"]["status"] == "ok" and lines["fine"]["samples_used"] == 3
    assert lines["late"]["status"] == "error" and lines["late"]["error"]["code"] == "deadline_exceeded"
    assert alignq_children(marker) == []


@pytest.mark.parametrize("target", ["parent", "group"])
def test_ctrl_c_stops_the_workers_and_redis_it_started(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                       target: str) -> None:
    """Mid-run Ctrl-C: exit 130 within the launcher's shutdown bound, nothing it started left running.

    ``parent``: SIGINT to alignq alone; ``group``: to its whole process group, as a terminal sends it (the
    children and the embedded Redis run in sessions of their own, so they are stopped by alignq, in order).
    """
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "budget": 64} for i in range(64)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNQ_")}
    marker = f"alignq-test-{uuid.uuid4().hex}"
    env.update(fast_env(tiny_llama_dir, ALIGNQ_MAX_NEW_TOKENS="64", ALIGNQ_TEST_MARKER=marker))
    process = subprocess.Popen([*ALIGNQ, "run", str(prompts), "-q"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        give_up_at = time.monotonic() + 120
        while not any("main() worker" in c for c in alignq_children(marker)) and time.monotonic() < give_up_at:
            time.sleep(0.1)
        started = descendants(process.pid)  # the workers and the embedded Redis (whose environ it overwrites)
        assert any("redis-server" in command for command in started.values()), started
        time.sleep(float(os.environ.get("CTRL_C_AFTER_S", "2")))
        if target == "group":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        assert process.wait(timeout=SHUTDOWN_TIMEOUT_S + KILL_TIMEOUT_S + 10) == 130
        assert time.monotonic() - interrupted_at < SHUTDOWN_TIMEOUT_S + KILL_TIMEOUT_S
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()  # reaped here, not by the garbage collector in a later test
        process.stderr.close()
    assert alignq_children(marker) == []
    assert [pid for pid in started if is_running(pid)] == []


@pytest.mark.slow
def test_run_with_default_models_on_embedded_redis(tmp_path: pathlib.Path) -> None:
    rows = [{"prompt": "Give me one tip for sleeping well.", "budget": 4},
            {"prompt": "What is the capital of France?", "budget": 4},
            {"prompt": "Say hello.", "method": "uniform", "budget": 2}]
    prompts = write_prompts(tmp_path / "p.jsonl", rows)
    done = alignq("run", str(prompts), "--max-new-tokens", "16", "-q", timeout_s=280,
                  env={"ALIGNQ_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3 and all(line["status"] == "ok" and line["response"] for line in lines)
    assert sum(line["samples_used"] for line in lines) == 10


def test_submit_to_separate_scheduler_and_worker_processes(tiny_llama_dir: pathlib.Path, redis_url: str,
                                                           tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNQ_")}
    env.update(fast_env(tiny_llama_dir, ALIGNQ_REDIS_URL=redis_url, ALIGNQ_WINDOW_MS="20"))
    services = [subprocess.Popen([*ALIGNQ, verb], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for verb in ("scheduler", "worker")]
    try:
        one = alignq("submit", "Write one line about rivers.", "--budget", "4", env={"ALIGNQ_REDIS_URL": redis_url})
        assert one.returncode == 0, one.stderr[-2000:]
        (line,) = [json.loads(text) for text in one.stdout.splitlines()]
        assert line["status"] == "ok" and line["samples_used"] == 4
        prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "budget": 3} for i in range(3)])
        many = alignq("submit", "-f", str(prompts), "--method", "uniform", env={"ALIGNQ_REDIS_URL": redis_url})
        assert many.returncode == 0 and [json.loads(t)["method"] for t in many.stdout.splitlines()] == ["uniform"] * 3
        no_url = alignq("submit", "hi")
        assert no_url.returncode == 2 and "ALIGNQ_REDIS_URL" in no_url.stderr
    finally:
        for process in services:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in services]
    assert codes == [0, 0]
