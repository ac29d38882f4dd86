"""``alignq bench allocation | aisp | throughput | ingest | latency``: JSON on stdout, optional plot.

Each benchmark is a module ``middleware.bench.<name>`` defining ``add_arguments(parser)`` and
``run(args) -> int``; imported only when its verb runs, so torch loads only for the benches that need it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
from typing import Any

BENCHES = {
    "allocation": "AdaBoN allocators vs uniform on response pools (the paper's protocol)",
    "aisp": "AISP(n, k) vs Best-of-N(n·k) on the same prompts, LM and reward",
    "throughput": "hand-written generate() loop vs alignq's engine vs the whole middleware",
    "ingest": "client submit rate vs redis-benchmark XADD; allocation time for 256 prompts",
    "latency": "best reward vs p50/p95 latency through the middleware: uniform, two rounds, deadline-chosen",
    "tracing": "the scheduler's CPU time per request with OpenTelemetry tracing off vs on",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON on stdout)", description=__doc__)
    verbs = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_text in BENCHES.items():
        module_name = f"middleware.bench.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        parser = verbs.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=_stopped_by_sigterm_too(module.run))


def _stopped_by_sigterm_too(run: Any) -> Any:
    """``run`` with SIGTERM raising KeyboardInterrupt like Ctrl-C, so a killed bench stops the scheduler
    and worker processes it started (its launcher's shutdown) instead of leaving them running."""

    def run_bench(args: argparse.Namespace) -> int:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        return int(run(args))

    return run_bench
