"""The worker's side of the job stream: read, lease, reclaim, publish, dead-letter (redis.asyncio).

    consumer = JobConsumer(redis, keys, worker_id)
    await consumer.ensure_group()                      # MKSTREAM; BUSYGROUP means it exists: fine
    entries = await consumer.read(count=8, block_ms=500)   # own pending entries first, then new ones
    await consumer.renew(held_ids)                     # the lease: XCLAIM JUSTID what we still hold
    stale = await consumer.claim_stale(min_idle_ms=15_000)  # entries of dead workers (XAUTOCLAIM)
    await publish_replies(redis, keys, [(entry_id, job, sample_set), ...])   # XADD + HSET + XACK, MULTI/EXEC

``workers`` never imports ``middleware``, so this is the worker's own small consumer (the scheduler
has ``middleware.streams``). Entry ids are ``str`` throughout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from schemas import PAYLOAD_FIELD, WORKER_GROUP, DeadLetter, Job, Keys, SampleSet, encode

__all__ = ["JobConsumer", "StreamEntry", "count_workers_on_host", "dead_letter", "publish_replies"]

logger = logging.getLogger(__name__)

SAMPLES_MAXLEN = 10_000  # approximate trim of each scheduler's reply stream
KEPT_SAMPLES_TTL_S = 3_600  # scored samples a reclaiming scheduler may reuse
DEAD_LETTER_MAXLEN = 10_000  # the dead-letter stream is for an operator, not an archive

# KEYS: stream. ARGV: group, consumer, entry ids. XCLAIM (JUSTID, idle 0) each id still pending for
# this consumer; returns those ids. Atomic, so an entry another worker reclaimed stays theirs.
RENEW_LUA = """
local kept = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


def _is_stream_gone(error: ResponseError) -> bool:
    """NOGROUP (Redis restarted, or the stream was deleted) or UNBLOCKED (deleted while we blocked on it)."""
    return any(code in str(error) for code in ("NOGROUP", "UNBLOCKED"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class StreamEntry:
    entry_id: str
    fields: dict[Any, Any]
    is_redelivery: bool = False  # read again from our own pending list, or reclaimed from another worker

    @property
    def payload(self) -> bytes | None:
        """The encoded Job (``PAYLOAD_FIELD``), or None when the entry lacks it."""
        value = self.fields.get(PAYLOAD_FIELD, self.fields.get(PAYLOAD_FIELD.decode()))
        return value if isinstance(value, bytes) else None


def _entries(raw: Iterable[Any], *, is_redelivery: bool) -> list[StreamEntry]:
    return [StreamEntry(_text(entry_id), dict(fields or {}), is_redelivery) for entry_id, fields in raw]


class JobConsumer:
    """This worker as one consumer of the ``workers`` group on ``keys.jobs``."""

    def __init__(self, redis: Any, keys: Keys, consumer: str) -> None:
        self.redis = redis
        self.stream = keys.jobs
        self.group = WORKER_GROUP
        self.consumer = consumer
        self._own_cursor: str | None = "0"  # None once our own pending entries are drained
        self._claim_cursor = "0-0"
        self._renew_script = redis.register_script(RENEW_LUA)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) from the stream's start; an existing group is fine."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(self, *, count: int, block_ms: int | None) -> list[StreamEntry]:
        """Entries for this consumer: first those it holds un-acked (a restart), then new ones.

        ``block_ms`` None: do not wait for new entries; else wait at most that long (never 0: forever).
        """
        try:
            return await self._read(count=count, block_ms=block_ms)
        except ResponseError as e:
            if not _is_stream_gone(e):
                raise
            logger.warning("stream or group gone (%s), recreating stream=%s group=%s", e, self.stream,
                           self.group)
            await self.ensure_group()
            self._own_cursor = "0"
            return []

    async def _read(self, *, count: int, block_ms: int | None) -> list[StreamEntry]:
        if self._own_cursor is not None:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: self._own_cursor},
                                                count=count)
            entries = _entries(reply[0][1], is_redelivery=True) if reply else []
            if entries:
                self._own_cursor = entries[-1].entry_id
                return [e for e in entries if e.fields]  # an empty entry was deleted from the stream
            self._own_cursor = None
        block = None if block_ms is None else max(1, block_ms)
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                            block=block)
        return _entries(reply[0][1], is_redelivery=False) if reply else []

    async def claim_stale(self, *, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over entries idle longer than ``min_idle_ms`` (their worker died). Resumable scan."""
        try:
            reply = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                min_idle_time=min_idle_ms, start_id=self._claim_cursor,
                                                count=count)
        except ResponseError as e:
            if not _is_stream_gone(e):
                raise
            await self.ensure_group()
            return []
        self._claim_cursor = _text(reply[0])
        return [entry for entry in _entries(reply[1], is_redelivery=True) if entry.fields]

    async def renew(self, entry_ids: Sequence[str]) -> set[str]:
        """Reset the idle time of the entries we still hold; returns those (JUSTID: count unchanged)."""
        if not entry_ids:
            return set()
        kept = await self._renew_script(keys=[self.stream], args=[self.group, self.consumer, *entry_ids])
        return {_text(entry_id) for entry_id in kept}

    async def hand_back(self, entry_ids: Sequence[str], *, idle_ms: int) -> None:
        """Make entries we will not run look stale now, so a live worker's XAUTOCLAIM takes them at once."""
        if entry_ids:
            await self.redis.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                    message_ids=list(entry_ids), idle=idle_ms, justid=True)

    async def delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """Times each pending entry was delivered (XPENDING); entries no longer pending are left out."""
        if not entry_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            try:
                replies = await pipe.execute()
            except ResponseError as e:
                if not _is_stream_gone(e):
                    raise
                return {}  # the group is gone, and with it every pending entry
        return {entry_id: int(reply[0]["times_delivered"])
                for entry_id, reply in zip(entry_ids, replies) if reply}


async def publish_replies(redis: Any, keys: Keys, replies: Sequence[tuple[str, Job, SampleSet]]) -> None:
    """For each job: XADD its SampleSet to its scheduler, keep its samples (HSET + EXPIRE), XACK it.

    One MULTI/EXEC for all of them: a job is acknowledged exactly when its reply is durable.
    """
    if not replies:
        return
    async with redis.pipeline(transaction=True) as pipe:
        for entry_id, job, sample_set in replies:
            pipe.xadd(keys.samples(job.scheduler_id), {PAYLOAD_FIELD: encode(sample_set)},
                      maxlen=SAMPLES_MAXLEN, approximate=True)
            if sample_set.samples:
                kept = keys.kept_samples(job.request_id)
                pipe.hset(kept, mapping={str(s.index): encode(s) for s in sample_set.samples})
                pipe.expire(kept, KEPT_SAMPLES_TTL_S)
            pipe.xack(keys.jobs, WORKER_GROUP, entry_id)
        _check(await pipe.execute(raise_on_error=False))


def _check(results: Sequence[Any]) -> None:
    """Raise the first error of a MULTI/EXEC, except NOGROUP from XACK: Redis lost the job stream
    (a restart without persistence) after we read the job, so there is nothing left to acknowledge,
    and the replies beside the XACK were still written (EXEC does not roll back)."""
    for result in results:
        if isinstance(result, ResponseError) and not _is_stream_gone(result):
            raise result
    if any(isinstance(result, ResponseError) for result in results):
        logger.warning("job stream gone before XACK (Redis restarted?); replies were published")


async def dead_letter(redis: Any, keys: Keys, *, entry_id: str, reason: str, payload: bytes | None,
                      request_id: str | None = None, reply: tuple[str, SampleSet] | None = None) -> None:
    """XADD a DeadLetter with the reason, the error reply (scheduler_id, SampleSet) if any, and XACK: one
    MULTI/EXEC."""
    letter = DeadLetter(source_stream=keys.jobs, entry_id=entry_id, reason=reason[:4000],
                        payload=(payload or b"")[:65_536], request_id=request_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.dead_letters, {PAYLOAD_FIELD: encode(letter)}, maxlen=DEAD_LETTER_MAXLEN,
                  approximate=True)
        if reply is not None:
            scheduler_id, sample_set = reply
            pipe.xadd(keys.samples(scheduler_id), {PAYLOAD_FIELD: encode(sample_set)}, maxlen=SAMPLES_MAXLEN,
                      approximate=True)
        pipe.xack(keys.jobs, WORKER_GROUP, entry_id)
        _check(await pipe.execute(raise_on_error=False))
    logger.warning("dead-lettered stream=%s entry_id=%s request_id=%s reason=%s", keys.jobs, entry_id,
                   request_id, reason)


async def count_workers_on_host(redis: Any, keys: Keys, hostname: str, worker_id: str) -> int:
    """Live or loading workers whose heartbeat names ``hostname``, ``worker_id`` included (at least 1)."""
    names = [key for pattern in (keys.heartbeat_pattern("worker"), keys.heartbeat_pattern("worker-loading"))
             async for key in redis.scan_iter(match=pattern, count=1000)]
    values = await redis.mget(names) if names else []
    others = set()
    for value in values:
        try:
            beat = json.loads(value) if value else {}
        except ValueError:
            continue
        if isinstance(beat, dict) and beat.get("host") == hostname and beat.get("worker_id") != worker_id:
            others.add(beat.get("worker_id"))
    return 1 + len(others)
