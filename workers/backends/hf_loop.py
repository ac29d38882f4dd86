"""The hf engine's batch loop: continuous batching on ``BatchRunner``'s step API.

Queued jobs join the running decode batch whenever it has free rows (``BatchRunner.submit`` and
``step_until`` in the model thread), and each job is published + XACKed (shielded) the moment it
finishes. On shutdown the jobs in flight finish; the worker hands back the queued ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from schemas import Job, SampleSet
from workers.cancellation import ack_cancelled
from workers.jobs import BatchRunner, HeldJob, take_batch

if TYPE_CHECKING:
    from workers.service import Worker

__all__ = ["STEPS_MAX_S", "stepping_loop"]

STEPS_MAX_S = 1.0  # longest the model thread decodes before the event loop hears from it


async def stepping_loop(worker: Worker) -> None:
    """Until stopped and nothing is in flight: admit queued jobs into free rows, decode, publish."""
    runner = worker.runner
    assert isinstance(runner, BatchRunner)
    while not (worker.stopping and not worker.in_flight):
        joining: list[HeldJob] = []
        if worker.queue and not worker.stopping and (runner.num_free_rows > 0 or not worker.in_flight):
            # up to max_batch_samples held: samples past the free rows wait inside the engine and
            # take rows the step they free up, with no hop through the event loop
            joining = take_batch(worker.queue, max_jobs=worker.settings.max_batch_jobs,
                                 max_samples=max(1, worker.max_batch_samples - runner.num_rows_held))
            worker.notify()  # room for intake
            joining = await worker.answer_expired(joining)
        if not joining and not worker.in_flight:
            await worker.wait_queue_change()
            continue
        if joining:
            worker.in_flight = [*worker.in_flight, *joining]
            worker.stats.num_batches += 1  # times jobs joined the running batch
            worker.stats.max_batch_jobs = max(worker.stats.max_batch_jobs, len(worker.in_flight))
        finished = await anyio.to_thread.run_sync(_steps_in_thread, worker, runner, [h.job for h in joining],
                                                  abandon_on_cancel=True)
        if finished:
            await _publish_finished(worker, finished)


def _steps_in_thread(worker: Worker, runner: BatchRunner, joining: list[Job]) -> list[tuple[Job, SampleSet | None]]:
    """Submit the joining jobs, then decode until some job finishes or new jobs could join."""
    worker.apply_threads()
    rejected: list[tuple[Job, SampleSet | None]] = list(runner.submit(joining))
    if rejected:
        return rejected

    def should_yield() -> bool:  # read from the model thread; a stale answer costs one hop
        return bool(worker.queue) and not worker.stopping and runner.num_free_rows > 0

    return runner.step_until(should_yield, max_s=STEPS_MAX_S)


async def _publish_finished(worker: Worker, finished: list[tuple[Job, SampleSet | None]]) -> None:
    """Publish + XACK the finished jobs (a cancelled job, None, is only acked: it was answered)."""
    by_id = {h.job.job_id: h for h in worker.in_flight}
    held = [(by_id[job.job_id], reply) for job, reply in finished if job.job_id in by_id]
    try:
        replies = [(h.entry_id, h.job, reply) for h, reply in held if reply is not None]
        if replies and await worker.publish(replies):
            worker.stats.num_samples += sum(len(reply.samples) for _, _, reply in replies)
        cancelled = [h for h, reply in held if reply is None]
        if cancelled:
            await ack_cancelled(worker, cancelled)
    finally:
        done = {job.job_id for job, _ in finished}
        worker.in_flight = [h for h in worker.in_flight if h.job.job_id not in done]
