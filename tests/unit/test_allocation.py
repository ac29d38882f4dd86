"""AdaBoN allocation math against hand-computed numbers (pure numpy, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from middleware.scheduler.allocation import (
    ALLOCATORS,
    BernoulliGains,
    KdeMonteCarloGains,
    MixtureGains,
    allocate,
    greedy_allocate,
    kde_bandwidth,
    normal_cdf,
    num_explore_samples,
    plan_window,
    value_vector,
)


@pytest.mark.parametrize(
    ("budget", "fraction", "expected"),
    [(32, 0.75, 24), (1, 0.75, 1), (2, 0.1, 2), (10, 1.0, 10), (16, 0.75, 12), (3, 0.1, 2), (100, 0.25, 25)],
)
def test_num_explore_samples(budget: int, fraction: float, expected: int) -> None:
    assert num_explore_samples(budget, fraction) == expected


def test_num_explore_samples_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="budget"):
        num_explore_samples(0, 0.5)
    with pytest.raises(ValueError, match="explore_fraction"):
        num_explore_samples(8, 0.0)


def test_normal_cdf_matches_erf() -> None:
    z = np.linspace(-8, 8, 161)
    exact = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in z])
    assert np.allclose(normal_cdf(z), exact, rtol=2e-7, atol=1e-300)


def _expected_bernoulli_total(p: tuple[float, float], explore: int, budget: int, method: str) -> float:
    """E[number of prompts solved] when each prompt explores ``explore`` samples, then stage 2 is planned."""
    total = 0.0
    for solved in itertools.product([False, True], repeat=2):
        case_probability = math.prod((1 - (1 - q) ** explore) if s else (1 - q) ** explore for q, s in zip(p, solved))
        rewards = {f"p{i}": ([1.0] + [0.0] * (explore - 1)) if s else [0.0] * explore for i, s in enumerate(solved)}
        plan = plan_window(rewards, {"p0": budget, "p1": budget}, method=method)
        assert sum(plan.values()) == 2 * (budget - explore)
        for i, (q, s) in enumerate(zip(p, solved)):
            total += case_probability * (1.0 if s else 1 - (1 - q) ** plan[f"p{i}"])
    return total


def test_paper_two_bernoulli_example() -> None:
    # the paper's motivating example: p = 0.95 and 0.05, d = 10, B = 25
    assert _expected_bernoulli_total((0.95, 0.05), 10, 25, "uniform") == pytest.approx(1.7226, abs=1e-3)
    assert _expected_bernoulli_total((0.95, 0.05), 10, 25, "adabon-eb") == pytest.approx(1.8715, abs=1e-3)
    assert plan_window({"easy": [1.0] * 10, "hard": [0.0] * 10}, {"easy": 25, "hard": 25}) == {"easy": 0, "hard": 30}


def test_bernoulli_value_vector_uniform_prior_is_j_over_j_plus_1() -> None:
    # p ~ Beta(1, 1): E[(1 - p)^j] = 1 / (j + 1), so V[j] = j / (j + 1)
    gains = BernoulliGains(np.array([1.0]), np.array([1.0]), np.array([False]))
    values = value_vector(gains, 0, 0.0, 10)
    assert np.allclose(values, [j / (j + 1) for j in range(11)])


def _brute_force_best(values: list[np.ndarray], total: int) -> float:
    best = -math.inf
    for split in itertools.product(range(total + 1), repeat=len(values)):
        if sum(split) == total:
            best = max(best, sum(v[a] for v, a in zip(values, split)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_greedy_equals_brute_force_on_concave_values(seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = int(rng.integers(1, 9))
    gains = [np.sort(rng.exponential(1.0, total))[::-1] for _ in range(3)]  # non-increasing: concave V
    values = [np.concatenate([[0.0], np.cumsum(g)]) for g in gains]
    counts = greedy_allocate(lambda i, a, b: gains[i][a:b], 3, total)
    assert counts.sum() == total
    assert sum(v[a] for v, a in zip(values, counts)) == pytest.approx(_brute_force_best(values, total))


def test_greedy_splits_ties_evenly_and_respects_floors_and_caps() -> None:
    flat = lambda i, a, b: np.zeros(b - a)
    assert greedy_allocate(flat, 4, 10).tolist() == [3, 3, 2, 2]
    steep = lambda i, a, b: np.full(b - a, 1.0 if i == 0 else 0.1)
    assert greedy_allocate(steep, 3, 9, floors=np.array([0, 2, 1])).tolist() == [6, 2, 1]
    assert greedy_allocate(steep, 3, 9, caps=np.array([4, 9, 9])).tolist() == [4, 3, 2]
    assert greedy_allocate(steep, 2, 9, caps=np.array([2, 2])).sum() == 9  # caps relax, the budget holds


def _random_window(rng: np.random.Generator, num_prompts: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    explore, budgets = {}, {}
    for i in range(num_prompts):
        budget = int(rng.integers(1, 20))
        size = int(rng.integers(1, budget + 1))
        kind = rng.integers(0, 3)
        rewards = rng.normal(0, rng.uniform(0.1, 3), size) if kind == 0 else np.full(size, 0.5) if kind == 1 \
            else (rng.random(size) < 0.3).astype(float)
        explore[f"k{i}"], budgets[f"k{i}"] = rewards.tolist(), budget
    return explore, budgets


@pytest.mark.parametrize("method", ALLOCATORS)
def test_allocation_always_spends_exactly_the_window_budget(method: str) -> None:
    rng = np.random.default_rng(7)
    for num_prompts in (1, 2, 5, 12):
        explore, budgets = _random_window(rng, num_prompts)
        plan = plan_window(explore, budgets, method=method, seed=3)
        expected = sum(max(0, budgets[k] - len(explore[k])) for k in explore)
        assert set(plan) == set(explore) and sum(plan.values()) == expected and min(plan.values()) >= 0
    # nothing left, a single sample, identical rewards, a budget smaller than the exploration
    assert plan_window({"a": [1.0, 2.0], "b": [3.0]}, {"a": 2, "b": 1}, method=method) == {"a": 0, "b": 0}
    assert sum(plan_window({"a": [0.3], "b": [0.3], "c": [0.3]}, {"a": 4, "b": 4, "c": 4}, method=method).values()) == 9
    assert plan_window({"a": [1.0, 2.0, 3.0]}, {"a": 2}, method=method) == {"a": 0}
    assert plan_window({"only": [0.1, 0.2]}, {"only": 10}, method=method) == {"only": 8}


def test_bernoulli_and_adaptive_allocators_favour_the_informative_prompt() -> None:
    rng = np.random.default_rng(0)
    wide, narrow = rng.normal(0, 1.0, 24), rng.normal(0, 0.05, 24)
    for method in ("adabon-mc", "adabon-integral", "adabon-gauss", "adabon-eb"):
        plan = plan_window({"wide": wide, "narrow": narrow}, {"wide": 32, "narrow": 32}, method=method)
        assert plan["wide"] > plan["narrow"], method


def test_floor_and_cap_options() -> None:
    explore = {"a": [0.0, 0.0, 1.0], "b": [0.0, 0.0, 0.0], "c": [0.0, 0.0, 0.0]}
    budgets = {"a": 11, "b": 11, "c": 11}
    assert plan_window(explore, budgets, method="adabon-eb") == {"a": 0, "b": 12, "c": 12}
    assert plan_window(explore, budgets, method="adabon-eb", floor_fraction=0.5)["a"] == 4
    capped = plan_window({"a": [0.0] * 3, "b": [1.0] * 3}, {"a": 11, "b": 11}, method="adabon-eb", cap_factor=1.5)
    assert capped == {"a": 13, "b": 3}  # a may end with at most 1.5 · 11 = 16 samples
    with pytest.raises(ValueError, match="cap_factor"):
        plan_window(explore, budgets, cap_factor=0.5)


def test_bad_rewards_and_methods_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        plan_window({"a": [0.1, float("nan")], "b": [0.2, 0.3]}, {"a": 8, "b": 8})
    with pytest.raises(ValueError, match="NaN or inf"):
        plan_window({"a": [0.1, float("inf")]}, {"a": 8}, method="uniform")
    with pytest.raises(ValueError, match="unknown allocator"):
        plan_window({"a": [0.1]}, {"a": 8}, method="greedy-ish")
    with pytest.raises(ValueError, match="no budget"):
        plan_window({"a": [0.1]}, {"b": 8})


def test_value_vectors_are_monotone_and_mc_agrees_with_integral() -> None:
    rewards = np.array([0.1, 0.4, 0.35, 0.9, 0.2, 0.55, 0.6, 0.3])
    best = float(rewards.max())
    bandwidth = kde_bandwidth(rewards)
    assert bandwidth == pytest.approx(rewards.std(ddof=1) * 8 ** -0.2)
    integral = MixtureGains.from_components(rewards[None, :], np.full((1, 8), bandwidth), np.full((1, 8), 1 / 8),
                                            np.array([best]), num_grid=256)
    monte_carlo = KdeMonteCarloGains([rewards], np.array([bandwidth]), np.array([best]), np.random.default_rng(0),
                                     num_draws=16384)
    by_integral = value_vector(integral, 0, best, 40)
    by_mc = value_vector(monte_carlo, 0, best, 40)
    assert by_integral[0] == best and np.all(np.diff(by_integral) >= 0) and np.all(np.diff(by_mc) >= 0)
    assert np.all(np.diff(by_integral, 2) <= 1e-12)  # concave
    assert np.allclose(by_mc, by_integral, atol=0.01 * rewards.std())


def test_integral_matches_the_expected_maximum_of_normals() -> None:
    # E[max of 2 standard normals] = 1/√π; E[max of 3] = 3/(2√π)
    gains = MixtureGains.from_components(np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.array([-12.0]),
                                         num_grid=512)
    values = value_vector(gains, 0, -12.0, 3)
    assert values[2] == pytest.approx(1 / math.sqrt(math.pi), abs=2e-3)
    assert values[3] == pytest.approx(3 / (2 * math.sqrt(math.pi)), abs=2e-3)


def test_identical_rewards_keep_finite_values() -> None:
    counts = allocate([[0.5] * 8, [0.5] * 8, [0.2, 0.8] * 4], [4, 4, 4], method="adabon-integral")
    assert counts.sum() == 12 and counts[2] == 12


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_greedy_matches_the_heap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_prompts = 12
    rewards = rng.normal(0, 1, (num_prompts, 6)) * rng.uniform(0.1, 3, (num_prompts, 1))
    gains = MixtureGains.from_components(rewards, np.full(rewards.shape, 0.3), np.full(rewards.shape, 1 / 6),
                                         rewards.max(axis=1))
    floors = rng.integers(0, 3, num_prompts)
    caps = floors + rng.integers(1, 40, num_prompts)
    for total in (int(floors.sum()) + 3, 60, 200):
        fast = greedy_allocate(gains, num_prompts, total, floors=floors, caps=caps)
        heap = greedy_allocate(lambda i, a, b: gains(i, a, b), num_prompts, total, floors=floors, caps=caps)
        assert fast.tolist() == heap.tolist() and fast.sum() == total
    bernoulli = BernoulliGains(np.full(4, 0.5), np.array([3.0, 8.0, 20.0, 1.0]), np.array([False, False, False, True]))
    assert greedy_allocate(bernoulli, 4, 30).tolist() == greedy_allocate(lambda i, a, b: bernoulli(i, a, b), 4, 30).tolist()


def test_empty_window_and_a_few_unsolved_prompts_among_many() -> None:
    assert plan_window({}, {}) == {}
    explore = {f"k{i}": [1.0] + [0.0] * 23 for i in range(250)} | {f"hard{i}": [0.0] * 24 for i in range(6)}
    plan = plan_window(explore, dict.fromkeys(explore, 32))
    assert sum(plan.values()) == 256 * 8
    assert all(plan[f"hard{i}"] in (341, 342) for i in range(6))  # the whole window's budget, evenly


def test_floors_with_one_prompt_taking_everything_left() -> None:
    # regression: a row that takes every remaining sample above its floor must not look "unfinished"
    explore = {"solved": [1.0, 0.0, 0.0], "open": [0.0, 0.0, 0.0]}
    plan = plan_window(explore, {"solved": 11, "open": 11}, floor_fraction=0.5)
    assert plan == {"solved": 4, "open": 12}
    rng = np.random.default_rng(1)
    wide = {f"k{i}": rng.normal(0, 0.01 if i else 5.0, 24).tolist() for i in range(10)}
    plan = plan_window(wide, dict.fromkeys(wide, 32), method="adabon-eb", floor_fraction=0.5)
    assert plan["k0"] == 44 and sum(plan.values()) == 80
