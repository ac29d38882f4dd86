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

**Submit** is one Lua script call per chunk of requests (``middleware.client.admission``): idempotent on the id with
the same request, ``Conflict`` on the same id with a different one, ``QuotaExceeded`` past the
tenant's quotas, ``Overloaded`` past ``max_pending``. Errors are ``middleware.errors.ClientError``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Self

import anyio
import redis.asyncio as aioredis

from middleware.client.admission import CANCEL_LUA, CancelOutcome
from middleware.client.building import build_request, checked_tenant
from middleware.client.event_router import EventRouter
from middleware.client.models import ServedModel
from middleware.client.results import ResultWaiting
from middleware.client.submitting import Quota, Submitting
from middleware.errors import BadRequest, Conflict, ConnectionLost, Overloaded, QuotaExceeded
from schemas import DEFAULT_NAMESPACE, AlignResult, Event, EventKind, Keys, ResultStatus, encode, now_ms
from schemas.lifecycle import read_heartbeats
from schemas.tenancy import SCOPE_SEPARATOR, scoped_request_id
from schemas.topology import check_min_replicas, is_cluster
from schemas.transport import REDIS_ERRORS, connect

# build_request, Quota and the errors stay importable from here, where callers and the README name them.
__all__ = ["BadRequest", "Client", "Conflict", "ConnectionLost", "Overloaded", "Quota", "QuotaExceeded",
           "build_request"]

logger = logging.getLogger(__name__)

DEFAULT_IDEMPOTENCY_TTL_S = 86_400  # how long an id stays bound to its request (as payment APIs do)


class Client(Submitting, ResultWaiting):
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
        self.tenant = checked_tenant(tenant)
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
        self._cancel_script = self._redis.register_script(CANCEL_LUA)
        self._router = EventRouter(self._redis)
        self._is_view = False
        self._models_cache: tuple[float, dict[str, ServedModel]] | None = None

    def with_tenant(self, tenant: str | None, *, quota: Quota | None = None) -> Client:
        """This client for another tenant: same connections and event router, its own id scope."""
        view = copy.copy(self)
        view.tenant = checked_tenant(tenant)
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

