"""``alignq``: one console script, one module per verb group.

Each module in ``VERB_MODULES`` defines ``register(subparsers)``, adding its verbs with
``parser.set_defaults(func=...)``; ``func(args) -> int`` is the exit code. Exit codes: 0 success,
1 runtime failure, 2 bad usage or bad input (one line of why on stderr). Modules import torch-side
code (``workers``) lazily, inside their functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from middleware.errors import ClientError, UsageError

VERB_MODULES = (
    "middleware.cli.sample",  # alignq sample
    "middleware.cli.pool",  # alignq pool build
    "middleware.cli.services",  # alignq run | serve | scheduler | worker | gateway | submit
    "middleware.cli.bench",  # alignq bench allocation | aisp | throughput | ingest
    "middleware.cli.control",  # alignq cancel
)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignq", description="Test-time alignment as a service: adaptive Best-of-N and AISP over Redis."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    configure_logging(args.verbose)
    try:
        code = args.func(args)
    except UsageError as e:
        print(f"alignq {args.verb}: {e}", file=sys.stderr)
        code = 2
    except (ClientError, BaseExceptionGroup) as e:  # e.g. Conflict: one line, exit 1, not a traceback
        error = _client_error(e)
        if error is None:
            raise
        print(f"alignq {args.verb}: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code or 0)


def _client_error(error: BaseException) -> ClientError | None:
    """The ClientError itself, or the first one inside an exception group (task groups wrap them)."""
    if isinstance(error, ClientError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _client_error(inner)
            if found is not None:
                return found
    return None
