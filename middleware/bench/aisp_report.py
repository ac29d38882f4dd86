"""The report of ``alignq bench aisp`` from its raw runs: analyse, merge runs of other seeds, print, plot.

Pure functions on the ``raw`` dict that ``run`` measures (and keeps in the report under "raw", so
runs made with ``--first-seed`` in separate processes can be merged with ``--merge``):

    meta       n, k, num_prompts, max_new_tokens, prompts, model, reward, config, first_seed, seeds, ...
    greedy     rewards, wall_s
    bon        runs (per (seed, prompt), seed-major), wall_s (per seed)
    aisp       runs, wall_s, iteration_mean, ess            (absent with --skip-base)
    variants   [{name, settings, runs, wall_s, iteration_mean, ess}]
    window     {runs, wall_s, share, max_iterations, rollouts_used_by_seed, rounds_by_seed}   (--window)
"""

from __future__ import annotations

import copy
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from middleware.bench.aisp_stats import paired_diff, summarize
from middleware.errors import UsageError

__all__ = ["analyse", "merge_raw", "plot_report", "print_table"]


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """The report: headline numbers with intervals, variants against BoN and the base, the window gain."""
    meta = raw["meta"]
    n, k, num_prompts = meta["n"], meta["k"], meta["num_prompts"]
    rollouts_per_seed = num_prompts * n * k
    bon, aisp = raw["bon"], raw.get("aisp")
    report: dict[str, Any] = {
        **{key: value for key, value in meta.items()},
        "greedy_mean": statistics.fmean(raw["greedy"]["rewards"]), "greedy_wall_s": raw["greedy"]["wall_s"],
        "bon_wall_s": bon["wall_s"], "bon_samples_per_s": rollouts_per_seed / bon["wall_s"],
    }
    if aisp is not None:
        report.update(summarize(aisp["runs"], bon["runs"], n, k, num_prompts))
        report.update(aisp_iteration_mean=aisp["iteration_mean"], aisp_ess=aisp["ess"], aisp_wall_s=aisp["wall_s"],
                      aisp_rollouts_per_s=rollouts_per_seed / aisp["wall_s"])
    report["variants"] = []
    for variant in raw.get("variants", []):
        summary = summarize(variant["runs"], bon["runs"], n, k, num_prompts)
        row = {"name": variant["name"], "settings": variant["settings"], **{key: summary[key] for key in (
            "aisp_best_mean", "rollouts_to_match_bon", "diff_mean", "diff_ci95", "prompts_ahead", "curve")},
            "iteration_mean": variant["iteration_mean"], "ess": variant["ess"], "aisp_wall_s": variant["wall_s"]}
        if aisp is not None:
            row["vs_base"] = paired_diff(variant["runs"], aisp["runs"], num_prompts, n * k)
        report["variants"].append(row)
    window = raw.get("window")
    if window is not None and aisp is not None:
        gain = paired_diff(window["runs"], aisp["runs"], num_prompts, n * window["max_iterations"], n * k)
        report["window"] = {
            "share": window["share"], "max_iterations": window["max_iterations"], "budget": rollouts_per_seed,
            "adaptive_best_mean": statistics.fmean(max(r) for r in window["runs"]),
            "fixed_best_mean": report["aisp_best_mean"], "gain_mean": gain["mean"], "gain_ci95": gain["ci95"],
            "prompts_ahead": gain["prompts_ahead"], "prompts_behind": gain["prompts_behind"],
            "wall_s": window["wall_s"], "rollouts_used_by_seed": window["rollouts_used_by_seed"],
            "rounds_by_seed": window["rounds_by_seed"]}
    report["raw"] = raw
    return report


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def _merge_run(parts: Sequence[dict[str, Any]], seeds: Sequence[int], prompts: Sequence[int] | None = None
               ) -> dict[str, Any]:
    """Seeds of ``parts`` one after the other; with ``prompts`` (each part's count), prompts side by side."""
    merged = {key: value for key, value in parts[0].items()}
    if prompts is None:
        merged["runs"] = [run for part in parts for run in part["runs"]]
        weights = list(seeds)
    else:  # same seeds in every part: seed-major, each seed's prompts part by part
        merged["runs"] = [run for s in range(seeds[0]) for part, p in zip(parts, prompts)
                          for run in part["runs"][s * p:(s + 1) * p]]
        weights = list(prompts)
    merged["wall_s"] = sum(part["wall_s"] for part in parts) if prompts is not None else \
        _weighted([part["wall_s"] for part in parts], weights)
    for key in ("iteration_mean", "ess"):
        if key in merged:
            merged[key] = [_weighted(col, weights) for col in zip(*(part[key] for part in parts))]
    for key in ("rollouts_used_by_seed", "rounds_by_seed"):
        if key in merged:
            merged[key] = [x for part in parts for x in part[key]]
    return merged


def merge_raw(raws: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One raw dict from runs of the same setup on other seeds, or (same seeds) on other prompts of the file.

    Parts are taken in the order given: seed-major for seeds, prompt order for prompt ranges.
    """
    if not raws:
        raise UsageError("--merge needs at least one report")
    metas = [raw["meta"] for raw in raws]
    by_prompts = len(raws) > 1 and len({(m["first_seed"], m["seeds"]) for m in metas}) == 1 \
        and len({m.get("prompt_offset", 0) for m in metas}) == len(raws)
    same = ("n", "k", "max_new_tokens", "prompts", "config") + (() if by_prompts else ("num_prompts",))
    for raw in raws[1:]:
        if any(raw["meta"][key] != metas[0][key] for key in same):
            raise UsageError(f"--merge: reports differ in one of {', '.join(same)}")
        if [v["name"] for v in raw.get("variants", [])] != [v["name"] for v in raws[0].get("variants", [])]:
            raise UsageError("--merge: reports ran different variants")
        if ("aisp" in raw) != ("aisp" in raws[0]) or ("window" in raw) != ("window" in raws[0]):
            raise UsageError("--merge: reports ran different parts (base AISP, window)")
    seeds = [m["seeds"] for m in metas]
    prompts = [m["num_prompts"] for m in metas] if by_prompts else None
    merged = copy.deepcopy(raws[0])
    if prompts is not None:
        merged["meta"]["num_prompts"] = sum(prompts)
        merged["meta"]["prompt_offset"] = [m.get("prompt_offset", 0) for m in metas]
        merged["greedy"]["rewards"] = [r for raw in raws for r in raw["greedy"]["rewards"]]
    else:
        merged["meta"]["seeds"] = sum(seeds)
        merged["meta"]["first_seed"] = [m.get("first_seed", 0) for m in metas]
    merged["bon"] = _merge_run([raw["bon"] for raw in raws], seeds, prompts)
    for part in ("aisp", "window"):
        if part in merged:
            merged[part] = _merge_run([raw[part] for raw in raws], seeds, prompts)
    merged["variants"] = [_merge_run([raw["variants"][i] for raw in raws], seeds, prompts)
                          for i in range(len(merged.get("variants", [])))]
    return merged


def _interval(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def print_table(report: dict[str, Any]) -> None:
    print(f"AISP(n={report['n']}, k={report['k']}) vs Best-of-N, {report['num_prompts']} prompts, "
          f"{report['seeds']} seeds, {report['max_new_tokens']} new tokens; greedy {report['greedy_mean']:.4f}")
    if "curve" in report:
        print(f"{'rollouts':>9} {'AISP best':>10} {'BoN best':>10} {'AISP−BoN [95% CI]':>28} {'iter mean':>10} {'ESS':>6}")
        for row, it_mean, ess in zip(report["curve"], report["aisp_iteration_mean"], report["aisp_ess"]):
            print(f"{row['rollouts']:>9} {row['aisp_best_mean']:>10.4f} {row['bon_best_mean']:>10.4f} "
                  f"{row['diff_mean']:>+9.4f} {_interval(row['diff_ci95']):>18} {it_mean:>10.4f} {ess:>6.2f}")
        match = report["rollouts_to_match_bon"]
        print(f"rollouts AISP needs to match BoN({report['n'] * report['k']}): {match if match else 'never'}")
        print(f"throughput: AISP {report['aisp_rollouts_per_s']:.1f} rollouts/s, "
              f"BoN {report['bon_samples_per_s']:.1f} samples/s ({report['max_batch']} rows per pass)")
    for row in report["variants"]:
        vs_base = f", vs base {row['vs_base']['mean']:+.4f} {_interval(row['vs_base']['ci95'])}" if "vs_base" in row else ""
        print(f"variant {row['name']:<24} best {row['aisp_best_mean']:.4f}  AISP−BoN {row['diff_mean']:+.4f} "
              f"{_interval(row['diff_ci95'])}  match at {row['rollouts_to_match_bon'] or 'never'}{vs_base}")
    if "window" in report:
        w = report["window"]
        print(f"adaptive window: {w['adaptive_best_mean']:.4f} vs fixed k {w['fixed_best_mean']:.4f}, "
              f"gain {w['gain_mean']:+.4f} {_interval(w['gain_ci95'])}")


def plot_report(report: dict[str, Any], path: pathlib.Path) -> None:
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
