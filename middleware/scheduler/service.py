"""The scheduler service: the async shell around ``SchedulerCore``. Model-free; talks only to Redis.

One task group owns every loop:

    intake      XREADGROUP keys.requests (group "schedulers"; own pending first), validate, admit
    tick        close windows after window_ms, answer requests past their deadline
    samples     XREAD keys.samples(scheduler_id): worker replies -> core -> jobs / events / answers
    janitor     XAUTOCLAIM requests of dead schedulers; recover replies that went elsewhere (kept samples)
    heartbeat   SET keys.heartbeat EX; XCLAIM our in-flight entries to ourselves (the lease)
    telemetry   flush metric increments to Redis

Boundary: this module is the event loop only: which loop runs, when, and lifecycle (start, drain,
cleanup). Entries are checked and admitted by ``middleware.scheduler.intake``; every plan the core returns
is written, and each answer published exactly once (``ANSWER_LUA``), by ``middleware.scheduler.effects``.

Sharded (``ALIGNQ_SHARDS`` S > 1, or a cluster): one ``Scheduler`` serves one shard (its ``keys`` are
pinned to it); ``middleware.scheduler.process`` runs one per shard the process owns. A new Redis
primary (failover) makes it re-read its own pending requests (``schemas.failover``).

Shutdown (``stop`` set, e.g. by SIGTERM): intake and janitor stop; the forming window launches;
in-flight requests get ``shutdown_grace_s`` to finish; the rest stay un-acked for another scheduler.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, cast

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from middleware.metrics import Telemetry
from middleware.runtime.exporter import maybe_start_process_exporter
from middleware.scheduler.core import CoreConfig, Plan, SchedulerCore
from middleware.scheduler.effects import ANSWER_LUA, PlanWriter, retry
from middleware.scheduler.intake import Intake
from middleware.scheduler.tracing import SchedulerTracing
from middleware.settings import SchedulerSettings
from schemas import PAYLOAD_FIELD, SCHEDULER_GROUP, Keys, SampleSet, SchemaError, decode, now_ms
from schemas.failover import PrimaryWatch
from schemas.keys import parse_shard_ids
from schemas.lifecycle import heartbeat_value, new_instance_id
from schemas.topology import check_min_replicas, deployment_keys
from schemas.transport import REDIS_ERRORS, StreamConsumer, connect

__all__ = ["ANSWER_LUA", "Scheduler"]  # ANSWER_LUA re-exported: tests run the script directly

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 250
SAMPLES_STREAM_TTL_S = 3_600
CANCEL_POLL_S = 0.2  # how soon a cancellation stops a window from waiting on the request
CLEANUP_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ResponseError)


class Scheduler:
    """One scheduler process's service. ``await Scheduler(settings).run(stop=event)``."""

    def __init__(self, settings: SchedulerSettings, *, redis: aioredis.Redis | None = None,
                 scheduler_id: str | None = None, telemetry: Telemetry | None = None,
                 keys: Keys | None = None) -> None:
        if redis is None and not settings.redis_url:
            raise ValueError("SchedulerSettings.redis_url is required (ALIGNQ_REDIS_URL)")
        self.settings = settings
        self.scheduler_id = scheduler_id or settings.scheduler_id or new_instance_id("scheduler")
        self.redis = redis if redis is not None else connect(settings.redis_url or "")
        self._owns_redis = redis is None
        # ``keys``: pinned to the one shard this instance serves (serve_scheduler makes one per shard)
        self.keys = keys or deployment_keys(settings.namespace, settings.shards, settings.redis_url).for_shard(
            parse_shard_ids(settings.shard_ids, settings.shards)[0])
        check_min_replicas(self.redis, settings.redis_min_replicas)
        self._primary = PrimaryWatch(self.redis)
        self.core = SchedulerCore(CoreConfig.from_settings(settings, self.scheduler_id))
        self.requests = StreamConsumer(self.redis, self.keys.requests, SCHEDULER_GROUP, self.scheduler_id)
        self.telemetry = telemetry or Telemetry(self.redis, self.keys)
        maybe_start_process_exporter(self.telemetry)  # ALIGNQ_METRICS_PORT, if set
        self.tracing = SchedulerTracing(self.scheduler_id)
        self.writer = PlanWriter(self.redis, self.keys, settings, self.scheduler_id, consumer=self.requests,
                                 requests=self.core.requests, telemetry=self.telemetry, tracing=self.tracing)
        self.intake = Intake(self.core, self.writer)
        self._samples_stream = self.keys.samples(self.scheduler_id)
        self._samples_cursor = "0-0"

    @property
    def num_answered(self) -> int:
        """Requests this scheduler answered (duplicates it only acked are not counted)."""
        return self.writer.num_answered

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event | None = None, ready: anyio.Event | None = None) -> None:
        """Serve until ``stop`` is set, then drain for up to ``shutdown_grace_s``."""
        stop = stop or anyio.Event()
        await retry("create group", self.requests.ensure_group)
        logger.info("scheduler started scheduler_id=%s namespace=%s", self.scheduler_id, self.settings.namespace)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._intake_loop, stop)
                tg.start_soon(self._tick_loop, stop)
                tg.start_soon(self._samples_loop)
                tg.start_soon(self._janitor_loop, stop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._cancel_loop)
                tg.start_soon(self.telemetry.run)
                if self.settings.spread_prior:
                    tg.start_soon(self._spread_loop)
                if ready is not None:
                    ready.set()
                await stop.wait()
                logger.info("scheduler draining scheduler_id=%s in_flight=%d grace_s=%.1f",
                            self.scheduler_id, self.core.num_in_flight, self.settings.shutdown_grace_s)
                with anyio.move_on_after(self.settings.shutdown_grace_s):
                    while self.core.num_in_flight or self.core.forming is not None:
                        await anyio.sleep(0.02)
                if self.core.num_in_flight:
                    logger.warning("grace period over: leaving %d requests un-acked for another scheduler",
                                   self.core.num_in_flight)
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(3, shield=True):
                await self._cleanup()

    async def _cleanup(self) -> None:
        try:
            await self.redis.delete(self.keys.heartbeat("scheduler", self.scheduler_id))
            if not self.core.num_in_flight:
                await self.redis.delete(self._samples_stream)
                # Deleting a consumer drops its pending entries: only when it holds none (e.g. an entry
                # read during the drain but not taken stays, for another scheduler to reclaim).
                held = await self.redis.xpending_range(self.keys.requests, SCHEDULER_GROUP, min="-", max="+",
                                                       count=1, consumername=self.scheduler_id)
                if not held:
                    await self.redis.xgroup_delconsumer(self.keys.requests, SCHEDULER_GROUP, self.scheduler_id)
        except CLEANUP_ERRORS as e:
            logger.warning("cleanup failed scheduler_id=%s: %s", self.scheduler_id, e)
        if self._owns_redis:
            await self.redis.aclose()
        logger.info("scheduler stopped scheduler_id=%s answered=%d", self.scheduler_id, self.num_answered)

    # -- loops ------------------------------------------------------------------------------------
    async def _intake_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            room = self.settings.max_in_flight - self.core.num_in_flight
            if room <= 0:
                await anyio.sleep(0.02)
                continue
            count = min(room, self.settings.max_window)
            entries = await retry("read requests", functools.partial(
                self.requests.read, count=count, block_ms=READ_BLOCK_MS))
            if entries and not stop.is_set():
                await self.intake.take(entries)

    async def _tick_loop(self, stop: anyio.Event) -> None:
        interval_s = min(0.05, max(0.005, self.settings.window_ms / 4000))
        while True:
            await anyio.sleep(interval_s)
            plan = self.core.tick(now_ms(), close_forming=stop.is_set())
            if plan:
                await self.writer.apply(plan)

    async def _samples_loop(self) -> None:
        while True:
            reply = await retry("read samples", self._read_samples)
            plan = Plan()
            for _, entries in reply:
                for entry_id, fields in entries:
                    self._samples_cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    try:
                        sample_set = decode(SampleSet, fields.get(PAYLOAD_FIELD, b""))
                    except SchemaError as e:
                        logger.warning("bad sample set entry_id=%s: %s", self._samples_cursor, e)
                        continue
                    self.telemetry.record_sample_set(sample_set)
                    plan.extend(self.core.on_sample_set(sample_set, now_ms()))
            if plan:
                await self.writer.apply(plan)

    async def _read_samples(self) -> list[list[Any]]:
        reply = await self.redis.xread({self._samples_stream: self._samples_cursor}, count=256, block=READ_BLOCK_MS)
        # connect() speaks RESP2: [[stream, [(entry_id, fields), ...]]], or None when the block timed out
        # (redis-py's XReadResponse also covers RESP3's dict forms)
        return cast("list[list[Any]]", reply or [])

    async def _janitor_loop(self, stop: anyio.Event) -> None:
        interval_s = max(0.1, min(5.0, self.settings.claim_idle_ms / 2000))
        while not stop.is_set():
            with anyio.move_on_after(interval_s):
                await stop.wait()
            if stop.is_set():
                return
            room = self.settings.max_in_flight - self.core.num_in_flight
            if room > 0:
                entries = await retry("claim stale requests", functools.partial(
                    self.requests.claim_stale, min_idle_ms=self.settings.claim_idle_ms, count=min(room, 100)))
                if entries:
                    logger.info("reclaimed %d requests from dead schedulers", len(entries))
                    await self.intake.take(entries, redelivered=True)
            await retry("recover replies", self.intake.recover_stale_jobs)

    async def _cancel_loop(self) -> None:
        """Poll the cancelled markers of the requests we hold (one MGET); drop the cancelled ones."""
        while True:
            await anyio.sleep(CANCEL_POLL_S)
            request_ids = list(self.core.requests)
            if not request_ids:
                continue
            markers = await retry("read cancellations", functools.partial(
                self.redis.mget, [self.keys.cancelled(rid) for rid in request_ids]))
            plan = Plan()
            for request_id, marker in zip(request_ids, markers):
                if marker is not None and request_id in self.core.requests:
                    logger.info("cancelled request_id=%s: dropping its work", request_id)
                    plan.extend(self.core.cancel(request_id, now_ms()))
            if plan:
                await self.writer.apply(plan)

    async def _spread_loop(self) -> None:
        """Share answered windows with the other schedulers' spread model and refit from the sum."""
        from middleware.scheduler.prior_store import sync_spread_model

        while True:
            await retry("spread model", lambda: sync_spread_model(self.core.spread, self.redis, self.keys))
            await anyio.sleep(self.settings.spread_sync_s)

    async def _heartbeat_loop(self) -> None:
        interval_s = self.settings.heartbeat_ms / 1000
        ttl_s = max(1, math.ceil(3 * interval_s))
        while True:
            await retry("heartbeat", lambda: self._beat(ttl_s))
            await anyio.sleep(interval_s)

    async def _beat(self, ttl_s: int) -> None:
        if await self._primary.changed():
            await self._forget_in_flight()
        state = heartbeat_value("scheduler", self.scheduler_id, in_flight=self.core.num_in_flight)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.heartbeat("scheduler", self.scheduler_id), state, ex=ttl_s)
            pipe.expire(self._samples_stream, SAMPLES_STREAM_TTL_S)
            pipe.xtrim(self._samples_stream, minid=self._samples_cursor, approximate=True)
            await pipe.execute(raise_on_error=False)
        held = {s.entry_id: s.request_id for s in self.core.requests.values() if s.entry_id is not None}
        if not held:
            return
        try:
            still_ours = await self.requests.renew(list(held))
        except ResponseError as e:  # NOGROUP: Redis lost the stream; nothing is ours any more
            logger.warning("lease renewal failed: %s", e)
            still_ours = set()
        plan = Plan()
        for entry_id, request_id in held.items():
            if entry_id not in still_ours and request_id in self.core.requests:
                # Reclaimed by another scheduler (we stalled) or lost by Redis: it is not ours to answer.
                logger.warning("lost the lease, dropping request_id=%s entry_id=%s", request_id, entry_id)
                plan.extend(self.core.release(request_id, now_ms()))
        if plan:
            await self.writer.apply(plan)

    async def _forget_in_flight(self) -> None:
        """A new primary (failover) may lack our latest jobs and replies: drop what we hold, re-read our own
        pending requests and plan them again (kept samples are reused), as after a restart."""
        request_ids = list(self.core.requests)
        logger.warning("redis primary changed: re-reading %d in-flight requests scheduler_id=%s",
                       len(request_ids), self.scheduler_id)
        plan = Plan()
        for request_id in request_ids:
            if request_id in self.core.requests:
                plan.extend(self.core.release(request_id, now_ms()))
        self.requests.reread_own_pending()
        if plan:
            await self.writer.apply(plan)
