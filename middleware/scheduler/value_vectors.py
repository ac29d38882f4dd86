"""Value vectors V_i[j] = E[max(c_i, X_1..X_j)] and their marginal gains Δ_i[j] = V_i[j+1] - V_i[j].

Pure numpy, no I/O: the estimates behind ``middleware.scheduler.allocation``. Each gains object is a callable
``(prompt, j_start, j_stop) -> Δ[j_start:j_stop]``; the concave ones (``is_concave``) also offer
``block(prompts, j_start, j_stop)`` for many prompts at once.

    MixtureGains        Gaussian mixtures (a KDE, one Gaussian, a shared shape), integral on a grid
    KdeMonteCarloGains  a KDE by Monte Carlo, running maxima of the same draws (the paper)
    BernoulliGains      0/1 rewards with a Beta posterior on the success rate, exact
    EmpiricalGains      a known finite sample (the benchmark's oracle), exact
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

NUM_MC_DRAWS = 1024
NUM_GRID_POINTS = 64
GRID_SPAN_STDS = 7.0  # integrate up to the largest component mean + this many of its stds
ABSOLUTE_BANDWIDTH_FLOOR = 1e-9

GainFn = Callable[[int, int, int], np.ndarray]  # (prompt, j_start, j_stop) -> Δ[j_start:j_stop]


# ---------------------------------------------------------------- the normal distribution, in numpy


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """Φ(z) through erfc (Numerical Recipes' Chebyshev fit: relative error < 1.2e-7, tails included)."""
    x = -np.asarray(z, dtype=np.float64) / math.sqrt(2.0)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc_abs = t * np.exp(poly)
    return 0.5 * np.where(x >= 0, erfc_abs, 2.0 - erfc_abs)


# ---------------------------------------------------------------- estimates and value vectors


def kde_bandwidth(rewards: Sequence[float] | np.ndarray, floor: float = ABSOLUTE_BANDWIDTH_FLOOR) -> float:
    """Scott's rule h = σ̂ · d^(-1/5), at least ``floor`` (one sample or identical rewards)."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.size < 2:
        return float(floor)
    return max(float(values.std(ddof=1)) * values.size ** -0.2, float(floor))


class MixtureGains:
    """Δ_i[j] = ∫_{c_i}^∞ F_i^j (1 - F_i) dx, by the trapezoid rule on a grid of each [c_i, upper_i].

    Built from Gaussian mixtures (``from_components``) or from one standardised shape shifted and scaled
    per prompt (``from_shape``). Concave in j by construction; no RNG.
    """

    def __init__(self, cdf: np.ndarray, best: np.ndarray, upper: np.ndarray) -> None:
        num_grid = cdf.shape[1]  # cdf: (K, G) on the grid best + (upper - best) * linspace(0, 1, G)
        cdf = np.clip(cdf, 0.0, 1.0)
        trapezoid = np.ones(num_grid)
        trapezoid[[0, -1]] = 0.5
        step = (upper - best) / (num_grid - 1)
        self.log_cdf = np.log(np.maximum(cdf, 1e-300))  # (K, G)
        self.tail_weight = (1.0 - cdf) * trapezoid[None, :] * step[:, None]  # (K, G)

    @staticmethod
    def grid(best: np.ndarray, upper: np.ndarray, num_grid: int) -> np.ndarray:
        upper = np.maximum(upper, best + ABSOLUTE_BANDWIDTH_FLOOR)
        return best[:, None] + (upper - best)[:, None] * np.linspace(0.0, 1.0, num_grid)[None, :]

    @classmethod
    def from_components(cls, means: np.ndarray, stds: np.ndarray, weights: np.ndarray, best: np.ndarray,
                        num_grid: int = NUM_GRID_POINTS) -> MixtureGains:
        """means, stds, weights: (K, M), padded with weight 0; best: (K,) the c_i."""
        upper = np.max(np.where(weights > 0, means + GRID_SPAN_STDS * stds, -np.inf), axis=1)
        grid = cls.grid(best, upper, num_grid)  # (K, G)
        z = (grid[:, :, None] - means[:, None, :]) / stds[:, None, :]  # (K, G, M)
        cdf = np.einsum("kgm,km->kg", normal_cdf(z), weights)
        return cls(cdf, best, grid[:, -1])

    @classmethod
    def from_shape(cls, shape_cdf: Callable[[np.ndarray], np.ndarray], shape_upper: float, loc: np.ndarray,
                   scale: np.ndarray, best: np.ndarray, num_grid: int = NUM_GRID_POINTS) -> MixtureGains:
        """F_i(x) = S((x - loc_i) / scale_i): one shape S for the whole window (cheap for large K)."""
        grid = cls.grid(best, loc + scale * shape_upper, num_grid)
        return cls(shape_cdf((grid - loc[:, None]) / scale[:, None]), best, grid[:, -1])

    def __call__(self, prompt: int, j_start: int, j_stop: int) -> np.ndarray:
        return self.block(np.array([prompt]), j_start, j_stop)[0]

    is_concave = True

    def block(self, prompts: np.ndarray, j_start: int, j_stop: int) -> np.ndarray:
        log_cdf = self.log_cdf[prompts]  # (P, G)
        cdf = np.exp(log_cdf)
        powers = np.empty((prompts.size, max(0, j_stop - j_start), log_cdf.shape[1]))  # (P, J, G): F^j
        if powers.shape[1]:
            powers[:, 0] = np.exp(j_start * log_cdf)
        for t in range(1, powers.shape[1]):  # a product per step: ~10x cheaper than exp of every power
            np.multiply(powers[:, t - 1], cdf, out=powers[:, t])
        return (powers @ self.tail_weight[prompts][:, :, None])[:, :, 0]


class KdeMonteCarloGains:
    """The paper's Monte Carlo: m draws per prompt from its KDE, V[j] = mean of running maxima with c_i.

    Extends lazily: the running maxima of earlier draws carry over, so V stays monotone.
    """

    def __init__(self, rewards: Sequence[np.ndarray], bandwidths: np.ndarray, best: np.ndarray,
                 rng: np.random.Generator, num_draws: int = NUM_MC_DRAWS) -> None:
        self.rewards, self.bandwidths, self.rng = rewards, bandwidths, rng
        self.running_max = [np.full(num_draws, float(c)) for c in best]
        self.num_drawn = [0] * len(rewards)

    def __call__(self, prompt: int, j_start: int, j_stop: int) -> np.ndarray:
        assert j_start == self.num_drawn[prompt], "Monte Carlo gains extend in order"
        rewards, running = self.rewards[prompt], self.running_max[prompt]
        if rewards.size == 0 or j_stop <= j_start:
            return np.zeros(max(0, j_stop - j_start))
        shape = (running.size, j_stop - j_start)
        draws = rewards[self.rng.integers(0, rewards.size, shape)] + self.bandwidths[prompt] * self.rng.standard_normal(shape)
        maxima = np.maximum.accumulate(np.concatenate([running[:, None], draws], axis=1), axis=1)  # (m, 1+J)
        self.running_max[prompt] = maxima[:, -1]
        self.num_drawn[prompt] = j_stop
        return np.diff(maxima.mean(axis=0))


class BernoulliGains:
    """0/1 rewards: p_i ~ Beta(α_i, β_i); until a success, V[j] = 1 - E[(1-p)^j] = 1 - Π_{t<j} (β+t)/(α+β+t)."""

    is_concave = True

    def __init__(self, alpha: np.ndarray, beta: np.ndarray, solved: np.ndarray) -> None:
        self.alpha, self.beta, self.solved = alpha, beta, solved

    def __call__(self, prompt: int, j_start: int, j_stop: int) -> np.ndarray:
        return self.block(np.array([prompt]), j_start, j_stop)[0]

    def block(self, prompts: np.ndarray, j_start: int, j_stop: int) -> np.ndarray:
        a, b = self.alpha[prompts][:, None], self.beta[prompts][:, None]
        t = np.arange(j_stop, dtype=np.float64)[None, :]
        survive = np.concatenate([np.ones((prompts.size, 1)), np.cumprod((b + t) / (a + b + t), axis=1)], axis=1)
        gains = survive[:, :-1] - survive[:, 1:]  # E[(1-p)^j] - E[(1-p)^(j+1)], j = 0..j_stop-1
        gains[self.solved[prompts]] = 0.0
        return gains[:, j_start:j_stop]


def value_vector(gains: GainFn, prompt: int, best: float, length: int) -> np.ndarray:
    """V[0..length] = c + cumulative Δ (for tests and plots)."""
    return best + np.concatenate([[0.0], np.cumsum(gains(prompt, 0, length))])


class EmpiricalGains:
    """Exact Δ_i[j] when X_i is known to be uniform over a finite sample (the oracle of the benchmark).

    Between consecutive sorted samples x_(k) <= x < x_(k+1) the CDF is k/n, so the integral is a sum.
    """

    def __init__(self, samples: Sequence[np.ndarray], best: np.ndarray) -> None:
        self.lengths, self.levels = [], []
        for values, c in zip(samples, best):
            x = np.sort(np.asarray(values, dtype=np.float64))
            lengths = np.maximum(x[1:] - np.maximum(x[:-1], c), 0.0)
            keep = lengths > 0
            self.lengths.append(lengths[keep])
            self.levels.append((np.arange(1, x.size) / x.size)[keep])

    def __call__(self, prompt: int, j_start: int, j_stop: int) -> np.ndarray:
        levels, lengths = self.levels[prompt], self.lengths[prompt]
        j = np.arange(j_start, j_stop, dtype=np.float64)
        return (levels[None, :] ** j[:, None] * (1.0 - levels) * lengths).sum(axis=1)
