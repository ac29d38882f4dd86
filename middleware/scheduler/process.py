"""One scheduler process: signal handling, and one ``Scheduler`` per shard it serves.

``alignq scheduler`` runs ``run_scheduler``. With ``ALIGNQ_SHARDS`` S > 1 (or a cluster) and the shards
of ``ALIGNQ_SHARD_IDS`` (default all), ``run_schedulers`` starts one ``Scheduler`` per shard on one
connection, under one scheduler id: each reads its own shard's requests and samples streams, so every
script and transaction stays in one slot (docs/scaling.md).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import anyio

from middleware.scheduler.service import Scheduler
from middleware.settings import SchedulerSettings
from schemas.keys import parse_shard_ids
from schemas.lifecycle import new_instance_id, stop_on_signals
from schemas.topology import deployment_keys
from schemas.transport import connect

__all__ = ["run_scheduler", "run_schedulers", "serve_scheduler"]

logger = logging.getLogger(__name__)


async def serve_scheduler(settings: SchedulerSettings, *, stop: anyio.Event | None = None,
                          ready: anyio.Event | None = None, scheduler_id: str | None = None) -> Scheduler:
    """Run a scheduler until ``stop``; SIGTERM and SIGINT also stop it when run in the main thread."""
    stop = stop or anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signals, stop)
        scheduler = await run_schedulers(settings, stop=stop, ready=ready, scheduler_id=scheduler_id)
        tg.cancel_scope.cancel()
    return scheduler


async def run_schedulers(settings: SchedulerSettings, *, stop: anyio.Event, ready: anyio.Event | None = None,
                         scheduler_id: str | None = None) -> Scheduler:
    """One Scheduler per shard this process serves (``ALIGNQ_SHARD_IDS``), on one connection; returns the first."""
    shard_ids = parse_shard_ids(settings.shard_ids, settings.shards)
    if len(shard_ids) == 1:
        scheduler = Scheduler(settings, scheduler_id=scheduler_id)
        await scheduler.run(stop=stop, ready=ready)
        return scheduler
    redis = connect(settings.redis_url or "")
    keys = deployment_keys(settings.namespace, settings.shards, settings.redis_url)
    scheduler_id = scheduler_id or settings.scheduler_id or new_instance_id("scheduler")
    schedulers = [Scheduler(settings, redis=redis, scheduler_id=scheduler_id, keys=keys.for_shard(shard))
                  for shard in shard_ids]
    logger.info("scheduler serving shards=%s of %d scheduler_id=%s", shard_ids, settings.shards, scheduler_id)
    try:
        readies = [anyio.Event() for _ in schedulers]
        async with anyio.create_task_group() as tg:
            for scheduler, shard_ready in zip(schedulers, readies):
                tg.start_soon(partial(scheduler.run, stop=stop, ready=shard_ready))
            for shard_ready in readies:
                await shard_ready.wait()
            if ready is not None:
                ready.set()
    finally:
        with anyio.move_on_after(3, shield=True):
            await redis.aclose()
    return schedulers[0]


def run_scheduler(settings: SchedulerSettings) -> int:
    """Blocking entry point of ``alignq scheduler``: 0 after a clean shutdown."""
    started = time.monotonic()
    anyio.run(serve_scheduler, settings)
    logger.info("scheduler exited after %.1f s", time.monotonic() - started)
    return 0
