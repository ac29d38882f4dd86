"""The three runners of ``alignq bench throughput``: hand-written generate() loop, engine, middleware.

Imported by ``middleware.bench.throughput.run`` only (it loads torch through ``workers``, lazily). The
middleware's processes come from the one launcher, ``middleware.runtime.launcher``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from middleware.bench.ingest import hardware_info as host_info
from middleware.bench.ingest import percentile, redis_for_bench
from middleware.runtime.launcher import Launcher

logger = logging.getLogger(__name__)

WARMUP_BUDGET = 2
WARMUP_NEW_TOKENS = 4


@dataclasses.dataclass(slots=True)
class LocalModels:
    policy: Any  # workers.models.Policy
    reward: Any  # workers.models.RewardModel
    eos_token_ids: frozenset[int]
    hardware: dict[str, Any]


def resolve_threads(num_threads: int) -> int:
    return num_threads if num_threads > 0 else max(1, os.cpu_count() or 1)


def load_local(args: argparse.Namespace) -> LocalModels:
    """Load policy and reward once for (a) and (b); set the torch thread count all modes use."""
    import torch

    from workers.models import configure_threads, load_policy, load_reward

    threads = configure_threads(args.threads, workers_on_host=1)
    policy = load_policy(args.model, device=args.device, dtype=args.dtype)
    reward = load_reward(args.reward, device=args.device)
    hardware = {**host_info(), "threads": threads, "device": str(policy.device),
                "dtype": str(policy.dtype).removeprefix("torch."), "torch": torch.__version__,
                "model": policy.name}
    return LocalModels(policy, reward, frozenset(policy.eos_token_ids()), hardware)


def count_generated_tokens(rows: Any, eos_token_ids: frozenset[int]) -> list[int]:
    """Tokens per row up to and including the first EOS (padding after it not counted)."""
    import torch

    is_eos = torch.zeros_like(rows, dtype=torch.bool)
    for token_id in eos_token_ids:
        is_eos |= rows == token_id
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, rows.shape[1]))
    return lengths.tolist()


def hf_generate_and_score(local: LocalModels, prompt: Any, *, budget: int, max_new_tokens: int,
                          temperature: float, top_p: float, seed: int) -> tuple[list[float], list[int]]:
    """The loop users write: tokenize, ``generate(num_return_sequences=N)``, decode, score. One prompt."""
    import torch

    policy = local.policy
    tokenizer = policy.tokenizer
    # the same token ids the engine feeds (chat template, no extra BOS): only the decoding differs
    input_ids = torch.tensor([policy.encode(prompt)], device=policy.device)  # (1, T_prompt)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    with torch.inference_mode():
        output = policy.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            num_return_sequences=budget, eos_token_id=sorted(local.eos_token_ids),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )  # (N, T_prompt + T_new)
    generated = output[:, input_ids.shape[1]:]  # (N, T_new)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    rewards = local.reward.score([prompt] * budget, texts)
    return rewards, count_generated_tokens(generated, local.eos_token_ids)


def summarize(done_s: list[float], wall_s: float, num_samples: int, num_tokens: int, *,
              cpu_s: float = 0.0) -> dict[str, float]:
    """Rates over the run's wall time, time-to-result percentiles (s) over prompts, and CPU time.

    ``cpu_s``: CPU seconds the processes doing the work used (this one; for the middleware also the
    scheduler and workers, Redis not counted). On a shared host, samples per CPU-second is the
    number other processes disturb least.
    """
    done_sorted = sorted(done_s)
    return {
        "cpu_s": cpu_s,
        "samples_per_cpu_s": num_samples / cpu_s if cpu_s > 0 else 0.0,
        "wall_s": wall_s,
        "num_samples": num_samples,
        "num_tokens": num_tokens,
        "samples_per_s": num_samples / wall_s,
        "tokens_per_s": num_tokens / wall_s,
        "p50_s": percentile(done_sorted, 50),
        "p95_s": percentile(done_sorted, 95),
    }


def run_hf_loop(local: LocalModels, prompts: list[Any], args: argparse.Namespace) -> dict[str, float]:
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    hf_generate_and_score(local, prompts[0], budget=WARMUP_BUDGET, seed=args.seed,
                          **{**params, "max_new_tokens": WARMUP_NEW_TOKENS})
    done_s: list[float] = []
    num_tokens = 0
    start_cpu_s, start_s = time.process_time(), time.perf_counter()
    for index, prompt in enumerate(prompts):
        rewards, token_counts = hf_generate_and_score(local, prompt, budget=args.budget, seed=args.seed + index,
                                                      **params)
        assert len(rewards) == args.budget
        num_tokens += sum(token_counts)
        done_s.append(time.perf_counter() - start_s)
    wall_s, cpu_s = time.perf_counter() - start_s, time.process_time() - start_cpu_s
    return summarize(done_s, wall_s, len(prompts) * args.budget, num_tokens, cpu_s=cpu_s)


def run_engine(local: LocalModels, prompts: list[Any], args: argparse.Namespace) -> dict[str, float]:
    from workers.engine import Engine, GenerationRequest

    engine = Engine(local.policy, local.reward, max_batch=args.max_batch)

    def requests(budget: int, max_new_tokens: int, chosen: list[Any]) -> list[Any]:
        return [GenerationRequest(key=str(index), prompt=prompt, num_samples=budget, max_new_tokens=max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed + index)
                for index, prompt in enumerate(chosen)]

    engine.run(requests(WARMUP_BUDGET, WARMUP_NEW_TOKENS, prompts[:1]))
    start_cpu_s, start_s = time.process_time(), time.perf_counter()
    results = engine.run(requests(args.budget, args.max_new_tokens, prompts))
    wall_s, cpu_s = time.perf_counter() - start_s, time.process_time() - start_cpu_s
    errors = [result.error for result in results if result.error]
    if errors:
        raise RuntimeError(f"engine: {len(errors)} requests failed, first: {errors[0]}")
    num_samples = sum(len(result.samples) for result in results)
    num_tokens = sum(sample.num_tokens for result in results for sample in result.samples)
    # Engine.run hands every result back at once: each prompt's time to result is the whole call.
    summary = summarize([wall_s] * len(results), wall_s, num_samples, num_tokens, cpu_s=cpu_s)
    summary["generate_s"] = sum(result.generate_s for result in results)
    summary["score_s"] = sum(result.score_s for result in results)
    return summary


MODE_RUNNERS: dict[str, Callable[[LocalModels, list[Any], argparse.Namespace], dict[str, float]]] = {
    "hf_loop": run_hf_loop,
    "engine": run_engine,
}


# -- (c) the whole middleware ------------------------------------------------------------------------
@contextlib.contextmanager
def middleware_session(args: argparse.Namespace, *, threads: int, warmup_prompt: Any,
                       ) -> Iterator[Callable[[list[Any]], dict[str, float]]]:
    """Redis, a scheduler and ``--workers`` workers, up and warm; yields ``measure(prompts) -> summary``.

    Keys live in a namespace of their own, deleted after the services stopped (they write heartbeats
    and telemetry until then).
    """
    import anyio

    namespace = f"alignq-bench-throughput-{os.getpid()}"
    with redis_for_bench(args.redis_url) as redis_url:
        try:
            with service_processes(redis_url, namespace, args,
                                   threads_per_worker=max(1, threads // args.workers)) as launcher:
                anyio.run(_warm_up_middleware, redis_url, namespace, warmup_prompt, args, launcher)
                yield lambda prompts: anyio.run(_measure_middleware, redis_url, namespace, prompts, args, launcher)
        finally:
            anyio.run(_delete_namespace_keys, redis_url, namespace)


@contextlib.contextmanager
def service_processes(redis_url: str, namespace: str, args: argparse.Namespace, *,
                      threads_per_worker: int) -> Iterator[Launcher]:
    """``alignq scheduler`` and ``--workers`` × ``alignq worker`` subprocesses; stopped on exit."""
    env: dict[str, str | None] = {
        "ALIGNQ_NAMESPACE": namespace, "ALIGNQ_DEVICE": args.device, "ALIGNQ_DTYPE": args.dtype,
        "ALIGNQ_NUM_THREADS": str(threads_per_worker), "OMP_NUM_THREADS": str(threads_per_worker),
        "ALIGNQ_MAX_BATCH": str(args.max_batch), "ALIGNQ_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "ALIGNQ_MAX_BUDGET": str(max(256, args.budget)), "ALIGNQ_LOG_LEVEL": "WARNING",
        "ALIGNQ_MODEL": args.model or None, "ALIGNQ_REWARD_MODEL": args.reward or None}
    env.update(getattr(args, "worker_env", None) or {})  # e.g. the openai backend (throughput_backend)
    with Launcher(redis_url, env=env, stop_timeout_s=20.0) as launcher:
        for number, role in enumerate(["scheduler"] + ["worker"] * args.workers):
            launcher.start(f"{role}-{number}", [role])
        yield launcher


def _cpu_s(launcher: Launcher) -> list[float]:
    """CPU seconds so far: this process, then each child in start order (scheduler, workers)."""
    return [time.process_time()] + [child.cpu_s() for child in launcher.children.values()]


async def _measure_middleware(redis_url: str, namespace: str, prompts: list[Any], args: argparse.Namespace,
                              launcher: Launcher) -> dict[str, float]:
    import anyio

    from middleware.client import Client

    async with Client(redis_url, namespace=namespace, max_pending=100_000, poll_interval_s=0.5) as client:
        items = [{"prompt": prompt, "method": getattr(args, "method", "uniform"), "budget": args.budget, "max_new_tokens": args.max_new_tokens,
                  "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed + index}
                 for index, prompt in enumerate(prompts)]
        done_s: dict[str, float] = {}
        results: dict[str, Any] = {}
        start_cpu_s = _cpu_s(launcher)
        start_s = time.perf_counter()
        request_ids = await client.submit_many(items)

        async def wait_one(request_id: str) -> None:
            results[request_id] = await _await_result(client, request_id, launcher, args.timeout_s)
            done_s[request_id] = time.perf_counter() - start_s

        async with anyio.create_task_group() as group:
            for request_id in request_ids:
                group.start_soon(wait_one, request_id)
        wall_s = time.perf_counter() - start_s
        used_cpu_s = [end - start for end, start in zip(_cpu_s(launcher), start_cpu_s)]
    num_samples = sum(result.samples_used for result in results.values())
    num_tokens = sum(result.num_tokens for result in results.values())
    summary = summarize(list(done_s.values()), wall_s, num_samples, num_tokens, cpu_s=sum(used_cpu_s))
    summary["cpu_s_client"], summary["cpu_s_scheduler"] = used_cpu_s[0], used_cpu_s[1]
    summary["cpu_s_workers"] = sum(used_cpu_s[2:])
    # the workers' own time (decode, scoring) for these requests: wall - these = the service's overhead
    summary["generate_s"] = sum(result.generate_s for result in results.values())
    summary["score_s"] = sum(result.score_s for result in results.values())
    summary["queued_p50_s"] = sorted(result.queued_s for result in results.values())[len(results) // 2]
    return summary


async def _warm_up_middleware(redis_url: str, namespace: str, prompt: Any, args: argparse.Namespace,
                              launcher: Launcher) -> None:
    """Wait for the heartbeats, then for one answered request: models loaded, code paths warm."""
    from middleware.client import Client

    async with Client(redis_url, namespace=namespace, max_pending=100_000, poll_interval_s=0.5) as client:
        await _wait_for_heartbeats(client, launcher, num_workers=args.workers, timeout_s=args.timeout_s)
        warmup_id = await client.submit(prompt, method=getattr(args, "method", "uniform"), budget=WARMUP_BUDGET,
                                        max_new_tokens=WARMUP_NEW_TOKENS, seed=args.seed)
        await _await_result(client, warmup_id, launcher, args.timeout_s)


async def _await_result(client: Any, request_id: str, launcher: Launcher, timeout_s: float) -> Any:
    """The request's result, checking every few seconds that no service process died meanwhile."""
    from middleware.client import ResultTimeout

    deadline_s = time.monotonic() + timeout_s
    while True:
        launcher.check_alive()
        try:
            return await client.result(request_id, timeout_s=min(5.0, max(0.1, deadline_s - time.monotonic())))
        except ResultTimeout:
            if time.monotonic() >= deadline_s:
                last = list(launcher.children)[-1]
                raise RuntimeError(f"no result for {request_id} within {timeout_s} s; "
                                   f"worker log: {launcher.log_tail(last)}") from None


async def _wait_for_heartbeats(client: Any, launcher: Launcher, *, num_workers: int, timeout_s: float) -> None:
    import anyio

    deadline_s = time.monotonic() + timeout_s
    while True:
        launcher.check_alive()
        workers = await client.heartbeats("worker")
        schedulers = await client.heartbeats("scheduler")
        if len(workers) >= num_workers and schedulers:
            return
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"services not up within {timeout_s} s (workers {len(workers)}/{num_workers}, "
                               f"schedulers {len(schedulers)})")
        await anyio.sleep(0.2)


async def _delete_namespace_keys(redis_url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    from middleware.bench.ingest import delete_namespace

    connection = aioredis.Redis.from_url(redis_url)
    try:
        await delete_namespace(connection, namespace)
    finally:
        await connection.aclose()
