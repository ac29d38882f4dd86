"""``alignq run | serve | scheduler | worker | gateway | submit``: the verbs that run alignq's services.

``run`` is the whole product on one machine: it uses ``ALIGNQ_REDIS_URL`` if set, else starts an
embedded Redis; starts a scheduler (in this process) and worker processes; submits the prompts;
prints each AlignResult as a JSON line as it arrives; and stops everything it started. ``serve`` is
the same services long-running, plus the HTTP gateway. ``scheduler``, ``worker`` and ``gateway``
run one role each (compose). ``submit`` sends prompts to a running deployment and waits.

Settings come from ``ALIGNQ_*`` environment variables; flags override them. torch loads only in
worker processes (``workers`` is imported lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from middleware.errors import ServiceError, UsageError
from middleware.runtime.exporter import maybe_start_process_exporter
from middleware.runtime.launcher import SHUTDOWN_TIMEOUT_S, Launcher, bound_shutdown
from middleware.settings import GatewaySettings, SchedulerSettings

logger = logging.getLogger(__name__)

# flag dest -> settings field, per settings class
SCHEDULER_FLAGS = {
    "redis_url": ("--redis-url", str, "Redis URL (default: ALIGNQ_REDIS_URL)"),
    "namespace": ("--namespace", str, "prefix of every Redis key (default alignq)"),
    "max_window": ("--max-window", int, "max prompts in one scheduling window"),
    "window_ms": ("--window-ms", int, "a window closes this long (ms) after its first prompt"),
    "default_budget": ("--default-budget", int, "samples per prompt when a request sets none"),
    "max_budget": ("--max-budget", int, "largest budget a request may ask for"),
    "explore_fraction": ("--explore-fraction", float, "share of each budget spent exploring (stage 1)"),
    "allocator": ("--allocator", str, "stage-2 allocator (see middleware.allocation.ALLOCATORS)"),
    "max_new_tokens": ("--max-new-tokens", int, "tokens per sample when a request sets none"),
    "temperature": ("--temperature", float, "sampling temperature when a request sets none"),
    "top_p": ("--top-p", float, "nucleus sampling when a request sets none"),
    "max_prompt_chars": ("--max-prompt-chars", int, "longer prompts get a bad_request error"),
    "claim_idle_ms": ("--claim-idle-ms", int, "reclaim entries idle this long (ms) from dead processes"),
    "heartbeat_ms": ("--heartbeat-ms", int, "heartbeat and lease-renewal period (ms)"),
    "max_in_flight": ("--max-in-flight", int, "requests one scheduler holds at once"),
    "shutdown_grace_s": ("--shutdown-grace-s", float, "on SIGTERM, time (s) to finish in-flight windows"),
}
WORKER_FLAGS = {
    "redis_url": ("--redis-url", str, "Redis URL (default: ALIGNQ_REDIS_URL)"),
    "namespace": ("--namespace", str, "prefix of every Redis key (default alignq)"),
    "model": ("--model", str, "policy LM: HF name, local folder or .gguf (default: SmolLM2-135M-Instruct)"),
    "reward_model": ("--reward-model", str, "hf:<name-or-path>, embedding:<path> or python:<module>:<function>"),
    "model_name": ("--model-name", str, "model name this worker serves (default: derived from the model)"),
    "backend": ("--backend", str, "generation backend: hf (in-process, default) or openai (a server)"),
    "backend_url": ("--backend-url", str, "openai backend: the server's /v1 base URL"),
    "backend_model": ("--backend-model", str, "openai backend: model name sent to the server"),
    "device": ("--device", str, "auto, cpu or cuda"),
    "dtype": ("--dtype", str, "auto, float32, bfloat16 or float16"),
    "num_threads": ("--num-threads", int, "torch CPU threads per worker (0: cores / workers)"),
    "max_batch": ("--max-batch", int, "max sequences decoded in one forward pass"),
    "max_batch_jobs": ("--max-batch-jobs", int, "max jobs packed into one engine batch"),
    "claim_idle_ms": ("--claim-idle-ms", int, "reclaim jobs idle this long (ms) from dead workers"),
    "heartbeat_ms": ("--heartbeat-ms", int, "heartbeat and lease-renewal period (ms)"),
}
GATEWAY_FLAGS = {
    "redis_url": ("--redis-url", str, "Redis URL (default: ALIGNQ_REDIS_URL)"),
    "namespace": ("--namespace", str, "prefix of every Redis key (default alignq)"),
    "host": ("--host", str, "bind address (default 127.0.0.1)"),
    "port": ("--port", int, "port (default 8000)"),
}


def _add_flags(parser: argparse.ArgumentParser, *flag_sets: dict[str, tuple[str, type, str]]) -> None:
    seen: set[str] = set()
    for flags in flag_sets:
        for dest, (flag, kind, help_text) in flags.items():
            if dest not in seen:
                seen.add(dest)
                parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def _overrides(args: argparse.Namespace, flags: dict[str, tuple[str, type, str]]) -> dict[str, Any]:
    return {dest: getattr(args, dest) for dest in flags if getattr(args, dest, None) is not None}


def build_settings(settings_type: type, args: argparse.Namespace, flags: dict[str, tuple[str, type, str]]) -> Any:
    """Settings from ALIGNQ_* env vars with flags on top; a bad value is a UsageError naming the flag."""
    try:
        return settings_type(**_overrides(args, flags))
    except ValidationError as e:
        first = e.errors()[0]
        if not first.get("loc"):  # a check across fields (e.g. ALIGNQ_SHARD_IDS vs ALIGNQ_SHARDS) names them itself
            raise UsageError(str(first.get("msg")).removeprefix("Value error, ")) from e
        name = str(first["loc"][0])
        flag = flags.get(name, (f"ALIGNQ_{name.upper()}",))[0]
        raise UsageError(f"{flag}: {first.get('msg')}") from e


def require_worker_extra() -> None:
    """UsageError naming the extra to install when torch or transformers is missing (the bare install)."""
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"this verb runs models and needs {' and '.join(missing)}: pip install 'alignq[worker]'")


def worker_settings(args: argparse.Namespace, **extra: Any) -> Any:
    from workers.settings import WorkerSettings

    try:
        return WorkerSettings(**{**_overrides(args, WORKER_FLAGS), **extra})
    except ValidationError as e:
        first = e.errors()[0]
        if not first.get("loc"):  # a check across fields names them itself
            raise UsageError(str(first.get("msg")).removeprefix("Value error, ")) from e
        name = str(first["loc"][0])
        raise UsageError(f"{WORKER_FLAGS.get(name, (name,))[0]}: {first.get('msg')}") from e


# -- verbs ----------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    run = subparsers.add_parser(
        "run", help="align a JSONL file of prompts on this machine (embedded Redis, scheduler, workers)",
        formatter_class=formatter, description=RUN_HELP)
    run.add_argument("prompts", help="JSON lines file of requests ('-' for stdin)")
    _add_output_flags(run)
    run.add_argument("--workers", type=int, default=1, help="worker processes to start (default 1)")
    _add_flags(run, SCHEDULER_FLAGS, WORKER_FLAGS)
    run.set_defaults(func=cmd_run)

    submit = subparsers.add_parser(
        "submit", help="send prompts to a running deployment (ALIGNQ_REDIS_URL) and print the results",
        formatter_class=formatter, description=SUBMIT_HELP)
    submit.add_argument("prompt", nargs="?", help="one prompt (text); or use -f")
    submit.add_argument("-f", "--file", help="JSON lines file of requests (as for `alignq run`)")
    submit.add_argument("--no-wait", action="store_true", help="print the request ids and exit")
    submit.add_argument("--model", default=None,
                        help="model for lines that set none (a name live workers serve; default: the default model)")
    _add_output_flags(submit)
    submit.add_argument("--redis-url", default=None, help="Redis URL (default: ALIGNQ_REDIS_URL)")
    submit.add_argument("--namespace", default=None, help="prefix of every Redis key (default alignq)")
    submit.add_argument("--tenant", default=None, help="submit in this tenant's id scope (default: the shared tenant)")
    submit.add_argument("--max-pending", type=int, default=None, help="queue bound the client enforces")
    submit.set_defaults(func=cmd_submit)

    serve = subparsers.add_parser(
        "serve", help="run Redis (embedded unless ALIGNQ_REDIS_URL), a scheduler, workers and the gateway",
        description="Long-running: the services of `alignq run` plus the HTTP gateway, until Ctrl-C/SIGTERM.")
    serve.add_argument("--workers", type=int, default=1, help="worker processes to start (default 1)")
    serve.add_argument("--host", default=None, help="gateway bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    _add_flags(serve, SCHEDULER_FLAGS, WORKER_FLAGS)
    serve.set_defaults(func=cmd_serve)

    scheduler = subparsers.add_parser(
        "scheduler", help="run one scheduler (windows, allocation) against ALIGNQ_REDIS_URL",
        description="Consume alignq:requests in group 'schedulers', plan windows, dispatch jobs to workers, "
                    "answer each request once. Several may run. SIGTERM drains in-flight windows.")
    _add_flags(scheduler, SCHEDULER_FLAGS)
    scheduler.set_defaults(func=cmd_scheduler)

    worker = subparsers.add_parser(
        "worker", help="run one worker (LM + reward model) against ALIGNQ_REDIS_URL",
        description="Consume alignq:jobs in group 'workers', generate and score samples in batches, "
                    "reply to the scheduler. Scale with more processes (one GPU each).")
    _add_flags(worker, WORKER_FLAGS)
    worker.set_defaults(func=cmd_worker)

    gateway = subparsers.add_parser(
        "gateway", help="serve the HTTP API (OpenAI-compatible) against ALIGNQ_REDIS_URL",
        description="OpenAI-compatible /v1/chat/completions and /v1/completions with budget and method, "
                    "SSE progress, /healthz, /metrics.")
    _add_flags(gateway, GATEWAY_FLAGS)
    gateway.set_defaults(func=cmd_gateway)


RUN_HELP = """Align every prompt of a JSON lines file and print one AlignResult JSON line per prompt.

Input lines are JSON objects: {"prompt": "text" or [{"role": "user", "content": "..."}], and optionally
"request_id", "budget", "method" (bon | uniform | aisp), "max_new_tokens", "temperature", "top_p",
"priority", "deadline_ms", "seed", "metadata", "model" (a model name workers serve)}. A bad line stops everything before it starts (exit 2).

Output lines: request_id, status (ok | partial | error), response, reward, samples_used, method,
timings {queued_s, total_s, generate_s, score_s}, error {code, message}. Exit 0 when every prompt
was answered, 1 if any got an error, 2 for bad input.

examples:
  alignq run examples/prompts.jsonl -o results.jsonl
  alignq run prompts.jsonl --budget 32 --method uniform --workers 2
  ALIGNQ_REDIS_URL=redis://127.0.0.1:6379/0 alignq run prompts.jsonl   # external Redis
"""

SUBMIT_HELP = """Send prompts to a running alignq deployment and print each result as a JSON line.

  alignq submit "Write a haiku about queues" --budget 16
  alignq submit -f prompts.jsonl -o results.jsonl

Needs ALIGNQ_REDIS_URL (or --redis-url). Input and output formats are those of `alignq run`.
"""


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default=None, help="write result lines here instead of stdout")
    parser.add_argument("--budget", type=int, default=None, help="budget for lines that set none")
    parser.add_argument("--method", choices=("bon", "uniform", "aisp"), default=None,
                        help="method for lines that set none (default bon)")
    parser.add_argument("--timeout-s", type=float, default=None, help="give up waiting after this many seconds")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def cmd_scheduler(args: argparse.Namespace) -> int:
    from middleware.scheduler.process import run_scheduler

    settings = build_settings(SchedulerSettings, args, SCHEDULER_FLAGS)
    if not settings.redis_url:
        raise UsageError("no Redis: set ALIGNQ_REDIS_URL or --redis-url (`alignq serve` starts an embedded one)")
    maybe_start_process_exporter()  # ALIGNQ_METRICS_PORT; each Scheduler adds its totals
    return run_scheduler(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    require_worker_extra()
    from workers.process import run_worker

    settings = worker_settings(args)
    if not settings.redis_url:
        raise UsageError("no Redis: set ALIGNQ_REDIS_URL or --redis-url (`alignq serve` starts an embedded one)")
    maybe_start_process_exporter()  # ALIGNQ_METRICS_PORT: the worker process's CPU, memory, GC
    return run_worker(settings)


def cmd_gateway(args: argparse.Namespace) -> int:
    from middleware.gateway.app import run_gateway

    return run_gateway(build_settings(GatewaySettings, args, GATEWAY_FLAGS))


def cmd_run(args: argparse.Namespace) -> int:
    from middleware.cli.batch import collect_results, read_requests

    settings = build_settings(SchedulerSettings, args, SCHEDULER_FLAGS)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {args.workers})")
    requests = read_requests(args.prompts, settings, budget=args.budget, method=args.method)
    try:
        with _launch_workers(settings, args) as launcher:
            settings = settings.model_copy(update={"redis_url": launcher.redis_url})
            return collect_results(settings, requests, output=args.output, quiet=args.quiet,
                                   timeout_s=args.timeout_s, launcher=launcher, run_scheduler=True,
                                   num_workers=args.workers)
    except ServiceError as e:
        print(f"alignq run: {e}", file=sys.stderr)
        return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from middleware.cli.batch import collect_results, read_requests, submit_only

    settings = build_settings(SchedulerSettings, args, {k: SCHEDULER_FLAGS[k] for k in ("redis_url", "namespace")})
    if not settings.redis_url:
        raise UsageError("no Redis to submit to: set ALIGNQ_REDIS_URL or --redis-url (or use `alignq run`)")
    if (args.prompt is None) == (args.file is None):
        raise UsageError('give either one prompt or -f FILE, e.g. alignq submit "Tell me a joke"')
    source = args.file if args.file is not None else [json.dumps({"prompt": args.prompt})]
    requests = read_requests(source, settings, budget=args.budget, method=args.method, model=args.model,
                             tenant=args.tenant)
    if args.max_pending is not None:
        settings = settings.model_copy(update={"max_pending": args.max_pending})
    if args.no_wait:
        return submit_only(settings, requests)
    return collect_results(settings, requests, output=args.output, quiet=args.quiet, timeout_s=args.timeout_s,
                           launcher=None, run_scheduler=False)


def cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    settings = build_settings(SchedulerSettings, args, SCHEDULER_FLAGS)
    try:
        with _launch_workers(settings, args) as launcher:
            settings = settings.model_copy(update={"redis_url": launcher.redis_url})
            gateway_env = {"ALIGNQ_NAMESPACE": settings.namespace}
            gateway_env.update({f"ALIGNQ_{name.upper()}": str(value) for name, value in
                                (("host", args.host), ("port", args.port)) if value is not None})
            launcher.start("gateway", ["gateway"], gateway_env)
            print(f"alignq serving: redis {launcher.redis_url}, {args.workers} worker(s), gateway "
                  f"http://{args.host or '127.0.0.1'}:{args.port or 8000}  (Ctrl-C to stop)", file=sys.stderr)
            return anyio.run(_serve, settings, launcher)
    except ServiceError as e:
        print(f"alignq serve: {e}", file=sys.stderr)
        return 1


async def _serve(settings: SchedulerSettings, launcher: Launcher) -> int:
    """The scheduler until Ctrl-C/SIGTERM, watching the child processes: one dying stops the rest (exit 1)."""
    import anyio

    from middleware.scheduler.process import serve_scheduler

    stop = anyio.Event()
    failures: list[ServiceError] = []

    async def watch() -> None:
        while not stop.is_set():
            try:
                launcher.check_alive()
            except ServiceError as e:
                failures.append(e)
                stop.set()
            await anyio.sleep(1.0)

    async def bound_after_stop() -> None:  # the scheduler drains, then the launcher stops the children
        await stop.wait()
        bound_shutdown(launcher, settings.shutdown_grace_s + launcher.stop_timeout_s + SHUTDOWN_TIMEOUT_S,
                       exit_code=1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        tg.start_soon(bound_after_stop)
        await serve_scheduler(settings, stop=stop)
        tg.cancel_scope.cancel()
    if failures:
        print(f"alignq serve: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    """ALIGNQ_* variables for worker processes: the worker flags given, and a fair share of the cores."""
    env = {f"ALIGNQ_{dest.upper()}": str(value) for dest, value in _overrides(args, WORKER_FLAGS).items()
           if dest not in ("redis_url", "namespace")}
    namespace = getattr(args, "namespace", None)
    if namespace:
        env["ALIGNQ_NAMESPACE"] = namespace
    num_workers = max(1, getattr(args, "workers", 1))
    if "ALIGNQ_NUM_THREADS" not in env and not os.environ.get("ALIGNQ_NUM_THREADS"):
        env["ALIGNQ_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_workers))
    return env


@contextlib.contextmanager
def _launch_workers(settings: SchedulerSettings, args: argparse.Namespace) -> Iterator[Launcher]:
    """A launcher on ``settings.redis_url`` (embedded if none) running ``--workers`` worker processes."""
    worker_env = _worker_env(args)
    with Launcher(settings.redis_url, verbosity=args.verbose) as launcher:
        for i in range(args.workers):
            launcher.start(f"worker-{i}", ["worker"], worker_env)
        yield launcher

