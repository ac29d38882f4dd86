"""The model runs of ``alignq bench aisp``: greedy, Best-of-N, AISP and windowed AISP, seed by seed.

Boundary: the only part of the bench that touches ``workers`` (imported inside the functions, so
``middleware`` never imports torch). Each run returns per-(seed, prompt) rewards in rollout order
(seed-major) and its wall time; prompt p of seed s uses seed ``seed_of(s, p)`` for both methods.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

from middleware.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["AISP_FIELDS", "BON_TEMPERATURE", "BON_TOP_P", "Models", "RunOutput", "load_models", "run_aisp_seeds",
           "run_bon_seeds", "run_greedy", "run_window_seeds", "seed_of"]

BON_TEMPERATURE = 0.8
BON_TOP_P = 0.95
# AispConfig fields a variant may set (plus n and k); the bench passes them through unchanged
AISP_FIELDS = ("sigma", "sigma_is_relative", "lam", "alpha", "horizon_tokens", "standardize_rewards", "max_u_norm",
               "sigma_decay", "temperature", "top_p", "keep_elite")


@dataclasses.dataclass(slots=True)
class Models:
    policy: Any  # workers.models.Policy
    reward: Any  # workers.reward.RewardModel
    hardware: dict[str, Any]


@dataclasses.dataclass(slots=True)
class RunOutput:
    runs: list[list[float]]  # per (seed, prompt): rewards in rollout order
    wall_s: float  # per seed (all prompts of one run)
    iteration_mean: list[float] = dataclasses.field(default_factory=list)  # AISP: mean reward per iteration
    ess: list[float] = dataclasses.field(default_factory=list)  # AISP: mean ESS per iteration
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_models(model: str | None, reward: str | None, device: str, dtype: str, threads: int) -> Models:
    import torch

    from workers.errors import ModelLoadError
    from workers.models import configure_threads, load_policy, load_reward

    used_threads = configure_threads(threads, workers_on_host=1)
    try:
        policy = load_policy(model, device=device, dtype=dtype)
        reward_model = load_reward(reward, device=device)
    except ModelLoadError as e:
        raise UsageError(str(e)) from e
    hardware = {"threads": used_threads, "device": str(policy.device),
                "dtype": str(policy.dtype).removeprefix("torch."), "torch": torch.__version__}
    return Models(policy, reward_model, hardware)


def seed_of(seed: int, prompt_index: int) -> int:
    return seed * 100_003 + prompt_index


def _raise_errors(results: Sequence[Any]) -> None:
    for result in results:
        if result.error:
            raise RuntimeError(f"{result.key}: {result.error}")


def run_greedy(models: Models, items: list[dict[str, Any]], max_new_tokens: int,
               max_batch: int) -> tuple[list[float], float]:
    from workers.engine import Engine, GenerationRequest

    engine = Engine(models.policy, models.reward, max_batch=max_batch)
    requests = [GenerationRequest(key=f"greedy-{i}", prompt=item["prompt"], num_samples=1,
                                  max_new_tokens=max_new_tokens, temperature=0.0, metadata=item["metadata"])
                for i, item in enumerate(items)]
    started = time.perf_counter()
    results = engine.run(requests)
    wall_s = time.perf_counter() - started
    _raise_errors(results)
    return [r.samples[0].reward for r in results], wall_s


def run_bon_seeds(models: Models, items: list[dict[str, Any]], *, num_samples: int, seeds: int,
                  max_new_tokens: int, max_batch: int, first_seed: int = 0) -> RunOutput:
    """Best-of-N with the engine (T 0.8, top-p 0.95): per (seed, prompt) the rewards in sample order."""
    from workers.engine import Engine, GenerationRequest

    engine = Engine(models.policy, models.reward, max_batch=max_batch)
    runs: list[list[float]] = []
    wall_s = 0.0
    for seed in range(first_seed, first_seed + seeds):
        requests = [GenerationRequest(key=f"bon-{seed}-{i}", prompt=item["prompt"], num_samples=num_samples,
                                      max_new_tokens=max_new_tokens, temperature=BON_TEMPERATURE, top_p=BON_TOP_P,
                                      seed=seed_of(seed, item.get("index", i)), metadata=item["metadata"])
                    for i, item in enumerate(items)]
        started = time.perf_counter()
        results = engine.run(requests)
        wall_s += time.perf_counter() - started
        _raise_errors(results)
        runs += [[s.reward for s in sorted(r.samples, key=lambda s: s.index)] for r in results]
        logger.info("bench aisp: BoN seed=%d best_mean=%.4f", seed, statistics.fmean(max(r) for r in runs[-len(items):]))
    return RunOutput(runs, wall_s / seeds)


def _config(settings: dict[str, Any]) -> Any:
    from workers.aisp import AispConfig

    return AispConfig(num_rollouts=settings["n"], num_iterations=settings["k"],
                      **{key: settings[key] for key in AISP_FIELDS if key in settings})


def run_aisp_seeds(models: Models, items: list[dict[str, Any]], settings: dict[str, Any], *, seeds: int,
                   max_new_tokens: int, max_batch: int, first_seed: int = 0) -> RunOutput:
    """AISP with ``settings`` (n, k and AispConfig fields): per (seed, prompt) the n·k rewards in rollout order."""
    from workers.aisp import run_aisp

    config = _config(settings)
    runs: list[list[float]] = []
    iteration_means: list[list[float]] = []
    ess: list[list[float]] = []
    wall_s = 0.0
    for seed in range(first_seed, first_seed + seeds):
        requests = [_request(f"aisp-{seed}-{i}", item, settings["n"] * settings["k"], max_new_tokens, seed_of(seed, item.get("index", i)))
                    for i, item in enumerate(items)]
        started = time.perf_counter()
        results = run_aisp(models.policy, models.reward, requests, config, max_batch=max_batch)
        wall_s += time.perf_counter() - started
        _raise_errors(results)
        runs += [[s.reward for s in sorted(r.samples, key=lambda s: s.index)] for r in results]
        iteration_means += [r.iteration_mean for r in results]
        ess += [r.ess for r in results]
        logger.info("bench aisp: settings=%s seed=%d best_mean=%.4f", settings, seed,
                    statistics.fmean(max(r) for r in runs[-len(items):]))
    return RunOutput(runs, wall_s / seeds, [statistics.fmean(col) for col in zip(*iteration_means)],
                     [statistics.fmean(col) for col in zip(*ess)])


def _request(key: str, item: dict[str, Any], budget: int, max_new_tokens: int, seed: int) -> Any:
    from workers.aisp import AispRequest

    return AispRequest(key=key, prompt=item["prompt"], budget=budget, max_new_tokens=max_new_tokens, seed=seed,
                       metadata=item["metadata"])


def run_window_seeds(models: Models, items: list[dict[str, Any]], settings: dict[str, Any], *, seeds: int,
                     max_new_tokens: int, max_batch: int, max_iterations: int, share: float,
                     first_seed: int = 0) -> RunOutput:
    """Adaptive AISP: all prompts of a seed form one window with n·k rollouts per prompt on average.

    Each prompt may run up to ``max_iterations`` iterations; its rewards are in rollout order (their
    number varies by prompt).
    """
    from workers.aisp_window import run_aisp_window

    config = _config(settings)
    n, k = settings["n"], settings["k"]
    runs: list[list[float]] = []
    used, rounds, iterations = [], [], []
    wall_s = 0.0
    for seed in range(first_seed, first_seed + seeds):
        requests = [_request(f"window-{seed}-{i}", item, n * max_iterations, max_new_tokens, seed_of(seed, item.get("index", i)))
                    for i, item in enumerate(items)]
        started = time.perf_counter()
        results, schedule = run_aisp_window(models.policy, models.reward, requests, config,
                                            budget=n * k * len(items), share=share, max_batch=max_batch)
        wall_s += time.perf_counter() - started
        _raise_errors(results)
        runs += [[s.reward for s in sorted(r.samples, key=lambda s: s.index)] for r in results]
        used.append(schedule.used)
        rounds.append(schedule.rounds)
        iterations += [len(r.ess) for r in results]
        logger.info("bench aisp: window seed=%d used=%d rounds=%s best_mean=%.4f", seed, schedule.used,
                    schedule.rounds, statistics.fmean(max(r) for r in runs[-len(items):]))
    return RunOutput(runs, wall_s / seeds, extra={
        "rollouts_used_by_seed": used, "rounds_by_seed": rounds,
        "iterations_histogram": {str(j): iterations.count(j) for j in sorted(set(iterations))}})
