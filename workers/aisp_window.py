"""Adaptive AISP across a window: AISP iterations shared out within one rollout budget.

As AdaBoN shares out samples between the prompts of a window, ``WindowSchedule`` shares out
iterations: the first round explores every prompt; each later round gives one more iteration to
the prompts whose reward is still rising, at most ``share`` of the window per round, until the
window's budget is spent. The ranking (``rank_rising``) is a pure function:

    gain_j = max(best_1..j) − max(best_1..j−1)     rise of the running best at a prompt's last iteration
    trend_j = mean_j − mean_(j−1)                  rise of its iteration mean (tie-break)

Prompts with the larger (gain, trend) go first; a prompt left out keeps its numbers and may come
back in a later round. The last round may leave fewer than n rollouts of the budget unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.aisp import AispConfig, AispRequest, AispResult, run_aisp

if TYPE_CHECKING:
    from workers.models import Policy
    from workers.reward import RewardModel

__all__ = ["WindowSchedule", "rank_rising", "rising_score", "run_aisp_window"]


def rising_score(iteration_best: Sequence[float], iteration_mean: Sequence[float]) -> tuple[float, float]:
    """(gain of the running best at the last iteration, rise of the iteration mean); (inf, inf) before any."""
    if not iteration_best:
        return math.inf, math.inf
    if len(iteration_best) == 1:
        return 0.0, 0.0
    gain = max(iteration_best) - max(iteration_best[:-1])
    return gain, iteration_mean[-1] - iteration_mean[-2]


def rank_rising(scores: Sequence[tuple[float, float]]) -> list[int]:
    """Indices by descending (gain, trend); earlier index first among equals."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i][0], -scores[i][1], i))


@dataclass(slots=True)
class WindowSchedule:
    """``run_aisp``'s schedule for a window: ``budget`` rollouts over all its prompts together."""

    budget: int  # rollouts for the whole window
    num_prompts: int  # prompts in the window
    share: float = 0.5  # at most this share of the window's prompts runs each round after the first
    used: int = 0  # rollouts spent so far
    rounds: list[int] = field(default_factory=list)  # prompts run in each round after the first

    def first_round(self, num_rollouts: Sequence[int]) -> None:
        self.used = sum(num_rollouts)
        if self.used > self.budget:
            raise ValueError(f"window budget {self.budget} is below one iteration of every prompt ({self.used})")

    def __call__(self, results: list[AispResult], num_rollouts: list[int]) -> set[str]:
        remaining = self.budget - self.used
        per_round = max(1, math.ceil(self.share * self.num_prompts))
        scores = [rising_score(r.iteration_best, r.iteration_mean) for r in results]
        chosen: list[int] = []
        spent = 0
        for i in rank_rising(scores):
            if len(chosen) == per_round:
                break
            if spent + num_rollouts[i] <= remaining:
                chosen.append(i)
                spent += num_rollouts[i]
        self.used += spent
        if chosen:
            self.rounds.append(len(chosen))
        return {results[i].key for i in chosen}


def run_aisp_window(policy: Policy, reward: RewardModel, requests: Sequence[AispRequest], config: AispConfig,
                    *, budget: int, share: float = 0.5, max_batch: int = 64,
                    **kwargs: Any) -> tuple[list[AispResult], WindowSchedule]:
    """AISP over a window sharing ``budget`` rollouts; each request's ``budget`` caps its own rollouts.

    Every request runs one iteration (its n = min(config n, its budget)), then ``WindowSchedule``
    hands out the rest. Returns the results (requests' order) and the schedule (rounds, rollouts used).
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    schedule = WindowSchedule(budget, len(requests), share)
    schedule.first_round([min((r.config or config).num_rollouts, r.budget) for r in requests])
    results = run_aisp(policy, reward, requests, config, max_batch=max_batch, schedule=schedule, **kwargs)
    return results, schedule
