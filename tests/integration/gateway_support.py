"""Test support for the gateway: a real uvicorn server in a thread, and a scripted stand-in scheduler.

The stand-in speaks the scheduler's Redis protocol (CONTRACTS.md) so gateway tests control exactly
which events arrive when; the end-to-end test uses the real scheduler and worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio
import redis.asyncio as aioredis
from chaos_support import free_port

from middleware.gateway.app import create_app
from middleware.settings import GatewaySettings
from schemas import (
    PAYLOAD_FIELD,
    AlignRequest,
    AlignResult,
    Event,
    EventKind,
    Keys,
    Method,
    ResultStatus,
    Sample,
    decode,
    encode,
)

KEYS = Keys("alignq")
__all__ = ["KEYS", "StandInScheduler", "against_stand_in", "default_answer", "free_port", "publish_answer",
           "publish_event", "running_gateway", "scored_result", "with_scheduler"]


@contextmanager
def running_gateway(redis_url: str, **overrides: object) -> Iterator[str]:
    """Serve the gateway app with uvicorn on a free port in a thread; yields its base URL."""
    import uvicorn

    settings = GatewaySettings(redis_url=redis_url, host="127.0.0.1", port=free_port(), **overrides)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                            lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def scored_result(request: AlignRequest, texts_rewards: list[tuple[str, float]]) -> AlignResult:
    samples = sorted((Sample(index=i, text=t, reward=r, num_tokens=len(t.split())) for i, (t, r) in enumerate(texts_rewards)),
                     key=lambda s: -s.reward)
    best = samples[0]
    return AlignResult(request_id=request.request_id, status=ResultStatus.OK, method=request.method, response=best.text,
                       reward=best.reward, best_index=best.index, samples_used=len(samples),
                       num_tokens=sum(s.num_tokens for s in samples), samples=samples,
                       explore_samples=2, exploit_samples=len(samples) - 2, total_s=0.1)


def default_answer(request: AlignRequest) -> AlignResult:
    """Three samples, one duplicated text, rewards that order them."""
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[-1].content
    return scored_result(request, [(f"fine answer to {prompt}", 0.5), ("the best answer here", 0.9),
                                   ("the best answer here", 0.8), ("a weak one", 0.1)])


class StandInScheduler:
    """Reads ``keys.requests`` and answers each request like the scheduler would.

    ``answer(request)`` builds the result; ``before_answer`` (optional) is awaited between the
    progress events and the answer, so a test can hold the answer back.
    """

    def __init__(self, redis_url: str, answer: Callable[[AlignRequest], AlignResult] = default_answer,
                 before_answer: Callable[[AlignRequest], Awaitable[None]] | None = None,
                 method_events: bool = True) -> None:
        self.redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=32))
        self.answer = answer
        self.before_answer = before_answer
        self.method_events = method_events
        self.requests: list[AlignRequest] = []

    async def run(self) -> None:
        """Answer requests until cancelled, each in its own task (a held answer blocks no other)."""
        last_id = b"0-0"
        async with anyio.create_task_group() as tg:
            while True:
                reply = await self.redis.xread({KEYS.requests: last_id}, block=200, count=100)
                for entry_id, fields in reply[0][1] if reply else []:
                    last_id = entry_id
                    request = decode(AlignRequest, fields[PAYLOAD_FIELD])
                    self.requests.append(request)
                    tg.start_soon(self.handle, request)

    async def handle(self, request: AlignRequest) -> None:
        await self.publish(request.request_id, EventKind.QUEUED)
        if request.method == Method.BON and self.method_events:
            await self.publish(request.request_id, EventKind.EXPLORED, reward_mean=0.5, reward_std=0.2, num_samples=2)
            await self.publish(request.request_id, EventKind.ALLOCATED, num_samples=2)
        if self.before_answer is not None:
            await self.before_answer(request)
        await publish_answer(self.redis, self.answer(request))

    async def publish(self, request_id: str, kind: EventKind, **data: float) -> None:
        await publish_event(self.redis, request_id, kind, **data)

    async def aclose(self) -> None:
        await self.redis.aclose()


async def publish_event(redis: aioredis.Redis, request_id: str, kind: EventKind, **data: float) -> None:
    """A non-terminal event, as the scheduler writes it."""
    await redis.xadd(KEYS.events(request_id), {PAYLOAD_FIELD: encode(Event(request_id=request_id, kind=kind, data=data))})


async def publish_answer(redis: aioredis.Redis, result: AlignResult) -> None:
    """What the scheduler's answer script does: claim, result, terminal event, leave pending."""
    rid = result.request_id
    kind = EventKind.ERROR if result.status == ResultStatus.ERROR else EventKind.DONE
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(KEYS.request_claim(rid), b"1", nx=True)
        pipe.set(KEYS.result(rid), encode(result), ex=60)
        pipe.xadd(KEYS.events(rid), {PAYLOAD_FIELD: encode(Event(request_id=rid, kind=kind, result=result))})
        pipe.zrem(KEYS.pending_requests, rid)
        await pipe.execute()


async def with_scheduler(scheduler: StandInScheduler, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` (within 30 s) while ``scheduler`` answers; closes the scheduler after."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            try:
                with anyio.fail_after(30):
                    await body()
            finally:
                tg.cancel_scope.cancel()
    finally:
        await scheduler.aclose()


async def against_stand_in(redis_url: str, body: Callable[[str], Awaitable[None]], *,
                           scheduler: StandInScheduler | None = None, **gateway: object) -> StandInScheduler:
    """``body(base_url)`` against a gateway (``gateway``: settings overrides) and a stand-in scheduler.

    Returns the scheduler, whose ``requests`` list what the gateway queued.
    """
    scheduler = scheduler or StandInScheduler(redis_url)
    with running_gateway(redis_url, **gateway) as base_url:
        await with_scheduler(scheduler, lambda: body(base_url))
    return scheduler
