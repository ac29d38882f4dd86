"""``alignq sample PROMPT -n N``: draw N samples in-process and print them best first.

The smallest way to see the policy and the reward model work; no Redis. Defaults come from
``workers.settings.WorkerSettings`` (``ALIGNQ_`` environment variables). torch loads only when the
verb runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from middleware.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", help="draw N samples for one prompt, print them best first",
        description="Draw N samples for one prompt in this process (no Redis) and print them with their rewards, "
                    "best first. Defaults come from the ALIGNQ_* worker settings.")
    parser.add_argument("prompt", help="the prompt (a user message; the chat template is applied)")
    parser.add_argument("-n", "--num-samples", type=int, default=4, help="samples to draw (default 4)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {text, reward, num_tokens}")
    parser.add_argument("--model", default=None, help="policy: HF name, local folder or .gguf (default: settings)")
    parser.add_argument("--reward", default=None,
                        help="reward spec: hf:<name-or-path>, embedding:<path>, python:<module>:<function>")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max tokens per sample (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same samples)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="torch device")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                        help="weights dtype")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UsageError("the prompt is empty: pass the text to answer, e.g. alignq sample \"Tell me a joke\" -n 4")
    if args.num_samples < 1:
        raise UsageError(f"-n must be at least 1 (got {args.num_samples})")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {args.top_p})")
    is_path = bool(args.model) and (args.model.startswith(("/", "./", "../", "~")) or args.model.endswith(".gguf"))
    if is_path and not os.path.exists(os.path.expanduser(args.model)):
        raise UsageError(f"model path {args.model} does not exist: pass an existing folder, .gguf file or HF name")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from middleware.cli.services import require_worker_extra

    require_worker_extra()
    from workers.engine import Engine, GenerationRequest
    from workers.errors import ModelLoadError
    from workers.models import configure_threads, load_policy, load_reward
    from workers.settings import WorkerSettings

    settings = WorkerSettings()
    configure_threads(settings.num_threads)
    device = args.device or settings.device
    try:
        # the reward first: a bad reward spec fails in milliseconds, before the policy loads
        reward = load_reward(args.reward or settings.reward_model, device=device,
                             positive=settings.reward_positive, negative=settings.reward_negative)
        policy = load_policy(args.model or settings.model, device=device, dtype=args.dtype or settings.dtype,
                             cache_dir=settings.cache_dir)
    except ModelLoadError as e:
        raise UsageError(str(e)) from e
    engine = Engine(policy, reward, max_batch=settings.max_batch)
    request = GenerationRequest(key="sample", prompt=args.prompt, num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    [result] = engine.run([request])
    if result.error:
        print(f"alignq sample: reward failed: {result.error}", file=sys.stderr)
        return 1
    samples = sorted(result.samples, key=lambda s: s.reward, reverse=True)
    if args.json:
        print(json.dumps([{"text": s.text, "reward": s.reward, "num_tokens": s.num_tokens} for s in samples]))
        return 0
    for rank, sample in enumerate(samples, 1):
        text = sample.text.strip().replace("\n", "\n      ")
        print(f"#{rank} reward={sample.reward:+.4f} tokens={sample.num_tokens}\n      {text}")
    return 0
