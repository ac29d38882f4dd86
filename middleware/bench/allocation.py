"""``alignq bench allocation``: AdaBoN allocators vs uniform Best-of-N on a response pool (the paper's protocol).

For each K: draw ``--batches`` batches of K distinct pool prompts; per batch, ``--runs`` independent runs.
A run samples (with replacement) from each prompt's pool: d explore samples, the allocator's a_i more,
and the batch total is Σ_i max reward. Uniform Best-of-N draws B per prompt, and up to 2B for the
survival curve. Per batch:

    BWR  = P[total_method > total_uniform(B)] + ½ P[=]
    EST  = Σ_{N=1}^{2B} P[total_method >= total_uniform(N)]        (EST/B > 1: worth a bigger budget)
    gain = E[total_method - total_uniform(B)] / K                   (reward per prompt)

Reported beside the allocators: ``null`` (an independent uniform run in place of the method: what noise
and the ≥ in EST score) and ``oracle`` (allocation with each prompt's true pool distribution).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from middleware.scheduler.allocation import ALLOCATORS, EmpiricalGains, allocate, greedy_allocate, num_explore_samples
from middleware.errors import UsageError

DEFAULT_METHODS = ("adabon-mc", "adabon-integral", "adabon-gauss", "adabon-eb")
BASELINES = ("null", "oracle")


@dataclass(slots=True)
class BenchRow:
    k: int
    method: str
    budget: int
    median_bwr: float
    q1_bwr: float
    q3_bwr: float
    frac_bwr_gt_half: float
    median_est: float
    median_est_over_budget: float
    mean_gain: float
    num_explore: int
    mean_allocation_ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="pool file (alignq pool build), or synthetic:KIND[:SPREAD[:SAMPLES]]")
    parser.add_argument("--k", default="3,5,10,20", help="prompts per batch, comma-separated (default 3,5,10,20)")
    parser.add_argument("--budget", type=int, default=32, help="samples per prompt, B (default 32)")
    parser.add_argument("--explore-fraction", type=float, default=0.75, help="d = round(f·B) (default 0.75)")
    parser.add_argument("--runs", type=int, default=100, help="runs per batch (default 100)")
    parser.add_argument("--batches", type=int, default=50, help="batches per K (default 50)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"allocators, comma-separated, from {', '.join(a for a in ALLOCATORS if a != 'uniform')}")
    parser.add_argument("--floor-fraction", type=float, default=0.0,
                        help="allocator option: each prompt keeps at least this share of its own remaining budget")
    parser.add_argument("--cap-factor", type=float, default=None,
                        help="allocator option: no prompt ends with more than this many times its budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--plot", help="write a PNG of BWR and EST/B against K")


def _parse_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    try:
        ks = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError as e:
        raise UsageError(f"--k takes comma-separated integers, got {args.k!r}") from e
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALLOCATORS or m == "uniform"]
    if unknown:
        raise UsageError(f"unknown allocator {unknown[0]!r}: choose from {', '.join(ALLOCATORS[1:])}")
    if not ks or min(ks) < 1:
        raise UsageError("--k needs positive integers")
    if args.budget < 1 or args.runs < 1 or args.batches < 1:
        raise UsageError("--budget, --runs and --batches must be >= 1")
    if not 0 < args.explore_fraction <= 1:
        raise UsageError("--explore-fraction must be in (0, 1]")
    if not 0 <= args.floor_fraction <= 1 or (args.cap_factor is not None and args.cap_factor < 1):
        raise UsageError("--floor-fraction must be in [0, 1] and --cap-factor >= 1")
    return ks, methods


def load_rewards(spec: str, seed: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The pool's rewards per prompt: a pool file, or ``synthetic:KIND[:SPREAD]`` made on the fly."""
    from middleware.bench.pools import PoolError, load_pool, synthetic_pool

    try:
        if spec.startswith("synthetic:"):
            _, kind, *rest = spec.split(":")  # synthetic:KIND[:SPREAD[:SAMPLES]]
            pool = synthetic_pool(kind, spread=float(rest[0]) if rest else 11.0, seed=seed,
                                  num_samples=int(rest[1]) if len(rest) > 1 else 192)
        else:
            pool = load_pool(spec)
    except (PoolError, ValueError) as e:
        raise UsageError(str(e)) from e
    return pool.rewards, pool.header


class _Sampler:
    """Draws with replacement from each prompt's pool, vectorised over runs."""

    def __init__(self, rewards: list[np.ndarray]) -> None:
        self.sizes = np.array([r.size for r in rewards])
        self.table = np.zeros((len(rewards), int(self.sizes.max())))
        for i, r in enumerate(rewards):
            self.table[i, : r.size] = r

    def draw(self, rng: np.random.Generator, prompts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        # shape = (R, num_samples): returns (R, K, num_samples)
        runs, count = shape
        index = (rng.random((runs, prompts.size, count)) * self.sizes[prompts][None, :, None]).astype(np.int64)
        return self.table[prompts[None, :, None], index]


def _batch_metrics(totals: np.ndarray, uniform_curve: np.ndarray, budget: int) -> tuple[float, float, float]:
    """totals (R,), uniform_curve (R, 2B): BWR, EST, gain for one batch."""
    reference = uniform_curve[:, budget - 1]
    bwr = float(np.mean((totals > reference) + 0.5 * (totals == reference)))
    est = float(np.mean(totals[:, None] >= uniform_curve, axis=0).sum())
    return bwr, est, float(np.mean(totals - reference))


def simulate(rewards: list[np.ndarray], *, ks: list[int], methods: list[str], budget: int, explore_fraction: float,
             num_runs: int, num_batches: int, seed: int, floor_fraction: float = 0.0,
             cap_factor: float | None = None) -> list[BenchRow]:
    sampler = _Sampler(rewards)
    num_explore = num_explore_samples(budget, explore_fraction)
    rows = []
    for k in ks:
        if k > len(rewards):
            raise UsageError(f"--k {k} exceeds the pool's {len(rewards)} prompts")
        rng = np.random.default_rng([seed, k])
        names = [*methods, *BASELINES]
        per_batch = {m: [] for m in names}  # (bwr, est, gain)
        elapsed_s = {m: 0.0 for m in names}
        for _ in range(num_batches):
            prompts = rng.choice(len(rewards), size=k, replace=False)
            uniform_curve = np.maximum.accumulate(sampler.draw(rng, prompts, (num_runs, 2 * budget)), axis=2).sum(axis=1)
            null_totals = sampler.draw(rng, prompts, (num_runs, budget)).max(axis=2).sum(axis=1)
            per_batch["null"].append(_batch_metrics(null_totals, uniform_curve, budget))
            explore = sampler.draw(rng, prompts, (num_runs, num_explore))  # (R, K, d), shared by every method
            remaining = np.full(k, budget - num_explore)
            for name in [*methods, "oracle"]:
                counts = np.zeros((num_runs, k), dtype=np.int64)
                started = time.perf_counter()
                for run in range(num_runs):
                    if name == "oracle":
                        gains = EmpiricalGains([rewards[p] for p in prompts], explore[run].max(axis=1))
                        counts[run] = greedy_allocate(gains, k, int(remaining.sum()))
                    else:
                        counts[run] = allocate(list(explore[run]), remaining, method=name, seed=rng,
                                               floor_fraction=floor_fraction, cap_factor=cap_factor)
                elapsed_s[name] += time.perf_counter() - started
                extra = sampler.draw(rng, prompts, (num_runs, max(1, int(counts.max()))))
                extra[np.arange(extra.shape[2])[None, None, :] >= counts[:, :, None]] = -np.inf
                totals = np.maximum(explore.max(axis=2), extra.max(axis=2)).sum(axis=1)
                per_batch[name].append(_batch_metrics(totals, uniform_curve, budget))
        for name in names:
            bwr, est, gain = (np.array(v) for v in zip(*per_batch[name]))
            q1, median, q3 = np.quantile(bwr, [0.25, 0.5, 0.75])
            rows.append(BenchRow(k=k, method=name, budget=budget, median_bwr=float(median), q1_bwr=float(q1),
                                 q3_bwr=float(q3), frac_bwr_gt_half=float(np.mean(bwr > 0.5)),
                                 median_est=float(np.median(est)), median_est_over_budget=float(np.median(est) / budget),
                                 mean_gain=float(gain.mean() / k), num_explore=num_explore,
                                 mean_allocation_ms=1000 * elapsed_s[name] / (num_batches * num_runs)))
    return rows


def time_large_window(rewards: list[np.ndarray], methods: list[str], *, num_prompts: int = 256, budget: int = 32,
                      explore_fraction: float = 0.75, repeats: int = 7) -> dict[str, float]:
    """Fastest of ``repeats`` allocations (ms) for a window of ``num_prompts`` prompts drawn from the pool.

    The fastest, not the median: on a shared CPU the others measure the neighbours as much as the code.
    """
    rng = np.random.default_rng(0)
    sampler = _Sampler(rewards)
    d = num_explore_samples(budget, explore_fraction)
    prompts = rng.choice(len(rewards), size=num_prompts, replace=True)
    timings = {}
    for method in ["uniform", *methods]:
        samples = []
        for _ in range(repeats):
            explore = list(sampler.draw(rng, prompts, (1, d))[0])
            started = time.perf_counter()
            allocate(explore, np.full(num_prompts, budget - d), method=method, seed=0)
            samples.append(1000 * (time.perf_counter() - started))
        timings[method] = float(np.min(samples))
    return timings


def _plot(rows: list[BenchRow], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        ks = [r.k for r in mine]
        style = {"linestyle": "--"} if method in BASELINES else {}
        left.errorbar(ks, [r.median_bwr for r in mine], capsize=3, label=method, marker="o", **style,
                      yerr=[[r.median_bwr - r.q1_bwr for r in mine], [r.q3_bwr - r.median_bwr for r in mine]])
        right.plot(ks, [r.median_est_over_budget for r in mine], marker="o", label=method, **style)
    left.axhline(0.5, color="grey", linewidth=0.8)
    right.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xlabel="K (prompts per batch)", ylabel="batch win rate vs uniform (median, IQR)", xscale="log")
    right.set(xlabel="K (prompts per batch)", ylabel="EST / B (median)", xscale="log")
    ks = sorted({r.k for r in rows})
    for axis in (left, right):
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.minorticks_off()
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[BenchRow]) -> str:
    lines = [f"{'K':>3} {'method':<16} {'BWR med [q1, q3]':<22} {'BWR>.5':>6} {'EST':>7} {'EST/B':>6} {'gain/prompt':>11} {'ms':>6}"]
    for r in rows:
        lines.append(f"{r.k:>3} {r.method:<16} {r.median_bwr:.3f} [{r.q1_bwr:.3f}, {r.q3_bwr:.3f}]  "
                     f"{r.frac_bwr_gt_half:>6.0%} {r.median_est:>7.1f} {r.median_est_over_budget:>6.3f} "
                     f"{r.mean_gain:>11.4f} {r.mean_allocation_ms:>6.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    ks, methods = _parse_args(args)
    rewards, header = load_rewards(args.pool, args.seed)
    started = time.perf_counter()
    rows = simulate(rewards, ks=ks, methods=methods, budget=args.budget, explore_fraction=args.explore_fraction,
                    num_runs=args.runs, num_batches=args.batches, seed=args.seed,
                    floor_fraction=args.floor_fraction, cap_factor=args.cap_factor)
    timings = time_large_window(rewards, methods, budget=args.budget, explore_fraction=args.explore_fraction)
    report = {"pool": args.pool, "pool_kind": header.get("kind"), "num_prompts": len(rewards),
              "samples_per_prompt": int(np.median([r.size for r in rewards])), "budget": args.budget,
              "explore_fraction": args.explore_fraction, "floor_fraction": args.floor_fraction,
              "cap_factor": args.cap_factor, "runs": args.runs, "batches": args.batches,
              "seed": args.seed, "elapsed_s": round(time.perf_counter() - started, 2),
              "allocation_ms_256_prompts": timings, "results": [asdict(r) for r in rows]}
    if args.plot:
        _plot(rows, args.plot, f"{args.pool}: B={args.budget}, d={rows[0].num_explore}, {args.batches}×{args.runs}")
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"pool {args.pool} ({len(rewards)} prompts), B={args.budget}, d={rows[0].num_explore}, "
              f"{args.batches} batches × {args.runs} runs, {report['elapsed_s']} s")
        print(_table(rows))
        print("allocation ms for 256 prompts: " + ", ".join(f"{m} {t:.1f}" for m, t in timings.items()))
    return 0
