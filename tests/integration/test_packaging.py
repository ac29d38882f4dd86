"""``pip install alignq`` (no extras) into a fresh venv: client, gateway, scheduler and CLI, no torch.

Builds the wheel from a copy of the sources (the checkout stays clean), installs it with pip's
configured indexes (a local mirror where the machine has one), and runs what a chatbot backend or
an operator without GPUs runs.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "schemas", "middleware", "workers")
HEAVY = ("torch", "transformers", "gguf", "accelerate")


def run(*args: str | pathlib.Path, cwd: pathlib.Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNQ_", "VIRTUAL_ENV", "PYTHONPATH"))}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.mark.slow
def test_bare_install_has_no_torch_and_the_cli_works(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", ".",
                cwd=source)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (source / "dist").glob("alignq-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]

    listed = run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "alignq" in names and not names & set(HEAVY), sorted(names)

    code = ("import sys, middleware.client, middleware.gateway.app, middleware.scheduler.service, middleware.cli; "
            f"sys.exit(sorted(set({HEAVY!r}) & set(sys.modules)) or 0)")
    imported = run(python, "-c", code, cwd=tmp_path)
    assert imported.returncode == 0, imported.stdout + imported.stderr[-3000:]

    helped = run(env_dir / "bin" / "alignq", "submit", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "usage: alignq submit" in helped.stdout, helped.stderr[-3000:]

    worker = run(env_dir / "bin" / "alignq", "worker", "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert worker.returncode == 2 and "alignq[worker]" in worker.stderr, worker.stderr[-3000:]
