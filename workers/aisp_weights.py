"""The math of AISP's importance step (DESIGN.md §4): pure functions on torch tensors, no I/O.

Shapes use B for prompts (or chains) in a batch, n for rollouts per prompt, τ for perturbed
tokens and d for the pre-logit width. Every function takes a leading batch dimension, so one call
updates the means of all prompts in a batch; numpy arrays are accepted and converted.

    s_i = r_i / λ − ((1 − α) / σ²) Σ_t ⟨u_t, v_{i,t}⟩      importance_scores
    w   = softmax(s)                                         softmax_weights (max subtracted: stable)
    ESS = 1 / Σ_i w_i²                                       effective_sample_size
    U  ← Σ_i w_i V_i, then ‖u_t‖ capped                      update_mean, cap_row_norms
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Rewards whose spread within an iteration is below this are treated as all equal (weights uniform).
MIN_REWARD_STD = 1e-8


def _as_tensor(values: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(values, torch.Tensor | np.ndarray):
        values = np.asarray(values, dtype=np.float64)  # python numbers: float64, not torch's float32
    tensor = torch.as_tensor(values)
    if dtype is not None:
        return tensor.to(dtype)
    return tensor if tensor.is_floating_point() else tensor.to(torch.float64)


def standardize_rewards(rewards: Any) -> torch.Tensor:
    """Z-score each row (B, n) within itself; a row with (near) equal rewards becomes all zeros.

    So λ means the same thing whatever the reward model's scale (DESIGN.md §4).
    """
    rewards = _as_tensor(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, unbiased=False, keepdim=True)
    safe_std = torch.where(std > MIN_REWARD_STD, std, torch.ones_like(std))
    return torch.where(std > MIN_REWARD_STD, (rewards - mean) / safe_std, torch.zeros_like(rewards))


def importance_scores(
    rewards: Any, mean: Any, perturbations: Any, *, sigma: Any, lam: float, alpha: float
) -> torch.Tensor:
    """s_i = r_i/λ − ((1−α)/σ²) Σ_t ⟨u_t, v_{i,t}⟩ for rewards (B, n), U (B, τ, d), V (B, n, τ, d).

    ``sigma`` is the absolute per-coordinate scale: a float or one value per prompt (B,). Returns (B, n)
    in the rewards' dtype (float64 for lists). With α = 1 the prior term vanishes: s = r/λ.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rewards = _as_tensor(rewards)
    scores = rewards / lam
    if alpha == 1.0:
        return scores
    mean = _as_tensor(mean, rewards.dtype)
    perturbations = _as_tensor(perturbations, rewards.dtype)
    sigma = _as_tensor(sigma, rewards.dtype)
    if bool((sigma <= 0).any()):
        raise ValueError("sigma must be > 0")
    sigma = sigma.reshape(-1, 1) if sigma.dim() > 0 else sigma
    # Σ_t ⟨u_t, v_{i,t}⟩: (B, n, τ, d) · (B, 1, τ, d) summed over τ and d -> (B, n)
    inner = (perturbations * mean.unsqueeze(1)).sum(dim=(-2, -1))
    return scores - (1.0 - alpha) / sigma**2 * inner


def softmax_weights(scores: Any) -> torch.Tensor:
    """Row-wise softmax of (B, n) scores, max subtracted first so huge scores stay finite."""
    scores = _as_tensor(scores)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("importance scores must be finite (a reward was NaN or inf?)")
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    exp = shifted.exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def effective_sample_size(weights: Any) -> torch.Tensor:
    """1 / Σ_i w_i² per row (B,): n for uniform weights, 1 when one rollout takes all the weight."""
    weights = _as_tensor(weights)
    return 1.0 / (weights**2).sum(dim=-1)


def update_mean(weights: Any, perturbations: Any) -> torch.Tensor:
    """U ← Σ_i w_i V_i: weights (B, n), V (B, n, τ, d) -> (B, τ, d) in V's dtype."""
    perturbations = _as_tensor(perturbations)
    weights = _as_tensor(weights, perturbations.dtype)
    return torch.einsum("bn,bntd->btd", weights, perturbations)


def cap_row_norms(mean: Any, max_norm: Any) -> torch.Tensor:
    """Scale each u_t of U (B, τ, d) down to ‖u_t‖ ≤ max_norm (a float or one value per prompt, (B,)).

    With α near 1 nothing in the importance step pulls U back towards 0, and a mean that drifts past
    ~0.4 of the pre-logit norm decodes into garbage (issue 4): the cap keeps it in range.
    """
    mean = _as_tensor(mean)
    max_norm = _as_tensor(max_norm, mean.dtype)
    max_norm = max_norm.reshape(-1, 1, 1) if max_norm.dim() > 0 else max_norm
    norms = mean.norm(dim=-1, keepdim=True)
    scale = torch.clamp(max_norm / norms.clamp_min(torch.finfo(mean.dtype).tiny), max=1.0)
    return mean * scale


def importance_step(
    rewards: Any,
    mean: Any,
    perturbations: Any,
    *,
    sigma: Any,
    lam: float,
    alpha: float,
    standardize: bool = True,
    max_norm: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AISP update for a batch: returns (new U (B, τ, d), weights (B, n), ESS (B,)).

    ``standardize`` z-scores the rewards within each prompt's iteration before dividing by λ;
    ``max_norm`` (absolute, a float or (B,)) caps ‖u_t‖ after the update; None: no cap.
    """
    rewards = _as_tensor(rewards)
    if standardize:
        rewards = standardize_rewards(rewards)
    scores = importance_scores(rewards, mean, perturbations, sigma=sigma, lam=lam, alpha=alpha)
    weights = softmax_weights(scores)
    new_mean = update_mean(weights, perturbations)
    if max_norm is not None:
        new_mean = cap_row_norms(new_mean, max_norm)
    return new_mean, weights, effective_sample_size(weights)
