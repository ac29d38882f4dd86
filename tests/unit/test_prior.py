"""The spread model: ridge sufficient statistics, GCV fit, priors, and their effect on allocation."""

from __future__ import annotations

import numpy as np
import pytest

from middleware.bench.prior_cv import Fold, held_out_correlation
from middleware.scheduler.allocation import allocate
from middleware.scheduler.deadline import RoundTimer, choose_explore_fraction
from middleware.scheduler.prior import (
    RidgeStats,
    SpreadModel,
    WindowPrior,
    prompt_features,
    reward_kind,
    reward_targets,
    window_prior,
)


def test_prompt_features_are_deterministic_and_carry_the_embedding() -> None:
    a, b = prompt_features("How do I boil an egg?"), prompt_features("How do I boil an egg?")
    assert np.array_equal(a, b) and a.shape == (258,)  # 2 length features + 256 hashed
    assert not np.array_equal(a, prompt_features("What is 2 + 2?"))
    assert prompt_features("hi", embedding=[0.5, -0.5])[-2:].tolist() == [0.5, -0.5]
    assert prompt_features("hi", embedding=[0.5, -0.5]).shape == (4,)


def test_reward_targets_hand_computed() -> None:
    log_var, mean = reward_targets([1.0, 3.0], is_bernoulli=False)
    assert log_var == pytest.approx(np.log(2.0)) and mean == pytest.approx(2.0)  # s² = 2 with ddof=1
    (logit,) = reward_targets([1.0, 0.0, 0.0, 0.0], is_bernoulli=True)
    assert logit == pytest.approx(np.log(1.5 / 3.5))  # Jeffreys-smoothed rate 1.5 / 5


def test_ridge_recovers_a_linear_rule_and_merging_equals_one_batch() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = np.stack([x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) + 3.0 + rng.normal(0, 0.1, 200), x[:, 0]], axis=1)
    whole = RidgeStats.from_rows(x, y)
    merged = RidgeStats.from_rows(x[:80], y[:80]) + RidgeStats.from_rows(x[80:], y[80:])
    assert np.allclose(whole.xx, merged.xx) and np.allclose(whole.xy, merged.xy)
    fit = merged.fit()
    assert fit is not None
    assert np.allclose(fit.weights[:, 0], [1.0, -2.0, 0.0, 0.5, 0.0], atol=0.05)
    assert fit.intercept[0] == pytest.approx(3.0, abs=0.05)
    assert 0.005 < fit.residual_var[0] < 0.02  # noise variance 0.01
    assert RidgeStats.from_rows(x[:3], y[:3]).fit() is None  # too few prompts: no prior


def test_window_prior_for_bernoulli_is_a_beta_around_the_prediction() -> None:
    x = np.eye(10)
    fit = RidgeStats.from_rows(np.repeat(x, 3, axis=0), np.full((30, 1), 0.0)).fit()  # every rate 1/2
    prior = window_prior(fit, x[:2], is_bernoulli=True)
    assert prior.alpha == pytest.approx(prior.beta) and np.all(prior.alpha >= 0.25)


def test_a_confident_spread_prior_steers_allocation_to_the_wide_prompt() -> None:
    explore = [np.array([0.0, 0.1]), np.array([0.0, 0.1])]  # two explore samples each look alike
    prior = WindowPrior(log_var_mean=np.log([1e-4, 1.0]), log_var_var=np.full(2, 1e-3),
                        loc_mean=np.array([0.05, 0.05]), loc_var=np.full(2, 1e-3))
    with_prior = allocate(explore, [10, 10], method="adabon-eb", prior=prior)
    assert with_prior[1] > with_prior[0] and with_prior.sum() == 20
    bernoulli = allocate([np.zeros(2), np.zeros(2)], [10, 10], method="adabon-eb",
                         prior=WindowPrior(alpha=np.array([0.01, 5.0]), beta=np.array([50.0, 5.0])))
    assert bernoulli[1] > bernoulli[0]  # the prompt predicted solvable gets the samples


def test_spread_model_queues_observations_by_kind() -> None:
    model = SpreadModel()
    model.observe("a", [0.0, 1.0, 1.0])
    model.observe("b", [0.2, 0.5])
    model.observe("c", [0.5])  # one sample: no spread to learn
    model.observe("d", [0.2, 0.5], embedding=[0.1, 0.2])
    model.observe("e", [0.2, 0.5], model="other-policy")
    assert {k: len(v) for k, v in model.pending.items()} == {
        (None, "bernoulli:hash"): 1, (None, "continuous:hash"): 1, (None, "continuous:embedding"): 1,
        ("other-policy", "continuous:hash"): 1}  # one model per policy: spreads are the policy's
    assert model.pending[(None, "continuous:embedding")][0][0].shape == (4,)  # length (2) + the embedding
    assert reward_kind([0.0, 1.0]) == "bernoulli" and reward_kind([0.5, 1.0]) == "continuous"
    assert not model.has_fit


def test_deadline_picks_one_round_when_two_do_not_fit() -> None:
    timer = RoundTimer(fixed_ms=100.0, per_sample_ms=10.0, num_rounds=1)
    # two rounds of B = 16 with a 1.25 cap: 2·100 + 10·20 = 400 ms
    assert choose_explore_fraction(16, None, timer, explore_fraction=0.5) == 0.5
    assert choose_explore_fraction(16, 400.0, timer, explore_fraction=0.5) == 0.5
    assert choose_explore_fraction(16, 399.0, timer, explore_fraction=0.5) == 1.0
    assert choose_explore_fraction(16, 10.0, RoundTimer(), explore_fraction=0.5) == 0.5  # nothing measured yet


def test_round_timer_moves_toward_what_it_measures() -> None:
    timer = RoundTimer(fixed_ms=100.0, per_sample_ms=10.0)
    for _ in range(30):
        timer.record(10.0, 400.0)  # twice the estimate of 200 ms
    assert timer.expected_ms(10.0) == pytest.approx(400.0, rel=0.02)
    timer.record(0.0, 50.0)  # nothing sampled: ignored
    assert timer.num_rounds == 30


def test_held_out_correlation_pools_every_fold_with_an_interval() -> None:
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(60, 2))
    predicted = np.column_stack([actual[:, 0] + 0.1 * rng.normal(size=60), rng.normal(size=60)])
    folds = [Fold(np.arange(f, 60, 3), WindowPrior().take, [0.0, 0.0], predicted[f::3], actual[f::3])
             for f in range(3)]
    (r0, low0, high0), (r1, low1, high1) = held_out_correlation(folds)
    assert r0 > 0.95 and low0 <= r0 <= high0  # the first target is predicted, the second is noise
    assert low1 < 0 < high1 and abs(r1) < 0.3
