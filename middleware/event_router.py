"""Many waiters, few connections: one XREAD serves the event streams of many requests at once.

A client waiting on thousands of requests would otherwise hold a blocked connection per request
(and redis-py caps a pool at 100). The router groups subscriptions into shards of at most
``max_streams_per_read`` streams; each shard is one task issuing ``XREAD BLOCK block_ms`` over all of
its streams and handing each new entry to its subscribers' in-memory queues. A new subscription is
picked up by the next read (at most ``block_ms`` later); events on streams already read wake the
read at once. A shard's task ends when its last subscriber leaves and restarts on demand.

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
from redis.exceptions import TimeoutError as RedisTimeoutError

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
    task: asyncio.Task | None = None


class EventRouter:
    def __init__(self, redis: Any, *, block_ms: int = 50, max_streams_per_read: int = 256) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.max_streams_per_read = max_streams_per_read
        self._shards: list[_Shard] = []

    def subscribe(self, stream: str, *, from_id: bytes = b"0-0") -> Subscription:
        send, receive = anyio.create_memory_object_stream[Any](max_buffer_size=math.inf)
        subscription = Subscription(stream, from_id, send, receive)
        shard = next((s for s in self._shards if stream in s.subscriptions), None) or next(
            (s for s in self._shards if len(s.subscriptions) < self.max_streams_per_read), None)
        if shard is None:
            shard = _Shard()
            self._shards.append(shard)
        shard.subscriptions.setdefault(stream, []).append(subscription)
        if shard.task is None:
            shard.task = asyncio.get_running_loop().create_task(self._read(shard))
        return subscription

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
        tasks = [shard.task for shard in self._shards if shard.task is not None]
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
        try:
            while shard.subscriptions:
                streams = {stream: min((s.last_id for s in subs), key=entry_id_key)
                           for stream, subs in shard.subscriptions.items()}
                try:
                    reply = await self.redis.xread(streams, count=100, block=self.block_ms)
                except _RETRYABLE as e:
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
        except Exception as e:
            logger.exception("event router shard failed")
            for subs in shard.subscriptions.values():
                for subscription in subs:
                    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                        subscription.send.send_nowait(e)
        finally:
            shard.task = None
            if not shard.subscriptions and shard in self._shards:
                self._shards.remove(shard)

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
