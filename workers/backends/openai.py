"""The ``openai`` backend: samples from an OpenAI-compatible server, scored by the worker's reward model.

    future = backend.submit(job)            # every sample of the job starts now; any thread
    replies = backend.replies([(job, samples_or_error, generate_s), ...])   # one reward call, blocking
    replies = backend.run(jobs)             # both, for a batch (blocking; tests and tools)

One request per sample (``openai_wire``: seeded from the request seed and the sample index), at most
``max_concurrency`` in flight over all jobs, on an event loop of its own (one connection pool for the
worker's life). The worker's loop (``openai_loop``) submits jobs as they arrive and scores each job
once its own samples are back, in one reward call with whatever else finished meanwhile (``scoring``).

Server failures:

- refused connections, timeouts, 5xx, 429: the sample is retried with backoff (capped at
  ``MAX_BACKOFF_S``) for as long as it takes. The job stays pending to this worker, its lease renewed,
  so nothing is lost: this worker finishes it when the server is back, or, if the worker dies or
  shuts down meanwhile, another worker reclaims it. A job whose deadline passes while waiting is
  answered ``deadline_exceeded``.
- any other 4xx (a prompt too long for the context, a wrong model name): the job is answered
  ``backend_failed`` with the server's message.
- every call is bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import random
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from schemas import ErrorCode, ErrorInfo, Job, JobKind, Sample, SampleSet, now_ms
from workers.backends.openai_wire import (
    BackendRejected,
    ServerSample,
    is_retryable_status,
    parse_sample,
    rejection_message,
    sample_request,
)
from workers.backends.scoring import score_jobs
from workers.errors import ModelLoadError
from workers.jobs import error_sample_set

__all__ = ["OpenAIBackend", "is_loopback_url", "load_openai_backend"]

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
DOWN_LOG_EVERY_S = 30.0  # while the server is down, a warning this often (not one per sample)
CONNECT_TIMEOUT_S = 10.0


class BackendClosed(Exception):
    """The worker is shutting down: the batch is abandoned (its jobs stay pending for reclaim)."""


class JobDeadline(Exception):
    """The job's deadline passed while the server was unreachable."""


class JobCancelled(Exception):
    """The job's request was cancelled while its samples were being generated (``cancel``)."""


class OpenAIBackend:
    """Bon and uniform jobs through an OpenAI-compatible server. ``submit`` from any thread; ``replies``
    and ``run`` from one thread at a time (they call the reward model)."""

    def __init__(self, base_url: str, reward: Any, *, worker_id: str, model: str | None = None,
                 api_key: str | None = None, max_concurrency: int = 64, timeout_s: float = 120.0,
                 colocated: bool | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # the server computes on this host's cores: the worker's loop scores in lulls (openai_loop)
        self.colocated = is_loopback_url(self.base_url) if colocated is None else colocated
        self.reward = reward
        self.worker_id = worker_id
        self.server_model = model  # sent as "model"; None: the server's choice
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._closed = False
        self._down_since: float | None = None
        self._down_logged_at = 0.0
        self._job_tasks: dict[str, asyncio.Future] = {}
        self.num_retries = 0  # sample calls retried (server down, timeouts, 5xx)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-backend", daemon=True)
        self._thread.start()
        self._client, self._semaphore = self._wait(self._open())

    # -- the worker's interface ------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[SampleSet]:
        """One SampleSet per job, in order: samples scored, or an error reply for that job alone. Blocks
        until every job is done (the worker's loop uses ``submit`` + ``replies`` instead, job by job)."""
        started = time.perf_counter()
        futures = [self.submit(job) for job in jobs]
        outcomes = [_outcome(future) for future in futures]
        generate_s = time.perf_counter() - started
        total_samples = max(1, sum(job.num_samples for job in jobs))
        done = [(job, outcome, generate_s * job.num_samples / total_samples) for job, outcome in zip(jobs, outcomes)]
        replies = self.replies(done)
        closed = next((outcome for outcome in outcomes if isinstance(outcome, BackendClosed)), None)
        if closed is not None:
            raise closed  # shutting down: no replies, the jobs stay pending for another worker
        return [reply for reply in replies if reply is not None]

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Start every sample of the job (at most ``max_concurrency`` requests in flight, over all jobs);
        the future's result is the samples in order, or the exception that stopped the job. An aisp job
        is not started (``replies`` answers it ``bad_request``)."""
        if job.kind == JobKind.AISP:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result([])
            return future
        if self._closed:
            future = concurrent.futures.Future()
            future.set_exception(BackendClosed("the worker is shutting down"))
            return future
        return asyncio.run_coroutine_threadsafe(self._tracked_job(job), self._loop)

    def replies(self, done: list[tuple[Job, list[ServerSample] | BaseException, float]]) -> list[SampleSet | None]:
        """(job, its samples or the exception that stopped it, generate_s) -> its SampleSet, the samples of
        every job scored in one reward call. None for a job abandoned at shutdown (it stays pending)."""
        scored = [(job, outcome) for job, outcome, _ in done
                  if isinstance(outcome, list) and job.kind != JobKind.AISP]
        scores = iter(score_jobs(self.reward, [_prompt(job) for job, _ in scored],
                                 [[s.text for s in samples] for _, samples in scored],
                                 [dict(job.metadata) for job, _ in scored]))
        replies: list[SampleSet | None] = []
        for job, outcome, generate_s in done:
            if job.kind == JobKind.AISP:
                replies.append(error_sample_set(job, self.worker_id, ErrorCode.BAD_REQUEST,
                                                "aisp needs a worker with the hf backend; this one is openai"))
            elif isinstance(outcome, list):
                replies.append(self._sample_set(job, outcome, next(scores), generate_s))
            elif isinstance(outcome, BackendClosed):
                replies.append(None)
            else:
                replies.append(self._error_reply(job, outcome))
        return replies

    def cancel(self, job_id: str) -> None:
        """Stop a running job's outstanding samples (its request was answered ``cancelled``)."""
        def cancel_in_loop() -> None:
            task = self._job_tasks.get(job_id)
            if task is not None:
                task.cancel()
        if not self._closed:
            self._loop.call_soon_threadsafe(cancel_in_loop)

    def close(self) -> None:
        """Abandon the calls in flight and stop the event loop (a ``run`` waiting on them returns)."""
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            for task in list(self._job_tasks.values()):
                task.cancel()
            await self._client.aclose()

        try:
            self._wait(shut(), timeout_s=5.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def list_models(self) -> list[str]:
        """The model ids the server lists (GET /models); raises on any failure."""
        return self._wait(self._list_models())

    # -- replies ----------------------------------------------------------------------------------
    def _sample_set(self, job: Job, samples: list[ServerSample], scores: Any, generate_s: float) -> SampleSet:
        if scores.error is not None:
            return SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id=self.worker_id, kind=job.kind,
                             generate_s=generate_s, score_s=scores.score_s,
                             error=ErrorInfo(code=ErrorCode.REWARD_FAILED, message=scores.error[:4000]))
        return SampleSet(
            job_id=job.job_id, request_id=job.request_id, worker_id=self.worker_id, kind=job.kind,
            samples=[Sample(index=job.sample_offset + i, text=s.text, reward=reward, num_tokens=s.num_tokens,
                            is_finished=s.is_finished) for i, (s, reward) in enumerate(zip(samples, scores.rewards))],
            generate_s=generate_s, score_s=scores.score_s)

    def _error_reply(self, job: Job, error: BaseException) -> SampleSet:
        if isinstance(error, BackendRejected):
            return error_sample_set(job, self.worker_id, ErrorCode.BACKEND_FAILED, str(error))
        if isinstance(error, JobDeadline):
            return error_sample_set(job, self.worker_id, ErrorCode.DEADLINE_EXCEEDED, str(error))
        if isinstance(error, (JobCancelled, asyncio.CancelledError, concurrent.futures.CancelledError)):
            return error_sample_set(job, self.worker_id, ErrorCode.INTERNAL, "job cancelled while generating")
        return error_sample_set(job, self.worker_id, ErrorCode.INTERNAL, f"{type(error).__name__}: {error}")

    # -- the event loop's side --------------------------------------------------------------------
    def _wait(self, coroutine: Any, *, timeout_s: float | None = None) -> Any:
        if self._closed and not self._loop.is_running():
            coroutine.close()
            raise BackendClosed("the openai backend is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_s)

    async def _open(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, CONNECT_TIMEOUT_S), pool=None)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers)
        return client, asyncio.Semaphore(self.max_concurrency)

    async def _list_models(self) -> list[str]:
        response = await self._client.get(f"{self.base_url}/models")
        if response.status_code >= 400:
            raise BackendRejected(response.status_code, rejection_message(response.content, response.status_code))
        return [str(m["id"]) for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]

    async def _tracked_job(self, job: Job) -> list[ServerSample]:
        """The job's samples, cancellable by job id (``cancel``); BackendClosed once the worker stops."""
        task = asyncio.ensure_future(self._job_samples(job))
        self._job_tasks[job.job_id] = task
        try:
            samples = await task
        except asyncio.CancelledError:
            if self._closed:
                raise BackendClosed("the worker is shutting down") from None
            raise JobCancelled("job cancelled while generating") from None
        finally:
            if self._job_tasks.get(job.job_id) is task:
                del self._job_tasks[job.job_id]
        if self._closed:
            raise BackendClosed("the worker is shutting down")
        return samples

    async def _job_samples(self, job: Job) -> list[ServerSample]:
        """A job's samples, in order; the first failure (or a cancel) stops the rest of them."""
        tasks = [asyncio.ensure_future(self._sample(job, i)) for i in range(job.num_samples)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _sample(self, job: Job, position: int) -> ServerSample:
        path, body = sample_request(_prompt(job), index=job.sample_offset + position, seed=job.seed,
                                    max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                                    top_p=job.top_p, model=self.server_model)
        delay_s = FIRST_BACKOFF_S
        while True:
            if self._closed:
                raise BackendClosed("the worker is shutting down")
            try:
                # while the server fails, no connection is kept: one it answered early may be out of step
                headers = {"Connection": "close"} if self._down_since is not None else None
                async with self._semaphore:
                    response = await self._client.post(f"{self.base_url}{path}", json=body, headers=headers)
                status = response.status_code
                if status < 400:
                    sample = parse_sample(path, response.json())
                    self._mark_up()
                    return sample
                message = rejection_message(response.content, status)
                if not is_retryable_status(status, response.content):
                    raise BackendRejected(status, message)
                problem = f"HTTP {status}: {message}"
            except httpx.TransportError as e:  # refused, reset, timed out, broken protocol
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except ValueError as e:  # a 2xx we cannot read: the server's fault, like a 5xx
                problem = f"unreadable reply: {e}"
            self._mark_down(problem)
            if job.deadline_at_ms is not None and now_ms() + delay_s * 1000 >= job.deadline_at_ms:
                raise JobDeadline(f"job deadline passed while the inference server failed: {problem}")
            self.num_retries += 1
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))  # jitter: 64 samples do not retry in step
            delay_s = min(MAX_BACKOFF_S, delay_s * 2)

    def _mark_down(self, problem: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_logged_at >= DOWN_LOG_EVERY_S:
            self._down_logged_at = now
            logger.warning("inference server %s failing for %.0f s (retrying; jobs stay pending): %s",
                           self.base_url, now - self._down_since, problem)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            logger.info("inference server %s answers again after %.1f s", self.base_url,
                        time.monotonic() - self._down_since)
            self._down_since = None
            self._down_logged_at = 0.0


def is_loopback_url(url: str) -> bool:
    """Whether the URL's host is this machine by its loopback name or address (127/8, ::1, localhost)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _outcome(future: concurrent.futures.Future) -> list[ServerSample] | BaseException:
    """A job future's samples, or the exception that stopped the job (a cancelled job included)."""
    try:
        samples: list[ServerSample] = future.result()
        return samples
    except BaseException as e:  # noqa: BLE001 - CancelledError too: the job was cancelled
        return e


def _prompt(job: Job) -> str | list[dict]:
    return job.prompt if isinstance(job.prompt, str) else [m.model_dump() for m in job.prompt]


def load_openai_backend(settings: Any, *, worker_id: str) -> OpenAIBackend:
    """The reward model (the only model this worker loads) and a client of ALIGNQ_BACKEND_URL. Without
    ALIGNQ_BACKEND_MODEL, the server's first listed model is used (waiting up to backend_timeout_s)."""
    from workers.models import load_reward

    url = settings.backend_url
    if not url or not url.startswith(("http://", "https://")):
        raise ModelLoadError("ALIGNQ_BACKEND=openai needs ALIGNQ_BACKEND_URL, the server's /v1 base "
                             "(e.g. http://vllm:8000/v1)")
    reward = load_reward(settings.reward_model, device=settings.device, positive=settings.reward_positive,
                         negative=settings.reward_negative)
    api_key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else None
    backend = OpenAIBackend(url, reward, worker_id=worker_id, model=settings.backend_model, api_key=api_key,
                            max_concurrency=settings.backend_max_concurrency, timeout_s=settings.backend_timeout_s,
                            colocated=settings.backend_colocated)
    if settings.backend_model is None:
        backend.server_model = _first_model(backend, give_up_s=settings.backend_timeout_s)
    logger.info("openai backend url=%s model=%s max_concurrency=%d colocated=%s", url, backend.server_model,
                settings.backend_max_concurrency, backend.colocated)
    return backend


def _first_model(backend: OpenAIBackend, *, give_up_s: float) -> str:
    give_up_at = time.monotonic() + give_up_s
    delay_s = FIRST_BACKOFF_S
    while True:
        try:
            models = backend.list_models()
            if models:
                return models[0]
            problem = "it lists no model"
        except BackendRejected as e:
            backend.close()
            raise ModelLoadError(f"inference server {backend.base_url}: {e}") from e
        except (httpx.HTTPError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if time.monotonic() + delay_s > give_up_at:
            backend.close()
            raise ModelLoadError(f"cannot ask {backend.base_url}/models which model it serves within {give_up_s:.0f} s "
                                 f"({problem}); set ALIGNQ_BACKEND_MODEL to start without asking")
        logger.info("waiting for the inference server %s: %s", backend.base_url, problem)
        time.sleep(delay_s)
        delay_s = min(MAX_BACKOFF_S, delay_s * 2)
