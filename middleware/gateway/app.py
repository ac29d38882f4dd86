"""HTTP gateway: OpenAI-compatible completions, SSE progress, batch, cancel, health and metrics.

An ASGI app (FastAPI on uvicorn) that talks to the scheduler only through Redis, with the same
``Client`` a Python program would use; run as many gateways as you like. The endpoints are in
``middleware.gateway.routes``; this module builds the app: its lifespan (one Redis pool, telemetry,
a heartbeat), error handlers, and the open probes ``/healthz`` and ``/metrics``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 401
bad or missing key (when keys are configured; /healthz and /metrics stay open for probes and
scrapers), 404 unknown id in the caller's tenant or unknown model, 405 with ``Allow``, 409 an id
reused for a different request (``conflict``) or a cancelled request (``cancelled``), 413 body too
large, 429 + Retry-After when ``max_pending`` or the key's quota is reached, 504 on a deadline or
``request_timeout_s``, 500 when the pipeline failed, 503 when Redis is unreachable or lost the
request. ``x-should-retry: false`` tells OpenAI SDKs not to retry errors a retry cannot fix.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from middleware.client import Client
from middleware.errors import GatewayError, UsageError
from middleware.gateway.contract import allowed_methods, openapi_document
from middleware.gateway.http import BodyLimitMiddleware, HttpMetricsMiddleware, error_responses
from middleware.gateway.routes import router
from middleware.gateway.tenants import TenantDirectory
from middleware.gateway.tracing import add_tracing
from middleware.metrics import (
    CONTENT_TYPE,
    Telemetry,
    count_live,
    render_metrics,
)
from middleware.runtime.exporter import maybe_start_process_exporter
from middleware.settings import GatewaySettings
from schemas import Keys
from schemas.lifecycle import write_heartbeat
from schemas.topology import deployment_keys
from schemas.transport import connect

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
HEARTBEAT_ROLE = "gateway"


def create_app(settings: GatewaySettings, *, redis: aioredis.Redis | None = None) -> FastAPI:
    """The gateway app. ``redis`` (optional) is used instead of connecting to ``settings.redis_url``."""
    keys = deployment_keys(settings.namespace, settings.shards, settings.redis_url)
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connection = redis or connect(settings.redis_url or "redis://127.0.0.1:6379/0", max_connections=128,
                                      blocking_pool=True)
        app.state.client = Client(connection, namespace=settings.namespace, max_pending=settings.max_pending,
                                  default_budget=settings.default_budget, num_shards=settings.shards,
                                  min_replicas=settings.redis_min_replicas)
        app.state.telemetry = Telemetry(connection, keys)
        maybe_start_process_exporter(app.state.telemetry)  # ALIGNQ_METRICS_PORT, if set
        app.state.redis = connection
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.state.telemetry.run)
            tg.start_soon(_heartbeat, connection, keys, gateway_id)
            logger.info("gateway started gateway_id=%s", gateway_id)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await app.state.client.aclose()  # stops its event readers; the connection is ours
            try:
                await connection.delete(keys.heartbeat(HEARTBEAT_ROLE, gateway_id))
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.debug("heartbeat cleanup failed: %s", e)
            if redis is None:
                await connection.aclose()

    app = FastAPI(title="alignq gateway", version="2", lifespan=lifespan)
    app.state.settings = settings
    app.state.tenants = TenantDirectory(settings)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(HttpMetricsMiddleware, telemetry_of=lambda: getattr(app.state, "telemetry", None))
    add_tracing(app)  # OpenTelemetry spans when OTEL_EXPORTER_OTLP_ENDPOINT is set
    _add_error_handlers(app)
    app.include_router(router)
    _add_probes(app, keys)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        gateway_error = GatewayError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                                     code="bad_request", param=".".join(loc) or None)
        return JSONResponse(gateway_error.body(), status_code=400, headers=gateway_error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        gateway_error = GatewayError(error.status_code, str(error.detail), code=f"http_{error.status_code}")
        headers = {**gateway_error.headers, **(error.headers or {})}
        if error.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return JSONResponse(gateway_error.body(), status_code=error.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        gateway_error = GatewayError(500, "internal error", type="server_error", code="internal")
        return JSONResponse(gateway_error.body(), status_code=500, headers=gateway_error.headers)


def _add_probes(app: FastAPI, keys: Keys) -> None:
    @app.get("/healthz", responses={
        200: {"description": "status ok (schedulers and workers live) or degraded; live counts, pending requests",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        503: {"description": "Redis unreachable: {status: down, redis}",
              "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def healthz(request: Request) -> JSONResponse:
        connection: aioredis.Redis = request.app.state.redis
        try:
            with anyio.fail_after(2):
                await connection.ping()
                live = {f"{role}s": await count_live(connection, keys, role)
                        for role in ("scheduler", "worker", "gateway")}
                num_pending = sum([await connection.zcard(keys.for_shard(shard).pending_requests)
                                   for shard in keys.shards])
        except (TimeoutError, OSError, aioredis.RedisError) as e:
            return JSONResponse({"status": "down", "redis": f"unreachable: {e}"}, status_code=503)
        is_serving = live["schedulers"] > 0 and live["workers"] > 0
        return JSONResponse({"status": "ok" if is_serving else "degraded", "redis": "ok", **live,
                             "pending": num_pending})

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition (version 0.0.4)"},
        **error_responses(503)})
    async def metrics(request: Request) -> Response:
        telemetry: Telemetry = request.app.state.telemetry
        try:
            await telemetry.flush()  # this gateway's own latest calls show at once
            body = await render_metrics(request.app.state.redis, keys)
        except (OSError, aioredis.RedisError) as e:
            raise GatewayError(503, f"Redis unreachable: {e}", type="server_error", code="redis_unavailable") from e
        return Response(body, media_type=CONTENT_TYPE)


async def _heartbeat(connection: aioredis.Redis, keys: Keys, gateway_id: str) -> None:
    while True:
        try:
            await write_heartbeat(connection, keys, HEARTBEAT_ROLE, gateway_id, ttl_ms=int(3 * HEARTBEAT_S * 1000))
        except (OSError, aioredis.RedisError) as e:
            logger.warning("gateway heartbeat failed: %s", e)
        await anyio.sleep(HEARTBEAT_S)


async def serve_gateway(settings: GatewaySettings, *, redis: aioredis.Redis | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation): uvicorn stops accepting, lets in-flight calls finish."""
    import uvicorn

    config = uvicorn.Config(create_app(settings, redis=redis), host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), lifespan="on", timeout_graceful_shutdown=10,
                            log_config=None)
    server = uvicorn.Server(config)
    await server.serve()
    if not server.started:
        raise RuntimeError(f"gateway could not start on {settings.host}:{settings.port} (port in use?)")


def run_gateway(settings: GatewaySettings) -> int:
    """``alignq gateway``: serve the HTTP API until SIGINT/SIGTERM; 0 after a graceful stop."""
    import signal
    import threading

    if not settings.redis_url:
        raise UsageError("the gateway needs a Redis: set ALIGNQ_REDIS_URL (or run `alignq serve`, which starts one)")
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place that re-raise is a no-op, so a graceful stop exits 0 instead of dying by the signal.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: None)
    try:
        asyncio.run(serve_gateway(settings))
    except (RuntimeError, OSError, ValidationError) as e:
        logger.error("gateway failed: %s", e)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
