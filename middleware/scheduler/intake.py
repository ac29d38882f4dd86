"""The scheduler's boundary: request entries read from the stream, checked, and admitted into the core.

``Intake.take(entries)`` never raises on bad input. Per entry, in order:

    no payload                    dead-lettered
    delivered > max_deliveries    dead-lettered; answered ``delivery_exhausted`` if its id can be salvaged
    not a valid AlignRequest      answered ``bad_request`` (id salvaged), else dead-lettered
    already answered (claimed)    acked, nothing else (a scheduler died between answering and acking)
    otherwise                     admitted, with the samples a previous owner kept (``keys.kept_samples``),
                                  and the stage-2 grant its window gave it, if one did (``plans.Grant``)

``recover_stale_jobs`` reads the kept samples of requests whose jobs have waited longer than
``claim_idle_ms`` and completes the jobs they cover (a reply that went to a dead scheduler's stream).
The loops that call these live in ``middleware.scheduler.service``; the writes go through ``PlanWriter``.
"""

from __future__ import annotations

import logging
from typing import Any

from middleware.scheduler.core import SchedulerCore
from middleware.scheduler.effects import PlanWriter, retry
from middleware.scheduler.plans import GRANT_FIELD, Grant, Plan
from schemas import (
    SCHEDULER_GROUP,
    AlignRequest,
    ErrorCode,
    ErrorInfo,
    Sample,
    SchemaError,
    decode,
    now_ms,
    salvage_request_id,
)
from schemas.transport import StreamEntry, dead_letter

__all__ = ["Intake", "decode_kept"]

logger = logging.getLogger(__name__)

GRANT_BYTES = GRANT_FIELD.encode()  # HGETALL's field names are bytes


def decode_kept(request_id: str, raw: dict[bytes, bytes]) -> list[Sample]:
    """A request's kept samples (HGETALL keys.kept_samples), skipping any that do not decode."""
    samples = []
    for name, data in raw.items():
        if name == GRANT_BYTES:
            continue
        try:
            samples.append(decode(Sample, data))
        except SchemaError as e:
            logger.warning("bad kept sample request_id=%s: %s", request_id, e)
    return samples


class Intake:
    """Admission for one scheduler: entries come from ``writer.consumer``; ``writer`` applies the plans."""

    def __init__(self, core: SchedulerCore, writer: PlanWriter) -> None:
        self.core = core
        self.writer = writer
        # the writer's connection, keys, settings and request consumer: one scheduler, one of each
        self.redis, self.keys, self.settings, self.consumer = writer.redis, writer.keys, writer.settings, writer.consumer

    async def take(self, entries: list[StreamEntry], *, redelivered: bool = False) -> None:
        """Validate entries at the boundary and admit the good ones; never raises on bad input."""
        pending = [e.entry_id for e in entries] if redelivered or self.consumer.is_reading_own_pending else []
        counts = await retry("delivery counts", lambda: self.consumer.delivery_counts(pending))
        accepted: list[tuple[StreamEntry, AlignRequest]] = []
        for entry in entries:
            payload = entry.payload
            if payload is None:
                await self._dead_letter(entry, "entry has no 'm' field", None)
                continue
            num_deliveries = counts.get(entry.entry_id, 1)
            if num_deliveries > self.settings.max_deliveries:
                request_id = salvage_request_id(payload)
                reason = f"delivered {num_deliveries} times > max_deliveries {self.settings.max_deliveries}"
                await self._dead_letter(entry, reason, request_id)
                if request_id is not None:
                    await self.writer.answer_error(
                        request_id, ErrorInfo(code=ErrorCode.DELIVERY_EXHAUSTED, message=reason), entry_id=None)
                continue
            try:
                accepted.append((entry, decode(AlignRequest, payload)))
            except SchemaError as e:
                request_id = salvage_request_id(payload)
                if request_id is None:
                    await self._dead_letter(entry, str(e), None)
                else:
                    logger.info("bad request request_id=%s: %s", request_id, e)
                    await self.writer.answer_error(
                        request_id, ErrorInfo(code=ErrorCode.BAD_REQUEST, message=str(e)[:4000]),
                        entry_id=entry.entry_id)
        if accepted:
            await self._admit(accepted)

    async def _admit(self, accepted: list[tuple[StreamEntry, AlignRequest]]) -> None:
        async def lookup() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, request in accepted:
                    pipe.exists(self.keys.request_claim(request.request_id))
                    pipe.hgetall(self.keys.kept_samples(request.request_id))
                return await pipe.execute()

        replies = await retry("look up requests", lookup)
        plan = Plan()
        for i, (entry, request) in enumerate(accepted):
            is_answered, kept_raw = replies[2 * i], replies[2 * i + 1]
            if is_answered:  # answered before (a scheduler died before acking): just ack
                plan.acks.append(entry.entry_id)
                continue
            kept = decode_kept(request.request_id, kept_raw)
            grant = Grant.decode(kept_raw.get(GRANT_BYTES))
            if kept or grant:
                logger.info("reusing %d kept samples request_id=%s grant=%s", len(kept), request.request_id, grant)
            plan.extend(self.core.admit(request, entry_id=entry.entry_id, now_ms=now_ms(), kept=kept, grant=grant))
        await self.writer.apply(plan)

    async def recover_stale_jobs(self) -> None:
        """Jobs waiting for longer than claim_idle_ms: read the request's kept samples, complete what they cover."""
        stale = self.core.stale_jobs(now_ms(), older_than_ms=self.settings.claim_idle_ms)
        if not stale:
            return
        request_ids = list(stale)
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hgetall(self.keys.kept_samples(request_id))
            replies = await pipe.execute()
        plan = Plan()
        for request_id, raw in zip(request_ids, replies):
            if raw:
                plan.extend(self.core.on_kept_samples(request_id, decode_kept(request_id, raw), now_ms()))
        if plan:
            await self.writer.apply(plan)

    async def _dead_letter(self, entry: StreamEntry, reason: str, request_id: str | None) -> None:
        await retry("dead letter", lambda: dead_letter(
            self.redis, self.keys, source_stream=self.keys.requests, group=SCHEDULER_GROUP, entry_id=entry.entry_id,
            reason=reason, payload=entry.payload, request_id=request_id))
