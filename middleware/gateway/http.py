"""HTTP plumbing of the gateway: OpenAI-shaped errors, the body-size limit, per-call metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from middleware.errors import (
    BadRequest,
    ClientError,
    Conflict,
    ConnectionLost,
    GatewayError,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    RequestCancelled,
    RequestFailed,
    RequestLost,
    ResultTimeout,
)
from schemas import AlignResult, ErrorCode

MAX_BODY_BYTES = 32 * 1024 * 1024  # a batch of large prompts; one prompt is capped far lower by the schema

# error code of a failed result -> (HTTP status, OpenAI error type)
_RESULT_ERROR_STATUS = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorCode.LOST: (503, "server_error"),
    ErrorCode.CONFLICT: (409, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.BACKEND_FAILED: (502, "server_error"),
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, the body of every non-2xx answer."""

    error: ErrorDetail


_STATUS_TEXT = {400: "Bad request: the body fails validation", 401: "Missing or invalid API key",
                404: "Unknown request id in this tenant, or a model no live worker serves",
                405: "Method not allowed (see the Allow header)", 409: "The request_id was used for a different "
                "request, or the request was cancelled", 413: "Body too large",
                429: "Overloaded or past the key's quota; see Retry-After", 499: "The client disconnected",
                500: "The pipeline failed", 502: "The inference server refused the request",
                503: "Redis unreachable, or it lost the request", 504: "No answer within the deadline"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with OpenAI's error body."""
    return {status: {"model": ErrorBody, "description": _STATUS_TEXT[status]} for status in statuses}


#: One server-sent event as a client parses it (OpenAPI 3.2 ``itemSchema`` of text/event-stream).
SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer", "minimum": 0}}}
_MEDIA_TYPES = {"application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA},
                "application/x-ndjson": {"itemSchema": {"type": "object"}}}


def success_response(description: str, *media_types: str) -> dict[str, Any]:
    """An OpenAPI response answered in any of ``media_types``: JSON objects, or a stream of them."""
    return {"description": description, "content": {media_type: _MEDIA_TYPES[media_type] for media_type in media_types}}


def error_from_client(error: ClientError) -> GatewayError:
    if isinstance(error, BadRequest):
        return GatewayError(400, str(error), code="bad_request")
    if isinstance(error, Conflict):
        return GatewayError(409, str(error), code="conflict", param="request_id")
    if isinstance(error, ModelNotFound):
        return GatewayError(404, str(error), code="model_not_found", param="model")
    if isinstance(error, QuotaExceeded):
        return GatewayError(429, str(error), type="rate_limit_error", code="quota_exceeded",
                            headers={"Retry-After": str(max(1, math.ceil(error.retry_after_s)))})
    if isinstance(error, RequestCancelled):
        return GatewayError(409, str(error), code="cancelled")
    if isinstance(error, Overloaded):
        return GatewayError(429, str(error), type="rate_limit_error", code="overloaded",
                            headers={"Retry-After": str(max(1, math.ceil(error.retry_after_s)))})
    if isinstance(error, ResultTimeout):
        return GatewayError(504, str(error), type="timeout_error", code="timeout")
    if isinstance(error, RequestLost):
        return GatewayError(503, str(error), type="server_error", code="request_lost")
    if isinstance(error, ConnectionLost):
        return GatewayError(503, str(error), type="server_error", code="redis_unavailable")
    if isinstance(error, RequestFailed):
        return error_from_result(error.result)
    return GatewayError(500, str(error), type="server_error", code="internal")


def error_from_result(result: AlignResult) -> GatewayError:
    info = result.error
    code = info.code if info else ErrorCode.INTERNAL
    status, error_type = _RESULT_ERROR_STATUS.get(code, (500, "server_error"))
    headers = {"Retry-After": str(max(1, math.ceil(info.retry_after_s)))} if info and info.retry_after_s else None
    return GatewayError(status, info.message if info else "request failed", type=error_type, code=code.value,
                        headers=headers)


class HttpMetricsMiddleware:
    """Pure ASGI (streams pass through untouched): counts each call by endpoint and status."""

    def __init__(self, app: Any, telemetry_of: Any) -> None:
        self.app = app
        self.telemetry_of = telemetry_of

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            telemetry = self.telemetry_of()
            if telemetry is not None:
                telemetry.record_http(endpoint_label(scope["path"]), status, time.perf_counter() - started)


class BodyLimitMiddleware:
    """413 in OpenAI's shape for a declared body above ``MAX_BODY_BYTES``, before it is read."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                error = GatewayError(413, f"body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}",
                                     code="body_too_large")
                await JSONResponse(error.body(), status_code=413, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def endpoint_label(path: str) -> str:
    """The metrics label of a path: route templates, never raw ids."""
    if path.startswith("/v1/align/") and path != "/v1/align/batch":
        return "/v1/align/{request_id}"
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/align/batch", "/v1/models", "/healthz", "/metrics"):
        return path
    return "other"
