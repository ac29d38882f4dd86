"""The one process launcher: child ``alignq VERB`` processes for ``run``, ``serve`` and the benches.

A ``Launcher`` owns a Redis (the URL given, else an embedded server it starts) and the children it
starts, each logging to a file of its own; leaving the ``with`` block stops them all (SIGTERM, then
SIGKILL after ``stop_timeout_s``), then the embedded Redis, also on Ctrl-C.

    with Launcher(redis_url=None) as launcher:             # embedded Redis
        launcher.start("worker-0", ["worker"], {"ALIGNQ_MODEL": "..."})
        launcher.check_alive()                             # ServiceError with the log tail if one died

Children run in a session of their own: Ctrl-C reaches only the parent, which stops them in order.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from middleware.errors import EmbeddedRedisError, ServiceError
from middleware.runtime.embedded_redis import EmbeddedRedis

__all__ = ["ChildProcess", "Launcher", "alignq_command"]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0


def alignq_command(*verb_args: str) -> list[str]:
    """The command line that runs ``alignq VERB ...`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-c", "from middleware.cli import main; main()", *verb_args]


@dataclass(slots=True)
class ChildProcess:
    """One started ``alignq`` process and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: str

    @property
    def is_alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, num_chars: int = 1500) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-num_chars:].strip() or "(empty log; rerun with -v)"

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the process used so far; 0 where /proc is missing."""
        try:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Launcher:
    """Redis (embedded unless ``redis_url``) and child ``alignq`` processes; all stopped on exit.

    ``env``: variables every child gets on top of this process's environment (``ALIGNQ_REDIS_URL``
    is always the launcher's); None unsets one. ``verbosity``: ``-v`` flags passed to each child; with any, children
    write their logs to this process's stderr as well as stdout to their log file.
    """

    def __init__(self, redis_url: str | None = None, *, env: Mapping[str, str | None] | None = None, verbosity: int = 0,
                 stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.redis_url = redis_url or ""
        self.env: dict[str, str | None] = dict(env or {})
        self.verbosity = verbosity
        self.stop_timeout_s = stop_timeout_s
        self.children: dict[str, ChildProcess] = {}
        self._embedded: EmbeddedRedis | None = None
        self._log_dir = ""

    def __enter__(self) -> Self:
        self._log_dir = tempfile.mkdtemp(prefix="alignq-")
        if not self.redis_url:
            self._embedded = EmbeddedRedis()
            try:
                self.redis_url = self._embedded.start()
            except EmbeddedRedisError as e:
                self._embedded = None
                shutil.rmtree(self._log_dir, ignore_errors=True)
                raise ServiceError(str(e)) from e
            logger.info("embedded redis at %s", self.redis_url)
        return self

    def start(self, name: str, verb_args: list[str], env: Mapping[str, str | None] | None = None) -> ChildProcess:
        """Start ``alignq [-v] VERB_ARGS`` as ``name`` (unique), logging to its own file."""
        if name in self.children:
            raise ValueError(f"a child named {name!r} was started already")
        merged = {**os.environ, **self.env, **(env or {}), "ALIGNQ_REDIS_URL": self.redis_url}
        full_env = {key: value for key, value in merged.items() if value is not None}
        verbose = ["-" + "v" * self.verbosity] if self.verbosity else []
        log_path = os.path.join(self._log_dir, f"{name}.log")
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(alignq_command(*verbose, *verb_args), env=full_env,
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=None if self.verbosity else subprocess.STDOUT,
                                       start_new_session=True)
        child = ChildProcess(name, process, log_path)
        self.children[name] = child
        logger.info("started %s pid=%d", name, process.pid)
        return child

    def check_alive(self) -> None:
        """Raise ServiceError (with the tail of its log) if a child process has exited."""
        for child in self.children.values():
            code = child.process.poll()
            if code is not None:
                raise ServiceError(f"{child.name} exited with code {code}: {child.log_tail()}")

    def log_tail(self, name: str, num_chars: int = 1500) -> str:
        child = self.children.get(name)
        return child.log_tail(num_chars) if child is not None else "(not started)"

    def stop_children(self) -> None:
        """SIGTERM every child, wait up to ``stop_timeout_s`` in all, then SIGKILL what is left."""
        for child in self.children.values():
            if child.is_alive:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children.values():
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", child.name, self.stop_timeout_s)
                child.process.kill()
                child.process.wait()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_children()
        finally:
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None
            shutil.rmtree(self._log_dir, ignore_errors=True)
