"""Async Python SDK: publish prompts to alignq over Redis and wait for their aligned answers.

Talks to the scheduler only through Redis (names from ``schemas.Keys``), so it is cheap to embed in
a chatbot backend: no torch, no worker code.

    async with Client("redis://127.0.0.1:6379/0", tenant="acme") as client:
        request_id = await client.submit("Write a haiku about queues", budget=16)
        result = await client.result(request_id, timeout_s=60)
        async for event in client.stream("Explain KV caches", method="uniform"):
            print(event.kind, event.data)
        await client.cancel(request_id)          # a no-op that says so once it is answered

**Tenancy.** Every id a caller passes or sees is its own; on the wire it is ``"{tenant}/{id}"``
(``schemas.tenancy``), so two tenants' ``order-1`` never meet, and another tenant's id is simply
unknown here. ``client.with_tenant(name)`` is a view on the same connections for another tenant
(the gateway makes one per API key).

**Submit** is one Lua script per request (``middleware.client.admission``): idempotent on the id with
the same request, ``Conflict`` on the same id with a different one, ``QuotaExceeded`` past the
tenant's quotas, ``Overloaded`` past ``max_pending``. Errors are ``middleware.errors.ClientError``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import anyio
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import NoScriptError

from middleware.client.admission import (
    CANCEL_LUA,
    QUEUED_SUBMIT_STATUSES,
    SUBMIT_LUA,
    CancelOutcome,
    SubmitStatus,
    estimate_retry_after_s,
)
from middleware.client.event_router import EventRouter
from middleware.client.models import ServedModel, check_route, served_models
from middleware.client.results import ResultWaiting
from middleware.errors import BadRequest, Conflict, ConnectionLost, Overloaded, QuotaExceeded
from schemas import (
    DEFAULT_NAMESPACE,
    AlignRequest,
    AlignResult,
    Event,
    EventKind,
    Keys,
    Method,
    ResultStatus,
    SchemaError,
    encode,
    new_request_id,
    now_ms,
)
from schemas.lifecycle import read_heartbeats
from schemas.tenancy import SCOPE_SEPARATOR, request_fingerprint, scoped_request_id
from schemas.topology import WAIT_TIMEOUT_MS, check_min_replicas, check_replicas, eval_replicated, is_cluster
from schemas.transport import REDIS_ERRORS, connect

__all__ = ["Client", "Quota"]

logger = logging.getLogger(__name__)

MODELS_CACHE_S = 1.0  # how stale the view of live workers' models may be
DEFAULT_IDEMPOTENCY_TTL_S = 86_400  # how long an id stays bound to its request (as payment APIs do)


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits, counted in Redis so they hold across gateways. 0: unlimited."""

    max_requests_per_minute: int = 0
    max_samples_in_flight: int = 0


class Client(ResultWaiting):
    """Async alignq client. Use as ``async with Client(url) as client:``.

    ``redis`` is a URL or an existing ``redis.asyncio.Redis`` (bytes responses; the caller keeps
    ownership and closes it). ``tenant`` scopes every id (None: the shared tenant).
    ``poll_interval_s`` bounds each blocking read, after which a waiting call checks that Redis still
    knows the request.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis = "redis://127.0.0.1:6379/0",
        *,
        tenant: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        max_pending: int = 10_000,
        poll_interval_s: float = 1.0,
        reconnect_timeout_s: float = 10.0,
        submit_chunk_size: int = 500,
        max_connections: int = 64,
        idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S,
        default_budget: int = 16,
        quota: Quota | None = None,
        num_shards: int = 1,
        min_replicas: int = 0,
    ) -> None:
        if isinstance(redis, str):
            self._redis = connect(redis, max_connections=max_connections, blocking_pool=True,
                                  socket_timeout_s=reconnect_timeout_s)
            self._owns_redis = True
        else:
            self._redis = redis
            self._owns_redis = False
        self.tenant = _checked_tenant(tenant)
        # S shards (ALIGNQ_SHARDS): the same in every process of a deployment (docs/scaling.md)
        self.keys = Keys.sharded(namespace, num_shards, cluster=is_cluster(self._redis))
        self.min_replicas = min_replicas  # WAIT after each submit (ALIGNQ_REDIS_MIN_REPLICAS)
        check_min_replicas(self._redis, min_replicas)
        self.max_pending = max_pending
        self.poll_interval_s = poll_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.submit_chunk_size = submit_chunk_size
        self.idempotency_ttl_s = idempotency_ttl_s
        self.default_budget = default_budget  # counted against a samples quota when a request sets none
        self.quota = quota or Quota()
        self._submit_script = self._redis.register_script(SUBMIT_LUA)
        self._cancel_script = self._redis.register_script(CANCEL_LUA)
        self._router = EventRouter(self._redis)
        self._is_view = False
        self._models_cache: tuple[float, dict[str, ServedModel]] | None = None

    def with_tenant(self, tenant: str | None, *, quota: Quota | None = None) -> Client:
        """This client for another tenant: same connections and event router, its own id scope."""
        view = copy.copy(self)
        view.tenant = _checked_tenant(tenant)
        view.quota = quota or Quota()
        view._is_view = True
        return view

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._is_view:  # the client it came from owns the connections
            return
        await self._router.aclose()
        if self._owns_redis:
            await self._redis.aclose()

    # -- ids --------------------------------------------------------------------------------------
    def wire_id(self, request_id: str) -> str:
        """The id Redis knows this caller's ``request_id`` by."""
        if SCOPE_SEPARATOR in request_id:  # a caller's ids never hold it: this would name another scope's keys
            raise BadRequest(f"invalid request_id {request_id!r}: letters, digits and _ . : - only")
        return scoped_request_id(self.tenant, request_id)

    # -- submit -----------------------------------------------------------------------------------
    def build_request(self, prompt: Any, **fields: Any) -> AlignRequest:
        """Validate ``prompt`` and AlignRequest ``fields`` in this client's tenant; BadRequest if invalid."""
        return build_request(prompt, tenant=self.tenant, **fields)

    async def submit(self, prompt: Any, **fields: Any) -> str:
        """Queue one prompt; returns its request_id. Raises BadRequest, Conflict, QuotaExceeded or Overloaded."""
        return await self.submit_request(self.build_request(prompt, **fields))

    async def submit_request(self, request: AlignRequest) -> str:
        """Queue a built request (``build_request``); returns the caller's id."""
        self._check_scope(request)
        await self._check_routes([request])
        args = self._submit_args(request, self._encode(request))
        reply = await self._with_reconnect(lambda: eval_replicated(
            self._redis, self._submit_script, keys=self._submit_keys(request), args=args,
            min_replicas=self.min_replicas))
        self._check_submit_reply(reply, request)
        return self.caller_id(request.request_id)

    async def submit_many(self, items: Sequence[str | dict | AlignRequest]) -> list[str]:
        """Queue many prompts, one pipelined round trip per ``submit_chunk_size`` items.

        Items are prompts, dicts of AlignRequest fields (with ``prompt``), or AlignRequests. All are
        validated before anything is sent. If the queue fills up, the chunk in flight completes and
        no further chunk is sent; Overloaded then carries ``submitted_ids`` (accepted, they stay
        queued) and ``rejected_ids`` (not queued), each in input order. A conflicting id raises
        Conflict after its chunk (the items before it stay queued).
        """
        requests = [self._as_request(item) for item in items]
        payloads = [self._encode(request) for request in requests]
        await self._check_routes(requests)
        sha = await self._with_reconnect(self._load_script)
        submitted_ids: list[str] = []
        rejected_ids: list[str] = []
        overloaded: Overloaded | None = None
        for start in range(0, len(requests), self.submit_chunk_size):
            if overloaded is not None:
                rejected_ids.extend(self.caller_id(request.request_id) for request in requests[start:])
                break
            chunk = list(zip(requests[start:start + self.submit_chunk_size],
                             payloads[start:start + self.submit_chunk_size]))
            replies = await self._with_reconnect(lambda chunk=chunk: self._submit_chunk(sha, chunk))
            for (request, _), reply in zip(chunk, replies):
                try:
                    self._check_submit_reply(reply, request)
                except Overloaded as e:  # a later item of the chunk may still fit (a slot freed)
                    overloaded = overloaded or e
                    rejected_ids.append(self.caller_id(request.request_id))
                    continue
                submitted_ids.append(self.caller_id(request.request_id))
        if overloaded is not None:
            overloaded.submitted_ids = submitted_ids
            overloaded.rejected_ids = rejected_ids
            raise overloaded
        return submitted_ids

    async def _submit_chunk(self, sha: str, chunk: list[tuple[AlignRequest, bytes]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for request, payload in chunk:
                keys = self._submit_keys(request)
                pipe.evalsha(sha, len(keys), *keys, *self._submit_args(request, payload))
            if self.min_replicas > 0:  # same connection: WAIT covers every script of the chunk
                pipe.execute_command("WAIT", self.min_replicas, WAIT_TIMEOUT_MS)
            replies = await pipe.execute(raise_on_error=False)
        if self.min_replicas > 0 and not isinstance(replies[-1], Exception):
            check_replicas(int(replies.pop()), self.min_replicas)  # short: retried, accepted ones are duplicates
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

    def _submit_keys(self, request: AlignRequest) -> list[str]:
        rid, tenant = request.request_id, request.tenant or ""
        keys = self.keys.for_request(rid)  # the request's shard: one hash slot for the whole script
        return [keys.pending_requests, keys.requests, keys.request_claim(rid),
                keys.fingerprint(rid), keys.quota_rate(tenant, int(time.time() // 60)),
                keys.quota_samples(tenant)]

    def _submit_args(self, request: AlignRequest, payload: bytes) -> list[Any]:
        seconds_left = 60 - int(time.time()) % 60
        # Backpressure and quotas are counted per shard: each shard admits its 1/S share of the limits.
        return [self._per_shard(self.max_pending), request.request_id, now_ms(), payload,
                request_fingerprint(request.model_dump(mode="json")), self.idempotency_ttl_s,
                self._per_shard(self.quota.max_requests_per_minute),
                self._per_shard(self.quota.max_samples_in_flight),
                request.budget or self.default_budget, seconds_left]

    def _per_shard(self, limit: int) -> int:
        return -(-limit // self.keys.num_shards) if limit > 0 else 0

    def _check_submit_reply(self, reply: Sequence[Any], request: AlignRequest) -> None:
        status, num_pending, detail = (int(value) for value in reply)
        if status in QUEUED_SUBMIT_STATUSES:
            return
        caller_id = self.caller_id(request.request_id)
        if status == SubmitStatus.CONFLICT:
            raise Conflict(f"request_id {caller_id!r} was already used for a different request "
                           "(another prompt or parameters); use a new request_id")
        if status == SubmitStatus.RATE_LIMITED:
            raise QuotaExceeded(f"quota exceeded: {self.quota.max_requests_per_minute} requests per minute; "
                                f"retry after {detail} s", retry_after_s=float(detail), num_pending=num_pending)
        if status == SubmitStatus.SAMPLES_LIMITED:
            raise QuotaExceeded(f"quota exceeded: {self.quota.max_samples_in_flight} samples in flight; retry "
                                "when earlier requests are answered", retry_after_s=1.0, num_pending=num_pending)
        if status == SubmitStatus.OVERLOADED:
            retry_after_s = estimate_retry_after_s(num_pending, self.max_pending, (now_ms() - detail) / 1000)
            raise Overloaded(
                f"alignq is overloaded: {num_pending} requests pending (max_pending={self.max_pending}); "
                f"retry after {retry_after_s:.2f} s",
                retry_after_s=retry_after_s,
                num_pending=num_pending,
            )

    def _check_scope(self, request: AlignRequest) -> None:
        if request.tenant != self.tenant:
            raise BadRequest(f"invalid request: built for tenant {request.tenant!r}, this client is "
                             f"{self.tenant!r}")

    def _as_request(self, item: str | dict | AlignRequest | list) -> AlignRequest:
        if isinstance(item, AlignRequest):
            self._check_scope(item)
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

    async def _check_routes(self, requests: Sequence[AlignRequest]) -> None:
        """Fail fast on a model no live worker serves, or aisp where none can run it (heartbeats, cached 1 s).

        Requests for the default model with bon or uniform skip the check: no Redis call on the hot path.
        """
        routes = {(r.model, r.method) for r in requests if r.model is not None or r.method == Method.AISP}
        if not routes:
            return
        if self._models_cache is None or time.monotonic() - self._models_cache[0] > MODELS_CACHE_S:
            models = await self._with_reconnect(lambda: served_models(self._redis, self.keys))
            self._models_cache = (time.monotonic(), models)
        for model, method in routes:
            check_route(self._models_cache[1], model, method)

    # -- cancel -----------------------------------------------------------------------------------
    async def cancel(self, request_id: str, *, reason: str = "cancelled by the client") -> CancelOutcome:
        """Answer the request ``cancelled`` now, once; its window and workers drop its work.

        Returns CANCELLED, or ALREADY_ANSWERED / UNKNOWN when there was nothing to cancel (a no-op).
        """
        rid = self.wire_id(request_id)
        result = AlignResult(request_id=rid, status=ResultStatus.CANCELLED, stats={"cancelled_at_ms": now_ms()})
        event = Event(request_id=rid, kind=EventKind.CANCELLED, result=result, data={"reason": reason[:200]})
        tenant, shard = self.tenant or "", self.keys.for_request(rid)
        keys = [shard.request_claim(rid), shard.result(rid), shard.events(rid),
                shard.pending_requests, shard.kept_samples(rid), shard.cancelled(rid),
                shard.quota_samples(tenant)]
        args = [rid, encode(result), encode(event), self.idempotency_ttl_s]
        outcome = await self._with_reconnect(lambda: self._cancel_script(keys=keys, args=args))
        return CancelOutcome(int(outcome))

    # -- connection -------------------------------------------------------------------------------
    async def _with_reconnect(self, call: Any) -> Any:
        """Run ``call()``; on connection errors retry with backoff for up to ``reconnect_timeout_s``."""
        give_up_at = time.monotonic() + self.reconnect_timeout_s
        delay_s = 0.05
        while True:
            try:
                return await call()
            except REDIS_ERRORS as e:
                if time.monotonic() + delay_s > give_up_at:
                    raise ConnectionLost(
                        f"Redis unreachable for {self.reconnect_timeout_s} s: {e}; check ALIGNQ_REDIS_URL and the server"
                    ) from e
                logger.warning("redis connection error, retrying in %.2f s: %s", delay_s, e)
                await anyio.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)

    # -- deployment ---------------------------------------------------------------------------------
    async def heartbeats(self, role: str) -> list[dict[str, Any]]:
        """The parsed heartbeats of every live ``role`` process (``worker``, ``scheduler``, ``gateway``)."""
        return await self._with_reconnect(lambda: read_heartbeats(self._redis, self.keys, role))

    # -- conveniences -----------------------------------------------------------------------------
    async def stream(self, prompt: Any, *, timeout_s: float | None = None, **fields: Any) -> AsyncIterator[Event]:
        """Submit and yield the request's events until the terminal one."""
        request_id = await self.submit(prompt, **fields)
        async for event in self.events(request_id, timeout_s=timeout_s):
            yield event

    async def align(self, prompt: Any, *, timeout_s: float | None = None, **fields: Any) -> AlignResult:
        """Submit and wait for the answer."""
        request_id = await self.submit(prompt, **fields)
        return await self.result(request_id, timeout_s=timeout_s)


def _checked_tenant(tenant: str | None) -> str | None:
    if tenant is None:
        return None
    try:
        AlignRequest(request_id=f"{tenant}/x", tenant=tenant, prompt="x")
    except ValidationError as e:
        raise BadRequest(f"invalid tenant {tenant!r}: letters, digits and _ . - only (1-64)") from e
    return tenant


def build_request(prompt: Any, *, tenant: str | None = None, **fields: Any) -> AlignRequest:
    """Validate ``prompt`` and AlignRequest ``fields`` in ``tenant``'s scope, with no connection; BadRequest if invalid."""
    if "tenant" in fields:
        raise BadRequest("invalid request: tenant: set by the client (Client(tenant=...)), not per request")
    request_id = fields.pop("request_id", None)
    if request_id is not None and (not isinstance(request_id, str) or "/" in request_id):
        raise BadRequest("invalid request: request_id: letters, digits and _ . : - only (1-128)")
    try:
        if request_id is not None:
            fields["request_id"] = scoped_request_id(tenant, request_id)
        elif tenant is not None:
            fields["request_id"] = scoped_request_id(tenant, new_request_id())
        return AlignRequest(prompt=prompt, tenant=tenant, **fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise BadRequest(f"invalid request: {where}: {first.get('msg')}") from e
    except TypeError as e:  # e.g. prompt passed twice
        raise BadRequest(f"invalid request: {e}") from e
