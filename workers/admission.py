"""A worker's admission of job entries: decoded and checked before they are queued.

    await admit(worker, entries)           # runnable jobs queued; bad ones dead-lettered, expired answered
    batch = await answer_expired(worker, batch)   # before generation: drop (and answer) expired jobs

An undecodable entry is dead-lettered (with an error reply when its request can be salvaged); one
delivered more than ``max_deliveries`` times is dead-lettered with ``delivery_exhausted``; one past its
deadline is answered ``deadline_exceeded`` without generating.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from schemas import ErrorCode, Job, SampleSet, SchemaError, decode, now_ms
from workers.consumer import StreamEntry, dead_letter_job
from workers.jobs import HeldJob, error_sample_set, expired_reply, salvage_error_reply

if TYPE_CHECKING:
    from workers.service import Worker

__all__ = ["admit", "answer_expired"]

logger = logging.getLogger(__name__)


async def admit(worker: Worker, entries: list[StreamEntry]) -> None:
    """Decode and check entries; queue the runnable ones, answer or dead-letter the rest."""
    held_ids = {h.entry_id for h in worker.queue} | {h.entry_id for h in worker.in_flight}
    entries = [e for e in entries if e.entry_id not in held_ids]
    redelivered = [e.entry_id for e in entries if e.is_redelivery]
    counts = await worker.retry("delivery counts", lambda: worker.consumer.delivery_counts(redelivered))
    now = now_ms()
    admitted = 0
    expired: list[tuple[str, Job, SampleSet]] = []
    for entry in entries:
        if entry.is_redelivery and entry.entry_id not in counts:
            continue  # acked meanwhile (its first worker finished after all)
        delivery_count = counts.get(entry.entry_id, 1)
        payload = entry.payload
        try:
            if payload is None:
                raise SchemaError(f"entry has no {b'm'!r} field")
            job = decode(Job, payload)
        except SchemaError as e:
            salvaged = salvage_error_reply(payload, worker.worker_id, e)
            await _dead_letter(worker, entry, f"undecodable job: {e}", payload, reply=salvaged)
            continue
        if delivery_count > worker.settings.max_deliveries:
            reason = f"delivered {delivery_count} times (max_deliveries={worker.settings.max_deliveries})"
            reply = error_sample_set(job, worker.worker_id, ErrorCode.DELIVERY_EXHAUSTED,
                                     f"job {reason}: its workers kept dying or stalling")
            await _dead_letter(worker, entry, reason, payload, request_id=job.request_id,
                              reply=(job.scheduler_id, reply))
            continue
        if job.deadline_at_ms is not None and job.deadline_at_ms <= now:
            expired.append((entry.entry_id, job, expired_reply(job, worker.worker_id, now)))
            continue
        worker.queue.append(HeldJob(entry.entry_id, job, delivery_count))
        admitted += 1
    if expired:
        worker.stats.num_expired += len(expired)
        logger.info("dropped %d expired jobs before generation worker_id=%s", len(expired), worker.worker_id)
        await worker.publish(expired)
    if admitted:
        worker.notify()


async def answer_expired(worker: Worker, batch: list[HeldJob]) -> list[HeldJob]:
    """Jobs whose deadline passed while queued are answered now, not generated."""
    now = now_ms()
    expired = [h for h in batch if h.job.deadline_at_ms is not None and h.job.deadline_at_ms <= now]
    if not expired:
        return batch
    worker.stats.num_expired += len(expired)
    logger.info("dropped %d expired jobs before generation worker_id=%s", len(expired), worker.worker_id)
    await worker.publish([(h.entry_id, h.job, expired_reply(h.job, worker.worker_id, now)) for h in expired])
    return [h for h in batch if h not in expired]


async def _dead_letter(worker: Worker, entry: StreamEntry, reason: str, payload: bytes | None, *,
                       request_id: str | None = None, reply: tuple[str, SampleSet] | None = None) -> None:
    await worker.retry("dead letter", lambda: dead_letter_job(
        worker.redis, worker.keys, entry_id=entry.entry_id, reason=reason, payload=payload,
        request_id=request_id, reply=reply, stream=entry.stream or None))
    worker.stats.num_dead_letters += 1

