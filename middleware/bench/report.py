"""How a bench prints what it measured: one JSON object (``--json``), or text lines with 95% intervals.

Shared by the ``alignq bench`` verbs so every report reads the same way; no measuring, no statistics here
(the intervals are computed where they are measured).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["format_interval", "print_report"]


def format_interval(interval: Sequence[float] | None, digits: int = 3) -> str:
    """``[low, high]`` with ``digits`` decimals; "" when there is no interval."""
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else ""


def print_report(report: dict[str, Any], *, as_json: bool, lines: Iterable[str]) -> None:
    """The report as one JSON line on stdout, or else ``lines`` (the human-readable table)."""
    if as_json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return
    for line in lines:
        print(line)
