"""The statistics of ``alignq bench aisp``: best-so-far curves and bootstrap intervals over prompts.

Pure functions on per-(seed, prompt) reward lists in rollout order; runs are grouped seed by seed,
``num_prompts`` each (run index = seed * num_prompts + prompt). Prompts are the unit of resampling:

    best_p(r)       mean over seeds of the max of prompt p's first r rewards
    diff_p(r)       best_p(r) of method A − best_p(r) of method B (same prompts, same seeds)
    ci95            2.5 and 97.5 percentiles of the mean of diff_p over prompts drawn with replacement
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["best_curve", "bootstrap_mean_ci", "paired_diff", "per_prompt_best", "rollouts_to_match", "summarize"]

BOOTSTRAP_SAMPLES = 2000


def best_curve(runs: Sequence[Sequence[float]]) -> list[float]:
    """Mean over runs of the running max: element r-1 is E[best of the first r rewards]."""
    length = min(len(rewards) for rewards in runs)
    totals = [0.0] * length
    for rewards in runs:
        best = float("-inf")
        for r in range(length):
            best = max(best, rewards[r])
            totals[r] += best
    return [total / len(runs) for total in totals]


def per_prompt_best(runs: Sequence[Sequence[float]], num_prompts: int, rollouts: int) -> list[float]:
    """best_p(rollouts) for each prompt p: the max of its first ``rollouts`` rewards, mean over seeds."""
    if len(runs) % num_prompts:
        raise ValueError(f"{len(runs)} runs is not a whole number of seeds of {num_prompts} prompts")
    num_seeds = len(runs) // num_prompts
    return [statistics.fmean(max(runs[s * num_prompts + p][:rollouts]) for s in range(num_seeds))
            for p in range(num_prompts)]


def bootstrap_mean_ci(values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> list[float]:
    """[2.5%, 97.5%] percentile interval of the mean of ``values`` resampled with replacement."""
    if not values:
        raise ValueError("bootstrap needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return [means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]]


def paired_diff(runs_a: Sequence[Sequence[float]], runs_b: Sequence[Sequence[float]], num_prompts: int,
                rollouts_a: int, rollouts_b: int | None = None) -> dict[str, Any]:
    """Mean over prompts of best_p(A, rollouts_a) − best_p(B, rollouts_b), its interval and per-prompt wins."""
    a = per_prompt_best(runs_a, num_prompts, rollouts_a)
    b = per_prompt_best(runs_b, num_prompts, rollouts_a if rollouts_b is None else rollouts_b)
    diffs = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.fmean(diffs), "ci95": bootstrap_mean_ci(diffs),
            "prompts_ahead": sum(d > 0 for d in diffs), "prompts_behind": sum(d < 0 for d in diffs)}


def rollouts_to_match(curve: Sequence[float], target: float) -> int | None:
    """Smallest r with curve[r-1] >= target; None if never."""
    return next((r + 1 for r, value in enumerate(curve) if value >= target), None)


def summarize(aisp_runs: Sequence[Sequence[float]], bon_runs: Sequence[Sequence[float]], n: int, k: int,
              num_prompts: int | None = None) -> dict[str, Any]:
    """Curves and the headline numbers; with ``num_prompts``, AISP − BoN per iteration with its interval."""
    aisp, bon = best_curve(aisp_runs), best_curve(bon_runs)
    total = n * k
    target = bon[total - 1]
    curve = []
    for j in range(1, k + 1):
        point: dict[str, Any] = {"rollouts": j * n, "aisp_best_mean": aisp[j * n - 1], "bon_best_mean": bon[j * n - 1]}
        if num_prompts is not None:
            diff = paired_diff(aisp_runs, bon_runs, num_prompts, j * n)
            point.update(diff_mean=diff["mean"], diff_ci95=diff["ci95"])
        curve.append(point)
    summary: dict[str, Any] = {
        "aisp_best_mean": aisp[total - 1],
        "bon_best_mean": target,
        "rollouts_to_match_bon": rollouts_to_match(aisp[:total], target),
        "curve": curve,
        "aisp_best_by_rollout": aisp[:total],
        "bon_best_by_rollout": bon[:total],
    }
    if num_prompts is not None:
        summary["diff_mean"] = curve[-1]["diff_mean"]
        summary["diff_ci95"] = curve[-1]["diff_ci95"]
        diff = paired_diff(aisp_runs, bon_runs, num_prompts, total)
        summary["prompts_ahead"], summary["prompts_behind"] = diff["prompts_ahead"], diff["prompts_behind"]
    return summary
