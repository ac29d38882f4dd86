"""The batch loop of a backend without a step API (openai: a server that batches for itself).

A pipeline, job by job, so the server is never left waiting on alignq:

    start     a queued job's samples are handed to the backend while fewer than twice
              ``max_concurrency`` samples are generating there; its semaphore bounds the requests in
              flight to ``max_concurrency``, so the next sample goes out the moment one comes back,
              with no hop through this loop, even while a job waits on its last sample
    score     jobs whose samples are all back are scored together, in one reward call (one batch
              over many jobs), in the model thread, while the server keeps generating the others
    publish   each reward call's jobs are published + XACKed (shielded) together, right after it

When a job is scored depends on where the server computes:

- on other hardware (a GPU server; the default unless the URL is loopback): at once, with whatever
  else finished meanwhile, so no job waits for the slowest job it arrived with;
- on this host's CPU cores (``backend_colocated``: llama-server on CPU): in a lull, since the reward
  model's threads would stall the server's decode threads mid-batch. Finished jobs wait until
  nothing of this worker is generating, or every job taken with them is back (a burst is scored
  after it, in one call), or ``max_concurrency`` samples are waiting. Measured on 2 cores with
  llama-server ``-t 2``: scoring mid-batch cost 10-15% of the server's speed (docs/backends.md).

A job that fails (server 4xx, deadline) is answered the same way; a job abandoned at shutdown gets no
reply (it stays pending for reclaim). A job's ``generate_s`` is its share of the generating time:
each moment split over the samples generating then.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import anyio

from schemas import Job, SampleSet
from workers.jobs import HeldJob, take_batch

if TYPE_CHECKING:
    from workers.service import Worker

__all__ = ["overlapping_loop"]

Finished = tuple[HeldJob, Any, float]  # the job, its samples or the exception that stopped it, generate_s


class _ShareClock:
    """∫ dt / (samples generating): a job's generate_s is its samples × the clock's advance while it ran."""

    def __init__(self) -> None:
        self.value = 0.0
        self.samples = 0
        self._at = time.perf_counter()

    def change(self, delta: int) -> float:
        now = time.perf_counter()
        if self.samples > 0:
            self.value += (now - self._at) / self.samples
        self._at = now
        self.samples += delta
        return self.value


class _Pipeline:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.backend = worker.runner
        # samples started at most: the requests in flight plus as many waiting for a free request
        self.limit = 2 * int(getattr(self.backend, "max_concurrency", 0) or worker.max_batch_samples)
        self.clock = _ShareClock()
        self.finished: list[Finished] = []
        self.finished_changed = anyio.Event()
        self.num_generating = 0  # jobs started, not yet back from the server
        self.colocated = bool(getattr(self.backend, "colocated", False))
        self.batch_size = int(getattr(self.backend, "max_concurrency", 0) or worker.max_batch_samples)
        self.left_in_batch: dict[int, int] = {}  # jobs of each take (batch number) still generating
        self.num_batches_back = 0  # takes whose jobs are all back since the last reward call
        self._num_takes = 0

    async def run(self) -> None:
        worker = self.worker
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._score_loop)
            while not worker.stopping:
                room = self.limit - self.clock.samples
                if not worker.queue or room <= 0:
                    await worker.wait_queue_change()
                    continue
                batch = take_batch(worker.queue, max_jobs=worker.settings.max_batch_jobs, max_samples=room)
                worker.notify()  # room for intake
                batch = await worker.answer_expired(batch)
                if not batch:
                    continue
                self._num_takes += 1
                self.left_in_batch[self._num_takes] = len(batch)
                for held in batch:
                    worker.in_flight = [*worker.in_flight, held]
                    self.num_generating += 1
                    tg.start_soon(self._generate, held, self._num_takes, self.clock.change(held.job.num_samples))
            self._signal()  # the score loop ends once nothing is left in flight

    async def _generate(self, held: HeldJob, take: int, clock_at_start: float) -> None:
        try:
            outcome = await _outcome(self.backend.submit(held.job))
        finally:
            self.num_generating -= 1
            self.left_in_batch[take] -= 1
            if not self.left_in_batch[take]:
                del self.left_in_batch[take]
                self.num_batches_back += 1
            generate_s = held.job.num_samples * (self.clock.change(-held.job.num_samples) - clock_at_start)
            self.worker.notify()  # room for the next job
        self.finished.append((held, outcome, generate_s))
        self._signal()

    async def _score_loop(self) -> None:
        """Score + publish whatever finished, in one reward call, until stopped with nothing in flight."""
        worker = self.worker
        while True:
            if not self._ready_to_score():
                if not self.finished and worker.stopping and self.num_generating == 0:
                    return
                event = self.finished_changed
                await event.wait()
                continue
            done, self.finished = self.finished, []
            self.num_batches_back = 0
            try:
                replies = await anyio.to_thread.run_sync(_replies_in_thread, worker,
                                                         [(h.job, outcome, s) for h, outcome, s in done],
                                                         abandon_on_cancel=True)
                published = [(h.entry_id, h.job, reply) for (h, _, _), reply in zip(done, replies) if reply is not None]
                worker.stats.num_batches += 1
                worker.stats.max_batch_jobs = max(worker.stats.max_batch_jobs, len(done))
                if published and await worker.publish(published):
                    worker.stats.num_samples += sum(len(reply.samples) for _, _, reply in published)
            finally:
                gone = {id(h) for h, _, _ in done}
                worker.in_flight = [h for h in worker.in_flight if id(h) not in gone]
                worker.notify()

    def _ready_to_score(self) -> bool:
        if not self.finished:
            return False
        if not self.colocated or self.num_generating == 0 or self.num_batches_back:
            return True
        return sum(h.job.num_samples for h, _, _ in self.finished) >= self.batch_size

    def _signal(self) -> None:
        self.finished_changed.set()
        self.finished_changed = anyio.Event()


async def overlapping_loop(worker: Worker) -> None:
    """Until stopped: start queued jobs as room frees up, score and publish them as they come back;
    on shutdown the jobs in flight finish (within the worker's grace period)."""
    await _Pipeline(worker).run()


async def _outcome(future: Any) -> Any:
    """The job's samples, or the exception that stopped it (the backend's future; the worker runs on
    asyncio, so its thread's future is awaited without a thread of our own)."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - answered as that job's error by the backend's replies()
        return e


def _replies_in_thread(worker: Worker, done: list[tuple[Job, Any, float]]) -> list[SampleSet | None]:
    worker.apply_threads()
    replies: list[SampleSet | None] = worker.runner.replies(done)
    return replies
