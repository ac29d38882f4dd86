"""The spread model in Redis: every scheduler adds what its answered windows taught, and reads the sum.

One string per (policy model, model kind) at ``Keys.spread_model``: the ``RidgeStats`` arrays as an ``.npz``
(numpy's own format, loaded with ``allow_pickle=False``). Adding is a WATCH / MULTI / EXEC
read-modify-write retried on conflict, so concurrent schedulers never lose each other's windows.
``sync_spread_model`` moves a scheduler's queued observations (``prior.SpreadModel``) into Redis and
refits from the deployment-wide sum (a few ms for 258 features), so allocation never waits on Redis.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import WatchError

from middleware.scheduler.prior import MODEL_KINDS, RidgeStats, SpreadModel

logger = logging.getLogger(__name__)

MAX_WATCH_RETRIES = 16


def encode_stats(stats: RidgeStats) -> bytes:
    buffer = io.BytesIO()
    # allow_pickle named: else mypy matches the **arrays to it; float arrays only, as decode_stats loads them
    np.savez(buffer, allow_pickle=False, **stats.to_arrays())
    return buffer.getvalue()


def decode_stats(data: bytes | str) -> RidgeStats:
    if isinstance(data, str):  # what BytesIO would raise: the client must be bytes-mode (decode_responses=False)
        raise TypeError(f"spread model bytes expected, got {type(data).__name__}")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return RidgeStats.from_arrays({name: arrays[name] for name in arrays.files})


async def load_stats(redis: Redis, key: str) -> RidgeStats | None:
    data = await redis.get(key)
    return decode_stats(data) if data else None


async def add_stats(redis: Redis, key: str, delta: RidgeStats) -> RidgeStats | None:
    """Add ``delta`` to the stored statistics atomically; the new sum, or None after too many conflicts."""
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_WATCH_RETRIES):
            try:
                await pipe.watch(key)
                data = await pipe.get(key)
                total = delta + decode_stats(data) if data else delta
                pipe.multi()
                pipe.set(key, encode_stats(total))
                await pipe.execute()
                return total
            except WatchError:
                continue
    logger.warning("spread model key=%s: %d conflicting writers in a row, retrying next sync", key, MAX_WATCH_RETRIES)
    return None


async def sync_spread_model(spread: SpreadModel, redis: Redis, keys: Any) -> int:
    """Push ``spread``'s pending observations, refit from the shared sums; returns the observations pushed.

    One Redis key per (policy model, kind): a model's spreads never train another model's prior.
    """
    pushed = 0
    for slot in [(model, kind) for model in sorted(spread.models, key=str) for kind in MODEL_KINDS]:
        rows, spread.pending[slot] = spread.pending.get(slot, []), []
        key = keys.spread_model(*slot)
        try:
            if rows:
                total = await add_stats(redis, key, RidgeStats.from_rows(np.stack([r[0] for r in rows]),
                                                                         np.stack([r[1] for r in rows])))
                if total is None:
                    spread.pending[slot] = rows + spread.pending.get(slot, [])
                    continue
                pushed += len(rows)
            else:
                total = await load_stats(redis, key)
        except BaseException:
            spread.pending[slot] = rows + spread.pending.get(slot, [])  # not lost: pushed on the next sync
            raise
        fit = total.fit() if total is not None else None
        if fit is not None:
            spread.fits[slot] = fit
    if pushed:
        logger.info("spread model synced observations=%d fits=%s", pushed, sorted(spread.fits, key=str))
    return pushed
