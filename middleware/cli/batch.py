"""What ``alignq run`` and ``alignq submit`` share: read a JSONL of requests, run the services a run
needs (embedded Redis, worker processes), submit, and print each result as it arrives.

Workers run as separate ``alignq worker`` processes (their own torch threads, killable on their
own), configured through ``ALIGNQ_*`` environment variables; the scheduler of ``alignq run`` runs
in this process. Everything started here is stopped here, also on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, Self

from middleware.client.sdk import build_request
from middleware.errors import BadRequest, ServiceError, UsageError
from middleware.settings import SchedulerSettings
from schemas import (
    AlignRequest,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Keys,
    Method,
    ResultStatus,
    decode,
    now_ms,
)

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 900.0  # loading the default models on a busy 2-core CPU can take minutes
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.1
LOST_CHECK_INTERVAL_S = 5.0
INPUT_FIELDS = ("prompt", "request_id", "budget", "method", "max_new_tokens", "temperature", "top_p", "priority",
                "deadline_ms", "seed", "metadata", "aisp")


# -- input ----------------------------------------------------------------------------------------
def read_requests(source: str | Sequence[str], settings: SchedulerSettings, *, budget: int | None = None,
                  method: str | None = None) -> list[AlignRequest]:
    """Parse and validate every line before anything starts; a bad line is a UsageError naming it."""
    from middleware.scheduler.core import CoreConfig, SchedulerCore

    if isinstance(source, str):
        name = "stdin" if source == "-" else source
        try:
            lines = sys.stdin.read().splitlines() if source == "-" else Path(source).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read {source}: {e.strerror or e}") from e
    else:
        name, lines = "input", list(source)
    limits = SchedulerCore(CoreConfig.from_settings(settings, "cli"))
    requests: list[AlignRequest] = []
    seen_ids: set[str] = set()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {line_number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg}); each line must be an object with a \"prompt\"") from e
        if not isinstance(fields, dict) or "prompt" not in fields:
            raise UsageError(f"{where}: expected a JSON object with a \"prompt\" field")
        unknown = sorted(set(fields) - set(INPUT_FIELDS))
        if unknown:
            raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(INPUT_FIELDS)})")
        if budget is not None:
            fields.setdefault("budget", budget)
        if method is not None:
            fields.setdefault("method", method)
        try:
            request = build_request(fields.pop("prompt"), **fields)
        except BadRequest as e:
            raise UsageError(f"{where}: {e}") from e
        error = limits.validate(request)
        if error is not None:
            raise UsageError(f"{where}: {error.message}")
        if request.request_id in seen_ids:
            raise UsageError(f"{where}: duplicate request_id {request.request_id!r}")
        seen_ids.add(request.request_id)
        requests.append(request)
    if not requests:
        raise UsageError(f"no prompts in {name}: give JSON lines like {{\"prompt\": \"Tell me a joke\"}}")
    return requests


def result_line(result: AlignResult) -> dict[str, Any]:
    """The JSON line printed for a result."""
    reward = result.reward if result.reward is None or math.isfinite(result.reward) else None
    return {
        "request_id": result.request_id,
        "status": result.status.value,
        "response": result.response,
        "reward": reward,
        "samples_used": result.samples_used,
        "method": result.method.value if result.method else None,
        "explore_samples": result.explore_samples,
        "exploit_samples": result.exploit_samples,
        "num_tokens": result.num_tokens,
        "timings": {"queued_s": round(result.queued_s, 4), "total_s": round(result.total_s, 4),
                    "generate_s": round(result.generate_s, 4), "score_s": round(result.score_s, 4)},
        "error": None if result.error is None else {"code": result.error.code.value, "message": result.error.message},
    }


# -- processes ------------------------------------------------------------------------------------
class ServiceProcesses:
    """Redis (embedded unless a URL is given) and child ``alignq`` processes; all stopped on exit."""

    def __init__(self, redis_url: str | None, *, verbosity: int = 0) -> None:
        self.redis_url = redis_url or ""
        self.verbosity = verbosity
        self.embedded: Any = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = ""

    def __enter__(self) -> Self:
        self.log_dir = tempfile.mkdtemp(prefix="alignq-run-")
        if not self.redis_url:
            from middleware.runtime.embedded_redis import EmbeddedRedis, EmbeddedRedisError

            self.embedded = EmbeddedRedis()
            try:
                self.redis_url = self.embedded.start()
            except EmbeddedRedisError as e:
                self.embedded = None
                raise ServiceError(str(e)) from e
            logger.info("embedded redis at %s", self.redis_url)
        return self

    def start(self, name: str, verb_args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        from middleware.cli.services import alignq_command

        full_env = {**os.environ, **env, "ALIGNQ_REDIS_URL": self.redis_url}
        verbose = ["-" + "v" * self.verbosity] if self.verbosity else []
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            # A new session: Ctrl-C reaches only us, and we stop the children in order.
            process = subprocess.Popen(alignq_command(*verbose, *verb_args), env=full_env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=None if self.verbosity else log, start_new_session=True)
        self.children[name] = process
        logger.info("started %s pid=%d", name, process.pid)
        return process

    def start_workers(self, num_workers: int, env: dict[str, str]) -> None:
        for i in range(num_workers):
            self.start(f"worker-{i}", ["worker"], env)

    def check_alive(self) -> None:
        """Raise ServiceError (with the tail of its log) if a child process has exited."""
        for name, process in self.children.items():
            code = process.poll()
            if code is not None:
                raise ServiceError(f"{name} exited with code {code}: {self.log_tail(name)}")

    def log_tail(self, name: str, num_chars: int = 1500) -> str:
        try:
            text = Path(self.log_dir, f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-num_chars:].strip() or "(empty log; rerun with -v)"

    def __exit__(self, *exc_info: object) -> None:
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, process in self.children.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", name, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        if self.embedded is not None:
            self.embedded.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)


# -- submit and collect ---------------------------------------------------------------------------
def collect_results(settings: SchedulerSettings, requests: list[AlignRequest], *, output: str | None, quiet: bool,
                    timeout_s: float | None, services: ServiceProcesses | None, run_scheduler: bool,
                    num_workers: int = 1) -> int:
    """Submit, print each result line as it arrives; 0 if all answered without error, else 1."""
    import anyio

    out: IO[str] = open(output, "w") if output else sys.stdout  # noqa: SIM115 - closed below
    try:
        return anyio.run(partial(_collect, settings, requests, out, quiet=quiet, timeout_s=timeout_s,
                                 services=services, run_scheduler=run_scheduler, num_workers=num_workers))
    except BaseExceptionGroup as group:  # a service failed inside the task group
        failure = _first_service_error(group)
        if failure is None:
            raise
        print(f"alignq: {failure}", file=sys.stderr)
        return 1
    except ServiceError as e:
        print(f"alignq: {e}", file=sys.stderr)
        return 1
    finally:
        if output:
            out.close()


def _first_service_error(group: BaseExceptionGroup) -> ServiceError | None:
    for error in group.exceptions:
        if isinstance(error, ServiceError):
            return error
        if isinstance(error, BaseExceptionGroup) and (found := _first_service_error(error)) is not None:
            return found
    return None


def submit_only(settings: SchedulerSettings, requests: list[AlignRequest]) -> int:
    import anyio

    from middleware.client import Client

    async def submit() -> list[str]:
        async with Client(settings.redis_url or "", namespace=settings.namespace,
                          max_pending=settings.max_pending) as client:
            return await _submit_all(client, requests)

    for request_id in anyio.run(submit):
        print(request_id)
    return 0


async def _submit_all(client: Any, requests: list[AlignRequest]) -> list[str]:
    """submit_many, waiting out backpressure (Overloaded) instead of failing."""
    import anyio

    from middleware.client import Overloaded

    submitted: list[str] = []
    # Stamped now, not when the file was read: queue time and deadlines start at submission.
    remaining = [request.model_copy(update={"submitted_at_ms": now_ms()}) for request in requests]
    while remaining:
        try:
            submitted.extend(await client.submit_many(remaining))
            return submitted
        except Overloaded as e:
            submitted.extend(e.submitted_ids)
            rejected = set(e.rejected_ids)
            remaining = [request for request in remaining if request.request_id in rejected]
            logger.info("queue full, retrying %d requests in %.2f s", len(remaining), e.retry_after_s)
            await anyio.sleep(e.retry_after_s)
    return submitted


async def _collect(settings: SchedulerSettings, requests: list[AlignRequest], out: IO[str], *, quiet: bool,
                   timeout_s: float | None, services: ServiceProcesses | None, run_scheduler: bool,
                   num_workers: int) -> int:
    import anyio
    from tqdm import tqdm

    from middleware.client import Client
    from middleware.scheduler.service import Scheduler

    keys = Keys(settings.namespace)
    async with Client(settings.redis_url or "", namespace=settings.namespace,
                      max_pending=settings.max_pending) as client, anyio.create_task_group() as tg:
        stop = anyio.Event()
        if run_scheduler:
            tg.start_soon(partial(Scheduler(settings).run, stop=stop))
        if services is not None and services.children:
            await _wait_for_workers(client.redis, keys, services, num_workers, quiet=quiet)
        started = time.monotonic()
        ids = await _submit_all(client, requests)
        methods = {request.request_id: request.method for request in requests}
        bar = tqdm(total=len(ids), unit="prompt", file=sys.stderr, disable=quiet, dynamic_ncols=True)
        try:
            num_errors = await _poll(client, keys, ids, methods, out, bar, services, timeout_s, started)
        finally:
            bar.close()
        stop.set()
    return 1 if num_errors else 0


async def _wait_for_workers(redis: Any, keys: Keys, services: ServiceProcesses, num_workers: int, *,
                            quiet: bool) -> None:
    import anyio

    if not quiet:
        print(f"alignq: waiting for {num_workers} worker(s) to load their models...", file=sys.stderr)
    give_up_at = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < give_up_at:
        services.check_alive()
        live = [key async for key in redis.scan_iter(match=keys.heartbeat_pattern("worker"), count=1000)]
        if len(live) >= num_workers:
            return
        await anyio.sleep(0.2)
    raise ServiceError(f"workers not ready after {WORKER_START_TIMEOUT_S:.0f} s: {services.log_tail('worker-0')}")


async def _poll(client: Any, keys: Keys, ids: list[str], methods: dict[str, Method], out: IO[str], bar: Any,
                services: ServiceProcesses | None, timeout_s: float | None, started: float) -> int:
    """GET every unanswered result each poll (pipelined); print results as they come. Returns #errors."""
    import anyio

    remaining = list(ids)
    num_errors = 0
    num_samples = 0
    rewards: list[float] = []
    next_lost_check = time.monotonic() + LOST_CHECK_INTERVAL_S

    def emit(result: AlignResult) -> None:
        nonlocal num_errors, num_samples
        num_errors += result.status == ResultStatus.ERROR
        num_samples += result.samples_used
        if result.reward is not None and math.isfinite(result.reward):
            rewards.append(result.reward)
        out.write(json.dumps(result_line(result)) + "\n")
        out.flush()
        bar.update(1)
        bar.set_postfix(samples=num_samples, reward=f"{sum(rewards) / len(rewards):.3f}" if rewards else "-",
                        refresh=False)

    while remaining:
        replies = await _get_results(client.redis, keys, remaining)
        still: list[str] = []
        for request_id, data in zip(remaining, replies):
            if data is None:
                still.append(request_id)
            else:
                emit(decode(AlignResult, data))
        remaining = still
        if not remaining:
            break
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            print(f"alignq: {len(remaining)} prompts unanswered after {timeout_s:.0f} s", file=sys.stderr)
            return num_errors + len(remaining)
        if services is not None:
            services.check_alive()
        if time.monotonic() >= next_lost_check:
            next_lost_check = time.monotonic() + LOST_CHECK_INTERVAL_S
            for request_id in await _lost(client.redis, keys, remaining):
                remaining.remove(request_id)
                emit(AlignResult(request_id=request_id, status=ResultStatus.ERROR, method=methods.get(request_id),
                                 error=ErrorInfo(code=ErrorCode.LOST, message="Redis lost the request; resubmit it"),
                                 completed_at_ms=now_ms()))
        # One GET per unanswered request per poll: space polls out so a big batch costs Redis < ~20k GETs/s.
        await anyio.sleep(max(POLL_INTERVAL_S, len(remaining) / 20_000))
    return num_errors


async def _get_results(redis: Any, keys: Keys, request_ids: Iterable[str]) -> list[bytes | None]:
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in request_ids:
            pipe.get(keys.result(request_id))
        return await pipe.execute()


async def _lost(redis: Any, keys: Keys, request_ids: list[str]) -> list[str]:
    """Requests Redis no longer knows: no result, not pending (checked in one MULTI snapshot)."""
    async with redis.pipeline(transaction=True) as pipe:
        for request_id in request_ids:
            pipe.exists(keys.result(request_id))
            pipe.zscore(keys.pending_requests, request_id)
        replies = await pipe.execute()
    return [rid for i, rid in enumerate(request_ids) if not replies[2 * i] and replies[2 * i + 1] is None]
