"""Submitting requests, as the ``Client`` mixin: one request, or many in pipelined chunks.

Admission is one Lua script call per chunk and shard (``middleware.client.admission``): idempotent on
the id with the same request, ``Conflict`` on the same id with a different one, ``QuotaExceeded`` past
the tenant's quotas, ``Overloaded`` past ``max_pending``. Every request is validated before the first
chunk is sent, then encoded chunk by chunk (``middleware.client.wire_form``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
from redis.exceptions import NoScriptError

from middleware.client.admission import (
    QUEUED_SUBMIT_STATUSES,
    SUBMIT_LUA,
    SubmitStatus,
    estimate_retry_after_s,
)
from middleware.client.building import build_request, caller_trace_fields
from middleware.client.models import ServedModel, check_route, served_models
from middleware.client.ordered_channel import OrderedChannel
from middleware.client.wire_form import WireBatch, WireRequest
from middleware.errors import Conflict, Overloaded, QuotaExceeded
from schemas import AlignRequest, Keys, Method, now_ms
from schemas.topology import WAIT_TIMEOUT_MS, check_replicas
from schemas.transport import REDIS_ERRORS

__all__ = ["Quota", "Submitting"]

CHUNKS_IN_FLIGHT = 2  # submit_many's chunks sent ahead of their replies (each admitted atomically, in order)
ENCODE_PIECE = 50  # requests encoded between yields to the event loop while chunks are in flight
MODELS_CACHE_S = 1.0  # how stale the view of live workers' models may be
SUBMIT_SHA = hashlib.sha1(SUBMIT_LUA.encode()).hexdigest()  # EVALSHA first; SCRIPT LOAD only when Redis lacks it


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits, counted in Redis so they hold across gateways. 0: unlimited."""

    max_requests_per_minute: int = 0
    max_samples_in_flight: int = 0


async def _encode_yielding(batch: WireBatch, start: int, stop: int) -> list[WireRequest]:
    """``batch.encode(start, stop)`` in pieces, yielding between them: the event loop writes the chunks in
    flight to the socket as the kernel takes them and reads their replies."""
    chunk: list[WireRequest] = []
    for piece in range(start, min(stop, len(batch)), ENCODE_PIECE):
        await asyncio.sleep(0)
        chunk += batch.encode(piece, min(piece + ENCODE_PIECE, stop))
    return chunk


@dataclass
class _Outcome:
    """What ``submit_many`` has learnt so far, in input order."""

    submitted_ids: list[str] = field(default_factory=list)
    rejected_ids: list[str] = field(default_factory=list)
    overloaded: Overloaded | None = None


class _SentChunk(NamedTuple):
    start: int  # the chunk's first position in the batch
    chunk: list[WireRequest]
    calls: list[_ScriptCall]  # written on the ordered channel (task None)
    task: asyncio.Future[list[int]] | None  # or admitted by this task, on a pooled connection


class _ScriptCall(NamedTuple):
    indexes: list[int]  # positions in the chunk of this call's requests (one shard's)
    keys: list[str]
    args: list[Any]


class Submitting:
    """The submitting half of ``Client`` (``middleware.client.sdk``)."""

    _redis: Any
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
        batch = WireBatch([request], tenant=self.tenant, default_budget=self.default_budget, trace_fields={})
        await self._check_routes(batch.routes)
        replies = await self._admit(batch.encode(0, 1))
        self._check_submit_reply(replies[0], replies[1], replies[2], batch.caller_ids[0])
        return batch.caller_ids[0]

    async def submit_many(self, items: Sequence[str | dict | AlignRequest]) -> list[str]:
        """Queue many prompts, one round trip (one script call per shard) per ``submit_chunk_size`` items.

        Items are prompts, dicts of AlignRequest fields (with ``prompt``), or AlignRequests. All are
        validated before anything is sent. Up to ``CHUNKS_IN_FLIGHT`` chunks are sent ahead of their
        replies, each admitted atomically and in order. If the queue fills up, the chunks in flight
        complete and no further chunk is sent; Overloaded then carries ``submitted_ids`` (accepted, they
        stay queued) and ``rejected_ids`` (not queued), each in input order. A conflicting id raises
        Conflict once the chunks in flight are back (the items before it stay queued; those after it
        in flight may be queued too, and a retry of the batch finds them as duplicates).
        """
        batch = WireBatch(items, tenant=self.tenant, default_budget=self.default_budget,
                          trace_fields=caller_trace_fields())
        await self._check_routes(batch.routes)
        outcome = _Outcome()
        async with OrderedChannel.open(self._redis) as channel:
            await self._submit_chunks(batch, channel, outcome)
        if outcome.overloaded is not None:
            outcome.overloaded.submitted_ids = outcome.submitted_ids
            outcome.overloaded.rejected_ids = outcome.rejected_ids
            raise outcome.overloaded
        return outcome.submitted_ids

    async def _submit_chunks(self, batch: WireBatch, channel: OrderedChannel | None, outcome: _Outcome) -> None:
        """Send ``batch`` chunk by chunk: on ``channel``, CHUNKS_IN_FLIGHT chunks ahead of their replies
        (the next one encoded meanwhile); without one, one chunk at a time, the next encoded while it is out."""
        size = self.submit_chunk_size
        in_flight: collections.deque[_SentChunk] = collections.deque()
        chunk, next_start = batch.encode(0, size), 0
        try:
            while in_flight or (outcome.overloaded is None and next_start < len(batch)):
                depth = CHUNKS_IN_FLIGHT if channel is not None and not channel.broken else 1
                while outcome.overloaded is None and next_start < len(batch) and len(in_flight) < depth:
                    in_flight.append(await self._send_chunk(next_start, chunk, channel))
                    next_start += size
                    chunk = await _encode_yielding(batch, next_start, next_start + size)
                sent = in_flight.popleft()
                replies = await self._chunk_replies(sent, channel)
                try:
                    self._take_replies(replies, batch.caller_ids[sent.start:sent.start + size], outcome)
                except Conflict:  # raised once the chunks sent after it are back: none is left half-known
                    for later in in_flight:
                        await self._chunk_replies(later, channel)
                    in_flight.clear()
                    raise
            outcome.rejected_ids.extend(batch.caller_ids[next_start:])  # never sent: the queue was full
        finally:
            for sent in in_flight:  # encoding failed or we were cancelled: leave no send behind
                if sent.task is not None:
                    sent.task.cancel()

    async def _send_chunk(self, start: int, chunk: list[WireRequest], channel: OrderedChannel | None) -> _SentChunk:
        if channel is None or channel.broken:  # the whole admission as a task: encoding goes on meanwhile
            return _SentChunk(start, chunk, [], asyncio.ensure_future(self._admit(chunk)))
        calls = self._submit_calls(chunk, first_attempt=True)
        with contextlib.suppress(*REDIS_ERRORS):  # the channel is broken now: the chunk is sent again
            await channel.send(self._commands(calls))
        return _SentChunk(start, chunk, calls, None)

    async def _chunk_replies(self, sent: _SentChunk, channel: OrderedChannel | None) -> list[int]:
        """(status, num_pending, detail) per item of a chunk sent by ``_send_chunk``, flat."""
        if sent.task is not None:
            return await sent.task
        assert channel is not None
        if not channel.broken:
            try:
                raw = await channel.read(len(sent.calls) + (self.min_replicas > 0))
                if not any(isinstance(reply, NoScriptError) for reply in raw):
                    return await self._recheck(sent.chunk, await self._after_send(sent.calls, raw))
                # Redis lost its scripts (a restart, SCRIPT FLUSH): this chunk and those sent after it on the
                # channel are sent again one by one, in order, so no later chunk is admitted before them
                channel.broken = True
            except REDIS_ERRORS:
                pass
        # lost with the connection (or short of replicas): sent again, every id looked up
        return await self._admit(sent.chunk, first_attempt=False)

    def _commands(self, calls: list[_ScriptCall]) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = [("EVALSHA", SUBMIT_SHA, len(call.keys), *call.keys, *call.args)
                                           for call in calls]
        if self.min_replicas > 0:  # same connection: WAIT covers every script of the chunk
            commands.append(("WAIT", self.min_replicas, WAIT_TIMEOUT_MS))
        return commands

    def _take_replies(self, replies: list[int], caller_ids: list[str], outcome: _Outcome) -> None:
        """Sort one chunk's ids into submitted and rejected, keeping the first Overloaded."""
        if set(replies[0::3]) <= QUEUED_SUBMIT_STATUSES:  # the usual case: every item queued
            outcome.submitted_ids += caller_ids
            return
        for position, caller_id in enumerate(caller_ids):
            try:
                status, num_pending, detail = replies[3 * position:3 * position + 3]
                self._check_submit_reply(status, num_pending, detail, caller_id)
            except Overloaded as e:  # counted per shard: another shard's items may still fit
                outcome.overloaded = outcome.overloaded or e
                outcome.rejected_ids.append(caller_id)
                continue
            outcome.submitted_ids.append(caller_id)

    async def _admit(self, chunk: list[WireRequest], *, first_attempt: bool = True) -> list[int]:
        """SUBMIT_LUA over ``chunk`` on a pooled connection: (status, num_pending, detail) per item, flat."""
        attempts = 0

        def calls() -> list[_ScriptCall]:  # a resend after a lost reply looks every id up
            nonlocal attempts
            attempts += 1
            return self._submit_calls(chunk, first_attempt=first_attempt and attempts == 1)

        return await self._recheck(chunk, await self._with_reconnect(lambda: self._send(calls())))

    async def _recheck(self, chunk: list[WireRequest], replies: list[int]) -> list[int]:
        """Ids seen before and no longer pending (RECHECK) decided by a second call with their answered markers."""
        recheck = [index for index, status in enumerate(replies[0::3]) if status == SubmitStatus.RECHECK]
        if recheck:
            calls = self._submit_calls([chunk[index] for index in recheck], with_markers=True)
            second = await self._with_reconnect(lambda: self._send(calls))
            for position, index in enumerate(recheck):
                replies[3 * index:3 * index + 3] = second[3 * position:3 * position + 3]
        return replies

    async def _send(self, calls: list[_ScriptCall]) -> list[int]:
        """The calls pipelined on one connection: (status, num_pending, detail) of each item, flat, in chunk order."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(SUBMIT_SHA, len(call.keys), *call.keys, *call.args)
            if self.min_replicas > 0:  # same connection: WAIT covers every script of the chunk
                pipe.execute_command("WAIT", self.min_replicas, WAIT_TIMEOUT_MS)
            replies = await pipe.execute(raise_on_error=False)
        return await self._after_send(calls, replies)

    async def _after_send(self, calls: list[_ScriptCall], replies: list[Any]) -> list[int]:
        """The calls' raw replies (errors as values, WAIT's last) as (status, num_pending, detail) per item."""
        if self.min_replicas > 0 and not isinstance(replies[-1], Exception):
            check_replicas(int(replies.pop()), self.min_replicas)  # short: retried, accepted ones are duplicates
        if any(isinstance(reply, NoScriptError) for reply in replies):  # a new Redis, SCRIPT FLUSH or a restart
            await self._redis.script_load(SUBMIT_LUA)
            # idempotent: items another node accepted are duplicates now, so every id is looked up
            return await self._send([call._replace(args=[*call.args[:-1], "0"]) for call in calls])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # every item queued: the script answers only the pending count (no reply of 3 per item to build)
        replies = [[SubmitStatus.ACCEPTED, reply, 0] * len(call.indexes) if isinstance(reply, int) else reply
                   for call, reply in zip(calls, replies, strict=True)]
        if len(calls) == 1:
            return replies[0]
        flat = [0] * sum(3 * len(call.indexes) for call in calls)
        for call, reply in zip(calls, replies, strict=True):
            for position, index in enumerate(call.indexes):
                flat[3 * index:3 * index + 3] = reply[3 * position:3 * position + 3]
        return flat

    def _submit_calls(self, chunk: list[WireRequest], *, with_markers: bool = False,
                      first_attempt: bool = False) -> list[_ScriptCall]:
        """SUBMIT_LUA's calls for ``chunk``: one per shard, every key in that shard's hash slot; the
        requests' answered markers only ``with_markers`` (a recheck). On a ``first_attempt``, a call whose
        ids are all fresh (made by this client) skips the fingerprint lookup."""
        if not chunk:
            return []
        num_shards = self.keys.num_shards
        by_shard: dict[int, list[int]] = {0: list(range(len(chunk)))} if num_shards == 1 else {}
        if num_shards > 1:
            for index, wire in enumerate(chunk):
                by_shard.setdefault(self.keys.shard_of(wire.wire_id), []).append(index)
        now_s = time.time()
        tenant = self.tenant or ""
        # Fingerprints go to one hash per idempotency window; it lives to the end of the next window,
        # so every id stays bound for at least idempotency_ttl_s (and less than twice that).
        window_s = self.idempotency_ttl_s
        window = int(now_s) // window_s
        # Backpressure and quotas are counted per shard: each shard admits its 1/S share of the limits.
        limits = [self._per_shard(self.max_pending), int(now_s * 1000), (window + 2) * window_s - int(now_s),
                  self._per_shard(self.quota.max_requests_per_minute), self._per_shard(self.quota.max_samples_in_flight),
                  60 - int(now_s) % 60]
        calls = []
        for shard, indexes in by_shard.items():
            keys = self.keys.for_shard(shard)
            names = [keys.pending_requests, keys.requests, keys.quota_rate(tenant, int(now_s // 60)),
                     keys.quota_samples(tenant), keys.fingerprints(window_s, window), keys.fingerprints(window_s, window - 1)]
            if with_markers:
                names += [keys.request_claim(chunk[index].wire_id) for index in indexes]
            items: list[Any] = []
            all_fresh = first_attempt
            for index in indexes:
                wire = chunk[index]
                items += (wire.wire_id, wire.payload, wire.fingerprint, wire.samples)
                all_fresh = all_fresh and wire.fresh
            calls.append(_ScriptCall(indexes, names, [*limits, msgpack.packb(items, use_bin_type=False),
                                                      "1" if all_fresh else "0"]))
        return calls  # cmsgpack (in Redis) reads no bin type: payloads go as raw strings

    def _per_shard(self, limit: int) -> int:
        return -(-limit // self.keys.num_shards) if limit > 0 else 0

    def _check_submit_reply(self, status: int, num_pending: int, detail: int, caller_id: str) -> None:
        if status in QUEUED_SUBMIT_STATUSES:
            return
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

    async def _check_routes(self, routes: set[tuple[str | None, str]]) -> None:
        """Fail fast on a model no live worker serves, or aisp where none can run it (heartbeats, cached 1 s).

        Requests for the default model with bon or uniform skip the check: no Redis call on the hot path.
        """
        if not routes:
            return
        if self._models_cache is None or time.monotonic() - self._models_cache[0] > MODELS_CACHE_S:
            models = await self._with_reconnect(lambda: served_models(self._redis, self.keys))
            self._models_cache = (time.monotonic(), models)
        for model, method in routes:
            check_route(self._models_cache[1], model, Method(method))
