"""Budget equivalence of an allocator against uniform Best-of-N, with bootstrap intervals over batches.

Pure numpy, no I/O. Inputs are per-batch means over runs of the batch total Σ_i max reward:

    uniform_curve   (batches, N_max)  uniform Best-of-N with N = 1..N_max samples per prompt
    method_at       (batches, G)      the allocator at the budgets ``grid`` (one of them B)

Two figures (the paper's second claim: adaptive at B matches uniform at ≈ 1.2 B):

    budget_equivalence = N* / B   where the mean uniform total at N* equals the method's at B
    budget_needed      = b* / B   where the method's mean total at b* equals uniform's at B
    budget_saving      = 1 - budget_needed   (the share of B that adaptive does not need)

Both are read off piecewise-linear curves of the mean total over batches, so the intervals come from
resampling batches (the prompts), not runs. A crossing outside the measured range is censored: the
figure is then the range's end, and ``censored`` says which side (``"above"`` or ``"below"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_BOOTSTRAP = 1000
CONFIDENCE = 0.95


@dataclass(slots=True)
class Interval:
    value: float
    low: float
    high: float
    censored: str | None = None  # "above": the crossing lies past the largest budget measured; "below": before the smallest

    def as_list(self) -> list[float]:
        return [round(self.value, 4), round(self.low, 4), round(self.high, 4)]


def crossing(xs: np.ndarray, ys: np.ndarray, target: float) -> tuple[float, str | None]:
    """Smallest x where the piecewise-linear curve (xs, ys) reaches ``target`` (xs increasing).

    Returns (x, None), or (xs[0], "below") when ys[0] already reaches it, (xs[-1], "above") when no point does.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if ys[0] >= target:
        return float(xs[0]), "below"
    above = np.flatnonzero(ys >= target)
    if above.size == 0:
        return float(xs[-1]), "above"
    j = int(above[0])
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0)), None


def _bootstrap_indices(num_batches: int, rng: np.random.Generator, num_bootstrap: int) -> np.ndarray:
    return rng.integers(0, num_batches, size=(num_bootstrap, num_batches))  # (S, batches)


def _interval(point: tuple[float, str | None], samples: np.ndarray, scale: float) -> Interval:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return Interval(point[0] / scale, float(low) / scale, float(high) / scale, point[1])


def budget_equivalence(method_at_budget: np.ndarray, uniform_curve: np.ndarray, budget: int, *,
                       rng: np.random.Generator, num_bootstrap: int = NUM_BOOTSTRAP) -> Interval:
    """N*/B: the uniform budget (multiple of B) whose mean batch total equals the method's at B."""
    method_at_budget, uniform_curve = np.asarray(method_at_budget), np.asarray(uniform_curve)
    sizes = np.arange(1, uniform_curve.shape[1] + 1)
    point = crossing(sizes, uniform_curve.mean(axis=0), float(method_at_budget.mean()))
    index = _bootstrap_indices(method_at_budget.size, rng, num_bootstrap)
    curves, targets = uniform_curve[index].mean(axis=1), method_at_budget[index].mean(axis=1)  # (S, N), (S,)
    samples = np.array([crossing(sizes, c, t)[0] for c, t in zip(curves, targets)])
    return _interval(point, samples, budget)


def budget_needed(method_at: np.ndarray, grid: np.ndarray, uniform_at_budget: np.ndarray, budget: int, *,
                  rng: np.random.Generator, num_bootstrap: int = NUM_BOOTSTRAP) -> Interval:
    """b*/B: the method's budget (multiple of B) whose mean batch total equals uniform's at B.

    ``method_at`` (batches, G) at the increasing budgets ``grid``; ``uniform_at_budget`` (batches,).
    """
    method_at, uniform_at_budget, grid = np.asarray(method_at), np.asarray(uniform_at_budget), np.asarray(grid)
    point = crossing(grid, method_at.mean(axis=0), float(uniform_at_budget.mean()))
    index = _bootstrap_indices(uniform_at_budget.size, rng, num_bootstrap)
    curves, targets = method_at[index].mean(axis=1), uniform_at_budget[index].mean(axis=1)
    samples = np.array([crossing(grid, c, t)[0] for c, t in zip(curves, targets)])
    return _interval(point, samples, budget)


def saving_from_needed(needed: Interval) -> Interval:
    """budget_saving = 1 - budget_needed (its interval flips; censoring flips side)."""
    side = {"above": "below", "below": "above"}.get(needed.censored or "")
    return Interval(1 - needed.value, 1 - needed.high, 1 - needed.low, side)


def median_interval(values: np.ndarray, *, rng: np.random.Generator, num_bootstrap: int = NUM_BOOTSTRAP) -> Interval:
    """The median over batches with a percentile-bootstrap interval (resampling batches)."""
    values = np.asarray(values, dtype=np.float64)
    index = _bootstrap_indices(values.size, rng, num_bootstrap)
    return _interval((float(np.median(values)), None), np.median(values[index], axis=1), 1.0)
