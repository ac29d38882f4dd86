"""The gateway's endpoints. Every call that names a request runs in the caller's tenant scope.

    POST   /v1/chat/completions    OpenAI chat completions (+ budget, method, priority, deadline_ms, seed)
    POST   /v1/completions         OpenAI text completions (``best_of`` = budget when budget is unset)
    POST   /v1/align/batch         {"requests": [{prompt, ...AlignRequest fields}]} -> NDJSON, as they finish
    GET    /v1/align/{request_id}  the AlignResult (200), still pending (202), unknown in this tenant (404)
    DELETE /v1/align/{request_id}  cancel: 200 {"cancelled": true|false, "status"}; unknown: 404
    GET    /v1/models              the models live workers serve (their heartbeats)

A completion whose HTTP client disconnects before the answer is cancelled (streaming or not).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from middleware.client import CancelOutcome, Client, RequestState
from middleware.client.models import served_models
from middleware.errors import BadRequest, ClientError, GatewayError, Overloaded, RequestLost, ResultTimeout
from middleware.gateway.bodies import AlignqFields, BatchBody, ChatCompletionBody, CompletionBody
from middleware.gateway.http import error_from_client, error_from_result, error_responses, success_response
from middleware.gateway.openai_shapes import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ChunkWriter,
    completion_response,
    sse_data,
)
from middleware.gateway.tenants import Tenant
from middleware.gateway.tracing import trace_fields
from schemas import FAILED_STATUSES, AlignRequest, ResultStatus

__all__ = ["router"]

logger = logging.getLogger(__name__)

KEEPALIVE_S = 10.0
DISCONNECT_POLL_S = 0.25
CANCEL_TIMEOUT_S = 5.0


def caller_tenant(request: Request) -> Tenant:
    return request.app.state.tenants.tenant_of(request)


def tenant_client(request: Request, tenant: Tenant = Depends(caller_tenant)) -> Client:
    """The SDK client in the caller's tenant scope, with its quotas; counts the call in telemetry."""
    request.app.state.telemetry.increment("alignq_tenant_calls_total", tenant=tenant.label)
    return request.app.state.client.with_tenant(tenant.name, quota=tenant.quota)


router = APIRouter()
#: the caller's id of a request: letters, digits and _ . : - (1-128); anything else is a 400
RequestIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
COMPLETION_RESPONSES = {
    200: success_response("The completion (JSON), or with stream=true server-sent events ending in [DONE]",
                          "application/json", "text/event-stream"),
    **error_responses(400, 401, 404, 409, 413, 429, 499, 500, 502, 503, 504)}


@router.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatCompletionBody, request: Request,
                           client: Client = Depends(tenant_client)) -> Response:
    return await _complete(request, client, body, body.prompt(), chat=True)


@router.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionBody, request: Request, client: Client = Depends(tenant_client)) -> Response:
    return await _complete(request, client, body, body.text_prompt(), chat=False)


@router.get("/v1/models", responses=error_responses(401, 503), dependencies=[Depends(caller_tenant)])
async def models(request: Request) -> JSONResponse:
    """The models live workers serve; ``alignq`` names the default model for clients that send it."""
    try:
        served = await served_models(request.app.state.redis, request.app.state.client.keys)
    except OSError as e:
        raise GatewayError(503, f"Redis unreachable: {e}", type="server_error", code="redis_unavailable") from e
    data = [{"id": "alignq", "object": "model", "created": 0, "owned_by": "alignq"}]
    data += [{"id": name, "object": "model", "created": 0, "owned_by": "alignq",
              "backends": sorted(m.backends), "capabilities": sorted(m.capabilities), "workers": m.num_workers}
             for name, m in sorted(served.items())]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/align/batch", response_class=StreamingResponse, responses={
    200: success_response("One JSON line per item as it finishes: {index, request_id, result} or {index, error}",
                          "application/x-ndjson"),
    **error_responses(400, 401, 404, 409, 413, 429, 503)})
async def align_batch(body: BatchBody, request: Request, client: Client = Depends(tenant_client)) -> StreamingResponse:
    settings = request.app.state.settings
    try:
        requests = [_batch_request(client, index, body) for index in range(len(body.requests))]
    except BadRequest as e:
        raise GatewayError(400, str(e), code="bad_request", param="requests") from e
    rejected: list[tuple[int, GatewayError]] = []
    try:
        accepted_ids = await client.submit_many(requests)
    except Overloaded as e:
        if not e.submitted_ids:
            raise error_from_client(e) from e
        accepted_ids = e.submitted_ids
        rejected_set = set(e.rejected_ids)
        rejected = [(i, error_from_client(e)) for i, r in enumerate(requests)
                    if client.caller_id(r.request_id) in rejected_set]
    except ClientError as e:
        raise error_from_client(e) from e
    timeout_s = min(body.timeout_s or settings.request_timeout_s, settings.request_timeout_s)
    return StreamingResponse(_batch_lines(client, accepted_ids, rejected, requests, timeout_s),
                             media_type="application/x-ndjson", headers={"X-Accel-Buffering": "no"})


@router.get("/v1/align/{request_id}", responses={
    200: success_response("The AlignResult", "application/json"),
    202: success_response("Still pending: {request_id, status: pending}", "application/json"),
    **error_responses(400, 401, 404, 503)})
async def get_result(request_id: RequestIdPath, request: Request,
                     wait_s: Annotated[float, Query(ge=0, description="wait up to this long (capped by the "
                                                                          "gateway's request_timeout_s)")] = 0.0,
                     client: Client = Depends(tenant_client)) -> Response:
    settings = request.app.state.settings
    try:
        if wait_s > 0:
            try:
                result = await client.result(request_id, timeout_s=min(wait_s, settings.request_timeout_s),
                                             raise_on_error=False)
            except ResultTimeout:
                result = None
        else:
            result = await client.get_result(request_id)
        if result is None:
            if await client.request_state(request_id) == RequestState.MISSING:
                raise GatewayError(404, f"no request {request_id} (unknown, expired or lost)", code="not_found")
            return JSONResponse({"request_id": request_id, "status": "pending"}, status_code=202)
    except RequestLost as e:
        raise GatewayError(404, str(e), code="not_found") from e
    except ClientError as e:
        raise error_from_client(e) from e
    return JSONResponse(result.model_dump(mode="json"))


@router.delete("/v1/align/{request_id}", responses={
    200: success_response("{request_id, cancelled, status}", "application/json"),
    **error_responses(400, 401, 404, 503)})
async def cancel(request_id: RequestIdPath, client: Client = Depends(tenant_client)) -> JSONResponse:
    """Cancel a pending request; a no-op that says so for an answered one (its status is returned)."""
    try:
        outcome = await client.cancel(request_id, reason="cancelled through the gateway")
        if outcome == CancelOutcome.UNKNOWN:
            raise GatewayError(404, f"no request {request_id} (unknown, expired or lost)", code="not_found")
        result = await client.get_result(request_id)
    except ClientError as e:
        raise error_from_client(e) from e
    status = result.status.value if result is not None else ResultStatus.CANCELLED.value
    return JSONResponse({"request_id": request_id, "cancelled": outcome == CancelOutcome.CANCELLED,
                         "status": status})


# -- completions ----------------------------------------------------------------------------------
async def _complete(request: Request, client: Client, body: AlignqFields, prompt: Any, *, chat: bool) -> Response:
    timeout_s = request.app.state.settings.request_timeout_s
    try:
        align_request = client.build_request(prompt, **body.request_fields(), **trace_fields())
        request_id = await client.submit_request(align_request)
    except ClientError as e:
        raise error_from_client(e) from e
    headers = {"X-Alignq-Request-Id": request_id}
    if body.stream:
        writer = ChunkWriter(align_request, body, chat=chat)
        return StreamingResponse(_sse(client, request_id, writer, timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    result = None
    failure: ClientError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, request, client, request_id, tg.cancel_scope)
        try:
            result = await client.result(request_id, timeout_s=timeout_s, raise_on_error=False)
        except ClientError as e:
            failure = e
        tg.cancel_scope.cancel()
    if failure is not None:
        raise error_from_client(failure) from failure
    if result is None:  # the caller left; it gets no answer, and the request was cancelled
        return Response(status_code=499)
    if result.status == ResultStatus.CANCELLED:
        raise GatewayError(409, f"request {request_id} was cancelled", code="cancelled")
    if result.status == ResultStatus.ERROR:
        raise error_from_result(result)
    return JSONResponse(completion_response(result, body, align_request, chat=chat), headers=headers)


async def _cancel_on_disconnect(request: Request, client: Client, request_id: str,
                                scope: anyio.CancelScope) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(DISCONNECT_POLL_S)
    logger.info("client disconnected, cancelling request_id=%s", request_id)
    await _cancel_quietly(client, request_id)
    scope.cancel()


async def _cancel_quietly(client: Client, request_id: str) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT_S):
        try:
            await client.cancel(request_id, reason="the HTTP client disconnected")
        except ClientError as e:
            logger.warning("could not cancel request_id=%s after a disconnect: %s", request_id, e)


def _batch_request(client: Client, index: int, body: BatchBody) -> AlignRequest:
    fields = {**trace_fields(), **body.item_fields(index)}
    try:
        return client.build_request(fields.pop("prompt"), **fields)
    except BadRequest as e:
        raise BadRequest(f"requests[{index}]: {e}") from e


async def _batch_lines(client: Client, accepted_ids: list[str], rejected: list[tuple[int, GatewayError]],
                       requests: list[AlignRequest], timeout_s: float) -> AsyncIterator[str]:
    """NDJSON: ``{"index", "request_id", "result"}`` per answered item, ``{"index", "error"}`` per rejected one."""
    index_of = {client.caller_id(request.request_id): i for i, request in enumerate(requests)}
    for index, error in rejected:
        yield json.dumps({"index": index, "request_id": client.caller_id(requests[index].request_id),
                          **error.body()}) + "\n"
    async for result in client.results_as_completed(accepted_ids, timeout_s=timeout_s):
        yield json.dumps({"index": index_of[result.request_id], "request_id": result.request_id,
                          "result": result.model_dump(mode="json")}) + "\n"


async def _sse(client: Client, request_id: str, writer: ChunkWriter, timeout_s: float) -> AsyncIterator[str]:
    """Progress as it happens, then the answer as chunks, then [DONE]. Keep-alive comments while idle.

    A client that disconnects closes this generator before the terminal event: the request is cancelled.
    """
    last_sent = time.monotonic()
    is_answered = False
    try:
        async for event in client.events_or_idle(request_id, timeout_s=timeout_s):
            if event is None:
                if time.monotonic() - last_sent >= KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield SSE_KEEPALIVE
                continue
            if not event.is_terminal:
                line = writer.progress(event)
                if line:
                    last_sent = time.monotonic()
                    yield line
                continue
            is_answered = True
            result = event.result
            if result is None or result.status in FAILED_STATUSES:
                error = (GatewayError(409, f"request {request_id} was cancelled", code="cancelled")
                         if result is not None and result.status == ResultStatus.CANCELLED
                         else error_from_result(result) if result
                         else GatewayError(500, "no result", type="server_error"))
                yield sse_data(error.body())
            else:
                for line in writer.answer(result):
                    yield line
            break
    except ClientError as e:
        is_answered = True
        yield sse_data(error_from_client(e).body())
    finally:
        if not is_answered:
            await _cancel_quietly(client, request_id)
    yield SSE_DONE
