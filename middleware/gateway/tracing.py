"""The gateway's spans: one SERVER span per ``/v1/...`` call, the root of each request's trace.

An incoming W3C ``traceparent`` header continues the caller's trace. While the call runs, its span is
the current OpenTelemetry context, and ``trace_fields()`` gives the ``traceparent`` the AlignRequest
carries to the scheduler and, through its jobs, the workers. Off (``schemas.tracing``): the middleware
is not installed and ``trace_fields()`` is ``{}``.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from schemas.tracing import context_of, service_tracer, traceparent_of

__all__ = ["add_tracing", "trace_fields"]

SERVICE_NAME = "alignq-gateway"
_ID_IN_PATH = re.compile(r"^/v1/align/(?!batch$)[^/]+$")


def add_tracing(app: FastAPI) -> None:
    """Install the span middleware when tracing is configured."""
    tracer = service_tracer(SERVICE_NAME)
    if tracer is not None:
        app.add_middleware(TracingMiddleware, tracer=tracer)


def trace_fields() -> dict[str, Any]:
    """``{"traceparent": ...}`` of the current span, for ``Client.build_request``; ``{}`` when off."""
    if service_tracer(SERVICE_NAME) is None:
        return {}
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return {}
    return {"traceparent": traceparent_of(span)}


class TracingMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): streaming bodies run inside the span and its context."""

    def __init__(self, app: Any, *, tracer: Any) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        route = "/v1/align/{request_id}" if _ID_IN_PATH.match(scope["path"]) else scope["path"]
        span = self.tracer.start_span(f"{scope['method']} {route}", context=context_of(headers.get("traceparent")),
                                      kind=trace.SpanKind.SERVER,
                                      attributes={"http.request.method": scope["method"], "url.path": scope["path"]})
        token = context.attach(trace.set_span_in_context(span))

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                request_id = dict(message.get("headers") or []).get(b"x-alignq-request-id")
                if request_id:
                    span.set_attribute("alignq.request_id", request_id.decode("latin-1"))
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            context.detach(token)
            span.end()
