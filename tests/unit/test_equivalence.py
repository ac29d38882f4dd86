"""Budget equivalence and saving: hand-computed crossings, censoring and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from middleware.bench.equivalence import (
    budget_equivalence,
    budget_needed,
    crossing,
    median_interval,
    saving_from_needed,
)


def test_crossing_interpolates_and_censors() -> None:
    xs, ys = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])
    assert crossing(xs, ys, 25.0) == (2.5, None)
    assert crossing(xs, ys, 20.0) == (2.0, None)
    assert crossing(xs, ys, 5.0) == (1.0, "below")
    assert crossing(xs, ys, 31.0) == (3.0, "above")


def test_budget_equivalence_reads_the_uniform_curve() -> None:
    # uniform total grows by 1 per sample; the method at B = 4 scores like uniform at 5: 1.25 × B
    curve = np.tile(np.arange(1, 9, dtype=np.float64), (6, 1))  # (batches, 2B)
    method = np.full(6, 5.0)
    result = budget_equivalence(method, curve, 4, rng=np.random.default_rng(0), num_bootstrap=50)
    assert result.value == pytest.approx(1.25) and result.low == pytest.approx(1.25) and result.censored is None
    beyond = budget_equivalence(np.full(6, 99.0), curve, 4, rng=np.random.default_rng(0), num_bootstrap=20)
    assert beyond.value == pytest.approx(2.0) and beyond.censored == "above"


def test_budget_saving_reads_the_method_curve_and_has_an_interval() -> None:
    rng = np.random.default_rng(1)
    grid = np.array([8, 12, 16, 20])
    noise = rng.normal(0, 0.5, (40, 1))
    method = grid[None, :] + 4.0 + noise  # method at b equals uniform at b + 4
    uniform_at_budget = np.full(40, 16.0) + noise[:, 0]  # uniform at B = 16
    needed = budget_needed(method, grid, uniform_at_budget, 16, rng=np.random.default_rng(0), num_bootstrap=200)
    assert needed.value == pytest.approx(12 / 16, abs=1e-9)
    saving = saving_from_needed(needed)
    assert saving.value == pytest.approx(0.25) and saving.low <= 0.25 <= saving.high
    assert saving_from_needed(type(needed)(1.25, 1.2, 1.25, "above")).censored == "below"


def test_median_interval_covers_the_median() -> None:
    values = np.random.default_rng(0).normal(0.55, 0.05, 60)
    interval = median_interval(values, rng=np.random.default_rng(0), num_bootstrap=300)
    assert interval.low <= np.median(values) <= interval.high and interval.high - interval.low < 0.05
