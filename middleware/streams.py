"""Consumer-group helper for Redis Streams: the one place that speaks XREADGROUP, XACK and XAUTOCLAIM.

    consumer = StreamConsumer(redis, keys.requests, SCHEDULER_GROUP, scheduler_id)
    await consumer.ensure_group()                 # MKSTREAM; BUSYGROUP means it exists: fine
    entries = await consumer.read(count=16, block_ms=500)   # own pending entries first, then new ones
    await consumer.ack(entry.entry_id)            # only after the effect is durable
    stale = await consumer.claim_stale(min_idle_ms=15_000)  # entries of dead consumers (XAUTOCLAIM)
    await consumer.renew(held_ids)                # keep the lease on long-running entries (XCLAIM JUSTID)

A message that cannot be processed goes to the dead-letter stream with its reason, acknowledged in
the same transaction (``dead_letter``). Entry ids are ``str`` throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from schemas import PAYLOAD_FIELD, DeadLetter, Keys, encode

logger = logging.getLogger(__name__)

# KEYS: stream. ARGV: group, consumer, entry ids. XCLAIM (JUSTID, idle 0) each id still pending for
# this consumer; returns those ids.
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

DEAD_LETTER_MAXLEN = 10_000  # approximate: the dead-letter stream is for an operator, not an archive


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class StreamEntry:
    entry_id: str
    fields: dict[bytes, bytes]

    @property
    def payload(self) -> bytes | None:
        """The encoded model (``PAYLOAD_FIELD``), or None when the entry lacks it."""
        value = self.fields.get(PAYLOAD_FIELD)
        if value is None:
            value = self.fields.get(PAYLOAD_FIELD.decode())  # type: ignore[call-overload]
        return value if isinstance(value, bytes) else None


def _entries(raw: Iterable[Any]) -> list[StreamEntry]:
    entries = []
    for entry_id, fields in raw:
        entries.append(StreamEntry(_text(entry_id), dict(fields or {})))
    return entries


class StreamConsumer:
    """One consumer of one group on one stream."""

    def __init__(self, redis: Any, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._own_cursor: str | None = "0"  # None once our pending entries are drained
        self._claim_cursor = "0-0"
        self._renew_script = redis.register_script(RENEW_LUA)

    @property
    def is_reading_own_pending(self) -> bool:
        """True while ``read`` still returns entries delivered to this consumer before (a restart)."""
        return self._own_cursor is not None

    async def ensure_group(self) -> None:
        """Create the group (and the stream) from the beginning of the stream; an existing group is fine."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(self, *, count: int, block_ms: int) -> list[StreamEntry]:
        """Entries for this consumer: first those it holds un-acked (after a restart), then new ones.

        ``block_ms`` > 0 bounds the wait for new entries (never 0: that waits forever).
        """
        try:
            return await self._read(count=count, block_ms=block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            logger.warning("group missing (Redis restarted?), recreating stream=%s group=%s", self.stream, self.group)
            await self.ensure_group()
            self._own_cursor = "0"
            return await self._read(count=count, block_ms=block_ms)

    async def _read(self, *, count: int, block_ms: int) -> list[StreamEntry]:
        if self._own_cursor is not None:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: self._own_cursor}, count=count)
            entries = _entries(reply[0][1]) if reply else []
            if entries:
                self._own_cursor = entries[-1].entry_id
                return entries
            self._own_cursor = None
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                            block=max(1, block_ms))
        return _entries(reply[0][1]) if reply else []

    async def ack(self, *entry_ids: str) -> int:
        if not entry_ids:
            return 0
        return int(await self.redis.xack(self.stream, self.group, *entry_ids))

    async def claim_stale(self, *, min_idle_ms: int, count: int = 100) -> list[StreamEntry]:
        """Take over entries idle longer than ``min_idle_ms`` (their consumer died). Resumable scan."""
        try:
            reply = await self.redis.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=min_idle_ms,
                                                start_id=self._claim_cursor, count=count)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return []
        next_cursor = _text(reply[0])
        self._claim_cursor = next_cursor
        return [entry for entry in _entries(reply[1]) if entry.fields]

    async def renew(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of entries we still hold; returns those. Atomic (Lua), so an entry another
        consumer has taken over stays theirs (a bare XCLAIM would steal it back). JUSTID: the delivery
        count is unchanged."""
        if not entry_ids:
            return []
        kept = await self._renew_script(keys=[self.stream], args=[self.group, self.consumer, *entry_ids])
        return [_text(entry_id) for entry_id in kept]

    async def delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (entries no longer pending are left out)."""
        if not entry_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        counts = {}
        for entry_id, reply in zip(entry_ids, replies):
            if reply:
                counts[entry_id] = int(reply[0]["times_delivered"])
        return counts


async def dead_letter(redis: Any, keys: Keys, *, source_stream: str, group: str | None, entry_id: str,
                      reason: str, payload: bytes | None, request_id: str | None = None) -> None:
    """XADD a DeadLetter with the reason and XACK the entry, in one transaction; logged once."""
    letter = DeadLetter(source_stream=source_stream, entry_id=entry_id, reason=reason[:4000],
                        payload=(payload or b"")[:65_536], request_id=request_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.dead_letters, {PAYLOAD_FIELD: encode(letter)}, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        if group is not None:
            pipe.xack(source_stream, group, entry_id)
        await pipe.execute()
    logger.warning("dead-lettered stream=%s entry_id=%s request_id=%s reason=%s",
                   source_stream, entry_id, request_id, reason)
