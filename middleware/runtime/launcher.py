"""The one process launcher: child ``alignq VERB`` processes for ``run``, ``serve`` and the benches.

A ``Launcher`` owns a Redis (the URL given, else an embedded server it starts) and the children it
starts, each logging to a file of its own; leaving the ``with`` block stops them all, then the
embedded Redis, also on Ctrl-C.

    with Launcher(redis_url=None) as launcher:             # embedded Redis
        launcher.start("worker-0", ["worker"], {"ALIGNQ_MODEL": "..."})
        launcher.check_alive()                             # ServiceError with the log tail if one died

Shutdown is bounded, in two phases (as saq's workers do):

    grace    SIGTERM every child, wait up to ``stop_timeout_s`` in all for them to drain and exit;
             a second Ctrl-C ends the grace period at once (it never interrupts the stop itself)
    kill     SIGKILL each remaining child's process group, reap it within ``KILL_TIMEOUT_S``

and, around the in-process part of a shutdown, ``bound_shutdown`` (armed by ``run`` and ``serve`` at
the first Ctrl-C/SIGTERM) is a deadline: a shutdown still running after it kills every child and the
embedded Redis and exits the process, so an interrupted run never leaves processes behind.

Children (and the embedded Redis) run in sessions of their own: a terminal's Ctrl-C reaches only the
parent, which stops them in order; the Redis they all talk to is stopped last.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from middleware.errors import EmbeddedRedisError, ServiceError
from middleware.runtime.embedded_redis import EmbeddedRedis

__all__ = ["SHUTDOWN_TIMEOUT_S", "ChildProcess", "Launcher", "alignq_command", "bound_shutdown", "stop_process"]

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # phase 1: how long children may take to drain after SIGTERM, all together
KILL_TIMEOUT_S = 5.0  # phase 2: how long SIGKILLed children may take to be reaped
SHUTDOWN_TIMEOUT_S = 20.0  # bound_shutdown's default: the longest an interrupted run may take to exit


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

    def kill(self) -> None:
        """SIGKILL the child's process group (it leads a session of its own), else the child alone."""
        if not self.is_alive:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            self.process.kill()

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
        self.stopped = threading.Event()  # set once leaving the ``with`` block has stopped everything
        self.watchdog: threading.Thread | None = None  # bound_shutdown's, once armed

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

    def stop_children(self, grace_s: float | None = None) -> None:
        """Two phases, bounded: SIGTERM every live child and wait up to ``grace_s`` (default
        ``stop_timeout_s``) in all, then SIGKILL what is left and reap it within ``KILL_TIMEOUT_S``."""
        grace_s = self.stop_timeout_s if grace_s is None else grace_s
        live = [child for child in self.children.values() if child.is_alive]
        for child in live:
            child.process.send_signal(signal.SIGTERM)
        give_up_at = time.monotonic() + grace_s
        with _second_interrupt() as hurry:
            while live and time.monotonic() < give_up_at and not hurry.is_set():
                time.sleep(0.02)
                live = [child for child in live if child.is_alive]
            for child in live:
                if child.is_alive:
                    logger.warning("%s did not stop within %.0f s: killing it", child.name, grace_s)
                    child.kill()
            give_up_at = time.monotonic() + KILL_TIMEOUT_S
            for child in live:
                try:
                    child.process.wait(timeout=max(0.01, give_up_at - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.error("%s pid=%d survived SIGKILL for %.0f s", child.name, child.process.pid,
                                 KILL_TIMEOUT_S)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the children (two phases), then the embedded Redis. Idempotent, and safe to call from the
        deadline's thread while the main thread is in it (signals and waits on exited processes are no-ops)."""
        try:
            self.stop_children(grace_s)
        finally:
            embedded, self._embedded = self._embedded, None
            if embedded is not None:
                embedded.stop()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.stopped.set()
            shutil.rmtree(self._log_dir, ignore_errors=True)


def bound_shutdown(launcher: Launcher | None, timeout_s: float = SHUTDOWN_TIMEOUT_S, *, exit_code: int = 130) -> None:
    """A deadline for the shutdown that starts now (call it at the first Ctrl-C/SIGTERM).

    If ``launcher`` has not finished stopping ``timeout_s`` from now (with no launcher: if the process is
    still running), a watchdog thread kills its children at once, stops the embedded Redis and exits
    the process with ``exit_code``. A stuck await or a blocked read in the shutdown then costs at most
    ``timeout_s``, and never leaves a child behind. Calling it again changes nothing.
    """
    if launcher is not None and launcher.watchdog is not None:
        return

    def expire() -> None:
        if launcher is not None and launcher.stopped.wait(timeout_s):
            return
        if launcher is None:
            time.sleep(timeout_s)
        logger.warning("shutdown took over %.0f s: stopping the started processes and exiting", timeout_s)
        if launcher is not None:
            launcher.stop(grace_s=0.0)
        logging.shutdown()
        os._exit(exit_code)

    watchdog = threading.Thread(target=expire, name="alignq-shutdown-deadline", daemon=True)
    if launcher is not None:
        launcher.watchdog = watchdog
    watchdog.start()


async def stop_process(process: Any, grace_s: float = STOP_TIMEOUT_S) -> int:
    """Stop an ``anyio.open_process`` child in the same two phases: SIGTERM, ``grace_s`` to exit, SIGKILL.

    Shielded from the caller's cancellation, so a cancelled bench or test still reaps what it started.
    Returns the exit code.
    """
    import anyio

    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace_s):
                await process.wait()
        if process.returncode is None:
            process.kill()
            with anyio.move_on_after(KILL_TIMEOUT_S):
                await process.wait()
    return process.returncode


@contextmanager
def _second_interrupt() -> Iterator[threading.Event]:
    """While stopping: Ctrl-C sets the event (ends the grace period) instead of raising KeyboardInterrupt,
    so a second Ctrl-C hurries the stop and cannot abandon a child half-stopped. Main thread only."""
    hurry = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hurry
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hurry.set())
    try:
        yield hurry
    finally:
        signal.signal(signal.SIGINT, previous)
