"""Score the samples of many jobs in one reward call; a failure stays with the job that caused it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["JobScores", "score_jobs"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class JobScores:
    rewards: list[float]
    score_s: float  # this job's share of scoring time
    error: str | None = None  # the reward failed for this job (its rewards are NaN)


def _finite(values: Sequence[Any], expected: int) -> list[float]:
    floats = [float(v) for v in values]
    if len(floats) != expected or not all(math.isfinite(v) for v in floats):
        raise ValueError(f"reward returned {len(floats)} scores (or non-finite ones) for {expected}")
    return floats


def score_jobs(reward: Any, prompts: Sequence[Any], texts: Sequence[Sequence[str]],
               metadata: Sequence[Mapping[str, Any]]) -> list[JobScores]:
    """One ``reward.score`` call over every sample of every job; if it fails, job by job, so one job's
    bad input costs only that job."""
    flat_prompts = [p for p, ts in zip(prompts, texts) for _ in ts]
    flat_meta = [m for m, ts in zip(metadata, texts) for _ in ts]
    flat = [t for ts in texts for t in ts]
    started = time.perf_counter()
    try:
        scores = _finite(reward.score(flat_prompts, flat, flat_meta), len(flat)) if flat else []
        share = (time.perf_counter() - started) / max(1, len(flat))
        out, start = [], 0
        for ts in texts:
            out.append(JobScores(scores[start:start + len(ts)], share * len(ts)))
            start += len(ts)
        return out
    except Exception as e:  # noqa: BLE001 - isolate the failing job(s) below
        logger.info("batched scoring failed (%s); scoring job by job", e)
    out = []
    for prompt, ts, meta in zip(prompts, texts, metadata):
        started = time.perf_counter()
        try:
            values = _finite(reward.score([prompt] * len(ts), list(ts), [meta] * len(ts)), len(ts)) if ts else []
            out.append(JobScores(values, time.perf_counter() - started))
        except Exception as e:  # noqa: BLE001 - a reward failure fails this job only
            out.append(JobScores([math.nan] * len(ts), time.perf_counter() - started, f"{type(e).__name__}: {e}"))
    return out
