"""Cross-validated priors for ``alignq bench allocation --cross-validate``: never test on a prompt learned from.

The pool's prompts are split into folds. For each fold, the spread model
(``middleware.scheduler.prior``) learns from the other folds' prompts, seeing only what past traffic would
have shown: the first ``train_samples`` rewards of each (one answered request's worth), and predicts a
``WindowPrior`` for the held-out fold's prompts. Batches of a fold are drawn from that fold only.

Features (``middleware.scheduler.prior.prompt_features``): ``hash`` (torch-free hashed words, what a
scheduler computes alone) or ``embedding`` (the reward encoder's sentence embedding of the prompt, what
workers send with explore replies; computed here through ``workers`` lazily, cached under ~/.cache/alignq).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from middleware.scheduler.prior import RidgeStats, WindowPrior, prompt_features, reward_targets, window_prior

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("hash", "embedding")


@runtime_checkable
class _Embedder(Protocol):
    """A reward model with a sentence encoder (``workers.reward.EmbeddingReward``); isinstance = hasattr."""

    def embed(self, texts: Sequence[str]) -> Any: ...


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def prompt_embeddings(texts: list[str], reward: str | None = None) -> np.ndarray:
    """(P, d) sentence embeddings from the reward encoder (the default MiniLM), cached by content."""
    key = hashlib.sha256("\x00".join([str(reward), *texts]).encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "alignq" / f"prompt-embeddings-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    from workers.reward import load_reward  # torch: only this bench mode needs it

    spec = reward if reward and reward.startswith("embedding:") else None
    encoder = load_reward(spec, device="cpu")
    if not isinstance(encoder, _Embedder):
        encoder = load_reward(None, device="cpu")
    if not isinstance(encoder, _Embedder):  # the default reward is an EmbeddingReward
        raise TypeError(f"reward {type(encoder).__name__} has no embed(): cannot embed prompts")
    values = encoder.embed(texts).cpu().numpy().astype(np.float64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, values)
    return values


def pool_features(prompts: list[Any], kind: str, reward: str | None = None) -> np.ndarray:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    texts = [_prompt_text(p) for p in prompts]
    embeddings = prompt_embeddings(texts, reward) if kind == "embedding" else None
    return np.stack([prompt_features(text, embeddings[i] if embeddings is not None else None)
                     for i, text in enumerate(texts)])


@dataclass(slots=True)
class Fold:
    test: np.ndarray  # pool indices of the held-out prompts
    prior_for: Callable[[np.ndarray], WindowPrior]  # pool indices -> their priors
    held_out_r2: list[float]  # per target, R² of the predictions on this fold's prompts (vs their full pools)
    predicted: np.ndarray | None = None  # (test, targets) the predictions for the held-out prompts
    actual: np.ndarray | None = None  # (test, targets) their full-pool targets


def _r2(predicted: np.ndarray, actual: np.ndarray) -> float:
    total = float(np.sum((actual - actual.mean()) ** 2))
    return 1.0 - float(np.sum((actual - predicted) ** 2)) / total if total > 0 else float("nan")


def oracle_folds(rewards: list[np.ndarray], *, num_folds: int, seed: int, variance: float = 1e-4) -> list[Fold]:
    """Folds whose prior is each prompt's own full-pool (log s², mean) or rate: the ceiling of any predictor."""
    pooled = np.concatenate(rewards)
    is_bernoulli = bool(np.all((pooled == 0.0) | (pooled == 1.0)))
    targets = np.stack([reward_targets(r, is_bernoulli) for r in rewards])
    order = np.random.default_rng([seed, 7]).permutation(len(rewards))
    if is_bernoulli:
        rate = 1.0 / (1.0 + np.exp(-targets[:, 0]))
        prior = WindowPrior(alpha=rate * 200.0, beta=(1 - rate) * 200.0)
    else:
        prior = WindowPrior(targets[:, 0], np.full(len(rewards), variance), targets[:, 1],
                            np.full(len(rewards), variance))
    return [Fold(np.sort(order[f::num_folds]), prior.take, [1.0] * targets.shape[1]) for f in range(num_folds)]


def make_folds(rewards: list[np.ndarray], features: np.ndarray, *, num_folds: int, train_samples: int,
               seed: int) -> list[Fold]:
    """Split the pool's prompts into ``num_folds`` folds; a prior learned off-fold for each."""
    pooled = np.concatenate(rewards)
    is_bernoulli = bool(np.all((pooled == 0.0) | (pooled == 1.0)))
    order = np.random.default_rng([seed, 7]).permutation(len(rewards))
    targets_train = np.stack([reward_targets(r[:train_samples], is_bernoulli) for r in rewards])
    targets_full = np.stack([reward_targets(r, is_bernoulli) for r in rewards])
    folds = []
    for fold in range(num_folds):
        test = np.sort(order[fold::num_folds])
        train = np.setdiff1d(order, test)
        fit = RidgeStats.from_rows(features[train], targets_train[train]).fit()
        if fit is None:
            raise ValueError(f"fold {fold}: too few training prompts ({train.size}) for the spread model")
        prior = window_prior(fit, features, is_bernoulli)  # every prompt; batches only take held-out ones
        predicted = fit.predict(features[test])
        r2 = [_r2(predicted[:, t], targets_full[test, t]) for t in range(predicted.shape[1])]
        folds.append(Fold(test, prior.take, r2, predicted, targets_full[test]))
        logger.info("prior fold=%d train=%d test=%d r2=%s", fold, train.size, test.size, r2)
    return folds


def held_out_correlation(folds: Sequence[Fold], *, num_boot: int = 1000, seed: int = 0) -> list[list[float]]:
    """Per target, Pearson r of out-of-fold predictions with full-pool targets over every held-out prompt,
    and its 95% interval resampling prompts: [r, low, high] (empty when the folds carry no predictions)."""
    parts = [(f.predicted, f.actual) for f in folds if f.predicted is not None and f.actual is not None]
    if not parts:
        return []
    predicted = np.concatenate([p for p, _ in parts])
    actual = np.concatenate([a for _, a in parts])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(actual), size=(num_boot, len(actual)))
    result = []
    for t in range(actual.shape[1]):
        r = _pearson(predicted[:, t], actual[:, t])
        boot = np.array([_pearson(predicted[d, t], actual[d, t]) for d in draws])
        low, high = np.nanquantile(boot, [0.025, 0.975])
        result.append([round(r, 4), round(float(low), 4), round(float(high), 4)])
    return result


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
