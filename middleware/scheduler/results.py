"""What the scheduler core emits for one request: its seed, its job payloads and its terminal result.

Pure functions of a ``RequestState`` and the ``CoreConfig`` (no I/O, no clock: ``now_ms`` is passed in).
``middleware.scheduler.core`` decides *when* a job is issued or a request answered; this module decides
*what* the job or the answer contains: sample ranking (best finite reward first), the result's
accounting (samples used, explore/exploit split, timings) and the error shapes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

from middleware.scheduler.plans import CoreConfig, RequestState
from schemas import (
    AlignRequest,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Job,
    JobKind,
    Method,
    ResultStatus,
    Sample,
)

__all__ = ["SEED_MASK", "build_job", "error_result", "final_result", "make_job_id", "prompt_text", "rank_samples",
           "request_error_result", "request_seed"]

SEED_MASK = 2**63 - 1


def prompt_text(prompt: Any) -> str:
    """A prompt's text: the string, or the chat messages' contents joined."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(getattr(m, "content", None) or (m.get("content", "") if isinstance(m, dict) else "")) for m in prompt)


def request_seed(request: AlignRequest) -> int:
    """The request's seed, or one derived from its id (stable across processes and restarts)."""
    if request.seed is not None:
        return request.seed
    digest = hashlib.blake2b(request.request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & SEED_MASK


def make_job_id(request_id: str, kind: JobKind, sample_offset: int) -> str:
    return f"{request_id}:{kind.value}:{sample_offset}"


def rank_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Best first: finite rewards descending (ties: lower index), then NaN/inf rewards by index."""
    return sorted(samples, key=lambda s: (0, -s.reward, s.index) if math.isfinite(s.reward) else (1, 0.0, s.index))


def build_job(state: RequestState, config: CoreConfig, kind: JobKind, offset: int, num_samples: int,
              now_ms: int) -> Job:
    """The job for samples [offset, offset + num_samples) of ``state``'s request, config defaults filled in."""
    request = state.request
    return Job(
        job_id=make_job_id(request.request_id, kind, offset),
        request_id=request.request_id,
        scheduler_id=config.scheduler_id,
        kind=kind,
        prompt=request.prompt,
        num_samples=num_samples,
        sample_offset=offset,
        max_new_tokens=request.max_new_tokens or config.max_new_tokens,
        temperature=config.temperature if request.temperature is None else request.temperature,
        top_p=request.top_p or config.top_p,
        seed=state.seed,
        aisp=request.aisp,
        metadata=dict(request.metadata),
        deadline_at_ms=request.deadline_at_ms,
        model=request.model,
        priority=request.priority,
        traceparent=request.traceparent,
        created_at_ms=now_ms,
    )


def final_result(state: RequestState, scheduler_id: str, now_ms: int, *,
                 partial_error: ErrorInfo | None = None) -> AlignResult:
    """The terminal result from every sample the request has. ``partial_error``: answered at its deadline."""
    ranked = rank_samples(state.samples.values())
    best = ranked[0] if ranked and math.isfinite(ranked[0].reward) else None
    request = state.request
    num_explore = sum(1 for i in state.samples if i < state.num_explore) if request.method == Method.BON else 0
    common: dict[str, Any] = {
        "request_id": request.request_id, "method": request.method, "samples_used": len(ranked),
        "num_tokens": sum(s.num_tokens for s in ranked), "samples": ranked,
        "explore_samples": num_explore, "exploit_samples": len(ranked) - num_explore if request.method == Method.BON else 0,
        "queued_s": max(0.0, (state.taken_at_ms - request.submitted_at_ms) / 1000),
        "total_s": max(0.0, (now_ms - request.submitted_at_ms) / 1000),
        "generate_s": state.generate_s, "score_s": state.score_s, "scheduler_id": scheduler_id,
        "stats": dict(state.stats), "completed_at_ms": now_ms,
    }
    if best is None:
        error = partial_error or (state.errors[0] if state.errors else ErrorInfo(
            code=ErrorCode.REWARD_FAILED, message="no sample has a finite reward"))
        return AlignResult(status=ResultStatus.ERROR, error=error, **common)
    status = ResultStatus.PARTIAL if partial_error is not None else ResultStatus.OK
    return AlignResult(status=status, response=best.text, reward=best.reward, best_index=best.index, **common)


def request_error_result(request: AlignRequest, error: ErrorInfo, scheduler_id: str, now_ms: int) -> AlignResult:
    """An error answer for a decoded request the core refused (deployment limits)."""
    return AlignResult(request_id=request.request_id, status=ResultStatus.ERROR, method=request.method,
                       error=error, total_s=max(0.0, (now_ms - request.submitted_at_ms) / 1000),
                       scheduler_id=scheduler_id, completed_at_ms=now_ms)


def error_result(request_id: str, error: ErrorInfo, *, scheduler_id: str, now_ms: int,
                 method: Method | None = None) -> AlignResult:
    """An error answer for a request known only by its id (bad input, delivery exhausted)."""
    return AlignResult(request_id=request_id, status=ResultStatus.ERROR, method=method, error=error,
                       scheduler_id=scheduler_id, completed_at_ms=now_ms)
