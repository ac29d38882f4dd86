"""Jobs to model calls and back: batch packing, Job -> engine/AISP request, result -> SampleSet.

Boundary: synchronous and Redis-free. ``take_batch`` is pure; ``BatchRunner.run`` is what the worker
service calls in a worker thread (model work never runs on the event loop). Every job handed to
``BatchRunner.run`` gets exactly one SampleSet back, an error one if anything fails.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas import AispParams, ErrorCode, ErrorInfo, Job, JobKind, Sample, SampleSet, SchemaError, decode_raw
from workers.engine import Engine, GenerationRequest, GenerationResult

__all__ = ["BatchRunner", "HeldJob", "aisp_config", "error_sample_set", "expired_reply",
           "salvage_error_reply", "take_batch", "to_generation_request"]

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000  # ErrorInfo.message limit


@dataclass(slots=True)
class HeldJob:
    """A decoded job this worker holds (pending to it in the group) but has not answered yet."""

    entry_id: str  # stream entry id in keys.jobs
    job: Job
    delivery_count: int = 1  # times delivered, this time included


def job_rows(job: Job) -> int:
    """Samples (rows) a job decodes in total: its budget for AISP too (n per iteration, k iterations)."""
    return job.num_samples


def take_batch(queue: list[HeldJob], *, max_jobs: int, max_samples: int) -> list[HeldJob]:
    """Remove and return the jobs of the next batch: the oldest job always, then, in order, every job
    that still fits ``max_jobs`` and ``max_samples`` (a later small job may pass a large one, but the
    large one heads the next batch, so nothing starves)."""
    batch: list[HeldJob] = []
    rest: list[HeldJob] = []
    used = 0
    for held in queue:
        rows = job_rows(held.job)
        if not batch or (len(batch) < max_jobs and used + rows <= max_samples):
            batch.append(held)
            used += rows
        else:
            rest.append(held)
    queue[:] = rest
    return batch


def error_sample_set(job: Job, worker_id: str, code: ErrorCode, message: str) -> SampleSet:
    return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id=worker_id, kind=job.kind,
                     error=ErrorInfo(code=code, message=message[:MAX_ERROR_CHARS]))


def expired_reply(job: Job, worker_id: str, now_ms: int) -> SampleSet:
    late_ms = now_ms - (job.deadline_at_ms or now_ms)
    return error_sample_set(job, worker_id, ErrorCode.DEADLINE_EXCEEDED,
                            f"job deadline passed {late_ms} ms before it could start; not generated")


def salvage_error_reply(payload: bytes | None, worker_id: str,
                        error: Exception) -> tuple[str, SampleSet] | None:
    """(scheduler_id, error SampleSet) for a job that failed validation but still names its scheduler,
    request, job id and kind, so its scheduler hears of it; None when nothing is identifiable."""
    try:
        raw = decode_raw(payload or b"")
        message = f"job rejected by worker: {error}"[:MAX_ERROR_CHARS]
        reply = SampleSet(job_id=str(raw["job_id"]), request_id=raw["request_id"], worker_id=worker_id,
                          kind=JobKind(raw["kind"]),
                          error=ErrorInfo(code=ErrorCode.INTERNAL, message=message))
        return str(raw["scheduler_id"]), reply
    except (SchemaError, KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def _prompt(job: Job) -> str | list[dict]:
    return job.prompt if isinstance(job.prompt, str) else [m.model_dump() for m in job.prompt]


def to_generation_request(job: Job) -> GenerationRequest:
    return GenerationRequest(key=job.job_id, prompt=_prompt(job), num_samples=job.num_samples,
                             max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_p=job.top_p,
                             seed=job.seed, sample_offset=job.sample_offset, metadata=dict(job.metadata))


def aisp_config(defaults: Any, params: AispParams | None) -> Any:
    """The worker's AispConfig with a job's non-None overrides on top."""
    if params is None:
        return defaults
    overrides = {name: getattr(params, name) for name in
                 ("num_rollouts", "num_iterations", "sigma", "lam", "alpha", "horizon_tokens")
                 if getattr(params, name) is not None}
    return dataclasses.replace(defaults, **overrides)


def _samples(offset: int, generated: Sequence[Any]) -> list[Sample]:
    return [Sample(index=offset + s.index, text=s.text, reward=float(s.reward),
                   num_tokens=s.num_tokens, is_finished=s.is_finished) for s in generated]


def sample_set_from_generation(job: Job, result: GenerationResult, worker_id: str) -> SampleSet:
    if result.error is not None:  # rewards are NaN: no sample of this job is usable
        error = ErrorInfo(code=ErrorCode.REWARD_FAILED, message=result.error[:MAX_ERROR_CHARS])
        return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id=worker_id, kind=job.kind,
                         generate_s=result.generate_s, score_s=result.score_s, error=error)
    # the engine already numbers samples sample_offset + i
    return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id=worker_id, kind=job.kind,
                     samples=_samples(0, result.samples), generate_s=result.generate_s,
                     score_s=result.score_s)


def sample_set_from_aisp(job: Job, result: Any, worker_id: str) -> SampleSet:
    """AISP rollouts are numbered iteration * n + i; shifted by the job's sample_offset. A reward
    failure keeps the iterations scored before it (their rewards are finite) and reports the error."""
    stats: dict[str, float | int | list[float]] = {
        "aisp_ess": list(result.ess), "aisp_iteration_mean": list(result.iteration_mean),
        "aisp_iteration_best": list(result.iteration_best), "aisp_num_iterations": len(result.ess)}
    error = None if result.error is None else ErrorInfo(code=ErrorCode.REWARD_FAILED,
                                                        message=result.error[:MAX_ERROR_CHARS])
    return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id=worker_id, kind=job.kind,
                     samples=_samples(job.sample_offset, result.samples), generate_s=result.generate_s,
                     score_s=result.score_s, error=error, stats=stats)


class BatchRunner:
    """Runs batches of jobs on one loaded policy and reward model. Call from one thread at a time."""

    def __init__(self, policy: Any, reward: Any, *, worker_id: str, max_batch: int,
                 aisp_defaults: Any = None, embed_prompts: bool = False) -> None:
        self.policy = policy
        # explore replies carry the reward encoder's prompt embedding (the scheduler's spread prior)
        self.embed_prompts = embed_prompts and hasattr(reward, "embed")
        self.reward = reward
        self.worker_id = worker_id
        self.max_batch = max_batch
        self.engine = Engine(policy, reward, max_batch=max_batch)
        self.aisp_defaults = aisp_defaults
        self.num_engine_calls = 0  # Engine.run/submit calls: jobs per call shows how well jobs were packed
        self.num_aisp_calls = 0
        self.jobs: dict[str, Job] = {}  # submitted, not answered yet (the step API)
        self.aisp_waiting: list[Job] = []
        self._to_cancel: set[str] = set()  # job ids; written by the event-loop thread, read by the model thread
        self._cancel_lock = threading.Lock()

    # -- the step API: jobs join a running decode batch and leave it as they finish -----------------
    @property
    def has_work(self) -> bool:
        return bool(self.jobs)

    @property
    def num_free_rows(self) -> int:
        return 0 if self.aisp_waiting else self.engine.num_free_rows

    @property
    def num_rows_held(self) -> int:
        return self.engine.num_rows_held

    def cancel(self, job_id: str) -> None:
        """Drop a running job's remaining work at its next decode step. Safe from any thread."""
        with self._cancel_lock:
            self._to_cancel.add(job_id)

    def submit(self, jobs: Sequence[Job]) -> list[tuple[Job, SampleSet]]:
        """Queue jobs into the running batch; returns the replies of jobs that cannot start (invalid)."""
        rejected = []
        for job in jobs:
            if job.job_id in self.jobs:
                continue  # a redelivery of a job we are running: its one reply is enough
            if job.kind == JobKind.AISP:
                self.aisp_waiting.append(job)
            else:
                try:
                    self.engine.submit([to_generation_request(job)])
                except ValueError as e:
                    rejected.append((job, error_sample_set(job, self.worker_id, ErrorCode.INTERNAL, str(e))))
                    continue
            self.jobs[job.job_id] = job
        self.num_engine_calls += any(job.kind != JobKind.AISP for job in jobs)
        return rejected

    def step(self) -> list[tuple[Job, SampleSet | None]]:
        """One decode step (AISP jobs waiting: run them first, whole). Returns the jobs that finished,
        with their replies; a cancelled job comes back with None (its request is answered already)."""
        with self._cancel_lock:
            to_cancel, self._to_cancel = self._to_cancel & set(self.jobs), set()
        for job_id in to_cancel:
            self.engine.cancel(job_id)
        if self.aisp_waiting:
            jobs, self.aisp_waiting = self.aisp_waiting, []
            try:
                replies = self._run_aisp(jobs)
            except Exception as e:  # never lose a job: each gets an answer
                logger.exception("aisp batch of %d jobs failed", len(jobs))
                replies = [error_sample_set(job, self.worker_id, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
                           for job in jobs]
            return [(self.jobs.pop(job.job_id), reply) for job, reply in zip(jobs, replies)]
        try:
            results = self.engine.step()
        except Exception:  # the batch is broken: answer its jobs one by one, from scratch
            logger.exception("decode step failed; rerunning its %d jobs one by one", len(self.jobs))
            jobs = list(self.jobs.values())
            self.jobs.clear()
            self.engine = Engine(self.policy, self.reward, max_batch=self.max_batch)
            return [(job, self.run([job])[0]) for job in jobs]
        finished: list[tuple[Job, SampleSet | None]] = []
        for result in results:
            job = self.jobs.pop(result.key)
            finished.append((job, None if result.is_cancelled else
                             self._with_embedding(job, sample_set_from_generation(job, result, self.worker_id))))
        return finished

    def _with_embedding(self, job: Job, reply: SampleSet) -> SampleSet:
        """An explore reply with ``stats["prompt_embedding"]`` (when enabled; never fails the reply)."""
        if not self.embed_prompts or job.kind != JobKind.EXPLORE or reply.error is not None:
            return reply
        try:
            text = job.prompt if isinstance(job.prompt, str) else "\n".join(m.content for m in job.prompt)
            vector = [round(float(v), 5) for v in self.reward.embed([text])[0].tolist()]
        except Exception:
            logger.exception("prompt embedding failed job_id=%s", job.job_id)
            return reply
        return reply.model_copy(update={"stats": {**reply.stats, "prompt_embedding": vector}})

    def step_until(self, should_yield: Callable[[], bool], *, max_s: float) -> list[tuple[Job, SampleSet | None]]:
        """Decode steps until a job finishes, there is no work, ``should_yield()`` or ``max_s`` passes:
        one hop from the event loop covers many steps."""
        deadline = time.perf_counter() + max_s
        while self.has_work:
            finished = self.step()
            if finished or should_yield() or time.perf_counter() >= deadline:
                return finished
        return []

    def run(self, jobs: Sequence[Job]) -> list[SampleSet]:
        """One SampleSet per job, in order. An unexpected failure of the batch is retried job by job,
        so one bad job cannot fail the others; a job that fails alone gets an ``internal`` error."""
        try:
            return self._run(jobs)
        except Exception as e:  # never lose a job: every job gets an answer below
            if len(jobs) == 1:
                logger.exception("job failed job_id=%s", jobs[0].job_id)
                message = f"{type(e).__name__}: {e}"
                return [error_sample_set(jobs[0], self.worker_id, ErrorCode.INTERNAL, message)]
            logger.exception("batch of %d jobs failed; retrying them one by one", len(jobs))
        return [self.run([job])[0] for job in jobs]

    def _run(self, jobs: Sequence[Job]) -> list[SampleSet]:
        replies: list[SampleSet | None] = [None] * len(jobs)
        engine_at = [i for i, job in enumerate(jobs) if job.kind != JobKind.AISP]
        aisp_at = [i for i, job in enumerate(jobs) if job.kind == JobKind.AISP]
        if engine_at:
            started = time.perf_counter()
            results = self.engine.run([to_generation_request(jobs[i]) for i in engine_at])
            self.num_engine_calls += 1
            logger.info("engine batch jobs=%d samples=%d run_s=%.2f", len(engine_at),
                        sum(jobs[i].num_samples for i in engine_at), time.perf_counter() - started)
            for i, result in zip(engine_at, results):
                replies[i] = self._with_embedding(jobs[i], sample_set_from_generation(jobs[i], result, self.worker_id))
        if aisp_at:
            for i, reply in zip(aisp_at, self._run_aisp([jobs[i] for i in aisp_at])):
                replies[i] = reply
        assert all(r is not None for r in replies)
        return replies  # type: ignore[return-value]

    def _run_aisp(self, jobs: Sequence[Job]) -> list[SampleSet]:
        from workers.aisp import AispRequest, run_aisp

        requests = [AispRequest(key=job.job_id, prompt=_prompt(job), budget=job.num_samples,
                                max_new_tokens=job.max_new_tokens, seed=job.seed, metadata=dict(job.metadata),
                                config=aisp_config(self.aisp_defaults, job.aisp)) for job in jobs]
        started = time.perf_counter()
        results = run_aisp(self.policy, self.reward, requests, self.aisp_defaults, max_batch=self.max_batch)
        self.num_aisp_calls += 1
        logger.info("aisp batch jobs=%d run_s=%.2f", len(jobs), time.perf_counter() - started)
        if len(results) != len(jobs):
            raise RuntimeError(f"run_aisp returned {len(results)} results for {len(jobs)} requests")
        return [sample_set_from_aisp(job, result, self.worker_id) for job, result in zip(jobs, results)]
