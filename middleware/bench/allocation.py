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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from middleware.bench.allocation_report import format_table, plot_rows
from middleware.bench.equivalence import (
    Interval,
    budget_equivalence,
    budget_needed,
    median_interval,
    saving_from_needed,
)
from middleware.bench.report import print_report
from middleware.errors import UsageError
from middleware.scheduler.allocation import (
    ALLOCATORS,
    EmpiricalGains,
    allocate,
    greedy_allocate,
    num_explore_samples,
)

DEFAULT_METHODS = ("adabon-mc", "adabon-integral", "adabon-gauss", "adabon-eb")
UNIFORM_CURVE_MULTIPLE = 4  # budget_equivalence is censored ("above") at 4×B


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
    median_bwr_ci: list[float] | None = None  # 95% bootstrap interval of the median (resampling batches)
    budget_equivalence: float | None = None  # uniform budget (× B) whose mean batch total the method's at B equals
    budget_equivalence_ci: list[float] | None = None
    budget_equivalence_censored: str | None = None  # "above": past 4B, the largest uniform budget simulated
    budget_saving: float | None = None  # 1 − b*/B: share of B the method does without to equal uniform at B
    budget_saving_ci: list[float] | None = None
    budget_saving_censored: str | None = None  # "above"/"below": beyond the --saving-grid


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
    parser.add_argument("--saving-grid", default="0.625,0.75,0.875,1.125,1.25",
                        help="budgets (multiples of B) the methods also run at, for budget_saving; '' skips it")
    parser.add_argument("--cross-validate", type=int, default=0, metavar="FOLDS",
                        help="split the pool's prompts into FOLDS; each batch comes from one fold, and +prior "
                             "methods get a spread model learned on the other folds (never on a tested prompt)")
    parser.add_argument("--prior-features", default="embedding", choices=("hash", "embedding", "oracle"),
                        help="+prior features: the reward encoder's prompt embedding, hashed words (torch-free), "
                             "or oracle (each prompt's own full-pool spread and mean: the ceiling of any predictor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--plot", help="write a PNG of BWR and EST/B against K")


def _parse_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    try:
        ks = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError as e:
        raise UsageError(f"--k takes comma-separated integers, got {args.k!r}") from e
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    for method in methods:
        MethodSpec.parse(method)  # raises UsageError
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
    est = float(np.mean(totals[:, None] >= uniform_curve[:, : 2 * budget], axis=0).sum())
    return bwr, est, float(np.mean(totals - reference))


@dataclass(slots=True)
class MethodSpec:
    """A bench method: ``allocator[+prior|+scale-prior][@explore_fraction]`` (e.g. ``adabon-eb+prior@0.25``).

    ``+scale-prior``: only the predicted spread (and success rate), not the predicted mean.
    """

    name: str
    allocator: str
    explore_fraction: float | None = None  # None: the bench's --explore-fraction
    uses_prior: bool = False
    scale_only: bool = False

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        base, _, fraction = text.partition("@")
        allocator, _, extra = base.partition("+")
        if allocator not in (*ALLOCATORS, "oracle") or allocator == "uniform" or extra not in ("", "prior", "scale-prior"):
            raise UsageError(f"unknown allocator {text!r}: choose from {', '.join(ALLOCATORS[1:])} "
                             "(optionally +prior or +scale-prior, @EXPLORE_FRACTION)")
        try:
            value = float(fraction) if fraction else None
        except ValueError as e:
            raise UsageError(f"{text!r}: the part after @ is an explore fraction in (0, 1]") from e
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{text!r}: the explore fraction must be in (0, 1]")
        return cls(text, allocator, value, extra != "", extra == "scale-prior")


class _Batch:
    """One batch's draws: explore samples shared by every method with the same d (common random numbers)."""

    def __init__(self, sampler: _Sampler, rewards: list[np.ndarray], prompts: np.ndarray, num_runs: int,
                 rng: np.random.Generator, prior: Any = None) -> None:
        self.sampler, self.rewards, self.prompts, self.num_runs, self.rng = sampler, rewards, prompts, num_runs, rng
        self.prior = prior  # WindowPrior for these prompts, or None
        self._explore: dict[int, np.ndarray] = {}

    def explore(self, num_explore: int) -> np.ndarray:
        if num_explore not in self._explore:  # (R, K, d)
            self._explore[num_explore] = self.sampler.draw(self.rng, self.prompts, (self.num_runs, num_explore))
        return self._explore[num_explore]

    def _prior(self, spec: MethodSpec) -> Any:
        if not spec.uses_prior or self.prior is None:
            return None
        if spec.scale_only:
            return replace(self.prior, loc_mean=None, loc_var=None)
        return self.prior

    def totals(self, spec: MethodSpec, budget: int, explore_fraction: float, options: dict[str, Any],
               elapsed_s: dict[str, float]) -> np.ndarray:
        """(R,) batch totals Σ_i max reward of ``spec`` at ``budget`` per prompt."""
        k = self.prompts.size
        num_explore = num_explore_samples(budget, spec.explore_fraction or explore_fraction)
        explore = self.explore(num_explore)
        remaining = np.full(k, budget - num_explore)
        counts = np.zeros((self.num_runs, k), dtype=np.int64)
        started = time.perf_counter()
        for run in range(self.num_runs):
            if spec.allocator == "oracle":
                gains = EmpiricalGains([self.rewards[p] for p in self.prompts], explore[run].max(axis=1))
                counts[run] = greedy_allocate(gains, k, int(remaining.sum()))
            else:
                counts[run] = allocate(list(explore[run]), remaining, method=spec.allocator, seed=self.rng,
                                       prior=self._prior(spec), **options)
        elapsed_s[spec.name] = elapsed_s.get(spec.name, 0.0) + time.perf_counter() - started
        extra = self.sampler.draw(self.rng, self.prompts, (self.num_runs, max(1, int(counts.max()))))
        extra[np.arange(extra.shape[2])[None, None, :] >= counts[:, :, None]] = -np.inf
        return np.maximum(explore.max(axis=2), extra.max(axis=2)).sum(axis=1)


def simulate(rewards: list[np.ndarray], *, ks: list[int], methods: list[str], budget: int, explore_fraction: float,
             num_runs: int, num_batches: int, seed: int, floor_fraction: float = 0.0,
             cap_factor: float | None = None, saving_grid: Sequence[float] = (),
             folds: Sequence[tuple[np.ndarray, Callable[[np.ndarray], Any] | None]] = ()) -> list[BenchRow]:
    """The paper's protocol per K; ``saving_grid``: budgets (multiples of B) for ``budget_saving``.

    ``folds``: (held-out pool indices, prior_for) pairs; batch j draws its prompts from fold j mod F only,
    and ``+prior`` methods get ``prior_for(prompts)`` (cross-validation: ``middleware.bench.prior_cv``).
    """
    sampler = _Sampler(rewards)
    specs = [MethodSpec.parse(m) for m in methods] + [MethodSpec("oracle", "oracle")]
    options: dict[str, Any] = {"floor_fraction": floor_fraction, "cap_factor": cap_factor}
    grid = sorted({*(max(2, round(g * budget)) for g in saving_grid), budget}) if saving_grid else [budget]
    at_budget = grid.index(budget)
    sources = list(folds) or [(np.arange(len(rewards)), None)]
    rows = []
    for k in ks:
        smallest = min(ids.size for ids, _ in sources)
        if k > smallest:
            raise UsageError(f"--k {k} exceeds the pool's {smallest} prompts" + (" per fold" if folds else ""))
        rng = np.random.default_rng([seed, k])
        per_batch: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in [*specs, MethodSpec("null", "null")]}
        means_at: dict[str, list[list[float]]] = {s.name: [] for s in specs}  # (batches, G) mean totals
        curves: list[np.ndarray] = []  # (batches, 2B) uniform mean totals
        elapsed_s: dict[str, float] = {}
        for batch_index in range(num_batches):
            pool_ids, prior_for = sources[batch_index % len(sources)]
            prompts = rng.choice(pool_ids, size=k, replace=False)
            # uniform Best-of-N for N = 1..UNIFORM_CURVE_MULTIPLE·B: EST reads its first 2B, equivalence all of it
            uniform_curve = np.maximum.accumulate(sampler.draw(rng, prompts, (num_runs, UNIFORM_CURVE_MULTIPLE * budget)),
                                                  axis=2).sum(axis=1)
            curves.append(uniform_curve.mean(axis=0))
            null_totals = sampler.draw(rng, prompts, (num_runs, budget)).max(axis=2).sum(axis=1)
            per_batch["null"].append(_batch_metrics(null_totals, uniform_curve, budget))
            batch = _Batch(sampler, rewards, prompts, num_runs, rng, prior_for(prompts) if prior_for else None)
            for spec in specs:
                totals_at = [batch.totals(spec, b, explore_fraction, options, elapsed_s) for b in grid]
                per_batch[spec.name].append(_batch_metrics(totals_at[at_budget], uniform_curve, budget))
                means_at[spec.name].append([float(t.mean()) for t in totals_at])
        curve_means = np.array(curves)
        boot = np.random.default_rng([seed, k, 1])
        for name, metrics in per_batch.items():
            bwr, est, gain = (np.array(v) for v in zip(*metrics))
            q1, median, q3 = np.quantile(bwr, [0.25, 0.5, 0.75])
            saving: Interval | None
            if name == "null":
                equivalence, saving = Interval(1.0, 1.0, 1.0), Interval(0.0, 0.0, 0.0)
            else:
                at = np.array(means_at[name])
                equivalence = budget_equivalence(at[:, at_budget], curve_means, budget, rng=boot)
                saving = (saving_from_needed(budget_needed(at, np.array(grid), curve_means[:, budget - 1], budget,
                                                           rng=boot)) if len(grid) > 1 else None)
            named = next((s for s in specs if s.name == name), None)
            f = (named.explore_fraction if named and named.explore_fraction else explore_fraction)
            rows.append(BenchRow(
                k=k, method=name, budget=budget, median_bwr=float(median), q1_bwr=float(q1), q3_bwr=float(q3),
                frac_bwr_gt_half=float(np.mean(bwr > 0.5)), median_est=float(np.median(est)),
                median_est_over_budget=float(np.median(est) / budget), mean_gain=float(gain.mean() / k),
                num_explore=num_explore_samples(budget, f) if name != "null" else 0,
                mean_allocation_ms=1000 * elapsed_s.get(name, 0.0) / (num_batches * num_runs * len(grid)),
                median_bwr_ci=median_interval(bwr, rng=boot).as_list()[1:],
                budget_equivalence=round(equivalence.value, 4), budget_equivalence_ci=equivalence.as_list()[1:],
                budget_equivalence_censored=equivalence.censored,
                budget_saving=round(saving.value, 4) if saving else None,
                budget_saving_ci=saving.as_list()[1:] if saving else None,
                budget_saving_censored=saving.censored if saving else None))
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
    for method in dict.fromkeys(["uniform", *(MethodSpec.parse(m).allocator for m in methods)]):
        samples = []
        for _ in range(repeats):
            explore = list(sampler.draw(rng, prompts, (1, d))[0])
            started = time.perf_counter()
            allocate(explore, np.full(num_prompts, budget - d), method=method, seed=0)
            samples.append(1000 * (time.perf_counter() - started))
        timings[method] = float(np.min(samples))
    return timings


def _folds(args: argparse.Namespace, rewards: list[np.ndarray],
           methods: list[str]) -> tuple[list[Any], dict[str, list[Any]]]:
    """Held-out folds with priors learned off-fold (``--cross-validate``); the predictor's held-out fit per
    target: mean R² over folds, and Pearson r over all held-out prompts with its 95% interval."""
    needs_prior = any(MethodSpec.parse(m).uses_prior for m in methods)
    if needs_prior and args.cross_validate < 2:
        raise UsageError("+prior methods learn from other prompts: give --cross-validate FOLDS (>= 2)")
    if args.cross_validate < 2:
        return [], {"prior_held_out_r2": [], "prior_held_out_r": []}
    from middleware.bench.pools import load_pool
    from middleware.bench.prior_cv import held_out_correlation, make_folds, oracle_folds, pool_features

    if args.prior_features == "oracle":
        return (oracle_folds(rewards, num_folds=args.cross_validate, seed=args.seed),
                {"prior_held_out_r2": [], "prior_held_out_r": []})

    pool = load_pool(args.pool) if not args.pool.startswith("synthetic:") else None
    texts = [p.prompt for p in pool.prompts] if pool else [f"synthetic prompt {i}" for i in range(len(rewards))]
    features = pool_features(texts, args.prior_features, pool.header.get("reward") if pool else None)
    try:
        folds = make_folds(rewards, features, num_folds=args.cross_validate, train_samples=args.budget,
                           seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return folds, {"prior_held_out_r2": [float(np.nanmean(v)) for v in zip(*(f.held_out_r2 for f in folds))],
                   "prior_held_out_r": held_out_correlation(folds, seed=args.seed)}


def run(args: argparse.Namespace) -> int:
    ks, methods = _parse_args(args)
    rewards, header = load_rewards(args.pool, args.seed)
    started = time.perf_counter()
    try:
        grid = [float(g) for g in str(args.saving_grid).split(",") if g.strip()]
    except ValueError as e:
        raise UsageError(f"--saving-grid takes comma-separated multiples of B, got {args.saving_grid!r}") from e
    folds, fold_fit = _folds(args, rewards, methods)
    rows = simulate(rewards, ks=ks, methods=methods, budget=args.budget, explore_fraction=args.explore_fraction,
                    num_runs=args.runs, num_batches=args.batches, seed=args.seed,
                    floor_fraction=args.floor_fraction, cap_factor=args.cap_factor, saving_grid=grid,
                    folds=[(f.test, f.prior_for) for f in folds])
    timings = time_large_window(rewards, methods, budget=args.budget, explore_fraction=args.explore_fraction)
    report = {"pool": args.pool, "pool_kind": header.get("kind"), "num_prompts": len(rewards),
              "samples_per_prompt": int(np.median([r.size for r in rewards])), "budget": args.budget,
              "explore_fraction": args.explore_fraction, "floor_fraction": args.floor_fraction,
              "cap_factor": args.cap_factor, "runs": args.runs, "batches": args.batches,
              "seed": args.seed, "elapsed_s": round(time.perf_counter() - started, 2), "saving_grid": grid,
              "cross_validate": args.cross_validate, "prior_features": args.prior_features,
              **fold_fit,
              "allocation_ms_256_prompts": timings, "results": [asdict(r) for r in rows]}
    if args.plot:
        plot_rows(rows, args.plot, f"{args.pool}: B={args.budget}, d={rows[0].num_explore}, {args.batches}×{args.runs}")
    print_report(report, as_json=args.json, lines=[
        (f"pool {args.pool} ({len(rewards)} prompts), B={args.budget}, d={rows[0].num_explore}, "
         f"{args.batches} batches × {args.runs} runs, {report['elapsed_s']} s"),
        format_table(rows), "allocation ms for 256 prompts: " + ", ".join(f"{m} {t:.1f}" for m, t in timings.items())])
    return 0
