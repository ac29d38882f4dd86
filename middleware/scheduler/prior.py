"""A prior on each prompt's reward distribution before it is sampled: spending before exploring.

Pure numpy, no I/O (``middleware.scheduler.prior_store`` keeps the model in Redis). A ridge regression
from prompt features to what a prompt's rewards looked like:

    continuous rewards   targets (log s², mean) of the prompt's rewards      -> loc and scale priors
    0/1 rewards          target logit of the smoothed success rate         -> a Beta prior

It is kept as sufficient statistics (n, Σx, Σy, Σxxᵀ, Σxyᵀ, Σyyᵀ), so an answered window adds to it in
O(p²) and schedulers merge theirs by adding. ``fit`` picks the ridge penalty by generalised
cross-validation and returns each target's residual variance (its predictive uncertainty), which sets
how much the prior weighs against a prompt's own explore samples in ``allocation``.

Features (``prompt_features``): torch-free hashed word and character-trigram counts plus log length
(what a scheduler can compute), optionally followed by a sentence embedding (the reward encoder's,
computed where torch lives).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NUM_HASH_FEATURES = 256
RIDGE_PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e6)  # 1e6: in effect the mean alone
MIN_OBSERVATIONS = 8  # fewer prompts seen: no prior (the allocator falls back to the window's)
RATE_SMOOTHING = 0.5  # Jeffreys pseudo-counts in the success-rate target
_WORD = re.compile(r"[a-z0-9']+")
PROMPT_EMBEDDING_STAT = "prompt_embedding"  # SampleSet.stats key of the worker's prompt embedding
REWARD_KINDS = ("continuous", "bernoulli")
MODEL_KINDS = tuple(f"{r}:{f}" for r in REWARD_KINDS for f in ("hash", "embedding"))
MAX_PENDING_OBSERVATIONS = 10_000  # per kind, if Redis stays unreachable: the oldest are dropped


def feature_set(embedding: Sequence[float] | None) -> str:
    """Which features a prompt gets: ``embedding`` when the worker sent one, else ``hash``."""
    return "hash" if embedding is None else "embedding"


def prompt_features(text: str, embedding: Sequence[float] | None = None,
                    num_hash_features: int = NUM_HASH_FEATURES) -> np.ndarray:
    """(p,) features: log length, then the embedding if given, else L2-normalised hashed words + char trigrams.

    The two sets differ in size, so a model learns from one of them (``feature_set``).
    """
    lowered = text.lower()
    tokens = _WORD.findall(lowered)
    length = np.array([math.log1p(len(text)) / 5.0, math.log1p(len(tokens)) / 3.0])
    if embedding is not None:
        return np.concatenate([length, np.asarray(embedding, dtype=np.float64)])
    grams = [lowered[i : i + 3] for i in range(max(0, len(lowered) - 2))]
    hashed = np.zeros(num_hash_features)
    for token in [*("w:" + t for t in tokens), *("c:" + g for g in grams)]:
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        hashed[value % num_hash_features] += 1.0 if (value >> 63) & 1 else -1.0
    norm = float(np.linalg.norm(hashed))
    hashed = hashed / norm if norm > 0 else hashed
    return np.concatenate([length, hashed])


def reward_targets(rewards: Sequence[float] | np.ndarray, is_bernoulli: bool) -> np.ndarray:
    """What the model learns from one prompt's rewards: (log s², mean), or (logit of the smoothed rate,)."""
    values = np.asarray(rewards, dtype=np.float64)
    if is_bernoulli:
        rate = (values.sum() + RATE_SMOOTHING) / (values.size + 2 * RATE_SMOOTHING)
        return np.array([math.log(rate / (1 - rate))])
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return np.array([2.0 * math.log(max(spread, 1e-6)), float(values.mean())])


@dataclass(slots=True)
class RidgeStats:
    """Sufficient statistics of a multi-target ridge regression; ``+`` merges two."""

    count: float
    sum_x: np.ndarray  # (p,)
    sum_y: np.ndarray  # (t,)
    xx: np.ndarray  # (p, p)
    xy: np.ndarray  # (p, t)
    yy: np.ndarray  # (t,) Σ y² per target

    @classmethod
    def empty(cls, num_features: int, num_targets: int) -> RidgeStats:
        return cls(0.0, np.zeros(num_features), np.zeros(num_targets), np.zeros((num_features, num_features)),
                   np.zeros((num_features, num_targets)), np.zeros(num_targets))

    @classmethod
    def from_rows(cls, features: np.ndarray, targets: np.ndarray) -> RidgeStats:
        x, y = np.atleast_2d(features).astype(np.float64), np.atleast_2d(targets).astype(np.float64)
        return cls(float(x.shape[0]), x.sum(axis=0), y.sum(axis=0), x.T @ x, x.T @ y, (y**2).sum(axis=0))

    def __add__(self, other: RidgeStats) -> RidgeStats:
        return RidgeStats(self.count + other.count, self.sum_x + other.sum_x, self.sum_y + other.sum_y,
                          self.xx + other.xx, self.xy + other.xy, self.yy + other.yy)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.array([self.count]), "sum_x": self.sum_x, "sum_y": self.sum_y, "xx": self.xx,
                "xy": self.xy, "yy": self.yy}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RidgeStats:
        return cls(float(arrays["count"][0]), arrays["sum_x"], arrays["sum_y"], arrays["xx"], arrays["xy"], arrays["yy"])

    def fit(self, penalties: Sequence[float] = RIDGE_PENALTIES) -> RidgeFit | None:
        """Centred ridge, penalty per target by GCV; None before ``MIN_OBSERVATIONS`` prompts."""
        n = self.count
        if n < MIN_OBSERVATIONS:
            return None
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        xx = self.xx - n * np.outer(mean_x, mean_x)  # centred Σxxᵀ
        xy = self.xy - n * np.outer(mean_x, mean_y)
        yy = self.yy - n * mean_y**2
        eigvals, eigvecs = np.linalg.eigh(xx)
        eigvals = np.maximum(eigvals, 0.0)
        projected = eigvecs.T @ xy  # (p, t)
        best: list[tuple[float, np.ndarray, float]] = []
        for target in range(xy.shape[1]):
            scored = []
            for penalty in penalties:
                shrink = 1.0 / (eigvals + penalty)
                weights = eigvecs @ (shrink * projected[:, target])
                rss = max(float(yy[target] - 2 * weights @ xy[:, target] + weights @ xx @ weights), 0.0)
                dof = float(np.sum(eigvals * shrink)) + 1.0  # + the intercept
                if dof >= n:
                    continue
                gcv = n * rss / (n - dof) ** 2  # ≈ the leave-one-out squared error: the predictive variance
                scored.append((gcv, weights, gcv))
            if not scored:
                return None
            gcv, weights, residual_var = min(scored, key=lambda item: item[0])
            best.append((gcv, weights, residual_var))
        weights = np.stack([w for _, w, _ in best], axis=1)  # (p, t)
        return RidgeFit(weights, mean_y - mean_x @ weights, np.array([v for _, _, v in best]), n)


@dataclass(slots=True)
class RidgeFit:
    weights: np.ndarray  # (p, t)
    intercept: np.ndarray  # (t,)
    residual_var: np.ndarray  # (t,) predictive variance of each target (the GCV estimate of held-out error)
    count: float  # prompts it learned from

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.atleast_2d(features) @ self.weights + self.intercept  # (K, t)


@dataclass(slots=True)
class WindowPrior:
    """Per-prompt priors for one window (arrays over its K prompts); built by ``window_prior``.

    Continuous rewards: log σ² ~ N(log_var_mean, log_var_var), mean ~ N(loc_mean, loc_var).
    0/1 rewards: p ~ Beta(alpha, beta).
    """

    log_var_mean: np.ndarray | None = None
    log_var_var: np.ndarray | None = None
    loc_mean: np.ndarray | None = None
    loc_var: np.ndarray | None = None
    alpha: np.ndarray | None = None
    beta: np.ndarray | None = None

    def take(self, index: np.ndarray) -> WindowPrior:
        return WindowPrior(*(None if v is None else v[index] for v in (self.log_var_mean, self.log_var_var,
                                                                     self.loc_mean, self.loc_var, self.alpha, self.beta)))

    @staticmethod
    def merge(parts: Sequence[tuple[np.ndarray, WindowPrior]], size: int) -> WindowPrior:
        """One window's prior from parts covering its prompts: (window positions, their prior) each."""
        fields = ("log_var_mean", "log_var_var", "loc_mean", "loc_var", "alpha", "beta")
        merged: dict[str, np.ndarray | None] = {}
        for name in fields:
            if any(getattr(prior, name) is None for _, prior in parts):
                merged[name] = None
                continue
            values = np.zeros(size)
            for index, prior in parts:
                values[index] = getattr(prior, name)
            merged[name] = values
        return WindowPrior(**merged)


def window_prior(fit: RidgeFit, features: np.ndarray, is_bernoulli: bool, *, min_strength: float = 0.5,
                 max_strength: float = 200.0) -> WindowPrior:
    """Turn predictions for K prompts' features (K, p) into priors for the allocator."""
    predicted = fit.predict(features)
    if is_bernoulli:
        rate = 1.0 / (1.0 + np.exp(-predicted[:, 0]))
        # var(p) ≈ (p(1-p))² · var(logit) matched to a Beta's p(1-p)/(strength+1)
        spread = np.maximum(rate * (1 - rate) * fit.residual_var[0], 1e-12)
        strength = np.clip(1.0 / spread - 1.0, min_strength, max_strength)
        return WindowPrior(alpha=rate * strength, beta=(1 - rate) * strength)
    size = predicted.shape[0]
    return WindowPrior(log_var_mean=predicted[:, 0], log_var_var=np.full(size, fit.residual_var[0]),
                       loc_mean=predicted[:, 1], loc_var=np.full(size, fit.residual_var[1]))


def model_kind(reward: str, embedding: Sequence[float] | None) -> str:
    """One model per reward kind and feature set, e.g. ``continuous:embedding``."""
    return f"{reward}:{feature_set(embedding)}"


def reward_kind(rewards: Sequence[float]) -> str:
    return "bernoulli" if len(rewards) and all(r in (0.0, 1.0) for r in rewards) else "continuous"


#: (policy model name, model kind): a spread model is learned per policy, since spreads are the policy's.
#: None is the deployment's default model (a request that names no model).
SpreadKey = tuple[str | None, str]


@dataclass(slots=True)
class SpreadModel:
    """One scheduler's view: the last fit per (policy model, kind), and observations not yet shared (``prior_store``).

    ``models``: every policy model this scheduler has answered or been asked about; each sync refreshes
    their fits from Redis, so a scheduler also learns from models only other schedulers have answered.
    """

    fits: dict[SpreadKey, RidgeFit] = field(default_factory=dict)
    pending: dict[SpreadKey, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    models: set[str | None] = field(default_factory=lambda: {None})

    def observe(self, prompt_text: str, rewards: Sequence[float], embedding: Sequence[float] | None = None,
                model: str | None = None) -> None:
        """An answered prompt of ``model``: its features and what its rewards looked like (needs >= 2 samples)."""
        if len(rewards) < 2:
            return
        kind = model_kind(reward_kind(rewards), embedding)
        self.models.add(model)
        queue = self.pending.setdefault((model, kind), [])
        queue.append((prompt_features(prompt_text, embedding), reward_targets(rewards, kind.startswith("bernoulli"))))
        del queue[:-MAX_PENDING_OBSERVATIONS]

    def fit_for(self, kind: str, model: str | None = None) -> RidgeFit | None:
        self.models.add(model)  # asked for: the next sync loads its shared fit
        return self.fits.get((model, kind))

    def has_fit_for(self, models: Sequence[str | None]) -> bool:
        """A fit (of any kind) for every one of ``models``."""
        fitted = {model for model, _ in self.fits}
        return bool(models) and all(m in fitted for m in models)

    @property
    def has_fit(self) -> bool:
        return bool(self.fits)
