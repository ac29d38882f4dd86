"""Async Python SDK: publish prompts to alignq over Redis and wait for their aligned answers.

Talks to the scheduler only through Redis (names from ``schemas.Keys``), so it is cheap to embed in
a chatbot backend: no torch, no worker code.

    async with Client("redis://127.0.0.1:6379/0") as client:
        request_id = await client.submit("Write a haiku about queues", budget=16)
        result = await client.result(request_id, timeout_s=60)
        async for event in client.stream("Explain KV caches", method="uniform"):
            print(event.kind, event.data)

Submit is one Lua script per request (``middleware.admission``): if fewer than ``max_pending`` requests are
accepted-but-unanswered it ZADDs the request to ``keys.pending_requests`` and XADDs it to
``keys.requests``, atomically; otherwise nothing is written and the client raises ``Overloaded``.
The script is idempotent on ``request_id``, so a submit retried after a dropped connection never
queues a request twice.

Errors (all ``middleware.errors.ClientError``):

    ClientError
    ├── BadRequest              the request fails validation; nothing was sent
    ├── Overloaded              max_pending reached; retry after ``retry_after_s``
    ├── RequestFailed           the request was answered with an error result (``.result``)
    ├── ResultTimeout           no answer within ``timeout_s``
    ├── RequestLost             Redis no longer knows the request: no result, no events, not pending
    │                           (e.g. Redis restarted without persistence, or the id is unknown)
    └── ConnectionLost          Redis unreachable for longer than ``reconnect_timeout_s``
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self

import anyio
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from middleware.admission import OVERLOADED, SUBMIT_LUA, estimate_retry_after_s
from middleware.errors import ClientError
from middleware.event_router import EventRouter
from schemas import (
    DEFAULT_NAMESPACE,
    PAYLOAD_FIELD,
    AlignRequest,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Event,
    EventKind,
    Keys,
    ResultStatus,
    SchemaError,
    decode,
    encode,
    now_ms,
)

__all__ = [
    "BadRequest",
    "Client",
    "ConnectionLost",
    "Overloaded",
    "RequestFailed",
    "RequestLost",
    "ResultTimeout",
    "estimate_retry_after_s",
]

logger = logging.getLogger(__name__)


class BadRequest(ClientError):
    """The request does not validate (empty prompt, budget out of range, unknown field...)."""


class Overloaded(ClientError):
    """``max_pending`` requests are waiting; nothing was queued. Retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float, num_pending: int = 0,
                 submitted_ids: Sequence[str] = (), rejected_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.num_pending = num_pending
        #: submit_many: ids of the items accepted before the queue filled up (in input order).
        self.submitted_ids = list(submitted_ids)
        #: submit_many: ids of the items not queued (retry those).
        self.rejected_ids = list(rejected_ids)


class RequestFailed(ClientError):
    """The request was answered with ``status=error``; ``result.error`` says why."""

    def __init__(self, result: AlignResult) -> None:
        error = result.error
        detail = f"{error.code.value}: {error.message}" if error else "no error detail"
        super().__init__(f"request {result.request_id} failed: {detail}")
        self.result = result


class ResultTimeout(ClientError):
    """No terminal answer within the caller's ``timeout_s`` (the request may still complete)."""


class RequestLost(ClientError):
    """Redis has neither a result, events, nor a pending entry for the request."""


class ConnectionLost(ClientError):
    """Redis could not be reached for longer than ``reconnect_timeout_s``."""


_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def _error_result(request_id: str, code: ErrorCode, message: str) -> AlignResult:
    return AlignResult(request_id=request_id, status=ResultStatus.ERROR, error=ErrorInfo(code=code, message=message))


class Client:
    """Async alignq client. Use as ``async with Client(url) as client:``.

    ``redis`` is a URL or an existing ``redis.asyncio.Redis`` (bytes responses; the caller keeps
    ownership and closes it). ``poll_interval_s`` bounds each blocking read, after which a waiting
    call checks that Redis still knows the request.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_pending: int = 10_000,
        poll_interval_s: float = 1.0,
        reconnect_timeout_s: float = 10.0,
        submit_chunk_size: int = 500,
        max_connections: int = 64,
    ) -> None:
        if isinstance(redis, str):
            # A blocking pool waits for a free connection instead of failing at max_connections.
            pool = aioredis.BlockingConnectionPool.from_url(redis, max_connections=max_connections,
                                                            timeout=reconnect_timeout_s, health_check_interval=30)
            self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
            self._owns_redis = True
        else:
            self._redis = redis
            self._owns_redis = False
        self.keys = Keys(namespace)
        self.max_pending = max_pending
        self.poll_interval_s = poll_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.submit_chunk_size = submit_chunk_size
        self._submit_script = self._redis.register_script(SUBMIT_LUA)
        self._router = EventRouter(self._redis)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._router.aclose()
        if self._owns_redis:
            await self._redis.aclose()

    # -- submit -----------------------------------------------------------------------------------
    @staticmethod
    def build_request(prompt: Any, **fields: Any) -> AlignRequest:
        """Validate ``prompt`` and AlignRequest ``fields`` locally; BadRequest if they are invalid."""
        try:
            return AlignRequest(prompt=prompt, **fields)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "request"
            raise BadRequest(f"invalid request: {where}: {first.get('msg')}") from e
        except TypeError as e:  # e.g. prompt passed twice
            raise BadRequest(f"invalid request: {e}") from e

    async def submit(self, prompt: Any, **fields: Any) -> str:
        """Queue one prompt; returns its request_id. Raises BadRequest or Overloaded."""
        return await self.submit_request(self.build_request(prompt, **fields))

    async def submit_request(self, request: AlignRequest) -> str:
        payload = self._encode(request)
        reply = await self._with_reconnect(
            lambda: self._submit_script(keys=self._submit_keys(request.request_id),
                                        args=[self.max_pending, request.request_id, now_ms(), payload])
        )
        self._check_submit_reply(reply)
        return request.request_id

    async def submit_many(self, items: Sequence[str | dict | AlignRequest]) -> list[str]:
        """Queue many prompts, one pipelined round trip per ``submit_chunk_size`` items.

        Items are prompts, dicts of AlignRequest fields (with ``prompt``), or AlignRequests. All are
        validated before anything is sent. If the queue fills up, the chunk in flight completes and
        no further chunk is sent; Overloaded then carries ``submitted_ids`` (accepted, they stay
        queued) and ``rejected_ids`` (not queued), each in input order.
        """
        requests = [self._as_request(item) for item in items]
        payloads = [self._encode(request) for request in requests]
        sha = await self._with_reconnect(self._load_script)
        submitted_ids: list[str] = []
        rejected_ids: list[str] = []
        overloaded: Overloaded | None = None
        for start in range(0, len(requests), self.submit_chunk_size):
            if overloaded is not None:
                rejected_ids.extend(request.request_id for request in requests[start:])
                break
            chunk = list(zip(requests[start:start + self.submit_chunk_size],
                             payloads[start:start + self.submit_chunk_size]))
            replies = await self._with_reconnect(lambda chunk=chunk: self._submit_chunk(sha, chunk))
            for (request, _), reply in zip(chunk, replies):
                try:
                    self._check_submit_reply(reply)
                except Overloaded as e:  # a later item of the chunk may still fit (a slot freed)
                    overloaded = overloaded or e
                    rejected_ids.append(request.request_id)
                    continue
                submitted_ids.append(request.request_id)
        if overloaded is not None:
            overloaded.submitted_ids = submitted_ids
            overloaded.rejected_ids = rejected_ids
            raise overloaded
        return submitted_ids

    async def _submit_chunk(self, sha: str, chunk: list[tuple[AlignRequest, bytes]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for request, payload in chunk:
                pipe.evalsha(sha, 3, *self._submit_keys(request.request_id),
                             self.max_pending, request.request_id, now_ms(), payload)
            replies = await pipe.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):  # SCRIPT FLUSH or a Redis restart
            sha = await self._load_script()
            return await self._submit_chunk(sha, chunk)  # idempotent: accepted items are duplicates now
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _load_script(self) -> str:
        sha = await self._redis.script_load(SUBMIT_LUA)
        return sha.decode() if isinstance(sha, bytes) else sha

    def _submit_keys(self, request_id: str) -> list[str]:
        return [self.keys.pending_requests, self.keys.requests, self.keys.request_claim(request_id)]

    def _check_submit_reply(self, reply: Sequence[Any]) -> None:
        status, num_pending, oldest_ms = (int(value) for value in reply)
        if status == OVERLOADED:
            retry_after_s = estimate_retry_after_s(num_pending, self.max_pending, (now_ms() - oldest_ms) / 1000)
            raise Overloaded(
                f"alignq is overloaded: {num_pending} requests pending (max_pending={self.max_pending}); "
                f"retry after {retry_after_s:.2f} s",
                retry_after_s=retry_after_s,
                num_pending=num_pending,
            )

    def _as_request(self, item: str | dict | AlignRequest | list) -> AlignRequest:
        if isinstance(item, AlignRequest):
            return item
        if isinstance(item, dict):
            fields = dict(item)
            if "prompt" not in fields:
                raise BadRequest("invalid request: prompt: field required")
            return self.build_request(fields.pop("prompt"), **fields)
        return self.build_request(item)

    @staticmethod
    def _encode(request: AlignRequest) -> bytes:
        try:
            return encode(request)
        except SchemaError as e:
            raise BadRequest(f"invalid request: {e}") from e

    # -- wait -------------------------------------------------------------------------------------
    async def get_result(self, request_id: str) -> AlignResult | None:
        """The stored result, or None if the request is not answered (or its result expired)."""
        data = await self._with_reconnect(lambda: self._redis.get(self.keys.result(request_id)))
        return None if data is None else decode(AlignResult, data)

    async def result(self, request_id: str, *, timeout_s: float | None = None,
                     raise_on_error: bool = True) -> AlignResult:
        """Wait for the request's answer. RequestFailed on an error result unless ``raise_on_error=False``."""
        result = await self.get_result(request_id)
        if result is None:
            async for event in self.events(request_id, timeout_s=timeout_s):
                if event.is_terminal:
                    result = event.result
        if result is None:  # a terminal event without its result: only a foreign writer does this
            raise RequestLost(f"request {request_id} ended without a result")
        if raise_on_error and result.status == ResultStatus.ERROR:
            raise RequestFailed(result)
        return result

    async def events(self, request_id: str, *, timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Every event of the request from the first, in order, ending with the terminal one.

        Raises ResultTimeout after ``timeout_s`` (None: wait as long as the request is alive),
        RequestLost when Redis no longer knows the request, ConnectionLost when Redis stays down.
        """
        async for event in self.events_or_idle(request_id, timeout_s=timeout_s):
            if event is not None:
                yield event

    async def events_or_idle(self, request_id: str, *, timeout_s: float | None = None) -> AsyncIterator[Event | None]:
        """Like ``events``, but yields None after each ``poll_interval_s`` without news (for keep-alives).

        Waits share connections: the client's EventRouter reads many requests' streams per XREAD.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        subscription = self._router.subscribe(self.keys.events(request_id))
        num_missing_checks = 0
        try:
            while True:
                wait_s = self.poll_interval_s
                if deadline is not None:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        raise ResultTimeout(f"no answer for request {request_id} within {timeout_s} s")
                    wait_s = min(wait_s, remaining_s)
                item = None
                with anyio.move_on_after(wait_s):
                    item = await subscription.receive.receive()
                if item is not None:
                    num_missing_checks = 0
                    if isinstance(item, Exception):
                        raise ConnectionLost(f"reading events of request {request_id} failed: {item}") from item
                    event = self._decode_event(request_id, *item)
                    if event is not None:
                        yield event
                        if event.is_terminal:
                            return
                    continue
                state = await self.request_state(request_id)
                if state == "answered":  # result stored but its events expired or were never written
                    result = await self.get_result(request_id)
                    if result is not None:
                        kind = EventKind.ERROR if result.status == ResultStatus.ERROR else EventKind.DONE
                        yield Event(request_id=request_id, kind=kind, result=result)
                        return
                elif state == "missing":
                    # Seen twice in a row, a poll apart: not a transient state of a restarting server.
                    num_missing_checks += 1
                    if num_missing_checks >= 2:
                        raise RequestLost(
                            f"request {request_id} is unknown to Redis: no result, no events and not pending "
                            "(Redis lost data, the result expired, or it was never submitted); resubmit it"
                        )
                else:
                    num_missing_checks = 0
                yield None
        finally:
            self._router.unsubscribe(subscription)

    @staticmethod
    def _decode_event(request_id: str, entry_id: bytes, fields: dict) -> Event | None:
        try:
            return decode(Event, fields[PAYLOAD_FIELD])
        except (SchemaError, KeyError) as e:
            logger.warning("skipping undecodable event request_id=%s entry=%s: %s", request_id, entry_id, e)
            return None

    async def results_as_completed(self, request_ids: Sequence[str], *, timeout_s: float | None = None,
                                   chunk_size: int = 1000, max_poll_s: float = 0.25) -> AsyncIterator[AlignResult]:
        """Yield each request's result as it is stored, polling all of them with one MGET per chunk.

        Scales to thousands of requests on one connection. Never raises for one request: a lost
        request yields an error result with code ``lost``, and at ``timeout_s`` every unanswered one
        yields an error result with code ``deadline_exceeded``. Polls every 20 ms while results
        arrive, backing off to ``max_poll_s`` when idle.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        outstanding = list(dict.fromkeys(request_ids))
        num_missing_checks: dict[str, int] = {}
        idle_poll_s = 0.02
        while outstanding:
            still_waiting: list[str] = []
            num_found = 0
            for start in range(0, len(outstanding), chunk_size):
                chunk = outstanding[start:start + chunk_size]
                datas, scores = await self._with_reconnect(lambda chunk=chunk: self._poll_results(chunk))
                for request_id, data, score in zip(chunk, datas, scores):
                    if data is not None:
                        num_found += 1
                        yield decode(AlignResult, data)
                    elif score is None and num_missing_checks.get(request_id, 0) >= 1:
                        yield _error_result(request_id, ErrorCode.LOST,
                                            "Redis no longer knows this request (lost data or expired); resubmit it")
                    else:
                        if score is None:
                            num_missing_checks[request_id] = num_missing_checks.get(request_id, 0) + 1
                        still_waiting.append(request_id)
            outstanding = still_waiting
            if not outstanding:
                return
            if deadline is not None and time.monotonic() >= deadline:
                for request_id in outstanding:
                    yield _error_result(request_id, ErrorCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s} s")
                return
            idle_poll_s = 0.02 if num_found else min(max_poll_s, idle_poll_s * 1.5)
            sleep_s = idle_poll_s if deadline is None else max(0.0, min(idle_poll_s, deadline - time.monotonic()))
            await anyio.sleep(sleep_s)

    async def _poll_results(self, request_ids: list[str]) -> tuple[list[bytes | None], list[float | None]]:
        async with self._redis.pipeline(transaction=True) as pipe:  # one snapshot: answered XOR pending
            pipe.mget([self.keys.result(request_id) for request_id in request_ids])
            pipe.zmscore(self.keys.pending_requests, request_ids)
            datas, scores = await pipe.execute()
        return datas, scores

    async def request_state(self, request_id: str) -> str:
        """'answered', 'alive' (pending), or 'missing' (unknown, lost or expired)."""
        return await self._with_reconnect(lambda: self._request_state(request_id))

    async def _request_state(self, request_id: str) -> str:
        """One MULTI snapshot of the keys that say where the request is."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.keys.result(request_id))
            pipe.zscore(self.keys.pending_requests, request_id)
            has_result, pending_score = await pipe.execute()
        if has_result:
            return "answered"
        # Only the pending set says "accepted, not answered": events alone do not keep a request alive,
        # since a scheduler may republish events of a request Redis lost (restart without persistence)
        # and then drop it, which would leave its waiters hanging.
        if pending_score is not None:
            return "alive"
        return "missing"

    async def stream(self, prompt: Any, *, timeout_s: float | None = None, **fields: Any) -> AsyncIterator[Event]:
        """Submit and yield the request's events until the terminal one."""
        request_id = await self.submit(prompt, **fields)
        async for event in self.events(request_id, timeout_s=timeout_s):
            yield event

    async def align(self, prompt: Any, *, timeout_s: float | None = None, **fields: Any) -> AlignResult:
        """Submit and wait for the answer."""
        request_id = await self.submit(prompt, **fields)
        return await self.result(request_id, timeout_s=timeout_s)

    # -- connection -------------------------------------------------------------------------------
    async def _with_reconnect(self, call: Any) -> Any:
        """Run ``call()``; on connection errors retry with backoff for up to ``reconnect_timeout_s``."""
        give_up_at = time.monotonic() + self.reconnect_timeout_s
        delay_s = 0.05
        while True:
            try:
                return await call()
            except _CONNECTION_ERRORS as e:
                if time.monotonic() + delay_s > give_up_at:
                    raise ConnectionLost(
                        f"Redis unreachable for {self.reconnect_timeout_s} s: {e}; check ALIGNQ_REDIS_URL and the server"
                    ) from e
                logger.warning("redis connection error, retrying in %.2f s: %s", delay_s, e)
                await anyio.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)
