"""Many waiters, few connections: one XREAD serves the event streams of many requests at once.

A client waiting on thousands of requests would otherwise hold a blocked connection per request
(and redis-py caps a pool at 100). The router groups subscriptions into shards of at most
``max_streams_per_read`` streams; each shard is one task on its own connection issuing
``XREAD BLOCK block_ms`` over all of its streams and handing each new entry to its subscribers'
in-memory queues. Events on streams already read wake the read at once; a new subscription wakes it
with ``CLIENT UNBLOCK`` so the next read includes it (where CLIENT is not allowed, it is picked up
by the next read, at most ``block_ms`` later). A shard's task ends when its last subscriber leaves
and restarts on demand.

On a Redis Cluster one XREAD may only name streams of one slot: a shard holds streams of one hash
tag (``schemas.keys``), reads through the cluster client (no CLIENT UNBLOCK; new waits start within
``block_ms``).

Subscribers see ``(entry_id, fields)`` tuples in order, or an exception the shard hit (anything but
a connection error, which the shard retries with backoff while waiters keep their own timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.keys import tag_of
from schemas.topology import is_cluster

logger = logging.getLogger(__name__)

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def entry_id_key(entry_id: bytes | str) -> tuple[int, int]:
    """Stream IDs ``<ms>-<seq>`` in numeric order."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False, slots=True)
class Subscription:
    stream: str
    last_id: bytes
    send: MemoryObjectSendStream
    receive: MemoryObjectReceiveStream


@dataclass(eq=False, slots=True)
class _Shard:
    subscriptions: dict[str, list[Subscription]] = field(default_factory=dict)  # stream -> subscribers
    tag: str | None = None  # hash tag of every stream in this shard (one slot per XREAD on a cluster)
    task: asyncio.Task | None = None
    client_id: int | None = None  # of the shard's own connection, for CLIENT UNBLOCK
    is_reading: bool = False  # an XREAD is in flight
    is_wake_sent: bool = False  # a CLIENT UNBLOCK is in flight (coalesces wake-ups)


class EventRouter:
    def __init__(self, redis: Any, *, block_ms: int = 250, max_streams_per_read: int = 256) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.max_streams_per_read = max_streams_per_read
        self._shards: list[_Shard] = []
        self._is_cluster = is_cluster(redis)
        self._can_unblock = not self._is_cluster
        self._wake_tasks: set[asyncio.Task] = set()

    def subscribe(self, stream: str, *, from_id: bytes = b"0-0") -> Subscription:
        send, receive = anyio.create_memory_object_stream[Any](max_buffer_size=math.inf)
        subscription = Subscription(stream, from_id, send, receive)
        tag = tag_of(stream)
        shard = next((s for s in self._shards if stream in s.subscriptions), None) or next(
            (s for s in self._shards if len(s.subscriptions) < self.max_streams_per_read and s.tag == tag), None)
        if shard is None:
            shard = _Shard(tag=tag)
            self._shards.append(shard)
        is_new_stream = stream not in shard.subscriptions
        shard.subscriptions.setdefault(stream, []).append(subscription)
        if shard.task is None:
            shard.task = asyncio.get_running_loop().create_task(self._read(shard))
        elif is_new_stream and shard.is_reading and not shard.is_wake_sent and self._can_unblock:
            shard.is_wake_sent = True
            task = asyncio.get_running_loop().create_task(self._wake(shard))
            self._wake_tasks.add(task)
            task.add_done_callback(self._wake_tasks.discard)
        return subscription

    async def _wake(self, shard: _Shard) -> None:
        """End the shard's blocked XREAD now, so its next read includes the new stream."""
        try:
            if shard.client_id is not None:
                await self.redis.client_unblock(shard.client_id)
        except ResponseError as e:  # CLIENT not allowed (ACL, managed Redis): rely on block_ms
            self._can_unblock = False
            logger.info("CLIENT UNBLOCK unavailable, new waits start within %d ms: %s", self.block_ms, e)
        except _RETRYABLE as e:
            logger.debug("wake-up failed: %s", e)
        finally:
            shard.is_wake_sent = False

    def unsubscribe(self, subscription: Subscription) -> None:
        for shard in self._shards:
            subscribers = shard.subscriptions.get(subscription.stream)
            if subscribers and subscription in subscribers:
                subscribers.remove(subscription)
                if not subscribers:
                    del shard.subscriptions[subscription.stream]
                break
        subscription.send.close()
        subscription.receive.close()

    async def aclose(self) -> None:
        for shard in self._shards:  # a read blocked in Redis does not see a cancellation until it returns
            if shard.client_id is not None and shard.is_reading and self._can_unblock:
                with contextlib.suppress(*_RETRYABLE, ResponseError):
                    await self.redis.client_unblock(shard.client_id)
        tasks = [shard.task for shard in self._shards if shard.task is not None] + list(self._wake_tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._shards.clear()

    @property
    def num_subscriptions(self) -> int:
        return sum(len(subs) for shard in self._shards for subs in shard.subscriptions.values())

    async def _read(self, shard: _Shard) -> None:
        delay_s = 0.05
        # holds one connection of the pool while the shard lives; a cluster routes each XREAD by slot
        connection = self.redis if self._is_cluster else self.redis.client()
        try:
            while shard.subscriptions:
                try:
                    if shard.client_id is None and not self._is_cluster:
                        shard.client_id = await connection.client_id()
                    streams = {stream: min((s.last_id for s in subs), key=entry_id_key)
                               for stream, subs in shard.subscriptions.items()}
                    shard.is_reading = True
                    try:
                        reply = await connection.xread(streams, count=100, block=self.block_ms)
                    finally:
                        shard.is_reading = False
                except _RETRYABLE as e:
                    shard.client_id = None  # a reconnect gets a new id
                    logger.warning("event read failed, retrying in %.2f s: %s", delay_s, e)
                    await asyncio.sleep(delay_s)
                    delay_s = min(1.0, delay_s * 2)
                    continue
                delay_s = 0.05
                for stream_key, entries in _stream_entries(reply):
                    for subscription in list(shard.subscriptions.get(stream_key, ())):
                        self._deliver(subscription, entries)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to every waiter, who raises it
            logger.exception("event router shard failed")
            for subs in shard.subscriptions.values():
                for subscription in subs:
                    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                        subscription.send.send_nowait(e)
        finally:
            shard.task = None
            shard.client_id = None
            if not shard.subscriptions and shard in self._shards:
                self._shards.remove(shard)
            if connection is not self.redis:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        await connection.aclose()

    @staticmethod
    def _deliver(subscription: Subscription, entries: list[tuple[bytes, dict]]) -> None:
        last_key = entry_id_key(subscription.last_id)
        for entry_id, fields in entries:
            if entry_id_key(entry_id) <= last_key:
                continue  # another subscriber of the stream needed older entries
            try:
                subscription.send.send_nowait((entry_id, fields))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            subscription.last_id = entry_id
            last_key = entry_id_key(entry_id)


def _stream_entries(reply: Any) -> list[tuple[str, list]]:
    """XREAD's reply as [(stream, entries)]: RESP2 gives [[key, entries]], RESP3 {key: [entries]}."""
    if not reply:
        return []
    if isinstance(reply, dict):
        pairs = [(key, value[0] if value else []) for key, value in reply.items()]
    else:
        pairs = [(key, entries) for key, entries in reply]
    return [(key.decode() if isinstance(key, bytes) else key, entries) for key, entries in pairs]
