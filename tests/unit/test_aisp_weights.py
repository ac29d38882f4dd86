"""AISP's importance math against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.aisp_weights import (
    cap_row_norms,
    effective_sample_size,
    importance_scores,
    importance_step,
    softmax_weights,
    standardize_rewards,
    update_mean,
)


def test_alpha_one_gives_reward_softmax() -> None:
    rewards = [[0.0, 1.0, 2.0]]
    mean = torch.ones(1, 2, 3)
    perturbations = torch.randn(1, 3, 2, 3)
    scores = importance_scores(rewards, mean, perturbations, sigma=0.5, lam=0.5, alpha=1.0)
    assert scores.tolist() == [[0.0, 2.0, 4.0]]
    weights = softmax_weights(scores)
    denominator = 1 + math.e**2 + math.e**4
    expected = [1 / denominator, math.e**2 / denominator, math.e**4 / denominator]
    assert weights[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_prior_term_hand_computed() -> None:
    # B=1, n=2, τ=2, d=2; u_1 = (1, 0), u_2 = (0, 2)
    mean = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    perturbations = torch.tensor(
        [[[[1.0, 1.0], [1.0, 1.0]],  # Σ_t <u_t, v_t> = 1 + 2 = 3
          [[-1.0, 0.0], [0.0, 0.5]]]],  # -1 + 1 = 0
        dtype=torch.float64,
    )
    scores = importance_scores([[0.3, 0.6]], mean, perturbations, sigma=0.5, lam=0.3, alpha=0.9)
    # coefficient (1 - 0.9) / 0.25 = 0.4
    assert scores[0].tolist() == pytest.approx([1.0 - 0.4 * 3, 2.0 - 0.0])


def test_per_prompt_sigma() -> None:
    mean = torch.ones(2, 1, 1, dtype=torch.float64)
    perturbations = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    scores = importance_scores([[0.0], [0.0]], mean, perturbations, sigma=[1.0, 2.0], lam=1.0, alpha=0.5)
    assert scores[:, 0].tolist() == pytest.approx([-0.5, -0.125])


def test_huge_rewards_stay_finite() -> None:
    weights = softmax_weights(importance_scores([[1e6, 1e6 + 1.0, -1e6]], torch.zeros(1, 1, 1),
                                                torch.zeros(1, 3, 1, 1), sigma=1.0, lam=1e-3, alpha=1.0))
    assert torch.isfinite(weights).all()
    assert weights[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert float(effective_sample_size(weights)[0]) == pytest.approx(1.0)


def test_nonfinite_scores_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        softmax_weights([[0.0, float("nan")]])


def test_ess_uniform_and_two_point() -> None:
    assert effective_sample_size([[0.25] * 4]).tolist() == pytest.approx([4.0])
    assert effective_sample_size(np.array([[0.5, 0.5, 0.0]])).tolist() == pytest.approx([2.0])


def test_standardize_rows_and_constant_row() -> None:
    z = standardize_rewards([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    sd = math.sqrt(2 / 3)
    assert z[0].tolist() == pytest.approx([-1 / sd, 0.0, 1 / sd])
    assert z[1].tolist() == [0.0, 0.0, 0.0]


def test_update_mean_is_weighted_sum() -> None:
    perturbations = torch.tensor([[[[1.0, 0.0]], [[0.0, 4.0]]]])  # B=1, n=2, τ=1, d=2
    new = update_mean([[0.25, 0.75]], perturbations)
    assert new.shape == (1, 1, 2)
    assert new[0, 0].tolist() == pytest.approx([0.25, 3.0])


def test_cap_row_norms_scales_only_long_rows() -> None:
    mean = torch.tensor([[[3.0, 4.0], [0.3, 0.4]], [[6.0, 8.0], [0.0, 0.0]]])
    capped = cap_row_norms(mean, torch.tensor([1.0, 5.0]))
    assert capped[0, 0].tolist() == pytest.approx([0.6, 0.8])  # 5 -> 1
    assert capped[0, 1].tolist() == pytest.approx([0.3, 0.4])  # 0.5 < 1: unchanged
    assert capped[1, 0].tolist() == pytest.approx([3.0, 4.0])  # 10 -> 5
    assert capped[1, 1].tolist() == [0.0, 0.0]


def test_importance_step_moves_mean_to_best_rollout() -> None:
    perturbations = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 1.0]]]])
    new, weights, ess = importance_step([[10.0, 0.0, 0.0]], torch.zeros(1, 1, 2), perturbations,
                                        sigma=1.0, lam=0.1, alpha=0.999, standardize=True, max_norm=0.5)
    assert int(weights.argmax()) == 0 and float(weights[0, 0]) > 0.99
    assert new[0, 0, 0] > 0.49 and float(new[0, 0].norm()) <= 0.5 + 1e-6
    assert 1.0 <= float(ess[0]) < 1.1
