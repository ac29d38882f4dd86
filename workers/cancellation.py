"""Cancelled requests stop costing samples: a worker polls the cancelled markers of what it holds.

    tg.start_soon(cancel_loop, worker)        # every CANCEL_POLL_S: one MGET of the held requests' markers
    await ack_cancelled(worker, held_jobs)    # a cancelled job is answered already: only XACKed

Queued jobs of a cancelled request are dropped and acked; running ones are cut by the backend
(``runner.cancel(job_id)``: the hf engine drops their rows at its next decode step, the openai
backend cancels their outstanding server calls).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from schemas import WORKER_GROUP
from schemas.transport import REDIS_ERRORS
from workers.consumer import job_stream_of
from workers.jobs import HeldJob

if TYPE_CHECKING:
    from workers.service import Worker

__all__ = ["CANCEL_POLL_S", "ack_cancelled", "cancel_loop"]

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.2  # how soon a cancelled request stops costing samples


async def cancel_loop(worker: Worker) -> None:
    """Poll the cancelled markers of the jobs we hold (one MGET): queued ones are dropped and acked;
    the backend cuts the running ones (``runner.cancel``)."""
    while True:
        await anyio.sleep(CANCEL_POLL_S)
        held = [*worker.queue, *worker.in_flight]
        if not held:
            continue
        request_ids = sorted({h.job.request_id for h in held})
        try:
            markers = await worker.redis.mget([worker.keys.cancelled(rid) for rid in request_ids])
        except REDIS_ERRORS as e:
            logger.warning("reading cancellations failed worker_id=%s: %s", worker.worker_id, e)
            continue
        cancelled = {rid for rid, marker in zip(request_ids, markers) if marker is not None}
        if cancelled:
            await _drop_cancelled(worker, cancelled)


async def _drop_cancelled(worker: Worker, request_ids: set[str]) -> None:
    dropped = [h for h in worker.queue if h.job.request_id in request_ids]
    if dropped:
        worker.queue[:] = [h for h in worker.queue if h.job.request_id not in request_ids]
        worker.notify()
        await ack_cancelled(worker, dropped)
        logger.info("dropped %d queued jobs of cancelled requests worker_id=%s", len(dropped), worker.worker_id)
    if worker.runner is not None:
        for held in worker.in_flight:
            if held.job.request_id in request_ids:
                worker.runner.cancel(held.job.job_id)


async def ack_cancelled(worker: Worker, held: list[HeldJob]) -> None:
    """The request is answered already: nothing to publish, only the jobs to acknowledge."""
    async with worker.redis.pipeline(transaction=False) as pipe:
        for h in held:
            pipe.xack(job_stream_of(worker.keys, h.job), WORKER_GROUP, h.entry_id)
        await worker.retry("ack cancelled", pipe.execute)
    worker.stats.num_cancelled += len(held)
