"""The async client against a real Redis: submit protocol, backpressure, waiting for answers."""

from __future__ import annotations

import time

import anyio
import pytest
import redis.asyncio as aioredis
from gateway_support import KEYS, publish_answer, publish_event

from middleware.client import (
    BadRequest,
    Client,
    ConnectionLost,
    Overloaded,
    RequestFailed,
    RequestLost,
    ResultTimeout,
)
from middleware.client.admission import estimate_retry_after_s
from middleware.errors import ClientError
from schemas import (
    PAYLOAD_FIELD,
    AlignRequest,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Event,
    EventKind,
    Method,
    ResultStatus,
    Sample,
    decode,
)

pytestmark = pytest.mark.anyio


def ok_result(request_id: str, reward: float = 0.9) -> AlignResult:
    samples = [Sample(index=1, text="best", reward=reward, num_tokens=2), Sample(index=0, text="meh", reward=0.1, num_tokens=3)]
    return AlignResult(request_id=request_id, status=ResultStatus.OK, method=Method.BON, response="best",
                       reward=reward, best_index=1, samples_used=2, num_tokens=5, samples=samples)


async def test_submit_writes_decodable_request_and_pending_entry(redis_url: str) -> None:
    async with Client(redis_url, max_pending=10) as client:
        request_id = await client.submit("What is 2+2?", budget=8, method="uniform", metadata={"answer": "4"})
        entries = await client.redis.xrange(KEYS.requests)
        assert len(entries) == 1
        request = decode(AlignRequest, entries[0][1][PAYLOAD_FIELD])
        assert (request.request_id, request.prompt, request.budget, request.method) == (request_id, "What is 2+2?", 8, Method.UNIFORM)
        assert request.metadata == {"answer": "4"}
        assert await client.redis.zscore(KEYS.pending_requests, request_id) == pytest.approx(request.submitted_at_ms, abs=5000)


async def test_resubmitting_the_same_request_id_queues_it_once(redis_url: str) -> None:
    async with Client(redis_url) as client:
        request = AlignRequest(prompt="hi", request_id="same-id")
        assert await client.submit_request(request) == "same-id"
        assert await client.submit_request(request) == "same-id"  # a retry after a dropped reply
        assert await client.redis.xlen(KEYS.requests) == 1
        await publish_answer(client.redis, ok_result("same-id"))
        await client.submit_request(request)  # answered already: still not queued again
        assert await client.redis.xlen(KEYS.requests) == 1


async def test_submit_many_is_pipelined(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.asyncio.connection import AbstractConnection

    num_sends = 0
    send_packed_command = AbstractConnection.send_packed_command

    async def counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
        nonlocal num_sends
        packed = command if isinstance(command, bytes | str) else b"".join(command)
        num_sends += b"EVALSHA" in (packed.encode() if isinstance(packed, str) else packed)  # not a new connection's setup
        return await send_packed_command(self, command, check_health)

    async with Client(redis_url, submit_chunk_size=500) as client:
        await client.submit("warm up the connection")
        await client.redis.flushdb()
        items = [f"prompt {i}" for i in range(998)] + [{"prompt": "as dict", "budget": 4}, AlignRequest(prompt="as model")]
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting_send)
        started = time.perf_counter()
        request_ids = await client.submit_many(items)
        elapsed_s = time.perf_counter() - started
        monkeypatch.undo()
        assert num_sends <= 3  # one pipelined write per chunk of 500 (+ one resend if the script was not loaded)
        assert len(request_ids) == len(set(request_ids)) == 1000
        assert await client.redis.xlen(KEYS.requests) == 1000
        assert await client.redis.zcard(KEYS.pending_requests) == 1000
        entries = await client.redis.xrange(KEYS.requests)
        # two chunks in flight at once on one connection: admitted in input order
        assert [decode(AlignRequest, fields[PAYLOAD_FIELD]).request_id for _, fields in entries] == request_ids
        assert decode(AlignRequest, entries[998][1][PAYLOAD_FIELD]).budget == 4
        assert elapsed_s < 5


async def test_overloaded_when_pending_is_full(redis_url: str) -> None:
    async with Client(redis_url, max_pending=3) as client:
        for i in range(3):
            await client.submit(f"p{i}")
        with pytest.raises(Overloaded) as excinfo:
            await client.submit("one too many")
        assert excinfo.value.retry_after_s >= 0.25
        assert excinfo.value.num_pending == 3
        assert isinstance(excinfo.value, ClientError)
        assert await client.redis.xlen(KEYS.requests) == 3  # nothing written
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many(["a", "b"])
        assert excinfo.value.submitted_ids == [] and len(excinfo.value.rejected_ids) == 2
        # the scheduler answers one: room for exactly one more
        first_id = (await client.redis.zrange(KEYS.pending_requests, 0, 0))[0].decode()
        await publish_answer(client.redis, ok_result(first_id))
        with pytest.raises(Overloaded) as excinfo:
            await client.submit_many([AlignRequest(prompt="x", request_id="x"), AlignRequest(prompt="y", request_id="y")])
        assert excinfo.value.submitted_ids == ["x"] and excinfo.value.rejected_ids == ["y"]
        assert await client.redis.xlen(KEYS.requests) == 4


def test_retry_after_estimate() -> None:
    assert estimate_retry_after_s(100, 100, 0.0) == 0.25  # a fresh flood still backs off
    assert estimate_retry_after_s(100, 100, 200.0) == pytest.approx(2.0)  # one slot every 2 s
    assert estimate_retry_after_s(110, 100, 110.0) == pytest.approx(11.0)
    assert estimate_retry_after_s(10, 10, 1e6) == 60.0


@pytest.mark.parametrize("fields", [{"prompt": ""}, {"prompt": "   "}, {"prompt": "hi", "budget": 0},
                                    {"prompt": "hi", "method": "beam"}, {"prompt": "hi", "colour": "blue"}])
async def test_bad_request_touches_nothing(redis_url: str, fields: dict) -> None:
    async with Client(redis_url) as client:
        prompt = fields.pop("prompt")
        with pytest.raises(BadRequest):
            await client.submit(prompt, **fields)
        with pytest.raises(BadRequest):
            await client.submit_many(["fine", {"prompt": prompt, **fields}])
        assert await client.redis.exists(KEYS.requests, KEYS.pending_requests) == 0


async def test_result_and_events_from_a_publisher(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.2) as client:
        request_id = await client.submit("hello", budget=2)

        async def publisher() -> None:
            await anyio.sleep(0.3)
            await publish_event(client.redis, request_id, EventKind.QUEUED)
            await publish_event(client.redis, request_id, EventKind.EXPLORED, reward_mean=0.5, reward_std=0.4, num_samples=2)
            await anyio.sleep(0.3)
            await publish_event(client.redis, request_id, EventKind.ALLOCATED, num_samples=0)
            await publish_answer(client.redis, ok_result(request_id))

        seen: list[Event] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            with anyio.fail_after(10):
                result = await client.result(request_id, timeout_s=5)
                async for event in client.events(request_id, timeout_s=5):
                    seen.append(event)
        assert result.response == "best" and result.reward == 0.9
        assert [e.kind for e in seen] == [EventKind.QUEUED, EventKind.EXPLORED, EventKind.ALLOCATED, EventKind.DONE]
        assert seen[1].data["reward_mean"] == 0.5
        assert seen[-1].result == result
        assert (await client.result(request_id)).request_id == request_id  # stored result, no wait


async def test_error_result_raises_request_failed(redis_url: str) -> None:
    async with Client(redis_url) as client:
        request_id = await client.submit("hello")
        failed = AlignResult(request_id=request_id, status=ResultStatus.ERROR,
                             error=ErrorInfo(code=ErrorCode.BAD_REQUEST, message="prompt too long"))
        await publish_answer(client.redis, failed)
        with pytest.raises(RequestFailed, match="prompt too long") as excinfo:
            await client.result(request_id, timeout_s=2)
        assert excinfo.value.result == failed
        assert (await client.result(request_id, raise_on_error=False)).status == ResultStatus.ERROR


async def test_result_timeout(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.1) as client:
        request_id = await client.submit("nobody answers")
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            await client.result(request_id, timeout_s=0.5)
        assert 0.45 <= time.monotonic() - started < 4


async def test_request_lost_after_flushdb(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.1) as client:
        request_id = await client.submit("about to be forgotten")
        await publish_event(client.redis, request_id, EventKind.QUEUED)

        async def forget() -> None:
            await anyio.sleep(0.3)
            await client.redis.flushdb()

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(forget)
            with pytest.raises(RequestLost):
                await client.result(request_id, timeout_s=10)
        assert time.monotonic() - started < 6
        with pytest.raises(RequestLost):
            await client.result("never-submitted", timeout_s=10)


async def test_stream_and_align(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.1) as client:

        async def answer_next() -> None:
            # a minimal scheduler: answer each queued request as it arrives
            last_id = b"0-0"
            for _ in range(2):
                reply = await client.redis.xread({KEYS.requests: last_id}, block=5000)
                last_id, fields = reply[0][1][0]
                request = decode(AlignRequest, fields[PAYLOAD_FIELD])
                await publish_event(client.redis, request.request_id, EventKind.QUEUED)
                await publish_answer(client.redis, ok_result(request.request_id, reward=request.budget))

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_next)
            with anyio.fail_after(10):
                kinds = [event.kind async for event in client.stream("stream me", budget=3, timeout_s=5)]
                result = await client.align("align me", budget=5, timeout_s=5)
        assert kinds == [EventKind.QUEUED, EventKind.DONE]
        assert result.reward == 5


async def test_accepts_an_existing_redis_client(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    async with Client(redis) as client:
        await client.submit("hi")
    assert await redis.xlen(KEYS.requests) == 1  # still open: the caller owns it
    await redis.aclose()


async def test_results_as_completed_in_completion_order(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.1) as client:
        first, second, lost, silent = await client.submit_many(["one", "two", "three", "four"])

        async def answer() -> None:
            await anyio.sleep(0.2)
            await publish_answer(client.redis, ok_result(second))
            await anyio.sleep(0.3)
            await publish_answer(client.redis, ok_result(first))
            await client.redis.zrem(KEYS.pending_requests, lost)  # as if Redis lost it

        seen: list[AlignResult] = []
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer)
            with anyio.fail_after(10):
                async for result in client.results_as_completed([first, second, lost, silent], timeout_s=1.5):
                    seen.append(result)
        assert [r.request_id for r in seen] == [second, first, lost, silent]
        assert [r.status for r in seen[:2]] == [ResultStatus.OK, ResultStatus.OK]
        assert seen[2].error is not None and seen[2].error.code == ErrorCode.LOST
        assert seen[3].error is not None and seen[3].error.code == ErrorCode.DEADLINE_EXCEEDED
        assert 1.4 < time.monotonic() - started < 6


async def test_events_or_idle_yields_none_between_events(redis_url: str) -> None:
    async with Client(redis_url, poll_interval_s=0.1) as client:
        request_id = await client.submit("slow")

        async def publisher() -> None:
            await anyio.sleep(0.35)
            await publish_answer(client.redis, ok_result(request_id))

        items: list[Event | None] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            async for item in client.events_or_idle(request_id, timeout_s=5):
                items.append(item)
        assert items[-1] is not None and items[-1].kind == EventKind.DONE
        assert items.count(None) >= 2
        assert await client.request_state(request_id) == "answered"
        assert await client.request_state("nope") == "missing"


async def test_many_concurrent_waits_share_few_connections(redis_url: str) -> None:
    async with Client(redis_url, max_connections=4, poll_interval_s=1.0) as client:
        request_ids = await client.submit_many([f"wait {i}" for i in range(300)])
        results: dict[str, AlignResult] = {}

        async def wait(request_id: str) -> None:
            results[request_id] = await client.result(request_id, timeout_s=20)

        async def answer_all() -> None:
            await anyio.sleep(0.3)
            for request_id in request_ids:
                await publish_answer(client.redis, ok_result(request_id))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for request_id in request_ids:
                tg.start_soon(wait, request_id)
            tg.start_soon(answer_all)
        # 300 blocked XREADs on 4 connections would take minutes; the router reads them together
        assert time.monotonic() - started < 8
        assert set(results) == set(request_ids)
        assert client._router.num_subscriptions == 0


async def test_waiters_get_request_lost_after_a_redis_restart_without_persistence(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path)]

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                return process
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    server = start()
    try:
        async with Client(f"redis://127.0.0.1:{port}/0", poll_interval_s=0.2, reconnect_timeout_s=10) as client:
            request_ids = await client.submit_many(["a", "b", "c"])
            outcomes: list[BaseException] = []

            async def wait(request_id: str) -> None:
                try:
                    await client.result(request_id, timeout_s=20)
                except ClientError as e:
                    outcomes.append(e)

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for request_id in request_ids:
                    tg.start_soon(wait, request_id)
                await anyio.sleep(0.3)
                server.terminate()
                server.wait()
                await anyio.sleep(0.5)  # down for a while: waits retry, they do not fail yet
                server = start()
            assert [type(e) for e in outcomes] == [RequestLost] * 3
            assert time.monotonic() - started < 10
            # Redis is back and empty: submitting works again
            assert await client.submit("again")
            # Redis gone for good: a typed error after reconnect_timeout_s, not a hang
            server.terminate()
            server.wait()
            client.reconnect_timeout_s = 1.0
            started = time.monotonic()
            with pytest.raises(ConnectionLost):
                await client.submit("nobody listens")
            with pytest.raises(ConnectionLost):
                await client.result("anything", timeout_s=30)
            assert time.monotonic() - started < 8
    finally:
        server.terminate()
        server.wait()


async def test_a_flood_is_bounded_by_max_pending(redis_url: str) -> None:
    async with Client(redis_url, max_pending=500) as client:
        accepted = await client.submit_many([f"flood {i}" for i in range(500)])
        memory_full = await client.redis.memory_usage(KEYS.requests) + await client.redis.memory_usage(KEYS.pending_requests)
        num_rejected = 0
        started = time.perf_counter()
        for wave in range(20):  # 10,000 more, none fits
            try:
                await client.submit_many([f"wave {wave} item {i}" for i in range(500)])
            except Overloaded as e:
                assert e.submitted_ids == [] and e.retry_after_s >= 0.25
                num_rejected += 500
        rejected_per_s = num_rejected / (time.perf_counter() - started)
        memory_after = await client.redis.memory_usage(KEYS.requests) + await client.redis.memory_usage(KEYS.pending_requests)
        assert len(accepted) == 500 and num_rejected == 10_000
        assert await client.redis.xlen(KEYS.requests) == 500
        assert await client.redis.zcard(KEYS.pending_requests) == 500
        assert memory_after == memory_full  # flat: a rejected submit writes nothing
        assert rejected_per_s > 1000  # fails fast


async def test_router_wakes_a_blocked_read_for_a_new_waiter(redis_url: str) -> None:
    from middleware.client.event_router import EventRouter

    redis = aioredis.Redis.from_url(redis_url)
    router = EventRouter(redis, block_ms=3000)
    try:
        first = router.subscribe("test:first")
        await anyio.sleep(0.2)  # the shard is now blocked on test:first for up to 3 s
        second = router.subscribe("test:second")
        await anyio.sleep(0.05)
        started = time.monotonic()
        await redis.xadd("test:second", {b"m": b"x"})
        with anyio.fail_after(5):
            _entry_id, fields = await second.receive.receive()
        assert fields == {b"m": b"x"}
        assert time.monotonic() - started < 1.0  # woken by CLIENT UNBLOCK, not after block_ms
        router.unsubscribe(first)
        router.unsubscribe(second)
    finally:
        await router.aclose()
        await redis.aclose()
