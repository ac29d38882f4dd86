"""``alignq bench aisp``: AISP(n, k) against Best-of-N(n·k) and greedy decoding, same prompts, LM and reward.

Per seed, every prompt gets n·k AISP rollouts (k iterations of n) and n·k Best-of-N samples
(temperature 0.8, top-p 0.95); greedy decoding runs once. Reported, averaged over prompts and seeds:

    best(r)                  E[max reward of a prompt's first r rollouts / samples]   (the curve)
    aisp_best_mean           best(n·k) of AISP;  bon_best_mean: the same for Best-of-N
    rollouts_to_match_bon    smallest r with best_AISP(r) >= best_BoN(n·k); null if never

``--sweep`` repeats AISP over a small grid of σ and λ (BoN and greedy run once). Wall times are per
seed (all prompts of one run). Torch and the models load only inside ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from middleware.errors import UsageError

logger = logging.getLogger(__name__)

BON_TEMPERATURE = 0.8
BON_TOP_P = 0.95
DEFAULT_SWEEP_SIGMAS = "0.1,0.2,0.3"
DEFAULT_SWEEP_LAMS = "0.1,0.3,1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=pathlib.Path, required=True, help="JSON lines with a 'prompt' field")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--n", type=int, default=8, help="AISP rollouts per iteration (default 8)")
    parser.add_argument("--k", type=int, default=4, help="AISP iterations (default 4); BoN draws n·k samples")
    parser.add_argument("--seeds", type=int, default=3, help="repeat AISP and BoN with seeds 0..S-1 (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="policy spec (default: SmolLM2-135M-Instruct wheel)")
    parser.add_argument("--reward", default=None, help="reward spec (default: MiniLM preference reward)")
    parser.add_argument("--sigma", type=float, default=0.3,
                        help="perturbation scale: E‖v_t − u_t‖ ≈ sigma · mean pre-logit norm (default 0.3)")
    parser.add_argument("--sigma-absolute", action="store_true", help="--sigma is the per-coordinate std instead")
    parser.add_argument("--lam", type=float, default=0.3, help="λ, softmax temperature on z-scored rewards")
    parser.add_argument("--alpha", type=float, default=0.999, help="α, prior weight (default 0.999)")
    parser.add_argument("--horizon", type=int, default=None, help="τ, perturbed tokens (default: max new tokens)")
    parser.add_argument("--max-u-norm", type=float, default=0.4,
                        help="cap on ‖u_t‖ relative to the pre-logit norm; 0: no cap (default 0.4)")
    parser.add_argument("--sigma-decay", type=float, default=0.5,
                        help="σ of iteration j is sigma · decay^j (default 0.5; 1: constant)")
    parser.add_argument("--no-standardize", action="store_true", help="use raw rewards / λ, not z-scores")
    parser.add_argument("--sweep", action="store_true", help="also run AISP over a grid of σ and λ")
    parser.add_argument("--sweep-sigmas", default=DEFAULT_SWEEP_SIGMAS, help=f"(default {DEFAULT_SWEEP_SIGMAS})")
    parser.add_argument("--sweep-lams", default=DEFAULT_SWEEP_LAMS, help=f"(default {DEFAULT_SWEEP_LAMS})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--max-batch", type=int, default=64, help="rows per forward pass (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="write a PNG of best reward vs rollouts")


def load_prompts(path: pathlib.Path, num_prompts: int | None) -> list[dict[str, Any]]:
    """Items with ``prompt`` (text or chat messages) and optional ``metadata``, from JSON lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read --prompts {path}: {e.strerror}") from e
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(item, dict) or not item.get("prompt"):
            raise UsageError(f"{path}:{number}: each line needs a non-empty 'prompt' field")
        items.append({"prompt": item["prompt"], "metadata": dict(item.get("metadata") or {})})
    items = items[:num_prompts] if num_prompts is not None else items
    if not items:
        raise UsageError(f"no prompts in {path}: give JSON lines with a 'prompt' field")
    return items


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise UsageError(f"{flag} needs positive numbers")
    return values


def best_curve(runs: Sequence[Sequence[float]]) -> list[float]:
    """Mean over runs of the running max: element r-1 is E[best of the first r rewards]."""
    length = min(len(rewards) for rewards in runs)
    totals = [0.0] * length
    for rewards in runs:
        best = float("-inf")
        for r in range(length):
            best = max(best, rewards[r])
            totals[r] += best
    return [total / len(runs) for total in totals]


def summarize(aisp_runs: Sequence[Sequence[float]], bon_runs: Sequence[Sequence[float]], n: int, k: int) -> dict[str, Any]:
    """Curves and the headline numbers from per-(seed, prompt) reward lists in rollout order."""
    aisp, bon = best_curve(aisp_runs), best_curve(bon_runs)
    total = n * k
    target = bon[total - 1]
    reached = [r + 1 for r, value in enumerate(aisp[:total]) if value >= target]
    return {
        "aisp_best_mean": aisp[total - 1],
        "bon_best_mean": target,
        "rollouts_to_match_bon": reached[0] if reached else None,
        "curve": [{"rollouts": j * n, "aisp_best_mean": aisp[j * n - 1], "bon_best_mean": bon[j * n - 1]}
                  for j in range(1, k + 1)],
        "aisp_best_by_rollout": aisp[:total],
        "bon_best_by_rollout": bon[:total],
    }


def _per_seed_best(runs: Sequence[Sequence[float]], num_prompts: int) -> list[float]:
    """Mean best reward of each seed's run (runs are grouped seed by seed, num_prompts each)."""
    return [statistics.fmean(max(r) for r in runs[i:i + num_prompts]) for i in range(0, len(runs), num_prompts)]


@dataclasses.dataclass(slots=True)
class _Models:
    policy: Any  # workers.models.Policy
    reward: Any  # workers.reward.RewardModel
    hardware: dict[str, Any]


def _load_models(args: argparse.Namespace) -> _Models:
    import torch

    from workers.errors import ModelLoadError
    from workers.models import configure_threads, load_policy, load_reward

    threads = configure_threads(args.threads, workers_on_host=1)
    try:
        policy = load_policy(args.model, device=args.device, dtype=args.dtype)
        reward = load_reward(args.reward, device=args.device)
    except ModelLoadError as e:
        raise UsageError(str(e)) from e
    hardware = {"threads": threads, "device": str(policy.device), "dtype": str(policy.dtype).removeprefix("torch."),
                "torch": torch.__version__}
    return _Models(policy, reward, hardware)


def _seed(seed: int, prompt_index: int) -> int:
    return seed * 100_003 + prompt_index


def _run_greedy(models: _Models, items: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[float], float]:
    from workers.engine import Engine, GenerationRequest

    engine = Engine(models.policy, models.reward, max_batch=args.max_batch)
    requests = [GenerationRequest(key=f"greedy-{i}", prompt=item["prompt"], num_samples=1,
                                  max_new_tokens=args.max_new_tokens, temperature=0.0, metadata=item["metadata"])
                for i, item in enumerate(items)]
    started = time.perf_counter()
    results = engine.run(requests)
    wall_s = time.perf_counter() - started
    _raise_errors(results)
    return [r.samples[0].reward for r in results], wall_s


def _run_bon_seeds(models: _Models, items: list[dict[str, Any]],
                   args: argparse.Namespace) -> tuple[list[list[float]], float]:
    """Per (seed, prompt): the n·k BoN rewards in sample order; wall time per seed."""
    from workers.engine import Engine, GenerationRequest

    engine = Engine(models.policy, models.reward, max_batch=args.max_batch)
    runs: list[list[float]] = []
    wall_s = 0.0
    for seed in range(args.seeds):
        requests = [GenerationRequest(key=f"bon-{seed}-{i}", prompt=item["prompt"], num_samples=args.n * args.k,
                                      max_new_tokens=args.max_new_tokens, temperature=BON_TEMPERATURE,
                                      top_p=BON_TOP_P, seed=_seed(seed, i), metadata=item["metadata"])
                    for i, item in enumerate(items)]
        started = time.perf_counter()
        results = engine.run(requests)
        wall_s += time.perf_counter() - started
        _raise_errors(results)
        runs += [[s.reward for s in sorted(r.samples, key=lambda s: s.index)] for r in results]
        logger.info("bench aisp: BoN seed=%d best_mean=%.4f", seed, statistics.fmean(max(r) for r in runs[-len(items):]))
    return runs, wall_s / args.seeds


def _run_aisp_seeds(models: _Models, items: list[dict[str, Any]], args: argparse.Namespace, *, sigma: float,
                    lam: float) -> tuple[list[list[float]], dict[str, list[float]], float]:
    """Per (seed, prompt): the n·k AISP rewards in rollout order; per-iteration means and ESS; wall per seed."""
    from workers.aisp import AispConfig, AispRequest, run_aisp

    config = AispConfig(num_rollouts=args.n, num_iterations=args.k, sigma=sigma,
                        sigma_is_relative=not args.sigma_absolute, lam=lam, alpha=args.alpha,
                        horizon_tokens=args.horizon, standardize_rewards=not args.no_standardize,
                        max_u_norm=args.max_u_norm or None, sigma_decay=args.sigma_decay)
    runs: list[list[float]] = []
    iteration_means: list[list[float]] = []
    ess: list[list[float]] = []
    wall_s = 0.0
    for seed in range(args.seeds):
        requests = [AispRequest(key=f"aisp-{seed}-{i}", prompt=item["prompt"], budget=args.n * args.k,
                                max_new_tokens=args.max_new_tokens, seed=_seed(seed, i), metadata=item["metadata"])
                    for i, item in enumerate(items)]
        started = time.perf_counter()
        results = run_aisp(models.policy, models.reward, requests, config, max_batch=args.max_batch)
        wall_s += time.perf_counter() - started
        _raise_errors(results)
        runs += [[s.reward for s in sorted(r.samples, key=lambda s: s.index)] for r in results]
        iteration_means += [r.iteration_mean for r in results]
        ess += [r.ess for r in results]
        logger.info("bench aisp: sigma=%g lam=%g seed=%d best_mean=%.4f", sigma, lam, seed,
                    statistics.fmean(max(r) for r in runs[-len(items):]))
    stats = {"aisp_iteration_mean": [statistics.fmean(col) for col in zip(*iteration_means)],
             "aisp_ess": [statistics.fmean(col) for col in zip(*ess)]}
    return runs, stats, wall_s / args.seeds


def _raise_errors(results: Sequence[Any]) -> None:
    for result in results:
        if result.error:
            raise RuntimeError(f"{result.key}: {result.error}")


def run(args: argparse.Namespace) -> int:
    if min(args.n, args.k, args.seeds, args.max_new_tokens, args.max_batch) < 1 or args.threads < 0:
        raise UsageError("--n, --k, --seeds, --max-new-tokens and --max-batch must be >= 1, --threads >= 0")
    if min(args.sigma, args.lam, args.sigma_decay) <= 0 or not 0 <= args.alpha <= 1 or args.max_u_norm < 0:
        raise UsageError("--sigma, --lam and --sigma-decay must be > 0, --alpha in [0, 1], --max-u-norm >= 0")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError("--num-prompts must be >= 1")
    items = load_prompts(args.prompts, args.num_prompts)
    grid = [(s, lam) for s in _floats(args.sweep_sigmas, "--sweep-sigmas")
            for lam in _floats(args.sweep_lams, "--sweep-lams")] if args.sweep else []
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise UsageError("--plot needs matplotlib: pip install 'alignq[plot]'") from e

    models = _load_models(args)
    n, k = args.n, args.k
    greedy_rewards, greedy_wall_s = _run_greedy(models, items, args)
    bon_runs, bon_wall_s = _run_bon_seeds(models, items, args)
    aisp_runs, aisp_stats, aisp_wall_s = _run_aisp_seeds(models, items, args, sigma=args.sigma, lam=args.lam)
    report: dict[str, Any] = {
        "n": n, "k": k, "num_prompts": len(items), "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
        "model": models.policy.name, "reward": args.reward or "embedding (MiniLM preference)",
        "config": {"sigma": args.sigma, "sigma_is_relative": not args.sigma_absolute, "lam": args.lam,
                   "alpha": args.alpha, "horizon_tokens": args.horizon, "max_u_norm": args.max_u_norm or None,
                   "standardize_rewards": not args.no_standardize, "sigma_decay": args.sigma_decay},
        "greedy_mean": statistics.fmean(greedy_rewards),
        **summarize(aisp_runs, bon_runs, n, k),
        "aisp_best_mean_by_seed": _per_seed_best(aisp_runs, len(items)),
        "bon_best_mean_by_seed": _per_seed_best(bon_runs, len(items)),
        **aisp_stats,
        "aisp_wall_s": aisp_wall_s, "bon_wall_s": bon_wall_s, "greedy_wall_s": greedy_wall_s,
        "hardware": models.hardware,
    }
    if grid:
        report["sweep"] = []
        for sigma, lam in grid:
            runs, stats, wall_s = _run_aisp_seeds(models, items, args, sigma=sigma, lam=lam)
            summary = summarize(runs, bon_runs, n, k)
            report["sweep"].append({"sigma": sigma, "lam": lam, "aisp_best_mean": summary["aisp_best_mean"],
                                    "rollouts_to_match_bon": summary["rollouts_to_match_bon"],
                                    "aisp_best_mean_by_seed": _per_seed_best(runs, len(items)),
                                    "iteration_mean": stats["aisp_iteration_mean"], "aisp_wall_s": wall_s})
    if args.plot is not None:
        _plot(report, args.plot)
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(f"AISP(n={report['n']}, k={report['k']}) vs Best-of-N, {report['num_prompts']} prompts, "
          f"{report['seeds']} seeds, {report['max_new_tokens']} new tokens; greedy {report['greedy_mean']:.4f}")
    print(f"{'rollouts':>9} {'AISP best':>10} {'BoN best':>10} {'AISP iter mean':>15} {'ESS':>6}")
    for row, it_mean, ess in zip(report["curve"], report["aisp_iteration_mean"], report["aisp_ess"]):
        print(f"{row['rollouts']:>9} {row['aisp_best_mean']:>10.4f} {row['bon_best_mean']:>10.4f} "
              f"{it_mean:>15.4f} {ess:>6.2f}")
    match = report["rollouts_to_match_bon"]
    print(f"rollouts AISP needs to match BoN({report['n'] * report['k']}): {match if match else 'never'}")
    print(f"wall per seed: AISP {report['aisp_wall_s']:.1f} s, BoN {report['bon_wall_s']:.1f} s, "
          f"greedy {report['greedy_wall_s']:.1f} s")
    for row in report.get("sweep", []):
        print(f"sweep sigma={row['sigma']:<5} lam={row['lam']:<5} AISP best {row['aisp_best_mean']:.4f} "
              f"match at {row['rollouts_to_match_bon'] or 'never'}")


def _plot(report: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = report["n"] * report["k"]
    rollouts = list(range(1, total + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(rollouts, report["bon_best_by_rollout"], label="Best-of-N (T=0.8, top-p 0.95)", color="tab:blue")
    ax.plot(rollouts, report["aisp_best_by_rollout"], label=f"AISP (n={report['n']})", color="tab:red")
    ax.plot([c["rollouts"] for c in report["curve"]], [c["aisp_best_mean"] for c in report["curve"]], "o",
            color="tab:red", label="AISP after each iteration")
    ax.axhline(report["greedy_mean"], color="gray", linestyle="--", label="greedy")
    ax.set_xlabel("rollouts per prompt")
    ax.set_ylabel("mean best reward")
    ax.set_title(f"{report['num_prompts']} prompts × {report['seeds']} seeds, {report['max_new_tokens']} new tokens")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
