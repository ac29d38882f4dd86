"""One pooled connection on which several chunks of commands are in flight at once, in order.

``submit_many`` writes chunk k+1 before it reads chunk k's replies, so Redis always has the next
chunk waiting and never idles while the client reads, encodes or writes. One socket is what keeps the
chunks in order: two pooled connections do not (Redis may run the later chunk first, and then the cut
at ``max_pending`` would fall in the wrong place).

    async with OrderedChannel.open(redis) as channel:   # None: a cluster client, or a pool of one
        await channel.send(commands_k)
        await channel.send(commands_k1)
        replies_k = await channel.read(len(commands_k))  # errors as values, in order

A connection error marks the channel ``broken``; it is then disconnected when released, since replies
may be left unread on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.exceptions import ResponseError

from schemas.transport import REDIS_ERRORS

__all__ = ["OrderedChannel"]


class OrderedChannel:
    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.num_unread = 0  # replies written for and not yet read
        self.broken = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, redis: Any) -> AsyncIterator[OrderedChannel | None]:
        """A channel on a connection of ``redis``'s pool; None where there is no single pool (a cluster
        client routes each key to its node) or it holds one connection (the caller's other calls need it)."""
        pool = getattr(redis, "connection_pool", None)
        if pool is None or getattr(pool, "max_connections", 2) < 2:
            yield None
            return
        try:
            connection = await pool.get_connection()
        except REDIS_ERRORS:
            yield None  # the caller's own path retries and reports
            return
        channel = cls(connection)
        try:
            yield channel
        finally:
            if channel.broken or channel.num_unread:
                await connection.disconnect()
            await pool.release(connection)

    async def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Write ``commands`` in one go; their replies are read by ``read``, after any sent before."""
        try:
            # no health check: a PING now would have its reply read as one of the commands' replies
            await self._connection.send_packed_command(self._connection.pack_commands(commands), check_health=False)
        except BaseException:
            self.broken = True
            raise
        self.num_unread += len(commands)

    async def read(self, count: int) -> list[Any]:
        """The next ``count`` replies, an error reply as its ResponseError (the rest are still read)."""
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(await self._connection.read_response())
                except ResponseError as e:
                    replies.append(e)
                self.num_unread -= 1
        except BaseException:
            self.broken = True
            raise
        return replies
