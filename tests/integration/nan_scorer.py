"""A ``python:`` reward for the worker-service tests (importable as ``nan_scorer`` with this folder on
sys.path / PYTHONPATH): distinct-word share, NaN when ``metadata["nan"]`` is set, and a pause of
``metadata["sleep_s"]`` seconds when ``NAN_SCORER_SLEEP=1`` is in the environment (a slow job to
kill or lease)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any


def score(prompt: Any, response: str, metadata: Mapping[str, Any] | None = None) -> float:
    metadata = metadata or {}
    if metadata.get("nan"):
        return math.nan
    if metadata.get("sleep_s") and os.environ.get("NAN_SCORER_SLEEP") == "1":
        time.sleep(float(metadata["sleep_s"]))
    words = response.lower().split()
    return len(set(words)) / len(words) if words else 0.0


def score_batch(prompts: list[Any], responses: list[str], metadata: list[Mapping[str, Any]]) -> list[float]:
    """Batched form: one pause per call, not per response."""
    pause_s = max((float(m.get("sleep_s", 0)) for m in metadata), default=0.0)
    if pause_s and os.environ.get("NAN_SCORER_SLEEP") == "1":
        time.sleep(pause_s)
    return [math.nan if m.get("nan") else score(p, r, {}) for p, r, m in zip(prompts, responses, metadata)]


score_batch.batched = True  # type: ignore[attr-defined]
