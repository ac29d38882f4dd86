"""What ``alignq run`` and ``alignq submit`` share: read a JSONL of requests, submit them through the
SDK (``middleware.client.Client``), and print each result as it arrives.

Every line is validated before anything starts, with no connection: the SDK's ``build_request`` and
the scheduler's pure limit checks (``middleware.scheduler.limits``). The services a run needs (an
embedded Redis, worker processes) come from ``middleware.runtime.launcher``; the scheduler of
``alignq run`` runs in this process. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio

from middleware.client import Client, Overloaded
from middleware.client.sdk import build_request
from middleware.errors import BadRequest, ClientError, ServiceError, UsageError
from middleware.runtime.launcher import Launcher, bound_shutdown
from middleware.scheduler.limits import check_limits
from middleware.settings import SchedulerSettings
from schemas import AlignRequest, AlignResult, ErrorCode, Method, ResultStatus, now_ms

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 900.0  # loading the default models on a busy 2-core CPU can take minutes
WATCH_INTERVAL_S = 0.5  # how often a run checks that the processes it started are alive
INPUT_FIELDS = ("prompt", "request_id", "budget", "method", "max_new_tokens", "temperature", "top_p", "priority",
                "deadline_ms", "seed", "metadata", "aisp", "model")


# -- input ----------------------------------------------------------------------------------------
def read_requests(source: str | Sequence[str], settings: SchedulerSettings, *, budget: int | None = None,
                  method: str | None = None, model: str | None = None,
                  tenant: str | None = None) -> list[AlignRequest]:
    """Parse and validate every line (in ``tenant``'s id scope) before anything starts; a bad line is a
    UsageError naming it."""
    if isinstance(source, str):
        name = "stdin" if source == "-" else source
        try:
            lines = sys.stdin.read().splitlines() if source == "-" else Path(source).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read {source}: {e.strerror or e}") from e
    else:
        name, lines = "input", list(source)
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
        for field_name, default in (("budget", budget), ("method", method), ("model", model)):
            if default is not None:
                fields.setdefault(field_name, default)
        try:
            request = build_request(fields.pop("prompt"), tenant=tenant, **fields)
        except BadRequest as e:
            raise UsageError(f"{where}: {e}") from e
        error = check_limits(request, max_budget=settings.max_budget, max_prompt_chars=settings.max_prompt_chars)
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


# -- submit and collect ---------------------------------------------------------------------------
def client_for(settings: SchedulerSettings, requests: Sequence[AlignRequest] = ()) -> Client:
    """A client in the requests' tenant scope (read_requests gives them all the same one)."""
    tenant = requests[0].tenant if requests else None
    return Client(settings.redis_url or "", namespace=settings.namespace, max_pending=settings.max_pending,
                  tenant=tenant, num_shards=settings.shards, min_replicas=settings.redis_min_replicas)


def collect_results(settings: SchedulerSettings, requests: list[AlignRequest], *, output: str | None, quiet: bool,
                    timeout_s: float | None, launcher: Launcher | None, run_scheduler: bool,
                    num_workers: int = 1) -> int:
    """Submit, print each result line as it arrives; 0 if all answered without error, else 1."""
    out: IO[str] = open(output, "w") if output else sys.stdout  # noqa: SIM115 - closed below
    try:
        return anyio.run(partial(_collect, settings, requests, out, quiet=quiet, timeout_s=timeout_s,
                                 launcher=launcher, run_scheduler=run_scheduler, num_workers=num_workers))
    except BaseExceptionGroup as group:  # a service failed inside the task group
        failure = _first_failure(group)
        if failure is None:
            raise
        print(f"alignq: {failure}", file=sys.stderr)
        return 1
    except (ServiceError, ClientError) as e:  # e.g. ModelNotFound: refused at submit, nothing waits
        print(f"alignq: {e}", file=sys.stderr)
        return 1
    finally:
        if output:
            out.close()


def _first_failure(group: BaseExceptionGroup) -> ServiceError | ClientError | None:
    for error in group.exceptions:
        if isinstance(error, (ServiceError, ClientError)):
            return error
        if isinstance(error, BaseExceptionGroup) and (found := _first_failure(error)) is not None:
            return found
    return None


def submit_only(settings: SchedulerSettings, requests: list[AlignRequest]) -> int:
    async def submit() -> list[str]:
        async with client_for(settings, requests) as client:
            return await _submit_all(client, requests)

    try:
        submitted = anyio.run(submit)
    except ClientError as e:  # e.g. ModelNotFound: refused at submit
        print(f"alignq: {e}", file=sys.stderr)
        return 1
    for request_id in submitted:
        print(request_id)
    return 0


async def _submit_all(client: Client, requests: list[AlignRequest]) -> list[str]:
    """submit_many, waiting out backpressure (Overloaded) instead of failing."""
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
            # rejected_ids are the caller's ids; a tenant's requests carry scoped wire ids
            remaining = [request for request in remaining if client.caller_id(request.request_id) in rejected]
            logger.info("queue full, retrying %d requests in %.2f s", len(remaining), e.retry_after_s)
            await anyio.sleep(e.retry_after_s)
    return submitted


async def _collect(settings: SchedulerSettings, requests: list[AlignRequest], out: IO[str], *, quiet: bool,
                   timeout_s: float | None, launcher: Launcher | None, run_scheduler: bool,
                   num_workers: int) -> int:
    from tqdm import tqdm

    from middleware.scheduler.process import run_schedulers

    interrupted: list[int] = []
    async with client_for(settings, requests) as client, anyio.create_task_group() as tg:
        stop = anyio.Event()
        listener = anyio.CancelScope()
        tg.start_soon(_cancel_on_interrupt, listener, tg.cancel_scope, launcher, interrupted)
        if run_scheduler:
            tg.start_soon(partial(run_schedulers, settings, stop=stop))  # one per shard (ALIGNQ_SHARDS)
        if launcher is not None and launcher.children:
            tg.start_soon(_watch, launcher, stop)
            await _wait_for_workers(client, launcher, num_workers, quiet=quiet)
        ids = await _submit_all(client, requests)
        methods = {client.caller_id(request.request_id): request.method for request in requests}
        bar = tqdm(total=len(ids), unit="prompt", file=sys.stderr, disable=quiet, dynamic_ncols=True)
        try:
            num_errors = await _print_results(client, ids, methods, out, bar, timeout_s)
        finally:
            bar.close()
        stop.set()
        listener.cancel()  # the run is over: Ctrl-C is no longer ours to handle
    if interrupted:
        raise KeyboardInterrupt  # exit code 130, after the launcher has stopped what it started
    return 1 if num_errors else 0


async def _cancel_on_interrupt(listener: anyio.CancelScope, scope: anyio.CancelScope, launcher: Launcher | None,
                               interrupted: list[int]) -> None:
    """Ctrl-C/SIGTERM cancels the run at once, under the launcher's shutdown deadline (``bound_shutdown``):
    a shutdown step that hangs cannot keep the started processes, or this one, alive."""
    with listener, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            interrupted.append(signum)
            bound_shutdown(launcher)
            scope.cancel()
            return


async def _watch(launcher: Launcher, stop: anyio.Event) -> None:
    """ServiceError (which cancels the run) as soon as a started process exits."""
    while not stop.is_set():
        launcher.check_alive()
        with anyio.move_on_after(WATCH_INTERVAL_S):
            await stop.wait()


async def _wait_for_workers(client: Client, launcher: Launcher, num_workers: int, *, quiet: bool) -> None:
    if not quiet:
        print(f"alignq: waiting for {num_workers} worker(s) to load their models...", file=sys.stderr)
    give_up_at = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < give_up_at:
        if len(await client.heartbeats("worker")) >= num_workers:
            return
        await anyio.sleep(0.2)
    raise ServiceError(f"workers not ready after {WORKER_START_TIMEOUT_S:.0f} s: {launcher.log_tail('worker-0')}")


async def _print_results(client: Client, ids: list[str], methods: dict[str, Method], out: IO[str], bar: Any,
                         timeout_s: float | None) -> int:
    """Print each result as the SDK hands it over (lost and timed-out requests as error lines). Returns #errors."""
    num_errors = num_samples = num_unanswered = 0
    rewards: list[float] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async for result in client.results_as_completed(ids, timeout_s=timeout_s):
        if result.method is None and result.request_id in methods:  # the SDK's own lost / timeout answers
            result = result.model_copy(update={"method": methods[result.request_id], "completed_at_ms": now_ms()})
        num_errors += result.status == ResultStatus.ERROR
        num_samples += result.samples_used
        if deadline is not None and time.monotonic() >= deadline and result.error is not None \
                and result.error.code == ErrorCode.DEADLINE_EXCEEDED:
            num_unanswered += 1
        if result.reward is not None and math.isfinite(result.reward):
            rewards.append(result.reward)
        out.write(json.dumps(result_line(result)) + "\n")
        out.flush()
        bar.update(1)
        bar.set_postfix(samples=num_samples, reward=f"{sum(rewards) / len(rewards):.3f}" if rewards else "-",
                        refresh=False)
    if num_unanswered:
        print(f"alignq: {num_unanswered} prompts unanswered after {timeout_s:.0f} s", file=sys.stderr)
    return num_errors
