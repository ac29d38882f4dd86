"""HTTP gateway: OpenAI-compatible completions, SSE progress, batch, health and metrics.

An ASGI app (FastAPI on uvicorn) that talks to the scheduler only through Redis, with the same
``Client`` a Python program would use; run as many gateways as you like.

    POST /v1/chat/completions    OpenAI chat completions (+ budget, method, priority, deadline_ms, seed)
    POST /v1/completions         OpenAI text completions (``best_of`` = budget when budget is unset)
    POST /v1/align/batch         {"requests": [{prompt, ...AlignRequest fields}]} -> NDJSON, as they finish
    GET  /v1/align/{request_id}  the AlignResult (200), still pending (202), unknown or lost (404)
    GET  /v1/models              one model, ``alignq`` (the workers' model), for clients that list first
    GET  /healthz                Redis ping, live schedulers / workers / gateways (heartbeats)
    GET  /metrics                Prometheus text: deployment-wide telemetry (see middleware.metrics)

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 401
bad or missing key (when ``api_keys`` is set; /healthz and /metrics stay open for probes and
scrapers), 404 unknown id, 429 + Retry-After when ``max_pending`` is reached, 504 on a deadline or
``request_timeout_s``, 500 when the pipeline failed (reward model raised, job dead-lettered), 503
when Redis is unreachable or lost the request. A ``x-should-retry: false`` header tells OpenAI SDKs
not to retry errors a retry cannot fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from middleware.client import (
    BadRequest,
    Client,
    Overloaded,
    RequestLost,
    ResultTimeout,
)
from middleware.errors import ClientError, UsageError
from middleware.gateway_http import (
    BodyLimitMiddleware,
    GatewayError,
    HttpMetricsMiddleware,
    error_from_client,
    error_from_result,
)
from middleware.gateway_openai import (
    SSE_DONE,
    SSE_KEEPALIVE,
    AlignqFields,
    ChatCompletionBody,
    ChunkWriter,
    CompletionBody,
    completion_response,
    sse_data,
)
from middleware.metrics import CONTENT_TYPE, Telemetry, count_live, render_metrics
from middleware.settings import GatewaySettings
from schemas import AlignRequest, Keys, ResultStatus

logger = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 10_000
HEARTBEAT_S = 2.0
KEEPALIVE_S = 10.0

class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    defaults: dict[str, Any] = Field(default_factory=dict)  # AlignRequest fields applied to every item
    timeout_s: float | None = Field(default=None, gt=0)


# -- app ------------------------------------------------------------------------------------------
def create_app(settings: GatewaySettings, *, redis: aioredis.Redis | None = None) -> FastAPI:
    """The gateway app. ``redis`` (optional) is used instead of connecting to ``settings.redis_url``."""
    keys = Keys(settings.namespace)
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connection = redis or aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            settings.redis_url or "redis://127.0.0.1:6379/0", max_connections=128, timeout=10, health_check_interval=30))
        app.state.client = Client(connection, namespace=settings.namespace, max_pending=settings.max_pending)
        app.state.telemetry = Telemetry(connection, keys)
        app.state.redis = connection
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.state.telemetry.run)
            tg.start_soon(_heartbeat, connection, keys.heartbeat("gateway", gateway_id))
            logger.info("gateway started gateway_id=%s", gateway_id)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await app.state.client.aclose()  # stops its event readers; the connection is ours
            try:
                await connection.delete(keys.heartbeat("gateway", gateway_id))
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.debug("heartbeat cleanup failed: %s", e)
            if redis is None:
                await connection.aclose()

    app = FastAPI(title="alignq gateway", version="1", lifespan=lifespan)
    app.state.settings = settings

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(HttpMetricsMiddleware, telemetry_of=lambda: getattr(app.state, "telemetry", None))

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
        return JSONResponse(gateway_error.body(), status_code=error.status_code, headers=gateway_error.headers)

    def require_api_key(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not key or not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
            raise GatewayError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    authed = [Depends(require_api_key)]

    @app.post("/v1/chat/completions", dependencies=authed)
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        try:
            prompt = body.prompt()
        except ValueError as e:
            raise GatewayError(400, str(e), code="bad_request", param="messages") from e
        return await _complete(request, body, prompt, chat=True)

    @app.post("/v1/completions", dependencies=authed)
    async def completions(body: CompletionBody, request: Request) -> Response:
        try:
            prompt = body.text_prompt()
        except ValueError as e:
            raise GatewayError(400, str(e), code="bad_request", param="prompt") from e
        return await _complete(request, body, prompt, chat=False)

    @app.get("/v1/models", dependencies=authed)
    async def models() -> JSONResponse:
        # The deployment serves whatever model its workers load; clients that list models first see one.
        return JSONResponse({"object": "list", "data": [{"id": "alignq", "object": "model", "created": 0,
                                                          "owned_by": "alignq"}]})

    @app.post("/v1/align/batch", dependencies=authed)
    async def align_batch(body: BatchBody, request: Request) -> StreamingResponse:
        client: Client = request.app.state.client
        try:
            requests = [_batch_request(index, item, body.defaults) for index, item in enumerate(body.requests)]
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
            rejected = [(i, error_from_client(e)) for i, r in enumerate(requests) if r.request_id in rejected_set]
        except ClientError as e:
            raise error_from_client(e) from e
        timeout_s = min(body.timeout_s or settings.request_timeout_s, settings.request_timeout_s)
        return StreamingResponse(_batch_lines(client, accepted_ids, rejected, requests, timeout_s),
                                 media_type="application/x-ndjson", headers={"X-Accel-Buffering": "no"})

    @app.get("/v1/align/{request_id}", dependencies=authed)
    async def get_result(request_id: str, request: Request, wait_s: float = 0.0) -> Response:
        client: Client = request.app.state.client
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
                if await client.request_state(request_id) == "missing":
                    raise GatewayError(404, f"no request {request_id} (unknown, expired or lost)", code="not_found")
                return JSONResponse({"request_id": request_id, "status": "pending"}, status_code=202)
        except RequestLost as e:
            raise GatewayError(404, str(e), code="not_found") from e
        except ClientError as e:
            raise error_from_client(e) from e
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        connection: aioredis.Redis = request.app.state.redis
        try:
            with anyio.fail_after(2):
                await connection.ping()
                live = {f"{role}s": await count_live(connection, keys, role) for role in ("scheduler", "worker", "gateway")}
                num_pending = await connection.zcard(keys.pending_requests)
        except (TimeoutError, OSError, aioredis.RedisError) as e:
            return JSONResponse({"status": "down", "redis": f"unreachable: {e}"}, status_code=503)
        is_serving = live["schedulers"] > 0 and live["workers"] > 0
        return JSONResponse({"status": "ok" if is_serving else "degraded", "redis": "ok", **live,
                             "pending": num_pending})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        telemetry: Telemetry = request.app.state.telemetry
        try:
            await telemetry.flush()  # this gateway's own latest calls show at once
            body = await render_metrics(request.app.state.redis, keys)
        except (OSError, aioredis.RedisError) as e:
            raise GatewayError(503, f"Redis unreachable: {e}", type="server_error", code="redis_unavailable") from e
        return Response(body, media_type=CONTENT_TYPE)

    async def _complete(request: Request, body: AlignqFields, prompt: Any, *, chat: bool) -> Response:
        client: Client = request.app.state.client
        try:
            align_request = Client.build_request(prompt, **body.request_fields())
            await client.submit_request(align_request)
        except ClientError as e:
            raise error_from_client(e) from e
        if body.stream:
            writer = ChunkWriter(align_request, body, chat=chat)
            return StreamingResponse(_sse(client, writer, settings.request_timeout_s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Alignq-Request-Id": align_request.request_id})
        try:
            result = await client.result(align_request.request_id, timeout_s=settings.request_timeout_s,
                                         raise_on_error=False)
        except ClientError as e:
            raise error_from_client(e) from e
        if result.status == ResultStatus.ERROR:
            raise error_from_result(result)
        return JSONResponse(completion_response(result, body, align_request, chat=chat),
                            headers={"X-Alignq-Request-Id": align_request.request_id})

    return app


def _batch_request(index: int, item: dict[str, Any], defaults: dict[str, Any]) -> AlignRequest:
    fields = {**defaults, **item}
    if "prompt" not in fields:
        raise BadRequest(f"requests[{index}]: prompt is required")
    try:
        return Client.build_request(fields.pop("prompt"), **fields)
    except BadRequest as e:
        raise BadRequest(f"requests[{index}]: {e}") from e


async def _batch_lines(client: Client, accepted_ids: list[str], rejected: list[tuple[int, GatewayError]],
                       requests: list[AlignRequest], timeout_s: float) -> AsyncIterator[str]:
    """NDJSON: ``{"index", "request_id", "result"}`` per answered item, ``{"index", "error"}`` per rejected one."""
    index_of = {request.request_id: i for i, request in enumerate(requests)}
    for index, error in rejected:
        yield json.dumps({"index": index, "request_id": requests[index].request_id, **error.body()}) + "\n"
    async for result in client.results_as_completed(accepted_ids, timeout_s=timeout_s):
        yield json.dumps({"index": index_of[result.request_id], "request_id": result.request_id,
                          "result": result.model_dump(mode="json")}) + "\n"


async def _sse(client: Client, writer: ChunkWriter, timeout_s: float) -> AsyncIterator[str]:
    """Progress as it happens, then the answer as chunks, then [DONE]. Keep-alive comments while idle."""
    request_id = writer.request.request_id
    last_sent = time.monotonic()
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
            result = event.result
            if result is None or result.status == ResultStatus.ERROR:
                error = error_from_result(result) if result else GatewayError(500, "no result", type="server_error")
                yield sse_data(error.body())
            else:
                for line in writer.answer(result):
                    yield line
            break
    except ClientError as e:
        yield sse_data(error_from_client(e).body())
    yield SSE_DONE


async def _heartbeat(connection: aioredis.Redis, key: str) -> None:
    while True:
        try:
            await connection.set(key, b"1", ex=int(3 * HEARTBEAT_S))
        except (OSError, aioredis.RedisError) as e:
            logger.warning("gateway heartbeat failed: %s", e)
        await anyio.sleep(HEARTBEAT_S)


# -- process --------------------------------------------------------------------------------------
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
