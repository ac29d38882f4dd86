"""HTTP plumbing of the gateway: OpenAI-shaped errors, the body-size limit, per-call metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi.responses import JSONResponse

from middleware.client import (
    BadRequest,
    ConnectionLost,
    Overloaded,
    RequestFailed,
    RequestLost,
    ResultTimeout,
)
from middleware.errors import ClientError
from schemas import AlignResult, ErrorCode

MAX_BODY_BYTES = 32 * 1024 * 1024  # a batch of large prompts; one prompt is capped far lower by the schema

# error code of a failed result -> (HTTP status, OpenAI error type)
_RESULT_ERROR_STATUS = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorCode.LOST: (503, "server_error"),
}


class GatewayError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})
        if status in (400, 401, 404, 413, 504) or (status == 500 and code != "internal"):
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_from_client(error: ClientError) -> GatewayError:
    if isinstance(error, BadRequest):
        return GatewayError(400, str(error), code="bad_request")
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
