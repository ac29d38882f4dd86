"""``alignq bench aisp``: AISP(n, k) against Best-of-N(n·k) and greedy decoding, same prompts, LM and reward.

Per seed, every prompt gets n·k AISP rollouts (k iterations of n) and n·k Best-of-N samples
(temperature 0.8, top-p 0.95); greedy decoding runs once. Reported (``middleware.bench.aisp_stats``):

    best(r)                  E[max reward of a prompt's first r rollouts / samples]   (the curve)
    aisp_best_mean           best(n·k) of AISP;  bon_best_mean: the same for Best-of-N
    diff_mean, diff_ci95     AISP − BoN at n·k, mean over prompts, 95% bootstrap interval over prompts
    rollouts_to_match_bon    smallest r with best_AISP(r) >= best_BoN(n·k); null if never
    aisp_rollouts_per_s      AISP rollouts per second of wall time; bon_samples_per_s: the engine's

``--variant "NAME key=value ..."`` runs AISP again with some settings changed (n·k kept) and reports
each variant against BoN and against the base run; ``--sweep`` adds a grid of σ and λ as variants.
``--window`` runs adaptive AISP (``workers.aisp_window``) over all prompts with the same total
budget and reports its gain over the fixed n, k. The protocol (docs/aisp.md): choose settings on
``examples/aisp_tune.jsonl``, report on ``examples/aisp_test.jsonl``. ``--save`` writes the report
after every run. Torch and the models load only inside ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any

from middleware.bench.aisp_report import analyse, merge_raw, plot_report, print_table
from middleware.bench.aisp_runs import (
    AISP_FIELDS,
    BON_TEMPERATURE,
    BON_TOP_P,
    load_models,
    run_aisp_seeds,
    run_bon_seeds,
    run_greedy,
    run_window_seeds,
)
from middleware.bench.aisp_stats import best_curve, summarize
from middleware.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "best_curve", "load_prompts", "parse_variant", "run", "summarize"]

DEFAULT_SWEEP_SIGMAS = "0.1,0.2,0.3"
DEFAULT_SWEEP_LAMS = "0.1,0.3,1.0"
_BOOL = {"true": True, "false": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=pathlib.Path, default=None, help="JSON lines with a 'prompt' field")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only N prompts")
    parser.add_argument("--prompt-offset", type=int, default=0, help="skip the first prompts (default 0)")
    parser.add_argument("--n", type=int, default=8, help="AISP rollouts per iteration (default 8)")
    parser.add_argument("--k", type=int, default=4, help="AISP iterations (default 4); BoN draws n·k samples")
    parser.add_argument("--seeds", type=int, default=3, help="repeat AISP and BoN with S seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+S-1 (default 0)")
    parser.add_argument("--merge", type=pathlib.Path, nargs="+", default=None, metavar="REPORT",
                        help="no runs: merge --save reports of the same setup on other seeds and analyse them")
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
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="rollout sampling temperature under the perturbation; 0: greedy (default 0.8, as the worker)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus of sampled rollouts (default 0.95)")
    parser.add_argument("--keep-elite", action="store_true", help="the best (V, r) so far joins every update")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME key=value ...'",
                        help=f"also run AISP with these settings changed; keys: n, k, {', '.join(AISP_FIELDS)}")
    parser.add_argument("--skip-base", action="store_true", help="run only the variants (no base AISP run)")
    parser.add_argument("--sweep", action="store_true", help="also run AISP over a grid of σ and λ")
    parser.add_argument("--sweep-sigmas", default=DEFAULT_SWEEP_SIGMAS, help=f"(default {DEFAULT_SWEEP_SIGMAS})")
    parser.add_argument("--sweep-lams", default=DEFAULT_SWEEP_LAMS, help=f"(default {DEFAULT_SWEEP_LAMS})")
    parser.add_argument("--window", action="store_true",
                        help="also run adaptive AISP: all prompts share n·k·prompts rollouts (workers.aisp_window)")
    parser.add_argument("--window-share", type=float, default=0.5, help="share of prompts per later round (0.5)")
    parser.add_argument("--window-max-iterations", type=int, default=None,
                        help="iterations one prompt may get in the window (default 2k)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--max-batch", type=int, default=64, help="rows per forward pass (default 64)")
    parser.add_argument("--save", type=pathlib.Path, default=None,
                        help="write the raw runs here after every run, the full report at the end")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="write a PNG of best reward vs rollouts")


def load_prompts(path: pathlib.Path, num_prompts: int | None, offset: int = 0) -> list[dict[str, Any]]:
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
    for index, item in enumerate(items):
        item["index"] = index  # seeds follow the prompt's place in the file, whatever range a run takes
    items = items[offset:offset + num_prompts] if num_prompts is not None else items[offset:]
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


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in _BOOL:
        return _BOOL[lowered]
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError as e:
        raise UsageError(f"--variant value {text!r} is not a number, true/false or none") from e


def parse_variant(text: str, base: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """'NAME key=value ...' -> (NAME, base settings with those keys replaced); n·k must stay the same."""
    name, *pairs = text.split()
    settings = dict(base)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in ("n", "k", *AISP_FIELDS):
            raise UsageError(f"--variant {name}: {pair!r} is not key=value with a key in n, k, {', '.join(AISP_FIELDS)}")
        settings[key] = _value(raw)
    if settings["n"] * settings["k"] != base["n"] * base["k"]:
        raise UsageError(f"--variant {name}: n·k must stay {base['n'] * base['k']} (the budget)")
    return name, settings


def _base_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"n": args.n, "k": args.k, "sigma": args.sigma, "sigma_is_relative": not args.sigma_absolute,
            "lam": args.lam, "alpha": args.alpha, "horizon_tokens": args.horizon,
            "standardize_rewards": not args.no_standardize, "max_u_norm": args.max_u_norm or None,
            "sigma_decay": args.sigma_decay, "temperature": args.temperature, "top_p": args.top_p,
            "keep_elite": args.keep_elite}


def _validate(args: argparse.Namespace) -> None:
    if min(args.n, args.k, args.seeds, args.max_new_tokens, args.max_batch) < 1 or min(args.threads, args.first_seed) < 0:
        raise UsageError("--n, --k, --seeds, --max-new-tokens and --max-batch must be >= 1, --threads and "
                         "--first-seed >= 0")
    if min(args.sigma, args.lam, args.sigma_decay) <= 0 or not 0 <= args.alpha <= 1 or args.max_u_norm < 0:
        raise UsageError("--sigma, --lam and --sigma-decay must be > 0, --alpha in [0, 1], --max-u-norm >= 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or not 0 < args.window_share <= 1:
        raise UsageError("--temperature must be >= 0, --top-p and --window-share in (0, 1]")
    if args.num_prompts is not None and args.num_prompts < 1 or args.prompt_offset < 0:
        raise UsageError("--num-prompts must be >= 1 and --prompt-offset >= 0")
    if args.skip_base and args.window:
        raise UsageError("--window compares with the base run: drop --skip-base")


def _save(report: dict[str, Any], path: pathlib.Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report) + "\n", encoding="utf-8")


def _measure(args: argparse.Namespace, items: list[dict[str, Any]], base: dict[str, Any],
             variants: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    models = load_models(args.model, args.reward, args.device, args.dtype, args.threads)
    n, k = args.n, args.k
    common = {"seeds": args.seeds, "first_seed": args.first_seed, "max_new_tokens": args.max_new_tokens,
              "max_batch": args.max_batch}
    rewards, wall_s = run_greedy(models, items, args.max_new_tokens, args.max_batch)
    raw: dict[str, Any] = {"meta": {
        "n": n, "k": k, "num_prompts": len(items), "prompt_offset": args.prompt_offset, "seeds": args.seeds,
        "first_seed": args.first_seed,
        "max_new_tokens": args.max_new_tokens, "prompts": str(args.prompts), "model": models.policy.name,
        "reward": args.reward or "embedding (MiniLM preference)", "config": base,
        "bon_sampling": {"temperature": BON_TEMPERATURE, "top_p": BON_TOP_P}, "max_batch": args.max_batch,
        "hardware": models.hardware}, "greedy": {"rewards": rewards, "wall_s": wall_s}}
    raw["bon"] = dataclasses.asdict(run_bon_seeds(models, items, num_samples=n * k, **common))
    _save(raw, args.save)
    if not args.skip_base:
        raw["aisp"] = dataclasses.asdict(run_aisp_seeds(models, items, base, **common))
        _save(raw, args.save)
    # the window before the variants: it compares with the base run, the variants come last
    if args.window:
        max_iterations = args.window_max_iterations or 2 * k
        out = run_window_seeds(models, items, base, max_iterations=max_iterations, share=args.window_share, **common)
        raw["window"] = {"share": args.window_share, "max_iterations": max_iterations, "runs": out.runs,
                         "wall_s": out.wall_s, **out.extra}
        _save(raw, args.save)
    raw["variants"] = []
    for name, settings in variants:
        out = run_aisp_seeds(models, items, settings, **common)
        raw["variants"].append({"name": name, "settings": settings, **dataclasses.asdict(out)})
        _save(raw, args.save)
    return raw


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise UsageError("--plot needs matplotlib: pip install 'alignq[plot]'") from e
    if args.merge:
        raws = []
        for path in args.merge:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"--merge: cannot read a report from {path}: {e}") from e
            raws.append(data.get("raw", data))
        raw = merge_raw(raws)
    else:
        if args.prompts is None:
            raise UsageError("give --prompts (or --merge reports)")
        items = load_prompts(args.prompts, args.num_prompts, args.prompt_offset)
        base = _base_settings(args)
        variants = [parse_variant(text, base) for text in args.variant]
        if args.sweep:
            variants += [(f"sigma={s},lam={lam}", {**base, "sigma": s, "lam": lam})
                         for s in _floats(args.sweep_sigmas, "--sweep-sigmas")
                         for lam in _floats(args.sweep_lams, "--sweep-lams")]
        raw = _measure(args, items, base, variants)
    report = analyse(raw)
    if args.sweep:  # the σ × λ grid, in the shape earlier versions printed
        report["sweep"] = [{"sigma": row["settings"]["sigma"], "lam": row["settings"]["lam"],
                            "aisp_best_mean": row["aisp_best_mean"], "rollouts_to_match_bon": row["rollouts_to_match_bon"]}
                           for row in report["variants"] if row["name"].startswith("sigma=")]
    _save(report, args.save)
    if args.plot is not None and "curve" in report:
        plot_report(report, args.plot)
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(report)
    return 0
