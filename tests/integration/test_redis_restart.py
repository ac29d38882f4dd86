"""Redis restarts under real services (``alignq scheduler`` and ``alignq worker`` processes).

- Without persistence the restarted Redis is empty: services reconnect with backoff and keep
  serving new requests; clients waiting on requests Redis forgot get ``RequestLost``, not a hang.
- With AOF (``appendfsync always``) a crash (SIGKILL) loses nothing acknowledged: every accepted
  request is completed after the restart, with exactly one result.

One redis-server on a fixed port (so the services' URL stays valid) and one scheduler + one worker
serve both tests: a worker takes seconds to load on a busy machine.
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Iterator

import anyio
import pytest
from chaos_support import KEYS, Fleet, RedisServer

from middleware.client import Client, RequestLost
from schemas import PAYLOAD_FIELD, Event, EventKind, ResultStatus, decode

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
AOF = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: pathlib.Path) -> Iterator[tuple[RedisServer, Fleet]]:
    """A redis-server (no persistence), a scheduler holding bon prompts in a 1.5 s window, a worker."""
    root = tmp_path_factory.mktemp("redis-restart")
    server = RedisServer(root / "redis")
    server.start(*NO_PERSISTENCE)
    fleet = Fleet(server.url(), root / "logs", tiny_llama_dir, ALIGNQ_WINDOW_MS="1500", ALIGNQ_MAX_NEW_TOKENS="8",
                  ALIGNQ_TOP_P="1.0")
    try:
        fleet.start("scheduler", "s0")
        fleet.start("worker", "w0")
        fleet.wait_ready(["s0", "w0"], timeout_s=120)
        yield server, fleet
        fleet.wait_ready(["s0", "w0"], timeout_s=20)  # heartbeating again after every restart
    finally:
        codes = fleet.stop_all()
        server.stop()
    assert codes == {"s0": 0, "w0": 0}, fleet.log_tail("s0") + fleet.log_tail("w0")


def events_of(server: RedisServer, request_id: str) -> list[Event]:
    client = server.client()
    try:
        return [decode(Event, fields[PAYLOAD_FIELD]) for _, fields in client.xrange(KEYS.events(request_id))]
    finally:
        client.close()


async def wait_queued(server: RedisServer, request_ids: list[str]) -> None:
    """Until the scheduler has taken every request (its QUEUED event): they are in its window, not just queued."""
    with anyio.fail_after(30):
        while not all(any(e.kind == EventKind.QUEUED for e in events_of(server, rid)) for rid in request_ids):
            await anyio.sleep(0.05)


def assert_alive(fleet: Fleet) -> None:
    for slot in ("s0", "w0"):
        assert fleet.services[slot].process.poll() is None, fleet.log_tail(slot)


async def test_restart_without_persistence_reports_lost_requests_and_keeps_serving(deployment) -> None:
    server, fleet = deployment
    scheduler = fleet.services["s0"].process
    async with Client(server.url(), poll_interval_s=0.3, reconnect_timeout_s=30) as client:
        before = await client.align("before the restart", method="uniform", budget=3, timeout_s=60)
        assert before.status == ResultStatus.OK
        held = await client.submit_many([{"prompt": f"held in the window {i}", "budget": 4} for i in range(2)])
        await wait_queued(server, held)  # in the scheduler's memory (a 1.5 s bon window)
        scheduler.send_signal(signal.SIGSTOP)  # so these stay unread in the stream: only Redis knows them
        await anyio.sleep(0.6)  # its XREADGROUP BLOCK (250 ms) times out first: nothing is delivered to it
        unread = await client.submit_many([{"prompt": f"never read {i}", "budget": 4} for i in range(2)])
        outcomes: dict[str, BaseException | ResultStatus] = {}

        async def wait(request_id: str) -> None:
            try:
                outcomes[request_id] = (await client.result(request_id, timeout_s=60, raise_on_error=False)).status
            except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
                outcomes[request_id] = e

        started = time.monotonic()
        try:
            async with anyio.create_task_group() as tg:
                for request_id in held + unread:
                    tg.start_soon(wait, request_id)
                await anyio.sleep(0.2)
                server.stop()  # no persistence: streams, groups, pending set and events are gone
                await anyio.sleep(1.0)  # down long enough for every service to hit connection errors
                server.start(*NO_PERSISTENCE)
                scheduler.send_signal(signal.SIGCONT)
        finally:
            scheduler.send_signal(signal.SIGCONT)
        waited_s = time.monotonic() - started
        assert {rid: type(outcomes[rid]) for rid in unread} == dict.fromkeys(unread, RequestLost)
        # A request a scheduler held in memory is completed on the new server, or dropped at its next
        # lease renewal (then lost); never a hang, never two answers.
        assert all(isinstance(outcomes[rid], RequestLost) or outcomes[rid] == ResultStatus.OK for rid in held)
        assert waited_s < 15
        # the same client, scheduler and worker serve new requests on the empty server
        after = await client.align("after the restart", method="uniform", budget=3, timeout_s=60)
        after_bon = await client.align("a window after the restart", budget=4, timeout_s=60)
    assert after.status == ResultStatus.OK and after_bon.status == ResultStatus.OK
    assert after_bon.samples_used == 4
    assert_alive(fleet)
    for rid in held + unread:
        terminal = [e.kind for e in events_of(server, rid) if e.is_terminal]
        assert terminal == ([] if rid in unread or isinstance(outcomes[rid], RequestLost) else [EventKind.DONE])
    assert "redis error" in fleet.log_text("scheduler") and "redis error" in fleet.log_text("worker")


def enable_aof(server: RedisServer) -> None:
    """Switch the running server to AOF with fsync on every write, and wait for its first rewrite."""
    client = server.client()
    try:
        client.config_set("appendfsync", "always")
        client.config_set("appendonly", "yes")
        give_up_at = time.monotonic() + 20
        while True:
            info = client.info("persistence")
            if info["aof_enabled"] and not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            assert time.monotonic() < give_up_at, info
            time.sleep(0.05)
    finally:
        client.close()


async def test_crash_with_aof_loses_no_accepted_request(deployment) -> None:
    server, fleet = deployment
    enable_aof(server)
    async with Client(server.url(), poll_interval_s=0.3, reconnect_timeout_s=30) as client:
        accepted = await client.submit_many([{"prompt": f"accepted before the crash {i}", "budget": 4}
                                             for i in range(3)])
        await wait_queued(server, accepted)  # held in the scheduler's window when Redis dies
        results = {}

        async def wait(request_id: str) -> None:
            results[request_id] = await client.result(request_id, timeout_s=60)

        async with anyio.create_task_group() as tg:
            for request_id in accepted:
                tg.start_soon(wait, request_id)
            await anyio.sleep(0.2)
            server.stop(signal.SIGKILL)  # a crash: only what the AOF holds survives
            await anyio.sleep(1.0)
            server.start(*AOF)
        late = await client.align("after the crash", method="uniform", budget=3, timeout_s=60)
    assert [results[rid].status for rid in accepted] == [ResultStatus.OK] * 3
    # the window spent its budget once: neither twice, nor short (a request re-read after the crash
    # finishes on the samples its window granted it, middleware.scheduler.plans.Grant)
    assert sum(results[rid].samples_used for rid in accepted) == 12
    assert late.status == ResultStatus.OK
    for rid in accepted:
        assert [e.kind for e in events_of(server, rid)].count(EventKind.DONE) == 1
    assert_alive(fleet)
