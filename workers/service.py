"""The worker service: jobs in from Redis, batched through the engine (or AISP), sample sets out.

One task group owns every loop:

    intake      XREADGROUP keys.jobs (group "workers"; own pending first), a bounded block, then
                non-blocking reads while there is room, so a burst of jobs becomes one batch
    runner      continuous batching (hf): queued jobs join the running decode batch whenever it has
                free rows (BatchRunner.submit/step_until in a worker thread); each job is published
                + XACKed (shielded) as soon as it finishes; other backends: whole batches (run)
    heartbeat   SET keys.heartbeat("worker", id) PX 3×heartbeat; XCLAIM what we hold (the lease);
                re-split the host's cores when workers come and go (num_threads 0)
    reclaim     XAUTOCLAIM jobs idle > claim_idle_ms (their worker died), dead-letter past max_deliveries

The worker holds at most ``max_batch_jobs`` queued jobs beside the batch in flight, so jobs it cannot
start soon stay in the stream for other workers. Bad input never stops it: an undecodable job is
dead-lettered, an expired one answered ``deadline_exceeded`` without generating, a failing batch
answered job by job.

Shutdown (``stop`` set, e.g. by SIGTERM): intake and reclaim stop; the batch in flight gets
``shutdown_grace_s`` to finish and publish; queued jobs are handed back (made stale at once, so a
live worker's XAUTOCLAIM takes them); the final publish + XACK is one shielded transaction.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
from redis.exceptions import ResponseError

from schemas import (
    WORKER_GROUP,
    ErrorCode,
    Job,
    SampleSet,
    SchemaError,
    decode,
    now_ms,
)
from schemas.keys import parse_shard_ids
from schemas.lifecycle import heartbeat_value, stop_on_signals
from schemas.topology import deployment_keys
from schemas.transport import REDIS_ERRORS, SOCKET_TIMEOUT_S, connect, retry_with_backoff
from workers.backends import backend_capabilities, derive_model_name, initial_model_name
from workers.consumer import (
    JobConsumer,
    StreamEntry,
    count_workers_on_host,
    dead_letter_job,
    job_stream_of,
    publish_replies,
)
from workers.jobs import (
    BatchRunner,
    HeldJob,
    error_sample_set,
    expired_reply,
    salvage_error_reply,
    take_batch,
)
from workers.settings import WorkerSettings
from workers.tracing import WorkerTracing

__all__ = ["Worker", "WorkerStats", "run_worker", "serve_worker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
READ_BLOCK_MS = 500
HAND_BACK_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ResponseError)
MAX_BACKOFF_S = 5.0
PUBLISH_GIVE_UP_S = 30.0  # after the grace period a shielded publish stops retrying (jobs stay for reclaim)
THREAD_CHECK_S = 5.0  # how often an auto-threaded worker recounts the workers on its host
CANCEL_POLL_S = 0.2  # how soon a cancelled request stops costing samples
STEPS_MAX_S = 1.0  # longest the model thread decodes before the event loop hears from it
LOADING_TTL_MS = 120_000  # a worker still loading its models counts towards its host's workers this long


@dataclass(slots=True)
class WorkerStats:
    num_jobs_done: int = 0  # answered with samples or an error, acked
    num_samples: int = 0
    num_batches: int = 0
    max_batch_jobs: int = 0  # most jobs packed into one batch so far
    num_expired: int = 0
    num_dead_letters: int = 0
    num_reclaimed: int = 0  # entries taken over from dead workers
    num_handed_back: int = 0
    num_cancelled: int = 0  # queued jobs dropped because their request was cancelled


class Worker:
    """One worker process's service: loads its models once, then serves until ``stop``."""

    def __init__(self, settings: WorkerSettings, *, redis: Any = None, worker_id: str | None = None) -> None:
        self.settings = settings
        self.keys = deployment_keys(settings.namespace, settings.shards, settings.redis_url)
        self.shard_ids = parse_shard_ids(settings.shard_ids, settings.shards)  # job streams we read
        self.hostname = socket.gethostname()
        default_id = f"{self.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.worker_id = worker_id or settings.worker_id or default_id
        self._owns_redis = redis is None
        if redis is None:
            if not settings.redis_url:
                raise ValueError("a worker needs ALIGNQ_REDIS_URL (or a Redis client)")
            redis = connect(settings.redis_url)
        self.redis = redis
        self.model_name = initial_model_name(settings)  # None: the openai backend asks its server at load
        self.consumer = self._job_consumer()
        self.runner: BatchRunner | None = None
        self.stats = WorkerStats()
        self.tracing = WorkerTracing(self.worker_id)
        self.queue: list[HeldJob] = []  # held, not started
        self.in_flight: list[HeldJob] = []  # the batch the model is working on
        self.max_batch_samples = settings.max_batch_samples or 4 * settings.max_batch
        self.num_threads = 0  # torch threads wanted; applied in the model thread before each batch
        self._queue_changed = anyio.Event()
        self._stopping = False
        self._give_up_publish_at = math.inf
        self._is_batch_abandoned = False

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event, ready: anyio.Event | None = None) -> None:
        """Load the models, then serve until ``stop``; drain for up to ``shutdown_grace_s``."""
        try:
            await self._retry("create group", self.consumer.ensure_group)
            await self._load_models()
            await self._retry("heartbeat", self._beat)
            logger.info("worker ready worker_id=%s threads=%d max_batch_jobs=%d max_batch_samples=%d",
                        self.worker_id, self.num_threads, self.settings.max_batch_jobs,
                        self.max_batch_samples)
            if ready is not None:
                ready.set()
            done = {name: anyio.Event() for name in ("intake", "reclaim", "runner")}
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._cancel_loop)
                tg.start_soon(_run_then_set, self._intake_loop, done["intake"])
                tg.start_soon(_run_then_set, self._reclaim_loop, done["reclaim"])
                tg.start_soon(_run_then_set, self._runner_loop, done["runner"])
                await stop.wait()
                await self._drain(done)
                tg.cancel_scope.cancel()
        finally:
            close = getattr(self.runner, "close", None)  # a backend's connections and threads (openai)
            if close is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await anyio.to_thread.run_sync(close, abandon_on_cancel=True)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.redis.delete(self.keys.heartbeat("worker", self.worker_id),
                                            self.keys.heartbeat("worker-loading", self.worker_id))
                except REDIS_ERRORS:
                    pass
                if self._owns_redis:
                    await self.redis.aclose()
        logger.info("worker stopped worker_id=%s jobs_done=%d batches=%d", self.worker_id,
                    self.stats.num_jobs_done, self.stats.num_batches)

    async def _drain(self, done: dict[str, anyio.Event]) -> None:
        """Stop taking work; give the batch in flight the grace period; hand back what never started."""
        self._stopping = True
        self._give_up_publish_at = anyio.current_time() + self.settings.shutdown_grace_s + PUBLISH_GIVE_UP_S
        self._notify()
        logger.info("stopping worker_id=%s in_flight=%d queued=%d grace_s=%.1f", self.worker_id,
                    len(self.in_flight), len(self.queue), self.settings.shutdown_grace_s)
        with anyio.move_on_after(self.settings.shutdown_grace_s):
            await done["runner"].wait()
        if not done["runner"].is_set():
            self._is_batch_abandoned = True
            logger.warning("grace period over: abandoning the batch in flight jobs=%d (left for reclaim)",
                           len(self.in_flight))
        with anyio.move_on_after(READ_BLOCK_MS / 1000 + 1):  # a read in progress may still bring jobs
            await done["intake"].wait()
            await done["reclaim"].wait()
        await self._hand_back()

    async def _load_models(self) -> None:
        """configure_threads first (a fair share of this host's cores), then policy and reward, once."""
        from workers.models import configure_threads

        loading_key = self.keys.heartbeat("worker-loading", self.worker_id)
        value = self._heartbeat_value()
        await self._retry("register", lambda: self.redis.set(loading_key, value, px=LOADING_TTL_MS))
        self.num_threads = configure_threads(self.settings.num_threads, await self._workers_on_host())
        started = time.perf_counter()
        self.runner = await anyio.to_thread.run_sync(self._build_runner)
        if self.model_name is None:  # named after the model the server reports
            self.model_name = derive_model_name(getattr(self.runner, "server_model", None))
            self.consumer = self._job_consumer()
            await self._retry("create group", self.consumer.ensure_group)
        logger.info("models loaded worker_id=%s load_s=%.1f threads=%d", self.worker_id,
                    time.perf_counter() - started, self.num_threads)
        await self._retry("register", lambda: self.redis.delete(loading_key))

    def _job_consumer(self) -> JobConsumer:
        """Jobs of our model's streams, and of the default model's when we serve it (every lane)."""
        models: list[str | None] = [self.model_name] if self.model_name else []
        if self.settings.serves_default or not models:
            models.append(None)
        return JobConsumer(self.redis, self.keys, self.worker_id, models=models, shards=self.shard_ids)

    def _build_runner(self) -> Any:
        from workers.backends import load_backend

        return load_backend(self.settings, worker_id=self.worker_id)

    async def _workers_on_host(self) -> int:
        return await count_workers_on_host(self.redis, self.keys, self.hostname, self.worker_id)

    # -- loops ------------------------------------------------------------------------------------
    async def _intake_loop(self) -> None:
        while not self._stopping:
            room = self._room()
            if room <= 0:
                await self._wait_queue_change(READ_BLOCK_MS / 1000)
                continue
            entries = await self._retry("read jobs", partial(self.consumer.read, count=room,
                                                             block_ms=READ_BLOCK_MS))
            while entries and len(entries) < room:  # a burst: take what is already waiting, without blocking
                missing = room - len(entries)
                more = await self._retry("read jobs", partial(self.consumer.read, count=missing, block_ms=None))
                if not more:
                    break
                entries += more
            if entries:
                await self._admit(entries)

    async def _reclaim_loop(self) -> None:
        interval_s = max(0.05, self.settings.claim_idle_ms / 2000)
        while not self._stopping:
            await anyio.sleep(interval_s)
            room = self._room()
            if room <= 0 or self._stopping:
                continue
            # XAUTOCLAIM would take our own entries too if they looked idle: freshen them first
            await self._retry("renew leases", self._renew_leases)
            entries = await self._retry("reclaim jobs", partial(self.consumer.claim_stale,
                                                                min_idle_ms=self.settings.claim_idle_ms, count=room))
            if entries:
                self.stats.num_reclaimed += len(entries)
                logger.info("reclaimed %d jobs from dead workers worker_id=%s", len(entries), self.worker_id)
                await self._admit(entries)

    async def _runner_loop(self) -> None:
        if isinstance(self.runner, BatchRunner):
            await self._stepping_loop()
            return
        await self._overlapping_loop()

    async def _overlapping_loop(self) -> None:
        """A backend without a step API (openai: a server that batches for itself): a batch starts
        whenever jobs wait and fewer than the backend's ``max_concurrency`` samples are in flight, so
        batches overlap and the server is not left idle while one batch's last samples finish or
        are scored."""
        limit = int(getattr(self.runner, "max_concurrency", 0) or self.max_batch_samples)
        async with anyio.create_task_group() as tg:
            while not self._stopping:
                room = limit - sum(h.job.num_samples for h in self.in_flight)
                if not self.queue or room <= 0:
                    await self._wait_queue_change(READ_BLOCK_MS / 1000)
                    continue
                batch = take_batch(self.queue, max_jobs=self.settings.max_batch_jobs, max_samples=room)
                self._notify()  # room for intake
                batch = await self._answer_expired(batch)
                if batch:
                    self.in_flight = [*self.in_flight, *batch]
                    tg.start_soon(self._run_overlapping_batch, batch)

    async def _run_overlapping_batch(self, batch: list[HeldJob]) -> None:
        try:
            jobs = [held.job for held in batch]
            replies = await anyio.to_thread.run_sync(self._run_in_thread, jobs, abandon_on_cancel=True)
            self.stats.num_batches += 1
            self.stats.max_batch_jobs = max(self.stats.max_batch_jobs, len(jobs))
            if await self._publish([(h.entry_id, h.job, r) for h, r in zip(batch, replies)]):
                self.stats.num_samples += sum(len(r.samples) for r in replies)
        finally:
            self.in_flight = [h for h in self.in_flight if h not in batch]
            self._notify()  # room for the next batch

    async def _stepping_loop(self) -> None:
        """Continuous batching: queued jobs join the running decode batch whenever it has free rows,
        and each job is published the moment it finishes. On shutdown the jobs in flight finish."""
        runner = self.runner
        assert isinstance(runner, BatchRunner)
        while not (self._stopping and not self.in_flight):
            joining: list[HeldJob] = []
            if self.queue and not self._stopping and (runner.num_free_rows > 0 or not self.in_flight):
                # up to max_batch_samples held: samples past the free rows wait inside the engine and
                # take rows the step they free up, with no hop through the event loop
                joining = take_batch(self.queue, max_jobs=self.settings.max_batch_jobs,
                                     max_samples=max(1, self.max_batch_samples - runner.num_rows_held))
                self._notify()  # room for intake
                joining = await self._answer_expired(joining)
            if not joining and not self.in_flight:
                await self._wait_queue_change(READ_BLOCK_MS / 1000)
                continue
            if joining:
                self.in_flight = [*self.in_flight, *joining]
                self.stats.num_batches += 1  # times jobs joined the running batch
                self.stats.max_batch_jobs = max(self.stats.max_batch_jobs, len(self.in_flight))
            finished = await anyio.to_thread.run_sync(self._steps_in_thread, [h.job for h in joining],
                                                      abandon_on_cancel=True)
            if finished:
                await self._publish_finished(finished)

    def _steps_in_thread(self, joining: list[Job]) -> list[tuple[Job, SampleSet | None]]:
        """Submit the joining jobs, then decode until some job finishes or new jobs could join."""
        import torch

        runner = self.runner
        assert isinstance(runner, BatchRunner)
        if self.num_threads and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        rejected: list[tuple[Job, SampleSet | None]] = list(runner.submit(joining))
        if rejected:
            return rejected

        def should_yield() -> bool:  # read from the model thread; a stale answer costs one hop
            return bool(self.queue) and not self._stopping and runner.num_free_rows > 0

        return runner.step_until(should_yield, max_s=STEPS_MAX_S)

    async def _publish_finished(self, finished: list[tuple[Job, SampleSet | None]]) -> None:
        """Publish + XACK the finished jobs (a cancelled job, None, is only acked: it was answered)."""
        by_id = {h.job.job_id: h for h in self.in_flight}
        held = [(by_id[job.job_id], reply) for job, reply in finished if job.job_id in by_id]
        try:
            replies = [(h.entry_id, h.job, reply) for h, reply in held if reply is not None]
            if replies and await self._publish(replies):
                self.stats.num_samples += sum(len(reply.samples) for _, _, reply in replies)
            cancelled = [h for h, reply in held if reply is None]
            if cancelled:
                await self._ack_cancelled(cancelled)
        finally:
            done = {job.job_id for job, _ in finished}
            self.in_flight = [h for h in self.in_flight if h.job.job_id not in done]

    def _run_in_thread(self, jobs: list[Job]) -> list[SampleSet]:
        import torch

        assert self.runner is not None
        if self.num_threads and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        return self.runner.run(jobs)

    async def _heartbeat_loop(self) -> None:
        interval_s = self.settings.heartbeat_ms / 1000
        next_thread_check = anyio.current_time() + THREAD_CHECK_S
        while True:
            await anyio.sleep(interval_s)
            try:
                await self._beat()
                if self.settings.num_threads == 0 and anyio.current_time() >= next_thread_check:
                    next_thread_check = anyio.current_time() + THREAD_CHECK_S
                    await self._rebalance_threads()
            except REDIS_ERRORS as e:
                logger.warning("heartbeat failed worker_id=%s: %s", self.worker_id, e)

    async def _cancel_loop(self) -> None:
        """Poll the cancelled markers of the jobs we hold (one MGET): queued ones are dropped and acked;
        the batch in flight drops their rows at its next decode step (``BatchRunner.cancel``)."""
        while True:
            await anyio.sleep(CANCEL_POLL_S)
            held = [*self.queue, *self.in_flight]
            if not held:
                continue
            request_ids = sorted({h.job.request_id for h in held})
            try:
                markers = await self.redis.mget([self.keys.cancelled(rid) for rid in request_ids])
            except REDIS_ERRORS as e:
                logger.warning("reading cancellations failed worker_id=%s: %s", self.worker_id, e)
                continue
            cancelled = {rid for rid, marker in zip(request_ids, markers) if marker is not None}
            if cancelled:
                await self._drop_cancelled(cancelled)

    async def _drop_cancelled(self, request_ids: set[str]) -> None:
        dropped = [h for h in self.queue if h.job.request_id in request_ids]
        if dropped:
            self.queue[:] = [h for h in self.queue if h.job.request_id not in request_ids]
            self._notify()
            await self._ack_cancelled(dropped)
            logger.info("dropped %d queued jobs of cancelled requests worker_id=%s", len(dropped), self.worker_id)
        if self.runner is not None:
            for held in self.in_flight:
                if held.job.request_id in request_ids:
                    self.runner.cancel(held.job.job_id)

    async def _ack_cancelled(self, held: list[HeldJob]) -> None:
        """The request is answered already: nothing to publish, only the jobs to acknowledge."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in held:
                pipe.xack(job_stream_of(self.keys, h.job), WORKER_GROUP, h.entry_id)
            await self._retry("ack cancelled", pipe.execute)
        self.stats.num_cancelled += len(held)

    # -- steps ------------------------------------------------------------------------------------
    async def _admit(self, entries: list[StreamEntry]) -> None:
        """Decode and check entries; queue the runnable ones, answer or dead-letter the rest."""
        held_ids = {h.entry_id for h in self.queue} | {h.entry_id for h in self.in_flight}
        entries = [e for e in entries if e.entry_id not in held_ids]
        redelivered = [e.entry_id for e in entries if e.is_redelivery]
        counts = await self._retry("delivery counts", lambda: self.consumer.delivery_counts(redelivered))
        now = now_ms()
        admitted = 0
        expired: list[tuple[str, Job, SampleSet]] = []
        for entry in entries:
            if entry.is_redelivery and entry.entry_id not in counts:
                continue  # acked meanwhile (its first worker finished after all)
            delivery_count = counts.get(entry.entry_id, 1)
            payload = entry.payload
            try:
                if payload is None:
                    raise SchemaError(f"entry has no {b'm'!r} field")
                job = decode(Job, payload)
            except SchemaError as e:
                salvaged = salvage_error_reply(payload, self.worker_id, e)
                await self._dead_letter(entry, f"undecodable job: {e}", payload, reply=salvaged)
                continue
            if delivery_count > self.settings.max_deliveries:
                reason = f"delivered {delivery_count} times (max_deliveries={self.settings.max_deliveries})"
                reply = error_sample_set(job, self.worker_id, ErrorCode.DELIVERY_EXHAUSTED,
                                         f"job {reason}: its workers kept dying or stalling")
                await self._dead_letter(entry, reason, payload, request_id=job.request_id,
                                        reply=(job.scheduler_id, reply))
                continue
            if job.deadline_at_ms is not None and job.deadline_at_ms <= now:
                expired.append((entry.entry_id, job, expired_reply(job, self.worker_id, now)))
                continue
            self.queue.append(HeldJob(entry.entry_id, job, delivery_count))
            admitted += 1
        if expired:
            self.stats.num_expired += len(expired)
            logger.info("dropped %d expired jobs before generation worker_id=%s", len(expired),
                        self.worker_id)
            await self._publish(expired)
        if admitted:
            self._notify()

    async def _answer_expired(self, batch: list[HeldJob]) -> list[HeldJob]:
        """Jobs whose deadline passed while queued are answered now, not generated."""
        now = now_ms()
        expired = [h for h in batch if h.job.deadline_at_ms is not None and h.job.deadline_at_ms <= now]
        if not expired:
            return batch
        self.stats.num_expired += len(expired)
        logger.info("dropped %d expired jobs before generation worker_id=%s", len(expired), self.worker_id)
        await self._publish([(h.entry_id, h.job, expired_reply(h.job, self.worker_id, now)) for h in expired])
        return [h for h in batch if h not in expired]

    async def _dead_letter(self, entry: StreamEntry, reason: str, payload: bytes | None, *,
                           request_id: str | None = None, reply: tuple[str, SampleSet] | None = None) -> None:
        await self._retry("dead letter", lambda: dead_letter_job(
            self.redis, self.keys, entry_id=entry.entry_id, reason=reason, payload=payload,
            request_id=request_id, reply=reply, stream=entry.stream or None))
        self.stats.num_dead_letters += 1

    async def _publish(self, replies: list[tuple[str, Job, SampleSet]]) -> bool:
        """Publish replies and XACK their jobs in one transaction; shielded from cancellation. Retries
        while Redis is away; gives up only during shutdown, PUBLISH_GIVE_UP_S after the grace period
        (the jobs then stay pending and another worker reclaims them)."""
        delay_s = 0.05
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    await publish_replies(self.redis, self.keys, replies)
                    break
                except REDIS_ERRORS as e:
                    if anyio.current_time() > self._give_up_publish_at:
                        logger.error("could not publish %d replies before shutdown; left for reclaim: %s",
                                     len(replies), e)
                        return False
                    logger.warning("redis error while publishing, retrying in %.2f s: %s", delay_s, e)
                    await anyio.sleep(delay_s)
                    delay_s = min(MAX_BACKOFF_S, delay_s * 2)
        self.stats.num_jobs_done += len(replies)
        self.tracing.record_published(replies)
        for _, job, reply in replies:
            if reply.error is not None:
                logger.info("job answered with error job_id=%s request_id=%s code=%s", job.job_id,
                            job.request_id, reply.error.code)
        return True

    async def _beat(self) -> None:
        ttl_ms = 3 * self.settings.heartbeat_ms
        key = self.keys.heartbeat("worker", self.worker_id)
        await self.redis.set(key, self._heartbeat_value(), px=ttl_ms)
        await self._renew_leases()

    async def _renew_leases(self) -> None:
        """XCLAIM (JUSTID) the entries we hold back to ourselves: idle 0, so no one reclaims them."""
        queued = [h.entry_id for h in self.queue]
        in_flight = [h.entry_id for h in self.in_flight]
        if not queued and not in_flight:
            return
        try:
            still_ours = await self.consumer.renew(queued + in_flight)
        except ResponseError as e:  # NOGROUP: Redis lost the stream; nothing is ours any more
            logger.warning("lease renewal failed worker_id=%s: %s", self.worker_id, e)
            return
        lost = set(queued) - still_ours
        if lost:  # another worker took them (we stalled past claim_idle_ms): do not run them twice
            self.queue[:] = [h for h in self.queue if h.entry_id not in lost]
            logger.warning("lost the lease on %d queued jobs worker_id=%s", len(lost), self.worker_id)
        lost_in_flight = [h.job.job_id for h in self.in_flight if h.entry_id not in still_ours]
        if lost_in_flight:
            logger.info("lost the lease on in-flight jobs %s (replies are deduplicated)", lost_in_flight)

    def _heartbeat_value(self) -> str:
        return heartbeat_value("worker", self.worker_id, worker_id=self.worker_id, model_name=self.model_name,
                               serves_default=self.settings.serves_default, backend=self.settings.backend,
                               capabilities=backend_capabilities(self.settings.backend), threads=self.num_threads,
                               queued=len(self.queue), in_flight=len(self.in_flight), **asdict(self.stats))

    async def _rebalance_threads(self) -> None:
        wanted = max(1, (os.cpu_count() or 1) // await self._workers_on_host())
        if wanted != self.num_threads:
            logger.info("workers on this host changed: torch threads %d -> %d", self.num_threads, wanted)
            self.num_threads = wanted  # applied by the model thread before its next batch

    async def _hand_back(self) -> None:
        """Queued jobs we will not start: made stale now, so a live worker reclaims them without waiting."""
        entry_ids = [h.entry_id for h in self.queue]
        self.queue.clear()
        if not entry_ids:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(SOCKET_TIMEOUT_S):
            try:
                await self.consumer.hand_back(entry_ids, idle_ms=self.settings.claim_idle_ms)
                self.stats.num_handed_back += len(entry_ids)
                logger.info("handed back %d queued jobs worker_id=%s", len(entry_ids), self.worker_id)
            except HAND_BACK_ERRORS as e:
                logger.warning("could not hand back %d jobs (reclaimed after claim_idle_ms): %s",
                               len(entry_ids), e)

    # -- helpers ----------------------------------------------------------------------------------
    def _room(self) -> int:
        return self.settings.max_batch_jobs - len(self.queue)

    def _notify(self) -> None:
        self._queue_changed.set()
        self._queue_changed = anyio.Event()

    async def _wait_queue_change(self, timeout_s: float) -> None:
        event = self._queue_changed
        with anyio.move_on_after(timeout_s):
            await event.wait()

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_with_backoff(what, call, max_backoff_s=MAX_BACKOFF_S)


async def _run_then_set(loop: Callable[[], Awaitable[None]], done: anyio.Event) -> None:
    try:
        await loop()
    finally:
        done.set()


async def serve_worker(settings: WorkerSettings, *, stop: anyio.Event | None = None,
                       ready: anyio.Event | None = None, worker: Worker | None = None) -> Worker:
    """Run a worker until ``stop`` (never set: until cancelled); returns it (stats)."""
    worker = worker or Worker(settings)
    await worker.run(stop=stop or anyio.Event(), ready=ready)
    return worker


async def _serve_until_signal(settings: WorkerSettings) -> Worker | Exception:
    """The worker, or the ModelLoadError that stopped it from starting."""
    from workers.errors import ModelLoadError

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signals, stop)
        try:
            outcome: Worker | Exception = await serve_worker(settings, stop=stop)
        except ModelLoadError as e:
            outcome = e
        tg.cancel_scope.cancel()
    return outcome


def run_worker(settings: WorkerSettings) -> int:
    """Blocking entry point of ``alignq worker`` (logging configured by the caller): 0 after a clean
    shutdown, 2 when the models cannot be loaded (the message says why)."""
    if not settings.redis_url:
        print("alignq worker: no Redis: set ALIGNQ_REDIS_URL or --redis-url", file=sys.stderr)
        return 2
    started = time.monotonic()
    worker = anyio.run(_serve_until_signal, settings)
    if isinstance(worker, Exception):
        print(f"alignq worker: {worker}", file=sys.stderr)
        return 2
    logger.info("worker exited after %.1f s", time.monotonic() - started)
    if worker._is_batch_abandoned:  # its model thread still runs; nothing it would publish is wanted now
        logging.shutdown()
        os._exit(0)
    return 0
