"""``alignq pool build | show``: response pools for ``alignq bench allocation`` (format: middleware.bench.pools)."""

from __future__ import annotations

import argparse
import json
import sys

from middleware.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    from middleware.bench.pools import SYNTHETIC_KINDS

    pool = subparsers.add_parser("pool", help="build or inspect response pools", description=__doc__)
    verbs = pool.add_subparsers(dest="pool_verb", metavar="VERB", required=True)

    build = verbs.add_parser("build", help="sample and score N responses per prompt (resumable)",
                             description="Generate N scored samples per prompt with the real engine, or a "
                                         "synthetic pool with --synthetic. Prompts already in -o are skipped.")
    build.add_argument("--prompts", help="JSON lines: {\"id\", \"prompt\", \"metadata\"} per line")
    build.add_argument("--samples", type=int, default=64, help="samples per prompt (default 64)")
    build.add_argument("-o", "--output", required=True, help="pool file to write or resume (JSON lines)")
    build.add_argument("--model", help="policy: HF name, local dir or .gguf (default: SmolLM2-135M-Instruct)")
    build.add_argument("--reward", help="reward spec: hf:..., embedding:..., python:module:function")
    build.add_argument("--max-new-tokens", type=int, default=32)
    build.add_argument("--temperature", type=float, default=0.8)
    build.add_argument("--top-p", type=float, default=1.0)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="auto", help="auto, cpu or cuda")
    build.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic)")
    build.add_argument("--max-batch", type=int, default=64, help="samples per forward batch")
    build.add_argument("--synthetic", choices=sorted(SYNTHETIC_KINDS),
                       help="no models: rewards from a parametric distribution (" +
                            "; ".join(f"{k}: {v}" for k, v in SYNTHETIC_KINDS.items()) + ")")
    build.add_argument("--num-prompts", type=int, default=24, help="synthetic: prompts (default 24)")
    build.add_argument("--spread", type=float, default=11.0, help="synthetic: largest/smallest scale (default 11)")
    build.add_argument("--max-duration-s", type=float, default=None,
                       help="stop cleanly after the prompt that crosses this many seconds (run again to resume)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    build.set_defaults(func=_build)

    show = verbs.add_parser("show", help="per-prompt summary of a pool (JSON lines with --json)")
    show.add_argument("pool")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    from middleware.bench.pools import PoolError, build_pool, synthetic_pool, write_pool

    if args.samples < 1:
        raise UsageError("--samples must be >= 1")
    try:
        if args.synthetic:
            pool = synthetic_pool(args.synthetic, num_prompts=args.num_prompts, num_samples=args.samples,
                                  spread=args.spread, seed=args.seed)
            write_pool(pool, args.output)
        else:
            if not args.prompts:
                raise UsageError("give --prompts FILE.jsonl (or --synthetic KIND for a pool without models)")
            pool = build_pool(args.prompts, args.output, num_samples=args.samples, model=args.model,
                              reward=args.reward, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, device=args.device, num_threads=args.threads,
                              max_batch=args.max_batch, progress=not args.no_progress,
                              max_duration_s=args.max_duration_s)
    except PoolError as e:
        raise UsageError(str(e)) from e
    if not args.synthetic:
        from middleware.bench.pools import read_prompts

        missing = len(read_prompts(args.prompts)) - len(pool.prompts)
        if missing > 0:
            print(f"{args.output}: stopped early, {len(pool.prompts)} prompts built, {missing} to go: "
                  "run the same command again to resume", file=sys.stderr)
            return 0
    print(f"{args.output}: {len(pool.prompts)} prompts × {args.samples} samples", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from middleware.bench.pools import PoolError, load_pool

    try:
        pool = load_pool(args.pool)
    except PoolError as e:
        raise UsageError(str(e)) from e
    rows = pool.summary()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(json.dumps(pool.header))
    print(f"{'prompt_id':<14} {'n':>4} {'mean':>8} {'std':>8} {'max':>8} {'tokens':>7}")
    for row in rows:
        tokens = f"{row['mean_tokens']:.1f}" if row["mean_tokens"] is not None else "-"
        print(f"{row['prompt_id']:<14} {row['num_samples']:>4} {row['mean']:>8.4f} {row['std']:>8.4f} "
              f"{row['max']:>8.4f} {tokens:>7}")
    return 0
