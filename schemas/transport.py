"""The stream protocol both sides speak: connection setup, retry, the consumer-group helper, dead letters.

Schedulers consume ``keys.requests`` and workers ``keys.jobs`` with the same ``StreamConsumer``:

    consumer = StreamConsumer(redis, keys.jobs, WORKER_GROUP, worker_id)
    await consumer.ensure_group()                       # MKSTREAM; BUSYGROUP means it exists: fine
    entries = await consumer.read(count=8, block_ms=500)    # own pending entries first, then new ones
    await consumer.ack(entry.entry_id)                  # only after the effect is durable
    stale = await consumer.claim_stale(min_idle_ms=15_000)  # entries of dead consumers (XAUTOCLAIM)
    await consumer.renew(held_ids)                      # the lease: atomic "XCLAIM only if still mine"

A message that cannot be processed goes to the dead-letter stream with its reason, acknowledged in
the same transaction (``dead_letter``). Entry ids are ``str`` throughout. redis is the only I/O
dependency of this module: it is part of the contract between processes, not of any one service.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.codec import PAYLOAD_FIELD, encode
from schemas.keys import LANES_BY_PRIORITY, Keys, Lane, lane_read_order, tag_of
from schemas.messages import DeadLetter
from schemas.topology import SENTINEL_SCHEME, cluster_client, is_cluster_url, sentinel_client

__all__ = [
    "DEAD_LETTER_MAXLEN",
    "REDIS_ERRORS",
    "RENEW_LUA",
    "SOCKET_TIMEOUT_S",
    "LanedConsumer",
    "StreamConsumer",
    "StreamEntry",
    "connect",
    "dead_letter",
    "is_stream_gone",
    "retry_with_backoff",
    "text",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors that mean "Redis is unreachable right now" (restarting, failing over): retry with backoff.
#: READONLY: we reached a demoted primary; MASTERDOWN/CLUSTERDOWN/TRYAGAIN/MOVED/ASK: a failover or
#: resharding in progress (redis-py's cluster client refreshes its slot map on these).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, OSError, BusyLoadingError, ReadOnlyError, MasterDownError,
    ClusterDownError, ClusterError, TryAgainError, AskError, SlotNotCoveredError)
SOCKET_TIMEOUT_S = 10.0  # every Redis call is bounded; blocking reads use far less
CONNECT_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 2.0
DEAD_LETTER_MAXLEN = 10_000  # approximate: the dead-letter stream is for an operator, not an archive

# KEYS: stream. ARGV: group, consumer, idle_ms, entry ids. XCLAIM (JUSTID, IDLE idle_ms) each id still
# pending for this consumer; returns those ids. Atomic, so an entry another consumer reclaimed stays
# theirs (a bare XCLAIM would steal it back). idle 0 renews a lease; a large idle hands the entry back.
RENEW_LUA = """
local kept = {}
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


def connect(redis_url: str, *, max_connections: int | None = None, blocking_pool: bool = False,
            socket_timeout_s: float | None = SOCKET_TIMEOUT_S) -> aioredis.Redis:
    """A bytes-mode client for ``redis_url`` (``redis://``, ``rediss://``, ``unix://``, and
    ``redis+sentinel://`` / ``redis+cluster://``: ``schemas.topology``).

    ``blocking_pool`` waits for a free connection instead of failing at ``max_connections`` (the SDK).
    """
    options: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": CONNECT_TIMEOUT_S,
                               "health_check_interval": 30}
    if redis_url.startswith(SENTINEL_SCHEME + "://") or is_cluster_url(redis_url):
        if max_connections is not None:
            options["max_connections"] = max_connections
        make = cluster_client if is_cluster_url(redis_url) else sentinel_client
        return make(redis_url, **options)  # type: ignore[return-value]
    if blocking_pool:
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=max_connections or 64,
                                                        timeout=socket_timeout_s, **options)
        return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
    if max_connections is not None:
        options["max_connections"] = max_connections
    return aioredis.Redis.from_url(redis_url, decode_responses=False, **options)


async def retry_with_backoff(what: str, call: Callable[[], Awaitable[T]], *,
                             max_backoff_s: float = MAX_BACKOFF_S, give_up_after_s: float | None = None) -> T:
    """``call()`` until it succeeds, backing off (50 ms doubling to ``max_backoff_s``) on connection errors.

    ``give_up_after_s`` None retries forever (services ride out a Redis restart); else the last error
    is raised once that long has passed.
    """
    delay_s = 0.05
    give_up_at = None if give_up_after_s is None else anyio.current_time() + give_up_after_s
    while True:
        try:
            return await call()
        except REDIS_ERRORS as e:
            if give_up_at is not None and anyio.current_time() + delay_s > give_up_at:
                raise
            logger.warning("redis error during %s, retrying in %.2f s: %s", what, delay_s, e)
            await anyio.sleep(delay_s)
            delay_s = min(max_backoff_s, delay_s * 2)


def is_stream_gone(error: ResponseError) -> bool:
    """NOGROUP (Redis restarted, or the stream was deleted) or UNBLOCKED (deleted while we blocked on it)."""
    return any(code in str(error) for code in ("NOGROUP", "UNBLOCKED"))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class StreamEntry:
    entry_id: str
    fields: dict[Any, Any]
    is_redelivery: bool = False  # read again from our own pending list, or reclaimed from another consumer
    stream: str = ""  # the stream it was read from

    @property
    def payload(self) -> bytes | None:
        """The encoded model (``PAYLOAD_FIELD``), or None when the entry lacks it."""
        value = self.fields.get(PAYLOAD_FIELD, self.fields.get(PAYLOAD_FIELD.decode()))
        return value if isinstance(value, bytes) else None


def _entries(raw: Iterable[Any], *, is_redelivery: bool, stream: str = "") -> list[StreamEntry]:
    return [StreamEntry(text(entry_id), dict(fields or {}), is_redelivery, stream) for entry_id, fields in raw]


class StreamConsumer:
    """One consumer of one group on one stream."""

    def __init__(self, redis: Any, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._own_cursor: str | None = "0"  # None once our own pending entries are drained
        self._claim_cursor = "0-0"
        self._renew_script = redis.register_script(RENEW_LUA)

    def reread_own_pending(self) -> None:
        """Start again from the entries delivered to us and not acked (after a failover, as on a restart)."""
        self._own_cursor = "0"

    @property
    def is_reading_own_pending(self) -> bool:
        """True while ``read`` still returns entries delivered to this consumer before (a restart)."""
        return self._own_cursor is not None

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
        When the stream or group vanished (Redis restarted without persistence) it is recreated and
        this read returns nothing.
        """
        try:
            return await self._read(count=count, block_ms=block_ms)
        except ResponseError as e:
            if not is_stream_gone(e):
                raise
            logger.warning("stream or group gone (%s), recreating stream=%s group=%s", e, self.stream, self.group)
            await self.ensure_group()
            self._own_cursor = "0"
            return []

    async def _read(self, *, count: int, block_ms: int | None) -> list[StreamEntry]:
        if self._own_cursor is not None:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: self._own_cursor},
                                                count=count)
            entries = _entries(reply[0][1], is_redelivery=True, stream=self.stream) if reply else []
            if entries:
                self._own_cursor = entries[-1].entry_id
                return [e for e in entries if e.fields]  # an empty entry was deleted from the stream
            self._own_cursor = None
        block = None if block_ms is None else max(1, block_ms)
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                            block=block)
        return _entries(reply[0][1], is_redelivery=False, stream=self.stream) if reply else []

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
            if not is_stream_gone(e):
                raise
            await self.ensure_group()
            return []
        self._claim_cursor = text(reply[0])
        return [entry for entry in _entries(reply[1], is_redelivery=True, stream=self.stream)
                if entry.fields]

    async def renew(self, entry_ids: Sequence[str]) -> set[str]:
        """Reset the idle time of the entries we still hold; returns those (JUSTID: count unchanged)."""
        if not entry_ids:
            return set()
        kept = await self._renew_script(keys=[self.stream], args=[self.group, self.consumer, 0, *entry_ids])
        return {text(entry_id) for entry_id in kept}

    async def hand_back(self, entry_ids: Sequence[str], *, idle_ms: int) -> None:
        """Make entries we will not run look stale now, so a live consumer's XAUTOCLAIM takes them at once."""
        if entry_ids:
            await self._renew_script(keys=[self.stream], args=[self.group, self.consumer, idle_ms, *entry_ids])

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
                if not is_stream_gone(e):
                    raise
                return {}  # the group is gone, and with it every pending entry
        return {entry_id: int(reply[0]["times_delivered"])
                for entry_id, reply in zip(entry_ids, replies) if reply}


class LanedConsumer:
    """One consumer of one group over a stream per priority lane (``schemas.keys.Lane``).

    Reads take the highest lane first, except one read in four that starts from the lowest
    (``lane_read_order``): high priority goes first under a backlog, and low priority is never starved.
    When every lane is empty, one XREADGROUP blocks on all of them. Methods that take entry ids try
    every lane (an id names an entry only within its stream); ``StreamEntry.stream`` says where each
    entry came from.
    """

    def __init__(self, redis: Any, streams: Sequence[tuple[Lane, str]], group: str, consumer: str) -> None:
        self.redis = redis
        self.group = group
        self.consumer = consumer
        #: (lane, consumer) per stream, e.g. a worker's model streams and the default model's, per lane
        self.consumers = [(lane, StreamConsumer(redis, stream, group, consumer)) for lane, stream in streams]
        self._num_reads = 0

    @property
    def streams(self) -> list[str]:
        return [consumer.stream for _, consumer in self.consumers]

    async def ensure_group(self) -> None:
        for _, consumer in self.consumers:
            await consumer.ensure_group()

    async def read(self, *, count: int, block_ms: int | None) -> list[StreamEntry]:
        order = lane_read_order(self._num_reads)
        self._num_reads += 1
        entries: list[StreamEntry] = []
        for wanted in order:
            for lane, consumer in self.consumers:
                if lane == wanted and len(entries) < count:
                    entries += await consumer.read(count=count - len(entries), block_ms=None)
        if entries or block_ms is None:
            return entries
        # One XREADGROUP may name streams of one slot only (a cluster): block on one shard's streams
        # per read, in turn, each for a share of block_ms.
        tags = sorted({tag_of(stream) for stream in self.streams}, key=str)
        tag = tags[self._num_reads % len(tags)]
        streams = [stream for stream in self.streams if tag_of(stream) == tag]
        try:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {s: ">" for s in streams},
                                                count=count, block=max(1, block_ms // len(tags)))
        except ResponseError as e:
            if not is_stream_gone(e):
                raise
            await self.ensure_group()
            return []
        return [entry for stream, raw in reply or []
                for entry in _entries(raw, is_redelivery=False, stream=text(stream))]

    async def claim_stale(self, *, min_idle_ms: int, count: int = 100) -> list[StreamEntry]:
        entries: list[StreamEntry] = []
        for _, consumer in sorted(self.consumers, key=lambda pair: LANES_BY_PRIORITY.index(pair[0])):
            if len(entries) < count:
                entries += await consumer.claim_stale(min_idle_ms=min_idle_ms, count=count - len(entries))
        return entries

    async def renew(self, entry_ids: Sequence[str]) -> set[str]:
        kept: set[str] = set()
        for _, consumer in self.consumers:
            kept |= await consumer.renew(entry_ids)
        return kept

    async def hand_back(self, entry_ids: Sequence[str], *, idle_ms: int) -> None:
        for _, consumer in self.consumers:
            await consumer.hand_back(entry_ids, idle_ms=idle_ms)

    async def ack_in(self, stream: str, *entry_ids: str) -> int:
        return int(await self.redis.xack(stream, self.group, *entry_ids)) if entry_ids else 0

    async def delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, consumer in self.consumers:
            for entry_id, num in (await consumer.delivery_counts(entry_ids)).items():
                counts[entry_id] = max(num, counts.get(entry_id, 0))
        return counts


def check_transaction(results: Sequence[Any]) -> None:
    """Raise the first error of a MULTI/EXEC, except NOGROUP/UNBLOCKED from XACK: Redis lost the stream
    (a restart without persistence) after we read the entry, so there is nothing left to acknowledge,
    and the writes beside the XACK still happened (EXEC does not roll back)."""
    for result in results:
        if isinstance(result, ResponseError) and not is_stream_gone(result):
            raise result
    if any(isinstance(result, ResponseError) for result in results):
        logger.warning("stream gone before XACK (Redis restarted?); the other writes were made")


async def dead_letter(redis: Any, keys: Keys, *, source_stream: str, group: str | None, entry_id: str,
                      reason: str, payload: bytes | None, request_id: str | None = None,
                      extra: Callable[[Any], None] | None = None) -> None:
    """XADD a DeadLetter with the reason and XACK the entry, in one MULTI/EXEC; logged once.

    ``extra(pipe)`` queues more writes into the same transaction (a worker's error reply).
    """
    letter = DeadLetter(source_stream=source_stream, entry_id=entry_id, reason=reason[:4000],
                        payload=(payload or b"")[:65_536], request_id=request_id)
    async with redis.pipeline(transaction=True) as pipe:  # the source's shard: one slot per transaction
        pipe.xadd(keys.for_stream(source_stream).dead_letters, {PAYLOAD_FIELD: encode(letter)}, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        if extra is not None:
            extra(pipe)
        if group is not None:
            pipe.xack(source_stream, group, entry_id)
        check_transaction(await pipe.execute(raise_on_error=False))
    logger.warning("dead-lettered stream=%s entry_id=%s request_id=%s reason=%s",
                   source_stream, entry_id, request_id, reason)
