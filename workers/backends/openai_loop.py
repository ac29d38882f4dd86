"""The batch loop of a backend without a step API (openai: a server that batches for itself).

A batch starts whenever jobs wait and fewer than the backend's ``max_concurrency`` samples are in
flight, so batches overlap and the server is not left idle while one batch's last samples finish or
are scored. Each batch is published + XACKed (shielded) when it is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from schemas import Job, SampleSet
from workers.jobs import HeldJob, take_batch

if TYPE_CHECKING:
    from workers.service import Worker

__all__ = ["overlapping_loop"]


async def overlapping_loop(worker: Worker) -> None:
    """Until stopped: start a batch whenever jobs wait and the in-flight samples leave room."""
    limit = int(getattr(worker.runner, "max_concurrency", 0) or worker.max_batch_samples)
    async with anyio.create_task_group() as tg:
        while not worker.stopping:
            room = limit - sum(h.job.num_samples for h in worker.in_flight)
            if not worker.queue or room <= 0:
                await worker.wait_queue_change()
                continue
            batch = take_batch(worker.queue, max_jobs=worker.settings.max_batch_jobs, max_samples=room)
            worker.notify()  # room for intake
            batch = await worker.answer_expired(batch)
            if batch:
                worker.in_flight = [*worker.in_flight, *batch]
                tg.start_soon(_run_batch, worker, batch)


async def _run_batch(worker: Worker, batch: list[HeldJob]) -> None:
    try:
        jobs = [held.job for held in batch]
        replies = await anyio.to_thread.run_sync(_run_in_thread, worker, jobs, abandon_on_cancel=True)
        worker.stats.num_batches += 1
        worker.stats.max_batch_jobs = max(worker.stats.max_batch_jobs, len(jobs))
        if await worker.publish([(h.entry_id, h.job, r) for h, r in zip(batch, replies)]):
            worker.stats.num_samples += sum(len(r.samples) for r in replies)
    finally:
        worker.in_flight = [h for h in worker.in_flight if h not in batch]
        worker.notify()  # room for the next batch


def _run_in_thread(worker: Worker, jobs: list[Job]) -> list[SampleSet]:
    worker.apply_threads()
    assert worker.runner is not None
    replies: list[SampleSet] = worker.runner.run(jobs)
    return replies
