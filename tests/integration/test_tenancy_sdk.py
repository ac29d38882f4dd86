"""Tenancy in the SDK and the CLI, against a real Redis (no scheduler needed: nothing here is answered).

Another tenant's id is unknown to every reading and cancelling call; reusing it is a new request in
the caller's scope; a conflicting resubmission is ``Conflict`` in the SDK and exit 1 with one line in
the CLI; ids that would name another scope are refused.
"""

from __future__ import annotations

import json
import pathlib

import anyio
import pytest
from chaos_support import alignq_executable

from middleware.client import BadRequest, CancelOutcome, Client, Conflict, RequestLost, RequestState

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_sdk_tenants_cannot_reach_each_others_requests(redis_url: str) -> None:
    async with Client(redis_url, tenant="acme", poll_interval_s=0.05) as acme:
        globex = acme.with_tenant("globex")
        shared = acme.with_tenant(None)
        assert await acme.submit("acme's secret", request_id="r1", budget=2) == "r1"
        assert await acme.request_state("r1") == RequestState.ALIVE
        for other in (globex, shared):
            assert await other.get_result("r1") is None
            assert await other.request_state("r1") == RequestState.MISSING
            with pytest.raises(RequestLost):
                async for _ in other.events("r1", timeout_s=5):
                    pass
            assert await other.cancel("r1") == CancelOutcome.UNKNOWN
        with pytest.raises(BadRequest):  # the wire id spelled out names nothing either
            await shared.get_result("acme/r1")
        assert await acme.request_state("r1") == RequestState.ALIVE  # nobody else could cancel it

        assert await globex.submit("globex's own prompt", request_id="r1", budget=2) == "r1"  # its own scope
        assert await acme.submit("acme's secret", request_id="r1", budget=2) == "r1"  # an idempotent retry
        with pytest.raises(Conflict):
            await acme.submit("another prompt", request_id="r1", budget=2)
        with pytest.raises(Conflict):
            await acme.submit("acme's secret", request_id="r1", budget=3)  # parameters count too
        assert await acme.cancel("r1") == CancelOutcome.CANCELLED
        assert (await acme.result("r1", raise_on_error=False)).status.value == "cancelled"
        assert await acme.cancel("r1") == CancelOutcome.ALREADY_ANSWERED
        assert await globex.request_state("r1") == RequestState.ALIVE  # globex's r1 is untouched


async def test_cli_conflict_is_one_line_and_exit_1(redis_url: str, tmp_path: pathlib.Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(json.dumps({"prompt": "one", "request_id": "dup"}) + "\n")
    second.write_text(json.dumps({"prompt": "two", "request_id": "dup"}) + "\n")
    command = [*alignq_executable(), "submit", "--no-wait", "--redis-url", redis_url, "-f"]
    accepted = await anyio.run_process([*command, str(first)], check=False)
    assert accepted.returncode == 0 and accepted.stdout.decode().split() == ["dup"]
    conflict = await anyio.run_process([*command, str(second)], check=False)
    assert conflict.returncode == 1
    lines = conflict.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "already used" in lines[0], lines


async def test_cli_submits_and_cancels_in_a_tenant_scope(redis_url: str, tmp_path: pathlib.Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "acme's prompt", "request_id": "job-7"}) + "\n")
    base = ["--redis-url", redis_url]
    submitted = await anyio.run_process([*alignq_executable(), "submit", "--no-wait", "--tenant", "acme", *base,
                                         "-f", str(prompts)], check=False)
    assert submitted.returncode == 0 and submitted.stdout.decode().split() == ["job-7"]  # the caller's id
    async with Client(redis_url, tenant="acme") as acme:
        assert await acme.request_state("job-7") == RequestState.ALIVE
        assert await acme.with_tenant(None).request_state("job-7") == RequestState.MISSING
    unscoped = await anyio.run_process([*alignq_executable(), "cancel", "job-7", *base], check=False)
    assert unscoped.returncode == 1  # unknown in the shared tenant
    cancelled = await anyio.run_process([*alignq_executable(), "cancel", "job-7", "--tenant", "acme", *base],
                                        check=False)
    assert cancelled.returncode == 0
    assert json.loads(cancelled.stdout) == {"request_id": "job-7", "cancelled": True, "status": "cancelled"}



async def test_cli_submit_retries_a_tenants_rejected_requests_after_backpressure(redis_url: str) -> None:
    """`alignq submit --tenant` waits out a full queue and then submits every request, none dropped:
    Overloaded names rejected requests by the caller's id, while a tenant's requests carry wire ids."""
    from gateway_support import KEYS, publish_answer

    from middleware.cli.batch import _submit_all
    from middleware.client.building import build_request
    from schemas import AlignResult, ResultStatus

    requests = [build_request(f"prompt {i}", tenant="acme", request_id=f"r{i}", budget=2) for i in range(3)]
    async with Client(redis_url, tenant="acme", max_pending=2) as client:

        async def answer_one_when_full() -> None:
            while await client.redis.zcard(KEYS.pending_requests) < 2:
                await anyio.sleep(0.02)
            first = (await client.redis.zrange(KEYS.pending_requests, 0, 0))[0].decode()
            await publish_answer(client.redis, AlignResult(request_id=first, status=ResultStatus.OK, samples=[]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_one_when_full)
            with anyio.fail_after(20):
                submitted = await _submit_all(client, requests)
        assert sorted(client.caller_id(i) for i in submitted) == ["r0", "r1", "r2"]
        assert await client.redis.xlen(KEYS.requests) == 3
