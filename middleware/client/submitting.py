"""Submitting requests, as the ``Client`` mixin: one request, or many in pipelined chunks.

Admission is one Lua script per request (``middleware.client.admission``): idempotent on the id with
the same request, ``Conflict`` on the same id with a different one, ``QuotaExceeded`` past the
tenant's quotas, ``Overloaded`` past ``max_pending``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from middleware.client.admission import (
    QUEUED_SUBMIT_STATUSES,
    SUBMIT_LUA,
    SubmitStatus,
    estimate_retry_after_s,
)
from middleware.client.building import build_request, caller_trace_fields, encode_request
from middleware.client.models import ServedModel, check_route, served_models
from middleware.errors import BadRequest, Conflict, Overloaded, QuotaExceeded
from schemas import AlignRequest, Keys, Method, now_ms
from schemas.tenancy import caller_request_id, request_fingerprint
from schemas.topology import WAIT_TIMEOUT_MS, check_replicas, eval_replicated

__all__ = ["Quota", "Submitting"]

MODELS_CACHE_S = 1.0  # how stale the view of live workers' models may be


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits, counted in Redis so they hold across gateways. 0: unlimited."""

    max_requests_per_minute: int = 0
    max_samples_in_flight: int = 0


class Submitting:
    """The submitting half of ``Client`` (``middleware.client.sdk``)."""

    _redis: Any
    _submit_script: Any
    _models_cache: tuple[float, dict[str, ServedModel]] | None
    keys: Keys
    tenant: str | None
    quota: Quota
    max_pending: int
    min_replicas: int
    submit_chunk_size: int
    idempotency_ttl_s: int
    default_budget: int

    async def _with_reconnect(self, call: Any) -> Any:
        raise NotImplementedError

    def build_request(self, prompt: Any, **fields: Any) -> AlignRequest:
        """Validate ``prompt`` and AlignRequest ``fields`` in this client's tenant; BadRequest if invalid.

        Without a ``traceparent``, the request joins the caller's active OpenTelemetry span, if any.
        """
        if "traceparent" not in fields:
            fields.update(caller_trace_fields())
        return build_request(prompt, tenant=self.tenant, **fields)

    async def submit(self, prompt: Any, **fields: Any) -> str:
        """Queue one prompt; returns its request_id. Raises BadRequest, Conflict, QuotaExceeded or Overloaded."""
        return await self.submit_request(self.build_request(prompt, **fields))

    async def submit_request(self, request: AlignRequest) -> str:
        """Queue a built request (``build_request``); returns the caller's id."""
        self._check_scope(request)
        await self._check_routes([request])
        args = self._submit_args(request, encode_request(request))
        reply = await self._with_reconnect(lambda: eval_replicated(
            self._redis, self._submit_script, keys=self._submit_keys(request), args=args,
            min_replicas=self.min_replicas))
        self._check_submit_reply(reply, request)
        return caller_request_id(request.request_id)

    async def submit_many(self, items: Sequence[str | dict | AlignRequest]) -> list[str]:
        """Queue many prompts, one pipelined round trip per ``submit_chunk_size`` items.

        Items are prompts, dicts of AlignRequest fields (with ``prompt``), or AlignRequests. All are
        validated before anything is sent. If the queue fills up, the chunk in flight completes and
        no further chunk is sent; Overloaded then carries ``submitted_ids`` (accepted, they stay
        queued) and ``rejected_ids`` (not queued), each in input order. A conflicting id raises
        Conflict after its chunk (the items before it stay queued).
        """
        requests = [self._as_request(item) for item in items]
        payloads = [encode_request(request) for request in requests]
        await self._check_routes(requests)
        sha = await self._with_reconnect(self._load_script)
        submitted_ids: list[str] = []
        rejected_ids: list[str] = []
        overloaded: Overloaded | None = None
        for start in range(0, len(requests), self.submit_chunk_size):
            if overloaded is not None:
                rejected_ids.extend(caller_request_id(request.request_id) for request in requests[start:])
                break
            chunk = list(zip(requests[start:start + self.submit_chunk_size],
                             payloads[start:start + self.submit_chunk_size]))
            replies = await self._with_reconnect(lambda chunk=chunk: self._submit_chunk(sha, chunk))
            for (request, _), reply in zip(chunk, replies):
                try:
                    self._check_submit_reply(reply, request)
                except Overloaded as e:  # a later item of the chunk may still fit (a slot freed)
                    overloaded = overloaded or e
                    rejected_ids.append(caller_request_id(request.request_id))
                    continue
                submitted_ids.append(caller_request_id(request.request_id))
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
        caller_id = caller_request_id(request.request_id)
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
