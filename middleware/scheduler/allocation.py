"""Prompt-adaptive Best-of-N allocation (AdaBoN): how a window's stage-2 samples are shared out.

Pure numpy, no I/O. A window holds K prompts; prompt i explored d_i samples (rewards r_i) of its
budget B_i, and the window's remaining T = Σ max(0, B_i - d_i) samples go where they raise the
expected best reward most. For prompt i with best-so-far c_i and an estimated reward distribution
X_i, V_i[j] = E[max(c_i, X_1..X_j)]; greedy hands out the T samples one at a time to the largest
marginal gain Δ_i[j] = V_i[j+1] - V_i[j] (a heap, O(T log K)), optimal when every V_i is concave.

Allocators (``ALLOCATORS``):
    uniform          every prompt spends its own remaining budget (plain Best-of-N)
    adabon-mc        the paper: Gaussian KDE (Scott's bandwidth), V by Monte Carlo (m = 1024 draws,
                     running maxima of the same draws)
    adabon-integral  the paper's KDE, V by the deterministic integral c + ∫_c^∞ (1 - F^j) dx on a grid
    adabon-gauss     one Gaussian per prompt (mean, std of its rewards), integral
    adabon-eb        empirical Bayes over the window: 0/1 rewards use a Beta-Bernoulli posterior and the
                     exact E[max] of a Bernoulli; otherwise the window's pooled shape (standardised
                     residuals) with each prompt's mean and a scale shrunk toward the window's by evidence
    adabon           the recommended default, chosen by ``alignq bench allocation`` (see README):
                     adabon-eb, with cap_factor 1.25 on continuous rewards unless one is given

A ``prior`` (``middleware.scheduler.prior.WindowPrior``: each prompt's predicted spread and mean, or
success rate, learned from past traffic) replaces the window's own prior in ``adabon-eb``/``adabon``:
the scale shrinks toward the predicted one, the mean toward the predicted mean, and 0/1 rewards start
from the predicted Beta. With it, fewer explore samples suffice (a smaller ``explore_fraction``).

Options for every adaptive allocator: ``floor_fraction`` (each prompt gets at least this share of its
own remaining budget), ``cap_factor`` (no prompt ends with more than cap_factor · B_i samples).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from middleware.scheduler.value_vectors import (
    ABSOLUTE_BANDWIDTH_FLOOR,
    GRID_SPAN_STDS,
    BernoulliGains,
    EmpiricalGains,
    GainFn,
    KdeMonteCarloGains,
    MixtureGains,
    kde_bandwidth,
    normal_cdf,
    value_vector,
)

__all__ = ["ALLOCATORS", "BernoulliGains", "EmpiricalGains", "KdeMonteCarloGains", "MixtureGains", "allocate",
           "greedy_allocate", "is_bernoulli", "kde_bandwidth", "normal_cdf", "num_explore_samples", "plan_window",
           "value_vector"]

if TYPE_CHECKING:
    from middleware.scheduler.prior import WindowPrior

logger = logging.getLogger(__name__)

PAPER_ALLOCATORS = ("adabon-mc", "adabon-integral")
OUR_ALLOCATORS = ("adabon-gauss", "adabon-eb")
DEFAULT_ALLOCATOR = "adabon-eb"  # chosen by benchmark: examples/pools/bench/README.md
#: ``adabon`` caps continuous-reward prompts at this multiple of their budget (bench: >= null on the preference pool)
DEFAULT_CONTINUOUS_CAP_FACTOR = 1.25
ALLOCATORS: tuple[str, ...] = ("uniform", *PAPER_ALLOCATORS, *OUR_ALLOCATORS, "adabon")

RELATIVE_BANDWIDTH_FLOOR = 1e-3  # of the window's reward std: identical rewards keep a finite KDE
NUM_SHAPE_QUANTILES = 32



def num_explore_samples(budget: int, explore_fraction: float) -> int:
    """d = min(B, max(2, round(f·B))); 1 when B == 1."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not 0.0 < explore_fraction <= 1.0:
        raise ValueError(f"explore_fraction must be in (0, 1], got {explore_fraction}")
    if budget == 1:
        return 1
    return min(budget, max(2, round(explore_fraction * budget)))


# ---------------------------------------------------------------- greedy allocation


def greedy_allocate(gains: GainFn, num_prompts: int, total: int, *, floors: np.ndarray | None = None,
                    caps: np.ndarray | None = None, initial_length: int = 16) -> np.ndarray:
    """Hand out ``total`` samples one at a time to the largest Δ_i[a_i] (ties: the prompt with fewer).

    Gains are fetched lazily per prompt in doubling blocks, so a window of 256 prompts computes only
    the part of each value vector the allocation reaches. Σ a_i == total always: once every prompt is
    at its cap, the rest is spread evenly (caps are a preference, the budget is a promise).
    """
    counts = np.zeros(num_prompts, dtype=np.int64) if floors is None else floors.astype(np.int64).copy()
    limits = np.full(num_prompts, total, dtype=np.int64) if caps is None else np.maximum(caps, counts)
    remaining = total - int(counts.sum())
    if remaining < 0:
        raise ValueError("per-prompt floors exceed the samples left in the window")
    if getattr(gains, "is_concave", False) and remaining > 0:
        counts = _select_largest_gains(gains, counts, limits, remaining)  # type: ignore[arg-type]
        return _spread_rest(counts, total)
    cache: list[list[float]] = [[] for _ in range(num_prompts)]

    def gain_at(i: int, j: int) -> float:
        known = cache[i]
        if j >= len(known):
            stop = min(int(limits[i]), max(j + 1, 2 * len(known), initial_length))
            known.extend(np.asarray(gains(i, len(known), stop), dtype=np.float64).tolist())
        return known[j]

    heap = [(-gain_at(i, int(counts[i])), int(counts[i]), i) for i in range(num_prompts) if counts[i] < limits[i]]
    heapq.heapify(heap)
    while remaining > 0 and heap:
        _, count, i = heapq.heappop(heap)
        counts[i] = count + 1
        remaining -= 1
        if count + 1 < limits[i]:
            heapq.heappush(heap, (-gain_at(i, count + 1), count + 1, i))
    return _spread_rest(counts, total)


def _spread_rest(counts: np.ndarray, total: int) -> np.ndarray:
    """Every prompt at its cap and samples left: hand them out round-robin, fewest first."""
    for offset in range(total - int(counts.sum())):
        counts[np.argmin(counts)] += 1
    return counts


def _select_largest_gains(gains: MixtureGains, counts: np.ndarray, limits: np.ndarray, remaining: int) -> np.ndarray:
    """Greedy for non-increasing Δ rows, vectorised: the ``remaining`` largest Δ_i[j], j in [floor_i, cap_i).

    With every row non-increasing, popping a heap keyed (-Δ, j, i) visits entries in the global sorted
    order of that key, so one lexsort gives the heap's answer. Rows start at a common length; a row
    whose pick reaches the end of what is known (and not its cap) may have more to give: extend only
    those rows and select again. Every other row can only lose picks from then on, so only its
    chosen entries stay candidates.
    """
    num_prompts = counts.size
    limits = np.minimum(limits, counts + remaining)  # no row can take more than what is left
    length = int(min(limits.max(), max(16, 2 * -(-remaining // num_prompts) + int(counts.max()) + 1)))
    known = list(gains.block(np.arange(num_prompts), 0, length))  # Δ_i[0 : len(known[i])]
    computed = np.full(num_prompts, length)
    upper = np.minimum(limits, computed)  # candidates: counts_i <= j < upper_i
    prompt_ids = np.arange(num_prompts)
    while True:
        sizes = np.maximum(upper - counts, 0)
        values = np.concatenate([known[i][counts[i] : upper[i]] for i in range(num_prompts)])
        rows = np.repeat(prompt_ids, sizes)
        cols = np.arange(values.size) - np.repeat(np.cumsum(sizes) - sizes, sizes) + counts[rows]
        order = np.lexsort((rows, cols, -values))[:remaining]
        chosen = counts + np.bincount(rows[order], minlength=num_prompts)
        saturated = np.flatnonzero((chosen >= computed) & (chosen < limits))
        if saturated.size == 0:
            return chosen
        upper = np.minimum(upper, chosen)
        stop = int(min(limits.max(), int(counts.max()) + remaining, 4 * int(computed.max())))
        for start in np.unique(computed[saturated]):
            extend = saturated[computed[saturated] == start]
            for i, row in zip(extend, gains.block(extend, int(start), stop)):
                known[i] = np.concatenate([known[i], row])
        computed[saturated] = stop
        upper[saturated] = np.minimum(limits[saturated], stop)


# ---------------------------------------------------------------- per-method value models


class WindowStats:
    """Per-prompt summaries of a window's explore rewards, vectorised (padded to the longest d_i)."""

    def __init__(self, explore: Sequence[np.ndarray]) -> None:
        self.explore = explore
        self.sizes = np.array([r.size for r in explore], dtype=np.int64)
        width = max(1, int(self.sizes.max()))
        self.mask = np.arange(width)[None, :] < self.sizes[:, None]  # (K, D)
        self.values = np.zeros((len(explore), width))
        for i, r in enumerate(explore):
            self.values[i, : r.size] = r
        if not np.all(np.isfinite(self.values)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(self.values), axis=1))[0])
            raise ValueError(f"explore rewards of prompt {bad} contain NaN or inf: "
                             "the reward model must return finite numbers")
        self.pooled = self.values[self.mask] if self.mask.any() else np.zeros(1)
        self.is_bernoulli = bool(self.mask.any()) and bool(np.all((self.pooled == 0.0) | (self.pooled == 1.0)))
        pooled_std = float(self.pooled.std())
        self.bandwidth_floor = max(RELATIVE_BANDWIDTH_FLOOR * pooled_std, ABSOLUTE_BANDWIDTH_FLOOR)
        counts = np.maximum(self.sizes, 1)
        sums = np.where(self.mask, self.values, 0.0).sum(axis=1)
        self.means = np.where(self.sizes > 0, sums / counts, self.pooled.mean())
        squares = np.where(self.mask, (self.values - self.means[:, None]) ** 2, 0.0).sum(axis=1)
        self.stds = np.where(self.sizes > 1, np.sqrt(squares / np.maximum(self.sizes - 1, 1)), 0.0)
        maxima = np.where(self.mask, self.values, -np.inf).max(axis=1)
        self.best = np.where(self.sizes > 0, maxima, self.pooled.min())  # c_i (no samples: the window's worst)


def _kde_gains(stats: WindowStats, monte_carlo: bool, rng: np.random.Generator) -> GainFn:
    # a prompt with no samples yet: the window's rewards stand in for its own
    explore = [r if r.size else stats.pooled for r in stats.explore]
    sizes = np.array([r.size for r in explore])
    stds = np.array([r.std(ddof=1) if r.size > 1 else 0.0 for r in explore]) if (stats.sizes == 0).any() else stats.stds
    bandwidths = np.maximum(stds * sizes.astype(np.float64) ** -0.2, stats.bandwidth_floor)  # Scott's rule
    if monte_carlo:
        return KdeMonteCarloGains(explore, bandwidths, stats.best, rng)
    width = int(sizes.max())
    means, weights = np.zeros((len(explore), width)), np.zeros((len(explore), width))
    for i, r in enumerate(explore):
        means[i, : r.size], weights[i, : r.size] = r, 1.0 / r.size
    return MixtureGains.from_components(means, np.broadcast_to(bandwidths[:, None], means.shape), weights, stats.best)


def _gauss_gains(stats: WindowStats) -> GainFn:
    fallback = max(float(stats.pooled.std()), stats.bandwidth_floor)
    stds = np.where(stats.sizes > 1, np.maximum(stats.stds, stats.bandwidth_floor), fallback)
    return MixtureGains.from_shape(normal_cdf, GRID_SPAN_STDS, stats.means, stds, stats.best)


def is_bernoulli(explore: Sequence[np.ndarray]) -> bool:
    """Every reward of the window is 0 or 1 (a verifiable reward)."""
    pooled = np.concatenate([r for r in explore if r.size] or [np.zeros(0)])
    return pooled.size > 0 and bool(np.all((pooled == 0.0) | (pooled == 1.0)))


def _beta_prior(successes: np.ndarray, trials: np.ndarray) -> tuple[float, float]:
    """Method-of-moments Beta prior over the window's success rates (Jeffreys when it cannot be fitted)."""
    seen = trials > 0
    if seen.sum() < 2:
        return 0.5, 0.5
    rates = successes[seen] / trials[seen]
    mean = float(np.clip(rates.mean(), 0.02, 0.98))
    between = float(rates.var(ddof=1) - np.mean(rates * (1 - rates) / trials[seen]))
    if between <= 1e-6:
        return 0.5, 0.5
    strength = float(np.clip(mean * (1 - mean) / between - 1.0, 0.5, 100.0))
    return mean * strength, (1 - mean) * strength


def _shape_cdf(residuals: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """CDF of a KDE of the window's standardised residuals, tabulated once and interpolated."""
    levels = (np.arange(NUM_SHAPE_QUANTILES) + 0.5) / NUM_SHAPE_QUANTILES
    centres = np.quantile(residuals, levels)
    width = kde_bandwidth(residuals, 1e-3)
    upper = float(centres.max() + GRID_SPAN_STDS * width)
    table_x = np.linspace(float(centres.min() - GRID_SPAN_STDS * width), upper, 1024)
    table_cdf = normal_cdf((table_x[:, None] - centres[None, :]) / width).mean(axis=1)
    return (lambda z: np.interp(z, table_x, table_cdf, left=0.0, right=1.0)), upper


def _eb_gains(stats: WindowStats, prior: WindowPrior | None = None) -> GainFn:
    if stats.is_bernoulli:
        successes = np.where(stats.mask, stats.values, 0.0).sum(axis=1)
        trials = stats.sizes.astype(np.float64)
        alpha0: np.ndarray | float
        beta0: np.ndarray | float
        if prior is not None and prior.alpha is not None and prior.beta is not None:
            alpha0, beta0 = prior.alpha, prior.beta  # predicted per prompt, from past traffic
        else:
            alpha0, beta0 = _beta_prior(successes, trials)
        return BernoulliGains(alpha0 + successes, beta0 + trials - successes, successes > 0)
    floor, sizes, means, stds = stats.bandwidth_floor, stats.sizes, stats.means, stats.stds
    spread = (sizes > 1) & (stds > floor)
    # 1. shape: the window's standardised residuals (K·d points: far more evidence than one prompt's d)
    if spread.any():
        residuals = ((stats.values - means[:, None]) / np.where(spread, stds, 1.0)[:, None])[stats.mask & spread[:, None]]
        shape_cdf, shape_upper = _shape_cdf(residuals)
        kurtosis = float(np.clip(np.mean(residuals**4) / max(np.mean(residuals**2) ** 2, 1e-12), 1.5, 20.0))
    else:
        (shape_cdf, shape_upper), kurtosis = (normal_cdf, GRID_SPAN_STDS), 3.0
    # 2. scale: log s_i² has sampling variance ≈ (κ - (d-3)/(d-1)) / d; shrink toward the window's mean
    d = np.maximum(sizes, 2).astype(np.float64)
    noise = (kurtosis - (d - 3) / (d - 1)) / d
    log_var = np.log(np.maximum(stds, floor) ** 2)
    if spread.sum() >= 2:
        centre = float(log_var[spread].mean())
        between = max(0.0, float(log_var[spread].var(ddof=1) - noise[spread].mean()))
    elif spread.any():
        centre, between = float(log_var[spread].mean()), 0.0
    else:
        centre, between = float(np.log(max(float(stats.pooled.std()), floor) ** 2)), 0.0
    if prior is not None and prior.log_var_mean is not None and prior.log_var_var is not None:
        # the predicted log σ² (from past traffic) is the centre, its predictive variance the between-prompt part
        weight = np.where(sizes > 1, prior.log_var_var / (prior.log_var_var + noise), 0.0)
        scale = np.exp(0.5 * (prior.log_var_mean + weight * (log_var - prior.log_var_mean)))
        if prior.loc_mean is not None and prior.loc_var is not None:
            own_var = scale**2 / np.maximum(sizes, 1)  # variance of a prompt's explore mean
            loc_weight = np.where(sizes > 0, prior.loc_var / (prior.loc_var + own_var), 0.0)
            means = prior.loc_mean + loc_weight * (means - prior.loc_mean)
        return MixtureGains.from_shape(shape_cdf, shape_upper, means, scale, stats.best)
    weight = np.where(sizes > 1, between / (between + noise), 0.0)
    scale = np.exp(0.5 * (centre + weight * (log_var - centre)))
    return MixtureGains.from_shape(shape_cdf, shape_upper, means, scale, stats.best)


def build_gains(stats: WindowStats, method: str, rng: np.random.Generator,
                prior: WindowPrior | None = None) -> GainFn:
    """The marginal-gain function of an adaptive allocator (``method`` in ALLOCATORS, not uniform).

    ``prior`` is used by ``adabon-eb`` (and ``adabon``); the paper's and ``adabon-gauss`` ignore it.
    """
    if method == "adabon":
        method = DEFAULT_ALLOCATOR
    if method in ("adabon-mc", "adabon-integral"):
        return _kde_gains(stats, method == "adabon-mc", rng)
    if method == "adabon-gauss":
        return _gauss_gains(stats)
    if method == "adabon-eb":
        return _eb_gains(stats, prior)
    raise ValueError(f"unknown allocator {method!r}: choose one of {', '.join(ALLOCATORS)}")


# ---------------------------------------------------------------- the window plan


def allocate(explore: Sequence[Sequence[float]], remaining: Sequence[int] | np.ndarray, *, method: str = "adabon",
             seed: int | np.random.Generator = 0, floor_fraction: float = 0.0,
             cap_factor: float | None = None, prior: WindowPrior | None = None) -> np.ndarray:
    """Stage-2 samples per prompt (array form of ``plan_window``): Σ a_i == Σ remaining_i."""
    if method not in ALLOCATORS:
        raise ValueError(f"unknown allocator {method!r}: choose one of {', '.join(ALLOCATORS)}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")
    if cap_factor is not None and cap_factor < 1.0:
        raise ValueError(f"cap_factor must be >= 1 (a prompt may always spend its own budget), got {cap_factor}")
    rewards = [np.asarray(r, dtype=np.float64).ravel() for r in explore]
    if not rewards:
        return np.zeros(0, dtype=np.int64)
    stats = WindowStats(rewards)  # checks the rewards are finite
    left = np.maximum(np.asarray(remaining, dtype=np.int64), 0)
    total = int(left.sum())
    if method == "uniform" or len(rewards) <= 1 or total == 0:
        return left.copy()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if method == "adabon" and cap_factor is None and not is_bernoulli(rewards):
        # On continuous rewards a few dozen explore samples barely see each prompt's spread: the cap
        # keeps estimation noise from pulling many samples away from any prompt (never below the null).
        cap_factor = DEFAULT_CONTINUOUS_CAP_FACTOR
    floors = np.floor(floor_fraction * left).astype(np.int64)
    caps = None
    if cap_factor is not None:
        sizes = np.array([r.size for r in rewards])
        caps = np.maximum(np.floor(cap_factor * (sizes + left)).astype(np.int64) - sizes, floors)
    return greedy_allocate(build_gains(stats, method, rng, prior), len(rewards), total, floors=floors, caps=caps)


def plan_window(explore_rewards: Mapping[str, Sequence[float]], budgets: Mapping[str, int], *,
                method: str = "adabon", seed: int = 0, **options: float | None) -> dict[str, int]:
    """a_i >= 0 per key, Σ a_i == Σ max(0, budgets[i] - len(explore_rewards[i])).

    Raises ValueError on NaN/inf rewards, a key missing from ``budgets``, or an unknown method.
    Options: ``floor_fraction``, ``cap_factor`` (see the module docstring).
    """
    keys = list(explore_rewards)
    missing = [k for k in keys if k not in budgets]
    if missing:
        raise ValueError(f"no budget for {missing[:3]}: every explored key needs a budget")
    explore = [explore_rewards[k] for k in keys]
    remaining = [budgets[k] - len(explore_rewards[k]) for k in keys]
    counts = allocate(explore, remaining, method=method, seed=seed, **options)  # type: ignore[arg-type]
    return {k: int(a) for k, a in zip(keys, counts)}
