"""``alignq sample``: the real console script on a tiny model, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from middleware.cli import main

ALIGNQ = str(pathlib.Path(sys.executable).with_name("alignq"))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def cli_env() -> dict[str, str]:
    return os.environ | {"ALIGNQ_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sample_json_lists_n_samples_best_first(tiny_llama_dir: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["sample", "Tell me about the sea", "-n", "5", "--json", "--model", str(tiny_llama_dir), "--dtype",
            "float32", "--reward", "python:workers.scorers:distinct_words", "--max-new-tokens", "9", "--seed", "3"]
    done = subprocess.run([ALIGNQ, *argv], check=False, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    samples = json.loads(done.stdout)
    assert len(samples) == 5 and all(set(s) == {"text", "reward", "num_tokens"} for s in samples)
    rewards = [s["reward"] for s in samples]
    assert rewards == sorted(rewards, reverse=True)
    assert all(1 <= s["num_tokens"] <= 9 for s in samples)
    monkeypatch.setenv("ALIGNQ_NUM_THREADS", "1")
    code, out, _ = run_cli(argv, capsys)  # another process, same seed: the same samples
    assert code == 0 and json.loads(out) == samples


def test_sample_text_output_in_process(tiny_llama_dir: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNQ_NUM_THREADS", "1")
    code, out, _ = run_cli(["sample", "Hello", "-n", "3", "--model", str(tiny_llama_dir), "--temperature", "0",
                            "--reward", "python:workers.scorers:distinct_words", "--max-new-tokens", "4"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines() if line.startswith("#")] == ["#1", "#2", "#3"]


@pytest.mark.parametrize("argv,match", [
    (["sample", "   "], "prompt is empty"),
    (["sample", "hi", "-n", "0"], "-n must be at least 1"),
    (["sample", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sample", "hi", "--reward", "vibes"], "unknown reward spec"),
    (["sample", "hi", "--reward", "python:workers.scorers:nope"], "has no function"),
    (["sample", "hi", "--model", "/no/such/model"], "does not exist"),
    (["sample", "hi", "--model", "no-such-org/no-such-model", "--reward", "python:workers.scorers:distinct_words"],
     "cannot load causal LM"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("alignq sample: ") and match in err and err.count("\n") == 1


@pytest.mark.slow
def test_sample_default_models() -> None:
    done = subprocess.run([ALIGNQ, "sample", "Give me one tip for sleeping well.", "-n", "2", "--json",
                           "--max-new-tokens", "12"], capture_output=True, text=True, env=cli_env(), timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    samples = json.loads(done.stdout)
    assert len(samples) == 2 and samples[0]["reward"] >= samples[1]["reward"]
    assert all(s["text"].strip() for s in samples)
