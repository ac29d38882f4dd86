"""``alignq bench latency``: best reward against p50 / p95 latency through the whole middleware.

Real processes: Redis, one scheduler and ``--workers`` workers per variant (each variant its own
namespace and scheduler settings; the workers load the models once per variant from the local cache).
Each variant answers the same prompts with the same budget; a wave of ``--concurrency`` requests is
submitted at once (one scheduling window), waves one after the other. Variants:

    uniform        method uniform: one round of B samples
    adabon-f0.75   two rounds, explore f = 0.75 (the paper's default)
    adabon-f0.25   two rounds, explore f = 0.25
    deadline       method bon with ``deadline_ms`` on every request: the scheduler picks one or two rounds
                   from its measured round time (``middleware.scheduler.deadline``)

Per variant: mean best reward with a 95% interval (bootstrap over prompts; requests answered without a
response, e.g. past their deadline before any sample, are counted in ``num_failed``), p50 and p95 of
submit → result latency, samples used. The figure to read is the trade-off: what reward each extra round buys
and what it costs at p95.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import numpy as np

from middleware.bench.ingest import percentile, redis_for_bench
from middleware.bench.report import format_interval, print_report
from middleware.errors import UsageError

logger = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {  # scheduler env, request fields
    "uniform": ({}, {"method": "uniform"}),
    "adabon-f0.75": ({"ALIGNQ_EXPLORE_FRACTION": "0.75"}, {"method": "bon"}),
    "adabon-f0.25": ({"ALIGNQ_EXPLORE_FRACTION": "0.25"}, {"method": "bon"}),
    "deadline": ({"ALIGNQ_EXPLORE_FRACTION": "0.75", "ALIGNQ_DEADLINE_ROUNDS": "true"}, {"method": "bon"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default="examples/pool_prompts.jsonl", help="JSON lines with \"prompt\"")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8, help="requests submitted at once (a window)")
    parser.add_argument("--deadline-ms", type=int, default=4000, help="the deadline variant's deadline_ms")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--model", help="policy (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--reward", help="reward spec (default: the MiniLM preference reward)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--redis-url", help="default: ALIGNQ_REDIS_URL, else an embedded Redis")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")


def _prompts(path: str, count: int) -> list[Any]:
    from middleware.bench.pools import PoolError, read_prompts

    try:
        prompts = [prompt for _, prompt, _ in read_prompts(path)][:count]
    except PoolError as e:
        raise UsageError(str(e)) from e
    if not prompts:
        raise UsageError(f"{path} has no prompts")
    return prompts


def summarize_variant(rewards: list[float], latencies_s: list[float], samples: list[int], *,
                      rng: np.random.Generator) -> dict[str, Any]:
    """Mean reward [95% bootstrap interval over prompts], p50/p95 latency, mean samples used."""
    every = np.asarray(rewards, dtype=np.float64)
    values = every[np.isfinite(every)]  # answered with a response; the rest count in num_failed
    if values.size == 0:
        values = np.zeros(1)
    means = values[rng.integers(0, values.size, (1000, values.size))].mean(axis=1)
    ordered = sorted(latencies_s)
    return {"mean_reward": float(values.mean()), "mean_reward_ci": [float(np.quantile(means, 0.025)),
                                                                    float(np.quantile(means, 0.975))],
            "p50_s": percentile(ordered, 50), "p95_s": percentile(ordered, 95),
            "mean_samples": float(np.mean(samples)), "num_requests": len(rewards),
            "num_failed": int(np.sum(~np.isfinite(every)))}


async def _run_variant(redis_url: str, namespace: str, prompts: list[Any], fields: dict[str, Any],
                       args: argparse.Namespace, launcher: Any) -> tuple[list[float], list[float], list[int]]:
    import anyio

    from middleware.bench.throughput_modes import _await_result, _wait_for_heartbeats
    from middleware.client import Client
    from middleware.errors import RequestFailed

    rewards, latencies, samples = [], [], []
    async with Client(redis_url, namespace=namespace, max_pending=100_000, poll_interval_s=0.2) as client:
        await _wait_for_heartbeats(client, launcher, num_workers=args.workers, timeout_s=args.timeout_s)
        warm = await client.submit(prompts[0], method="bon", budget=4, max_new_tokens=4, seed=args.seed)
        await _await_result(client, warm, launcher, args.timeout_s)  # models loaded, round timer measured
        for start in range(0, len(prompts), args.concurrency):
            wave = prompts[start : start + args.concurrency]
            submitted_s = time.perf_counter()
            ids = [await client.submit(p, budget=args.budget, max_new_tokens=args.max_new_tokens,
                                       seed=args.seed + start + i, **fields) for i, p in enumerate(wave)]

            async def wait_one(request_id: str, submitted_s: float = submitted_s) -> None:
                try:
                    result = await _await_result(client, request_id, launcher, args.timeout_s)
                except RequestFailed as e:  # e.g. its deadline passed before any sample was scored
                    result = e.result
                latencies.append(time.perf_counter() - submitted_s)
                rewards.append(float(result.reward) if result.reward is not None else float("nan"))
                samples.append(result.samples_used)

            async with anyio.create_task_group() as group:
                for request_id in ids:
                    group.start_soon(wait_one, request_id)
    return rewards, latencies, samples


def run(args: argparse.Namespace) -> int:
    import anyio

    from middleware.bench.throughput_modes import _delete_namespace_keys
    from middleware.runtime.launcher import Launcher

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    prompts = _prompts(args.prompts, args.num_prompts)
    rng = np.random.default_rng(args.seed)
    report: dict[str, Any] = {"budget": args.budget, "max_new_tokens": args.max_new_tokens,
                              "num_prompts": len(prompts), "concurrency": args.concurrency,
                              "deadline_ms": args.deadline_ms, "variants": {}}
    env = {"ALIGNQ_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads), "ALIGNQ_LOG_LEVEL": "WARNING",
           "ALIGNQ_MODEL": args.model, "ALIGNQ_REWARD_MODEL": args.reward, "ALIGNQ_DEVICE": "cpu",
           "ALIGNQ_MAX_WINDOW": str(args.concurrency), "ALIGNQ_WINDOW_MS": "50"}
    with redis_for_bench(args.redis_url) as redis_url:
        for name in names:
            scheduler_env, fields = VARIANTS[name]
            if name == "deadline":
                fields = {**fields, "deadline_ms": args.deadline_ms}
            namespace = f"alignq-bench-latency-{os.getpid()}-{name}"
            started = time.perf_counter()
            try:
                with Launcher(redis_url, env={**env, "ALIGNQ_NAMESPACE": namespace}, stop_timeout_s=20.0) as launcher:
                    launcher.start("scheduler", ["scheduler"], env=scheduler_env)
                    for number in range(args.workers):
                        launcher.start(f"worker-{number}", ["worker"])
                    rewards, latencies, samples = anyio.run(_run_variant, redis_url, namespace, prompts, fields,
                                                            args, launcher)
            finally:
                anyio.run(_delete_namespace_keys, redis_url, namespace)
            report["variants"][name] = {**summarize_variant(rewards, latencies, samples, rng=rng),
                                        "elapsed_s": round(time.perf_counter() - started, 1)}
            logger.info("latency variant=%s %s", name, report["variants"][name])
    print_report(report, as_json=args.json, lines=_table(report, args, len(prompts)))
    return 0


def _table(report: dict[str, Any], args: argparse.Namespace, num_prompts: int) -> list[str]:
    lines = [(f"B={args.budget}, {num_prompts} prompts in waves of {args.concurrency}, "
              f"{args.max_new_tokens} tokens, deadline variant {args.deadline_ms} ms"),
             f"{'variant':<14} {'reward [95% CI]':<28} {'p50 s':>7} {'p95 s':>7} {'samples':>8} {'failed':>6}"]
    for name, row in report["variants"].items():
        lines.append(f"{name:<14} {row['mean_reward']:.4f} {format_interval(row['mean_reward_ci'], 4)}   "
                     f"{row['p50_s']:>7.2f} {row['p95_s']:>7.2f} {row['mean_samples']:>8.1f} {row['num_failed']:>6}")
    return lines
