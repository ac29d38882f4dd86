"""Real processes for fault tests: a restartable redis-server, and alignq schedulers and workers.

    server = RedisServer(tmp_path / "redis")          # a free loopback port, its own data dir
    server.start("--appendonly", "no", "--save", "")
    fleet = Fleet(server.url(), tmp_path / "logs", model_dir)
    fleet.start("scheduler", "s0"); fleet.start("worker", "w0")
    fleet.kill("w0")                                   # SIGKILL, then fleet.start("worker", "w0") again
    fleet.stop_all()                                   # SIGTERM, then SIGKILL after a grace period

Each service is ``.venv/bin/alignq -v scheduler|worker`` with its settings in ``ALIGNQ_*`` variables;
its stderr (INFO logs) is appended to ``<log_dir>/<slot>.log`` across restarts, so a test can grep
what every incarnation did (e.g. each ``answered request_id=...`` line).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import redis

from schemas import Keys

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = Keys()
START_TIMEOUT_S = 10.0
ANSWERED_LINE = re.compile(r"(?<!already )\banswered request_id=(\S+)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ready(url: str, process: subprocess.Popen, timeout_s: float, *, what: str,
                    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
                    log_tail: Callable[[], str] = lambda: "") -> None:
    """Poll ``url`` until ``ready(response)``; raise if ``process`` exits first or ``timeout_s`` passes."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log_tail()}")
        try:
            if ready(httpx.get(url, timeout=2.0)):
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > give_up_at:
            raise TimeoutError(f"{what} not ready within {timeout_s} s: {log_tail()}")
        time.sleep(0.1)


def alignq_executable() -> list[str]:
    """The venv's console script when there is one, else this interpreter running the CLI."""
    script = pathlib.Path(sys.executable).parent / "alignq"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from middleware.cli import main; main()"]


class RedisServer:
    """One redis-server child on a fixed loopback port and data dir, so a restart finds its AOF."""

    def __init__(self, data_dir: pathlib.Path, *, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, *args: str) -> None:
        """Start with extra redis-server ``args`` (e.g. ``--appendonly yes``); returns once it answers PING."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                   "--logfile", str(self.data_dir / "redis.log"), *args]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = self.client()
        give_up_at = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < give_up_at:
                if self.process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            client.close()
        log = (self.data_dir / "redis.log").read_text(errors="replace")[-1000:]
        raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash: only what is already in the AOF survives)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@dataclass(slots=True)
class Service:
    role: str  # scheduler | worker
    slot: str  # stable name of the place in the fleet (log file name)
    instance_id: str  # scheduler_id / worker_id of this incarnation
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)


class Fleet:
    """alignq services as child processes; restarts keep their slot, optionally their instance id."""

    def __init__(self, redis_url: str, log_dir: pathlib.Path, model_dir: pathlib.Path, **env: str) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, Service] = {}
        self.generations: Counter[str] = Counter()
        self.env = {
            **os.environ,
            "ALIGNQ_REDIS_URL": redis_url, "ALIGNQ_MODEL": str(model_dir),
            "ALIGNQ_REWARD_MODEL": "python:workers.scorers:distinct_words", "ALIGNQ_DEVICE": "cpu",
            "ALIGNQ_DTYPE": "float32", "ALIGNQ_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "ALIGNQ_CLAIM_IDLE_MS": "1500", "ALIGNQ_HEARTBEAT_MS": "300", "ALIGNQ_SHUTDOWN_GRACE_S": "5",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            **env,
        }
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def start(self, role: str, slot: str, *, keep_id: bool = True, **env: str) -> Service:
        """Start ``alignq -v ROLE`` in ``slot``; ``keep_id=False`` gives this incarnation a fresh id."""
        self.generations[slot] += 1
        instance_id = slot if keep_id else f"{slot}-g{self.generations[slot]}"
        id_var = "ALIGNQ_SCHEDULER_ID" if role == "scheduler" else "ALIGNQ_WORKER_ID"
        with open(self.log_dir / f"{slot}.log", "ab") as log:
            log.write(f"==== start {role} {instance_id} at {time.time():.3f}\n".encode())
            log.flush()
            process = subprocess.Popen([*alignq_executable(), "-v", role], cwd=ROOT,
                                       env={**self.env, id_var: instance_id, **env},
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        service = Service(role, slot, instance_id, process)
        self.services[slot] = service
        return service

    def is_ready(self, slot: str) -> bool:
        """Alive and heartbeating (a worker beats only once its models are loaded)."""
        service = self.services[slot]
        if service.process.poll() is not None:
            return False
        for _ in range(2):  # the first call after a Redis restart meets a dead connection
            try:
                return bool(self._redis.exists(KEYS.heartbeat(service.role, service.instance_id)))
            except redis.ConnectionError:
                continue
            except redis.RedisError:
                return False
        return False

    def ready(self, role: str) -> list[str]:
        return [slot for slot, s in self.services.items() if s.role == role and self.is_ready(slot)]

    def wait_ready(self, slots: list[str], timeout_s: float) -> None:
        give_up_at = time.monotonic() + timeout_s
        while not all(self.is_ready(slot) for slot in slots):
            for slot in slots:
                code = self.services[slot].process.poll()
                if code is not None:
                    raise RuntimeError(f"{slot} exited with {code}: {self.log_tail(slot)}")
            if time.monotonic() > give_up_at:
                raise TimeoutError(f"not ready after {timeout_s} s: {[s for s in slots if not self.is_ready(s)]}")
            time.sleep(0.1)

    def kill(self, slot: str) -> None:
        """kill -9: no cleanup, no ack, no heartbeat removal."""
        process = self.services[slot].process
        process.kill()
        process.wait(timeout=10)

    def stop_all(self, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every ready service, wait, SIGKILL stragglers; returns each slot's exit code.

        A service still starting (a worker loading its models) holds no work: it is killed at once
        rather than waited for, and its code is reported as None.
        """
        for slot, service in self.services.items():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM if self.is_ready(slot) else signal.SIGKILL)
        give_up_at = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for slot, service in self.services.items():
            try:
                code = service.process.wait(timeout=max(0.1, give_up_at - time.monotonic()))
                codes[slot] = None if code == -signal.SIGKILL else code
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=10)
                codes[slot] = -1
        self._redis.close()
        return codes

    def log_tail(self, slot: str, num_chars: int = 3000) -> str:
        path = self.log_dir / f"{slot}.log"
        return path.read_text(errors="replace")[-num_chars:] if path.exists() else "(no log)"

    def log_text(self, role: str) -> str:
        return "".join((self.log_dir / f"{slot}.log").read_text(errors="replace")
                       for slot, s in self.services.items() if s.role == role)

    def answered_counts(self) -> Counter[str]:
        """request_id -> 'answered' log lines over every scheduler incarnation (a crash may lose one, never add)."""
        return Counter(ANSWERED_LINE.findall(self.log_text("scheduler")))
