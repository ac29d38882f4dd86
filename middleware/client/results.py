"""Waiting for answers: results, event streams and request states, as the ``Client`` mixin.

Every id here is the caller's; ``wire_id`` scopes it by the client's tenant before a key is named, and
results and events come back with the caller's id again. Another tenant's id therefore names keys that
do not exist: ``RequestLost`` (404 at the gateway), never its data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import anyio

from middleware.errors import ConnectionLost, RequestCancelled, RequestFailed, RequestLost, ResultTimeout
from schemas import (
    PAYLOAD_FIELD,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Event,
    Keys,
    ResultStatus,
    SchemaError,
    decode,
)
from schemas.messages import FAILED_STATUSES, terminal_event_kind
from schemas.tenancy import caller_request_id

if TYPE_CHECKING:
    from middleware.client.event_router import EventRouter

__all__ = ["RequestState", "ResultWaiting"]

logger = logging.getLogger(__name__)


class RequestState(StrEnum):
    """Where a request is, from one snapshot of its keys."""

    ANSWERED = "answered"  # its result is stored (ok, partial, error or cancelled)
    ALIVE = "alive"  # accepted, not answered yet
    MISSING = "missing"  # unknown: never submitted (in this tenant), lost by Redis, or expired


class ResultWaiting:
    """The waiting half of ``Client`` (``middleware.client.sdk``)."""

    _redis: Any
    _router: EventRouter
    keys: Keys
    poll_interval_s: float

    def wire_id(self, request_id: str) -> str:
        raise NotImplementedError

    async def _with_reconnect(self, call: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def caller_id(wire_id: str) -> str:
        return caller_request_id(wire_id)

    def _for_caller(self, result: AlignResult) -> AlignResult:
        return result.model_copy(update={"request_id": self.caller_id(result.request_id)})

    def _event_for_caller(self, event: Event) -> Event:
        result = None if event.result is None else self._for_caller(event.result)
        return event.model_copy(update={"request_id": self.caller_id(event.request_id), "result": result})

    async def get_result(self, request_id: str) -> AlignResult | None:
        """The stored result, or None if the request is not answered (or its result expired)."""
        data = await self._with_reconnect(lambda: self._redis.get(self.keys.result(self.wire_id(request_id))))
        return None if data is None else self._for_caller(decode(AlignResult, data))

    async def result(self, request_id: str, *, timeout_s: float | None = None,
                     raise_on_error: bool = True) -> AlignResult:
        """Wait for the answer. RequestFailed (RequestCancelled) on an error (cancelled) result unless
        ``raise_on_error=False``."""
        result = await self.get_result(request_id)
        if result is None:
            async for event in self.events(request_id, timeout_s=timeout_s):
                if event.is_terminal:
                    result = event.result
        if result is None:  # a terminal event without its result: only a foreign writer does this
            raise RequestLost(f"request {request_id} ended without a result")
        if raise_on_error and result.status in FAILED_STATUSES:
            raise RequestCancelled(result) if result.status == ResultStatus.CANCELLED else RequestFailed(result)
        return result

    async def events(self, request_id: str, *, timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Every event of the request from the first, in order, ending with the terminal one.

        Raises ResultTimeout after ``timeout_s`` (None: wait as long as the request is alive),
        RequestLost when Redis does not know the request, ConnectionLost when Redis stays down.
        """
        async for event in self.events_or_idle(request_id, timeout_s=timeout_s):
            if event is not None:
                yield event

    async def events_or_idle(self, request_id: str, *, timeout_s: float | None = None
                             ) -> AsyncIterator[Event | None]:
        """Like ``events``, but yields None after each ``poll_interval_s`` without news (for keep-alives).

        Waits share connections: the client's EventRouter reads many requests' streams per XREAD.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        subscription = self._router.subscribe(self.keys.events(self.wire_id(request_id)))
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
                if state == RequestState.ANSWERED:  # result stored but its events expired or were never written
                    result = await self.get_result(request_id)
                    if result is not None:
                        yield Event(request_id=request_id, kind=terminal_event_kind(result.status), result=result)
                        return
                elif state == RequestState.MISSING:
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

    def _decode_event(self, request_id: str, entry_id: bytes, fields: dict) -> Event | None:
        try:
            return self._event_for_caller(decode(Event, fields[PAYLOAD_FIELD]))
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
                        yield self._for_caller(decode(AlignResult, data))
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
        wire_ids = [self.wire_id(request_id) for request_id in request_ids]
        by_shard: dict[int, list[int]] = {}  # one snapshot per shard (one slot on a cluster)
        for i, wire_id in enumerate(wire_ids):
            by_shard.setdefault(self.keys.shard_of(wire_id), []).append(i)
        datas: list[bytes | None] = [None] * len(wire_ids)
        scores: list[float | None] = [None] * len(wire_ids)
        for shard, indices in by_shard.items():
            ids = [wire_ids[i] for i in indices]
            async with self._redis.pipeline(transaction=True) as pipe:  # answered XOR pending
                # MGET by name: a cluster pipeline blocks .mget(), though one slot's keys are fine
                pipe.execute_command("MGET", *[self.keys.result(wire_id) for wire_id in ids])
                pipe.zmscore(self.keys.for_shard(shard).pending_requests, ids)
                shard_datas, shard_scores = await pipe.execute()
            for i, data, score in zip(indices, shard_datas, shard_scores):
                datas[i], scores[i] = data, score
        return datas, scores

    async def request_state(self, request_id: str) -> RequestState:
        """ANSWERED, ALIVE (pending) or MISSING (unknown in this tenant, lost or expired)."""
        return await self._with_reconnect(lambda: self._request_state(self.wire_id(request_id)))

    async def _request_state(self, wire_id: str) -> RequestState:
        """One MULTI snapshot of the keys that say where the request is."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.keys.result(wire_id))
            pipe.zscore(self.keys.for_request(wire_id).pending_requests, wire_id)
            has_result, pending_score = await pipe.execute()
        if has_result:
            return RequestState.ANSWERED
        # Only the pending set says "accepted, not answered": events alone do not keep a request alive,
        # since a scheduler may republish events of a request Redis lost (restart without persistence)
        # and then drop it, which would leave its waiters hanging.
        if pending_score is not None:
            return RequestState.ALIVE
        return RequestState.MISSING


def _error_result(request_id: str, code: ErrorCode, message: str) -> AlignResult:
    return AlignResult(request_id=request_id, status=ResultStatus.ERROR, error=ErrorInfo(code=code, message=message))
