"""The scheduler service: the async shell around ``SchedulerCore``. Model-free; talks only to Redis.

One task group owns every loop:

    intake      XREADGROUP keys.requests (group "schedulers"; own pending first), validate, admit
    tick        close windows after window_ms, answer requests past their deadline
    samples     XREAD keys.samples(scheduler_id): worker replies -> core -> jobs / events / answers
    janitor     XAUTOCLAIM requests of dead schedulers; recover replies that went elsewhere (kept samples)
    heartbeat   SET keys.heartbeat EX; XCLAIM our in-flight entries to ourselves (the lease)
    telemetry   flush metric increments to Redis

Each answer is published by ``ANSWER_LUA``: SET NX the request's claim marker and, only if it was
set, store the result, XADD the terminal event and drop the request from the pending set; in every
case XACK the request entry. A scheduler killed between publishing and acking leaves an entry that
another scheduler reclaims, finds claimed, and acks: one result per request_id.

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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from middleware.metrics import Telemetry
from middleware.runtime.exporter import maybe_start_process_exporter
from middleware.scheduler.core import Answer, CoreConfig, Plan, SchedulerCore, error_result
from middleware.scheduler.tracing import SchedulerTracing
from middleware.settings import SchedulerSettings
from schemas import (
    PAYLOAD_FIELD,
    SCHEDULER_GROUP,
    AlignRequest,
    ErrorCode,
    ErrorInfo,
    Event,
    Keys,
    Sample,
    SampleSet,
    SchemaError,
    decode,
    encode,
    now_ms,
    salvage_request_id,
)
from schemas.failover import PrimaryWatch
from schemas.keys import Lane, parse_shard_ids
from schemas.lifecycle import heartbeat_value, new_instance_id
from schemas.messages import terminal_event_kind
from schemas.topology import NotReplicated, check_min_replicas, deployment_keys, eval_replicated
from schemas.transport import (
    REDIS_ERRORS,
    StreamConsumer,
    StreamEntry,
    connect,
    dead_letter,
    retry_with_backoff,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

READ_BLOCK_MS = 250
MAX_BACKOFF_S = 2.0
ANSWER_TIMEOUT_S = 15.0  # a shielded answer still gives up eventually (the entry stays for reclaim)
SAMPLES_STREAM_TTL_S = 3_600
CANCEL_POLL_S = 0.2  # how soon a cancellation stops a window from waiting on the request
CLEANUP_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ResponseError)

# KEYS: claim marker, result, events, pending zset, requests stream, kept samples, tenant samples hash.
# ARGV: request_id, encoded result, encoded terminal event, ttl_s, group, entry_id ('' for none), owner.
# Returns 1 if this call answered the request, 0 if it had been answered already.
ANSWER_LUA = """
local answered = 0
if redis.call('SET', KEYS[1], ARGV[7], 'NX', 'EX', ARGV[4]) then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('DEL', KEYS[6])
  redis.call('HDEL', KEYS[7], ARGV[1])
  answered = 1
end
if ARGV[6] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[5], ARGV[6])
end
return answered
"""


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
        self._answer_script = self.redis.register_script(ANSWER_LUA)
        self.tracing = SchedulerTracing(self.scheduler_id)
        self._samples_stream = self.keys.samples(self.scheduler_id)
        self._samples_cursor = "0-0"
        self.num_answered = 0

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event | None = None, ready: anyio.Event | None = None) -> None:
        """Serve until ``stop`` is set, then drain for up to ``shutdown_grace_s``."""
        stop = stop or anyio.Event()
        await self._retry("create group", self.requests.ensure_group)
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

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_with_backoff(what, call, max_backoff_s=MAX_BACKOFF_S)

    # -- loops ------------------------------------------------------------------------------------
    async def _intake_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            room = self.settings.max_in_flight - self.core.num_in_flight
            if room <= 0:
                await anyio.sleep(0.02)
                continue
            count = min(room, self.settings.max_window)
            entries = await self._retry("read requests", functools.partial(
                self.requests.read, count=count, block_ms=READ_BLOCK_MS))
            if entries and not stop.is_set():
                await self._take(entries)

    async def _tick_loop(self, stop: anyio.Event) -> None:
        interval_s = min(0.05, max(0.005, self.settings.window_ms / 4000))
        while True:
            await anyio.sleep(interval_s)
            plan = self.core.tick(now_ms(), close_forming=stop.is_set())
            if plan:
                await self._apply(plan)

    async def _samples_loop(self) -> None:
        while True:
            reply = await self._retry("read samples", self._read_samples)
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
                await self._apply(plan)

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
                entries = await self._retry("claim stale requests", functools.partial(
                    self.requests.claim_stale, min_idle_ms=self.settings.claim_idle_ms, count=min(room, 100)))
                if entries:
                    logger.info("reclaimed %d requests from dead schedulers", len(entries))
                    await self._take(entries, redelivered=True)
            await self._retry("recover replies", self._recover_stale_jobs)

    async def _cancel_loop(self) -> None:
        """Poll the cancelled markers of the requests we hold (one MGET); drop the cancelled ones."""
        while True:
            await anyio.sleep(CANCEL_POLL_S)
            request_ids = list(self.core.requests)
            if not request_ids:
                continue
            markers = await self._retry("read cancellations", functools.partial(
                self.redis.mget, [self.keys.cancelled(rid) for rid in request_ids]))
            plan = Plan()
            for request_id, marker in zip(request_ids, markers):
                if marker is not None and request_id in self.core.requests:
                    logger.info("cancelled request_id=%s: dropping its work", request_id)
                    plan.extend(self.core.cancel(request_id, now_ms()))
            if plan:
                await self._apply(plan)

    async def _spread_loop(self) -> None:
        """Share answered windows with the other schedulers' spread model and refit from the sum."""
        from middleware.scheduler.prior_store import sync_spread_model

        while True:
            await self._retry("spread model", lambda: sync_spread_model(self.core.spread, self.redis, self.keys))
            await anyio.sleep(self.settings.spread_sync_s)

    async def _heartbeat_loop(self) -> None:
        interval_s = self.settings.heartbeat_ms / 1000
        ttl_s = max(1, math.ceil(3 * interval_s))
        while True:
            await self._retry("heartbeat", lambda: self._beat(ttl_s))
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
            await self._apply(plan)

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
            await self._apply(plan)

    # -- intake -----------------------------------------------------------------------------------
    async def _take(self, entries: list[StreamEntry], *, redelivered: bool = False) -> None:
        """Validate entries at the boundary and admit the good ones; never raises on bad input."""
        pending = [e.entry_id for e in entries] if redelivered or self.requests.is_reading_own_pending else []
        counts = await self._retry("delivery counts", lambda: self.requests.delivery_counts(pending))
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
                    await self._answer_error(request_id, ErrorInfo(code=ErrorCode.DELIVERY_EXHAUSTED, message=reason),
                                             entry_id=None)
                continue
            try:
                accepted.append((entry, decode(AlignRequest, payload)))
            except SchemaError as e:
                request_id = salvage_request_id(payload)
                if request_id is None:
                    await self._dead_letter(entry, str(e), None)
                else:
                    logger.info("bad request request_id=%s: %s", request_id, e)
                    await self._answer_error(request_id, ErrorInfo(code=ErrorCode.BAD_REQUEST, message=str(e)[:4000]),
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

        replies = await self._retry("look up requests", lookup)
        plan = Plan()
        for i, (entry, request) in enumerate(accepted):
            is_answered, kept_raw = replies[2 * i], replies[2 * i + 1]
            if is_answered:  # answered before (a scheduler died before acking): just ack
                plan.acks.append(entry.entry_id)
                continue
            kept = self._decode_kept(request.request_id, kept_raw)
            if kept:
                logger.info("reusing %d kept samples request_id=%s", len(kept), request.request_id)
            plan.extend(self.core.admit(request, entry_id=entry.entry_id, now_ms=now_ms(), kept=kept))
        await self._apply(plan)

    @staticmethod
    def _decode_kept(request_id: str, raw: dict[bytes, bytes]) -> list[Sample]:
        samples = []
        for data in raw.values():
            try:
                samples.append(decode(Sample, data))
            except SchemaError as e:
                logger.warning("bad kept sample request_id=%s: %s", request_id, e)
        return samples

    async def _recover_stale_jobs(self) -> None:
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
                plan.extend(self.core.on_kept_samples(request_id, self._decode_kept(request_id, raw), now_ms()))
        if plan:
            await self._apply(plan)

    async def _dead_letter(self, entry: StreamEntry, reason: str, request_id: str | None) -> None:
        await self._retry("dead letter", lambda: dead_letter(
            self.redis, self.keys, source_stream=self.keys.requests, group=SCHEDULER_GROUP, entry_id=entry.entry_id,
            reason=reason, payload=entry.payload, request_id=request_id))

    async def _answer_error(self, request_id: str, error: ErrorInfo, *, entry_id: str | None) -> None:
        result = error_result(request_id, error, scheduler_id=self.scheduler_id, now_ms=now_ms())
        await self._publish_answer(Answer(result, entry_id))

    # -- effects ----------------------------------------------------------------------------------
    async def _apply(self, plan: Plan) -> None:
        """Write a plan's effects: events and jobs (one pipeline), then each answer, then plain acks."""
        self.tracing.observe(plan, self.core.requests)  # spans; stamps jobs with their traceparent
        if plan.events or plan.jobs:
            await self._retry("publish jobs", lambda: self._publish(plan))
        for answer in plan.answers:
            await self._publish_answer(answer)
        self.tracing.answered(plan, self.core.requests)
        if plan.acks:
            await self._retry("ack", lambda: self.requests.ack(*plan.acks))
        for window in plan.windows:
            self.telemetry.record_window(window.num_prompts, window.explore_rewards, window.allocation)
            logger.info("window planned scheduler_id=%s num_prompts=%d allocation=%s", self.scheduler_id,
                        window.num_prompts, sorted(window.allocation.values(), reverse=True))

    async def _publish(self, plan: Plan) -> None:
        ttl_s = self.settings.result_ttl_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in plan.events:  # before the jobs: a reply can only follow its own events
                pipe.xadd(self.keys.events(event.request_id), {PAYLOAD_FIELD: encode(event)})
                pipe.expire(self.keys.events(event.request_id), ttl_s)
            for job in plan.jobs:  # a lane per priority class, a stream per model (schemas.keys)
                pipe.xadd(self.keys.job_stream(job.model, Lane.of(job.priority)), {PAYLOAD_FIELD: encode(job)})
            await pipe.execute()

    async def _publish_answer(self, answer: Answer) -> None:
        """Answer once (Lua), shielded from cancellation and bounded in time."""
        result = answer.result
        kind = terminal_event_kind(result.status)
        event = Event(request_id=result.request_id, kind=kind, at_ms=result.completed_at_ms, result=result)
        rid = result.request_id
        state = self.core.requests.get(rid)
        tenant = state.request.tenant if state is not None else rid.rpartition("/")[0]
        keys = [self.keys.request_claim(rid), self.keys.result(rid), self.keys.events(rid),
                self.keys.pending_requests, self.keys.requests, self.keys.kept_samples(rid),
                self.keys.quota_samples(tenant or "")]
        args = [rid, encode(result), encode(event), self.settings.result_ttl_s, SCHEDULER_GROUP,
                answer.entry_id or "", self.scheduler_id]
        answered = None
        first_reply: list[Any] = []  # an attempt that answered but reached too few replicas (then retried)

        async def attempt() -> Any:
            try:
                reply = await eval_replicated(self.redis, self._answer_script, keys=keys, args=args,
                                              min_replicas=self.settings.redis_min_replicas)
            except NotReplicated as e:
                first_reply.append(getattr(e, "reply", None))
                raise
            return max([int(r) for r in first_reply if r is not None] + [int(reply)])

        with anyio.move_on_after(ANSWER_TIMEOUT_S, shield=True):
            answered = await self._retry("answer", attempt)
        if answered is None:
            logger.error("could not publish the answer request_id=%s; its entry stays for reclaim", rid)
            return
        if int(answered):
            self.num_answered += 1
            self.telemetry.record_result(result, stage1_best_reward=answer.stage1_best_reward)
            logger.info("answered request_id=%s status=%s reward=%s samples_used=%d total_s=%.3f", rid,
                        result.status.value, result.reward, result.samples_used, result.total_s)
        else:
            logger.info("already answered request_id=%s: acked the duplicate", rid)
