"""``alignq bench throughput``: the same prompts and budgets run three ways, side by side.

(a) ``hf_loop``: what users write by hand — per prompt, ``model.generate(num_return_sequences=N,
    do_sample=True)`` then score the N responses with the reward model;
(b) ``engine``: alignq's ``workers.engine.Engine.run`` over all prompts at once, in-process
    (Best-of-N with the same budget: what method ``uniform`` runs);
(c) ``middleware``: the whole service — ``alignq scheduler`` and ``alignq worker`` as separate
    processes on Redis (embedded unless ALIGNQ_REDIS_URL or ``--redis-url``), requests submitted
    with the Client (method ``uniform``), results awaited.

All three use the same model files, dtype, device and torch thread count; (a) and (b) share one
loaded model. Model loading and a warm-up round are excluded from every clock: (c) waits for the
worker's heartbeat and a first answered request before starting its clock. Time to result of a
prompt = from the start of the run (all prompts handed over at t=0) to when its scored samples are
in the caller's hands. Tokens = generated tokens up to and including EOS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
from typing import Any

from middleware.bench.ingest import hardware_info as host_info
from middleware.errors import UsageError

DEFAULT_PROMPTS = (
    "Give me three tips for a good night's sleep.",
    "What is the capital of France?",
    "Explain what a hash table is to a beginner.",
    "Write a short, friendly reply to a customer whose order arrived late.",
    "How do I boil an egg?",
    "Suggest a name for a small coffee shop by the sea.",
    "Why is the sky blue? Answer in two sentences.",
    "Write a haiku about autumn rain.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "How can I stay focused while working from home?",
    "Describe a cat to someone who has never seen one.",
    "What is a good way to learn a new language?",
    "Recommend a healthy breakfast that takes five minutes.",
    "Explain recursion with a simple example.",
    "Write a polite message declining a meeting invitation.",
)
MODES = ("hf_loop", "engine", "middleware", "backend", "server")
DEFAULT_MODES = ("hf_loop", "engine", "middleware")  # backend and server need --backend-url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=pathlib.Path, default=None,
                        help="JSONL ({'prompt': ...} per line) or plain text, one prompt a line; default: 16 built-in")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--budget", type=int, default=8, help="samples per prompt (N)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--method", default="uniform", choices=("uniform", "bon"),
                        help="middleware: uniform (one stage) or bon (explore, allocate, exploit: two stages)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the middleware run")
    parser.add_argument("--model", default=None, help="policy LM spec (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--reward", default=None, help="reward spec (default: MiniLM preference reward)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for every mode (0: cores / workers); each worker gets threads / workers")
    parser.add_argument("--max-batch", type=int, default=64, help="engine rows per forward pass (b and c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every mode this often, interleaved; report the median run and ratio")
    parser.add_argument("--modes", "--mode", dest="modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (default {','.join(DEFAULT_MODES)})")
    parser.add_argument("--backend-url", default=None,
                        help="backend, server: an OpenAI-compatible server's /v1 base (middleware.bench.throughput_backend)")
    parser.add_argument("--backend-model", default=None, help="backend, server: model name sent to the server")
    parser.add_argument("--backend-concurrency", type=int, default=64,
                        help="backend, server: requests in flight to the server (ALIGNQ_BACKEND_MAX_CONCURRENCY)")
    parser.add_argument("--redis-url", default=None, help="Redis for (c) (default ALIGNQ_REDIS_URL, else embedded)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up on (c) after this long")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="write a bar chart (PNG) here")


def load_prompts(path: pathlib.Path | None, num_prompts: int | None) -> list[str | list[dict]]:
    if path is None:
        prompts: list[str | list[dict]] = list(DEFAULT_PROMPTS)
    else:
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts {path}: {e.strerror}") from e
        prompts = []
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith(("{", '"')):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from e
                prompt = item.get("prompt") if isinstance(item, dict) else item
                if not prompt:
                    raise UsageError(f"{path}:{number}: no 'prompt' field")
                prompts.append(prompt)
            else:
                prompts.append(line.strip())
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise UsageError("no prompts to run: give --prompts FILE with at least one line")
    return prompts


def run(args: argparse.Namespace) -> int:
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        raise UsageError(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    if min(args.budget, args.max_new_tokens, args.workers, args.max_batch, args.repeats) < 1 or args.threads < 0:
        raise UsageError("--budget, --max-new-tokens, --workers, --max-batch and --repeats must be >= 1, --threads >= 0")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError("--num-prompts must be >= 1")
    prompts = load_prompts(args.prompts, args.num_prompts)
    if args.plot is not None:
        _check_matplotlib()

    from middleware.bench import throughput_backend as backend
    from middleware.bench import throughput_modes as measure

    if {"backend", "server"} & set(modes):
        backend.check_backend_url(args)

    report: dict[str, Any] = {"num_prompts": len(prompts), "budget": args.budget,
                              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                              "top_p": args.top_p, "repeats": args.repeats, "method": args.method}
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with contextlib.ExitStack() as stack:
        threads = measure.resolve_threads(args.threads)
        if "middleware" in modes:  # started first: its model loads while ours does
            measure_middleware = stack.enter_context(
                measure.middleware_session(args, threads=threads, warmup_prompt=prompts[0]))
        if "backend" in modes:
            measure_backend = stack.enter_context(
                backend.backend_session(args, threads=threads, warmup_prompt=prompts[0]))
        local = measure.load_local(args) if {"hf_loop", "engine"} & set(modes) else None
        if local is not None:
            threads = local.hardware["threads"]
            report["hardware"] = local.hardware
        for repeat in range(args.repeats):  # interleaved, order alternating: drifting load hits each alike
            for mode in (modes if repeat % 2 == 0 else modes[::-1]):
                if mode == "middleware":
                    runs[mode].append(measure_middleware(prompts))
                elif mode == "backend":
                    runs[mode].append(measure_backend(prompts))
                elif mode == "server":
                    runs[mode].append(backend.run_server(prompts, args))
                else:
                    assert local is not None  # loaded above for every local mode
                    runs[mode].append(measure.MODE_RUNNERS[mode](local, prompts, args))
    if {"middleware", "backend", "server"} & set(modes):
        report.setdefault("hardware", {**host_info(), "threads": threads, "device": args.device,
                                       "dtype": args.dtype})
        report["hardware"]["worker_processes"] = args.workers
        report["hardware"]["threads_per_worker"] = max(1, threads // args.workers)
    report["hardware"]["load_avg_1m_end"] = os.getloadavg()[0]  # other work on the host skews timings
    for mode, mode_runs in runs.items():
        report[mode] = median_run(mode_runs)
        report[mode]["runs_samples_per_s"] = [run["samples_per_s"] for run in mode_runs]
    # ratios of runs measured side by side (same repeat), then their median
    if "backend" in runs and "server" in runs:
        report.update(backend.backend_ratios(runs["backend"], runs["server"]))
    for key, upper, lower in (("engine_over_hf", "engine", "hf_loop"), ("middleware_over_engine", "middleware", "engine")):
        if upper in runs and lower in runs:
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[upper], runs[lower])]
            report[key] = statistics.median(ratios)
            report[f"{key}_runs"] = ratios
            if all(a["cpu_s"] > 0 and b["cpu_s"] > 0 for a, b in zip(runs[upper], runs[lower])):
                report[f"{key}_per_cpu_s"] = statistics.median(
                    a["samples_per_cpu_s"] / b["samples_per_cpu_s"] for a, b in zip(runs[upper], runs[lower]))
    if args.plot is not None:
        write_plot(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median samples/s (a real run, so its numbers agree with each other)."""
    ordered = sorted(runs, key=lambda run: run["samples_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2])


def format_report(report: dict[str, Any]) -> str:
    hardware = report.get("hardware", {})
    title = (f"throughput: {report['num_prompts']} prompts x budget {report['budget']} x {report['max_new_tokens']} "
             f"new tokens; {hardware.get('cpu_model', '?')}, threads={hardware.get('threads', '?')}, "
             f"{hardware.get('dtype', '?')} on {hardware.get('device', '?')}")
    lines = [title]
    for key, label in (("engine_over_hf", "engine / hf_loop"), ("middleware_over_engine", "middleware / engine")):
        if key in report:
            runs = ", ".join(f"{ratio:.2f}" for ratio in report[f"{key}_runs"])
            line = f"  {label:<20} {report[key]:.2f}x samples/s" + (f" (runs: {runs})" if report["repeats"] > 1 else "")
            if f"{key}_per_cpu_s" in report:
                line += f"; {report[f'{key}_per_cpu_s']:.2f}x samples per CPU-second"
            lines.append(line)
    if "backend_over_server" in report:
        lines.append(f"  {'backend / server':<20} {report['backend_over_server']:.2f}x samples/s; "
                     f"{report['backend_over_server_without_scoring']:.2f}x without the workers' scoring "
                     f"({report['backend_score_share']:.0%} of the backend's wall time)")
    lines.append(f"  {'mode':<12} {'samples/s':>10} {'tokens/s':>10} {'p50 s':>8} {'p95 s':>8} {'wall s':>8} {'CPU s':>8}")
    for mode in MODES:
        if mode in report:
            row = report[mode]
            lines.append(f"  {mode:<12} {row['samples_per_s']:>10.2f} {row['tokens_per_s']:>10.1f} "
                         f"{row['p50_s']:>8.2f} {row['p95_s']:>8.2f} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f}")
    return "\n".join(lines)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        raise UsageError("--plot needs matplotlib: pip install 'alignq[plot]'") from e


def write_plot(report: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in MODES if mode in report]
    labels = {"hf_loop": "generate() loop", "engine": "alignq engine", "middleware": "alignq via Redis",
              "backend": "alignq + server", "server": "server alone"}
    colors = {"hf_loop": "#999999", "engine": "#1f77b4", "middleware": "#2ca02c", "backend": "#9467bd",
              "server": "#8c564b"}
    fig, (ax_rate, ax_latency) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [report[mode]["samples_per_s"] for mode in modes]
    bars = ax_rate.bar([labels[m] for m in modes], rates, color=[colors[m] for m in modes])
    base = report.get("hf_loop", {}).get("samples_per_s")
    for bar, rate in zip(bars, rates):
        note = f"{rate:.1f}" + (f"\n{rate / base:.2f}x" if base else "")
        ax_rate.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax_rate.set_ylabel("samples / s (higher is better)")
    ax_rate.set_ylim(0, max(rates) * 1.3)
    width = 0.38
    positions = range(len(modes))
    ax_latency.bar([p - width / 2 for p in positions], [report[m]["p50_s"] for m in modes], width, label="p50")
    ax_latency.bar([p + width / 2 for p in positions], [report[m]["p95_s"] for m in modes], width, label="p95")
    ax_latency.set_xticks(list(positions), [labels[m] for m in modes])
    ax_latency.set_ylabel("time to result, s (lower is better)")
    ax_latency.legend()
    hardware = report.get("hardware", {})
    fig.suptitle(f"{report['num_prompts']} prompts x N={report['budget']} x {report['max_new_tokens']} tokens — "
                 f"{hardware.get('cpu_model', '')}, threads={hardware.get('threads', '?')}, {hardware.get('dtype', '')}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
