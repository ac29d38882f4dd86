"""How one window's samples are shared: the explore fraction at launch, the prior and allocation at stage 2.

Pure functions the core calls at its two window decisions (no I/O, no clock: ``now_ms`` is passed in):

    launch     explore_fraction()  f from the config, the spread model's fit and the window's deadline
    stage 2    allocate_window()   ``plan_window`` over the explored rewards, with the spread prior if any

The allocation math itself lives in ``middleware.scheduler.allocation``, the learned prior in
``middleware.scheduler.prior`` and the round-time model in ``middleware.scheduler.deadline``; this module
only gathers what they need from the window's request states.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from middleware.scheduler.allocation import plan_window
from middleware.scheduler.deadline import RoundTimer, choose_explore_fraction
from middleware.scheduler.plans import CoreConfig, RequestState
from middleware.scheduler.prior import (
    SpreadModel,
    WindowPrior,
    model_kind,
    prompt_features,
    reward_kind,
    window_prior,
)
from middleware.scheduler.results import SEED_MASK, prompt_text

__all__ = ["allocate_window", "explore_fraction", "sample_tokens"]

logger = logging.getLogger(__name__)


def sample_tokens(state: RequestState, config: CoreConfig) -> int:
    """Tokens one sample of the request may generate (its own limit or the default)."""
    return state.request.max_new_tokens or config.max_new_tokens


def explore_fraction(config: CoreConfig, spread: SpreadModel, round_timer: RoundTimer,
                     states: Sequence[RequestState], now_ms: int) -> float:
    """The configured f, the smaller prior one once a spread model is fitted, 1.0 when a deadline allows one round."""
    fraction = config.explore_fraction
    if config.spread_prior and spread.has_fit_for([s.request.model for s in states]):
        fraction = config.prior_explore_fraction
    time_left = [s.request.deadline_at_ms - now_ms for s in states if s.request.deadline_at_ms is not None]
    if config.deadline_rounds and time_left:
        work = max(s.budget * sample_tokens(s, config) for s in states)  # sample-tokens per prompt, the largest
        fraction = choose_explore_fraction(work, min(time_left), round_timer, explore_fraction=fraction)
    return fraction


def _window_prior(spread: SpreadModel, states: Sequence[RequestState],
                  explore_rewards: dict[str, list[float]]) -> WindowPrior | None:
    """Predicted spreads for the window's prompts (embedding features only if every prompt has one)."""
    rewards = reward_kind([r for values in explore_rewards.values() for r in values])
    has_embeddings = all(s.prompt_embedding is not None for s in states)
    kind = model_kind(rewards, [0.0] if has_embeddings else None)
    features = np.stack([prompt_features(prompt_text(s.request.prompt), s.prompt_embedding if has_embeddings else None)
                         for s in states])
    models = np.array([s.request.model or "" for s in states])
    parts = []
    for model in dict.fromkeys(models):  # each prompt gets its own policy model's prior
        fit = spread.fit_for(kind, model or None)
        if fit is None or features.shape[1] != fit.weights.shape[0]:
            return None  # unlearned model or another encoder's embeddings: no prior rather than a wrong one
        index = np.flatnonzero(models == model)
        parts.append((index, window_prior(fit, features[index], rewards == "bernoulli")))
    return WindowPrior.merge(parts, len(states))


def allocate_window(config: CoreConfig, spread: SpreadModel, window_id: int, states: dict[str, RequestState],
                    explore_rewards: dict[str, list[float]], budgets: dict[str, int]) -> dict[str, int]:
    """Stage-2 samples per request id. ``states``: the explored requests, by id (the prior's features).

    The allocator's seed derives from the window's request ids, so a replayed window allocates the same.
    """
    seed_text = ",".join(sorted(explore_rewards)).encode()
    seed = int.from_bytes(hashlib.blake2b(seed_text, digest_size=8).digest(), "big") & SEED_MASK
    try:
        prior = None
        if config.spread_prior:
            prior = _window_prior(spread, [states[rid] for rid in explore_rewards], explore_rewards)
        return plan_window(explore_rewards, budgets, method=config.allocator, seed=seed,
                           prior=prior)  # type: ignore[arg-type]
    except ValueError as e:  # a bug or a bad allocator name: fall back to each prompt's own budget
        logger.error("allocation failed window_id=%d, using each prompt's remaining budget: %s", window_id, e)
        return {rid: max(0, budgets[rid] - len(rewards)) for rid, rewards in explore_rewards.items()}
