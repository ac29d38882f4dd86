"""The worker service: jobs in from Redis, through the backend, sample sets out.

One task group owns every loop:

    intake      XREADGROUP keys.jobs (group "workers"; own pending first), a bounded block, then
                non-blocking reads while there is room, so a burst of jobs becomes one batch;
                entries are checked on the way in (``workers.admission``)
    runner      the backend's own batch loop (``workers.backends.batch_loop``): continuous batching
                on the hf engine (``backends.hf_loop``), overlapping batches on a server
                (``backends.openai_loop``); replies are published + XACKed (shielded) as they finish
    heartbeat   SET keys.heartbeat("worker", id) PX 3×heartbeat; XCLAIM what we hold (the lease);
                re-split the host's cores when workers come and go (num_threads 0)
    cancel      poll the cancelled markers of held requests: queued jobs dropped, running ones cut
    reclaim     XAUTOCLAIM jobs idle > claim_idle_ms (their worker died), dead-letter past max_deliveries

The worker holds at most ``max_batch_jobs`` queued jobs beside the batch in flight, so jobs it cannot
start soon stay in the stream for other workers. Bad input never stops it: an undecodable job is
dead-lettered, an expired one answered ``deadline_exceeded`` without generating, a failing batch
answered job by job.

Shutdown (``stop`` set, e.g. by SIGTERM): intake and reclaim stop; the batch in flight gets
``shutdown_grace_s`` to finish and publish; queued jobs are handed back (made stale at once, so a
live worker's XAUTOCLAIM takes them); the final publish + XACK is one shielded transaction. The
process entry (signals, exit codes) is ``workers.process``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
from redis.exceptions import ResponseError

from schemas import Job, SampleSet
from schemas.keys import parse_shard_ids
from schemas.lifecycle import heartbeat_value
from schemas.topology import deployment_keys
from schemas.transport import REDIS_ERRORS, SOCKET_TIMEOUT_S, connect, retry_with_backoff
from workers.admission import admit, answer_expired
from workers.backends import backend_capabilities, derive_model_name, initial_model_name
from workers.cancellation import cancel_loop
from workers.consumer import JobConsumer, count_workers_on_host, publish_replies
from workers.jobs import HeldJob
from workers.settings import WorkerSettings
from workers.tracing import WorkerTracing

__all__ = ["Worker", "WorkerStats", "serve_worker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
READ_BLOCK_MS = 500
HAND_BACK_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, ResponseError)
MAX_BACKOFF_S = 5.0
PUBLISH_GIVE_UP_S = 30.0  # after the grace period a shielded publish stops retrying (jobs stay for reclaim)
THREAD_CHECK_S = 5.0  # how often an auto-threaded worker recounts the workers on its host
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
        self.runner: Any = None  # the backend (workers.backends.load_backend)
        self.stats = WorkerStats()
        self.tracing = WorkerTracing(self.worker_id)
        self.queue: list[HeldJob] = []  # held, not started
        self.in_flight: list[HeldJob] = []  # the batch the model is working on
        self.max_batch_samples = settings.max_batch_samples or 4 * settings.max_batch
        self.num_threads = 0  # torch threads wanted; applied in the model thread before each batch
        self._queue_changed = anyio.Event()
        self.stopping = False
        self._give_up_publish_at = math.inf
        self._is_batch_abandoned = False

    @property
    def is_batch_abandoned(self) -> bool:
        """Shutdown gave up on the batch in flight: its model thread may still run (workers.process)."""
        return self._is_batch_abandoned

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event, ready: anyio.Event | None = None) -> None:
        """Load the models, then serve until ``stop``; drain for up to ``shutdown_grace_s``."""
        try:
            await self.retry("create group", self.consumer.ensure_group)
            await self._load_models()
            await self.retry("heartbeat", self._beat)
            logger.info("worker ready worker_id=%s threads=%d max_batch_jobs=%d max_batch_samples=%d",
                        self.worker_id, self.num_threads, self.settings.max_batch_jobs,
                        self.max_batch_samples)
            if ready is not None:
                ready.set()
            done = {name: anyio.Event() for name in ("intake", "reclaim", "runner")}
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(cancel_loop, self)
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
        self.stopping = True
        self._give_up_publish_at = anyio.current_time() + self.settings.shutdown_grace_s + PUBLISH_GIVE_UP_S
        self.notify()
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
        await self.retry("register", lambda: self.redis.set(loading_key, value, px=LOADING_TTL_MS))
        self.num_threads = configure_threads(self.settings.num_threads, await self._workers_on_host())
        started = time.perf_counter()
        self.runner = await anyio.to_thread.run_sync(self._build_runner)
        if self.model_name is None:  # named after the model the server reports
            self.model_name = derive_model_name(getattr(self.runner, "server_model", None))
            self.consumer = self._job_consumer()
            await self.retry("create group", self.consumer.ensure_group)
        logger.info("models loaded worker_id=%s load_s=%.1f threads=%d", self.worker_id,
                    time.perf_counter() - started, self.num_threads)
        await self.retry("register", lambda: self.redis.delete(loading_key))

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
        while not self.stopping:
            room = self._room()
            if room <= 0:
                await self.wait_queue_change(READ_BLOCK_MS / 1000)
                continue
            entries = await self.retry("read jobs", partial(self.consumer.read, count=room,
                                                             block_ms=READ_BLOCK_MS))
            while entries and len(entries) < room:  # a burst: take what is already waiting, without blocking
                missing = room - len(entries)
                more = await self.retry("read jobs", partial(self.consumer.read, count=missing, block_ms=None))
                if not more:
                    break
                entries += more
            if entries:
                await admit(self, entries)

    async def _reclaim_loop(self) -> None:
        interval_s = max(0.05, self.settings.claim_idle_ms / 2000)
        while not self.stopping:
            await anyio.sleep(interval_s)
            room = self._room()
            if room <= 0 or self.stopping:
                continue
            # XAUTOCLAIM would take our own entries too if they looked idle: freshen them first
            await self.retry("renew leases", self._renew_leases)
            entries = await self.retry("reclaim jobs", partial(self.consumer.claim_stale,
                                                                min_idle_ms=self.settings.claim_idle_ms, count=room))
            if entries:
                self.stats.num_reclaimed += len(entries)
                logger.info("reclaimed %d jobs from dead workers worker_id=%s", len(entries), self.worker_id)
                await admit(self, entries)

    async def _runner_loop(self) -> None:
        """The backend's own batch loop: stepping (hf, continuous batching) or overlapping (openai)."""
        from workers.backends import batch_loop

        await batch_loop(self.runner)(self)

    def apply_threads(self) -> None:
        """In the model thread, before torch work: the torch thread count this worker is given."""
        import torch

        if self.num_threads and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

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

    # -- steps ------------------------------------------------------------------------------------
    async def answer_expired(self, batch: list[HeldJob]) -> list[HeldJob]:
        """Jobs whose deadline passed while queued are answered now, not generated."""
        return await answer_expired(self, batch)

    async def publish(self, replies: list[tuple[str, Job, SampleSet]]) -> bool:
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

    def notify(self) -> None:
        self._queue_changed.set()
        self._queue_changed = anyio.Event()

    async def wait_queue_change(self, timeout_s: float = READ_BLOCK_MS / 1000) -> None:
        event = self._queue_changed
        with anyio.move_on_after(timeout_s):
            await event.wait()

    async def retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
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
