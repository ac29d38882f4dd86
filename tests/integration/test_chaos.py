"""Chaos (issue 6): Redis, 2 schedulers and 3 workers as real processes; kill -9 and restart one every
few seconds while 60 prompts (bon, uniform, aisp) flow; afterwards every prompt has exactly one result.

Schedulers restart either under their old id (``s0``: reads its own pending entries first) or a new
one (``s1``: another scheduler reclaims); workers likewise (``w0`` keeps its id). Victims are drawn
from services that are up and heartbeating, and only while another of the same role is: the
deployment is degraded, never empty. A one-line summary is printed (``pytest -s``) and written as
JSON to ``$ALIGNQ_CHAOS_SUMMARY`` (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import time
from collections import Counter

import anyio
import pytest
import redis
from chaos_support import KEYS, Fleet

from middleware.client import Client
from schemas import (
    PAYLOAD_FIELD,
    SCHEDULER_GROUP,
    AispParams,
    AlignRequest,
    AlignResult,
    DeadLetter,
    Event,
    Keys,
    Method,
    ResultStatus,
    decode,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NUM_PROMPTS = 60
WAVE_SIZE = 6  # prompts submitted every KILL_INTERVAL_S, so kills land while work is in flight
MIN_KILLS = 10
MIN_WORKER_KILLS = 2  # a worker takes ~10-40 s to load its models on a busy 2-core box: more would be slow
KILL_INTERVAL_S = 2.5
RESULTS_TIMEOUT_S = 60.0


def chaos_request(i: int) -> AlignRequest:
    """A third each of bon, uniform and aisp, budgets 2..12; every tenth with a (generous) deadline.

    Built at submission: ``submitted_at_ms`` starts the deadline clock.
    """
    method = (Method.BON, Method.UNIFORM, Method.AISP)[i % 3]
    budget = {Method.BON: 4 + 2 * (i % 5), Method.UNIFORM: 2 + 2 * (i % 4), Method.AISP: 8}[method]
    return AlignRequest(request_id=f"chaos-{i:02d}", prompt=f"Question {i}: tell me something about the number {i}.",
                        method=method, budget=budget, max_new_tokens=8,
                        aisp=AispParams(num_rollouts=4) if method == Method.AISP else None,
                        deadline_ms=120_000 if i % 10 == 7 else None)


def pick_victim(fleet: Fleet, rng: random.Random, last_role: str | None) -> str | None:
    """A heartbeating service whose role keeps another member; alternate roles when both qualify.

    A worker is killed only while another is serving (workers restart slowly); a scheduler while the
    other one is at least running (it restarts in seconds, and requests wait safely in Redis).
    """
    candidates: dict[str, list[str]] = {}
    if len(workers := fleet.ready("worker")) >= 2:
        candidates["worker"] = workers
    schedulers = [slot for slot, s in fleet.services.items() if s.role == "scheduler" and s.process.poll() is None]
    if len(schedulers) >= 2:
        candidates["scheduler"] = [slot for slot in schedulers if fleet.is_ready(slot)]
    candidates = {role: slots for role, slots in candidates.items() if slots}
    if not candidates:
        return None
    roles = [role for role in candidates if role != last_role] or list(candidates)
    return rng.choice(candidates[rng.choice(roles)])


def check_result(client: redis.Redis, request: AlignRequest, answered_logs: Counter[str], *,
                 keys: Keys = KEYS) -> list[str]:
    """Every way the exactly-once and no-duplicate-sample promises could be broken, for one request."""
    rid = request.request_id
    problems = []
    data = client.get(keys.result(rid))
    if data is None:
        return [f"{rid}: no result key"]
    result = decode(AlignResult, data)
    events = [decode(Event, fields[PAYLOAD_FIELD]) for _, fields in client.xrange(keys.events(rid))]
    terminal = [event for event in events if event.is_terminal]
    if len(terminal) != 1:
        problems.append(f"{rid}: {len(terminal)} terminal events")
    elif terminal[0].result != result:
        problems.append(f"{rid}: terminal event and stored result differ")
    if answered_logs[rid] > 1:
        problems.append(f"{rid}: answered {answered_logs[rid]} times in scheduler logs")
    allowed = {ResultStatus.OK, ResultStatus.PARTIAL} if request.deadline_ms else {ResultStatus.OK}
    if result.status not in allowed:
        problems.append(f"{rid}: status {result.status.value} error={result.error}")
    indices = [sample.index for sample in result.samples]
    if len(indices) != len(set(indices)):
        problems.append(f"{rid}: a sample index listed twice: {sorted(indices)}")
    if result.samples_used != len(set(indices)):
        problems.append(f"{rid}: samples_used {result.samples_used} != {len(set(indices))} distinct samples")
    if request.method == Method.UNIFORM and result.samples_used != request.budget:
        problems.append(f"{rid}: uniform used {result.samples_used} of budget {request.budget}")
    if request.method == Method.AISP and not 0 < result.samples_used <= (request.budget or 0):
        problems.append(f"{rid}: aisp used {result.samples_used} of budget {request.budget}")
    if result.status != ResultStatus.ERROR and result.best_index not in indices:
        problems.append(f"{rid}: best_index {result.best_index} not among its samples")
    return problems


async def test_kill_9_chaos_every_prompt_answered_exactly_once(redis_url: str, tiny_llama_dir: pathlib.Path,
                                                               tmp_path: pathlib.Path) -> None:
    requests: list[AlignRequest] = []
    # top_p 1: a random tiny model's flat logits would make nucleus sampling sort the whole vocabulary
    fleet = Fleet(redis_url, tmp_path / "logs", tiny_llama_dir, ALIGNQ_WINDOW_MS="200", ALIGNQ_MAX_WINDOW="8",
                  ALIGNQ_MAX_NEW_TOKENS="8", ALIGNQ_TOP_P="1.0", ALIGNQ_MAX_DELIVERIES="10")
    rng = random.Random(6)
    kills: list[tuple[float, str]] = []
    results: dict[str, AlignResult] = {}
    started = time.monotonic()
    try:
        for slot in ("s0", "s1"):
            fleet.start("scheduler", slot, keep_id=slot == "s0")
        for slot in ("w0", "w1", "w2"):
            fleet.start("worker", slot, keep_id=slot == "w0")
        await anyio.to_thread.run_sync(fleet.wait_ready, ["s0", "s1"], 60.0)
        with anyio.fail_after(90):  # chaos starts with the first worker up; the others join while it runs
            while not fleet.ready("worker"):
                await anyio.sleep(0.1)
        chaos_started = time.monotonic()
        submitted_all = anyio.Event()

        async def submit_waves(client: Client) -> None:
            for start in range(0, NUM_PROMPTS, WAVE_SIZE):
                wave = [chaos_request(i) for i in range(start, min(NUM_PROMPTS, start + WAVE_SIZE))]
                requests.extend(wave)
                await client.submit_many(wave)
                await anyio.sleep(KILL_INTERVAL_S)
            submitted_all.set()

        async def kill_loop() -> None:
            last_role = None
            await anyio.sleep(KILL_INTERVAL_S / 2)
            def num_worker_kills() -> int:
                return sum(1 for _, slot in kills if slot.startswith("w"))

            while len(kills) < MIN_KILLS or num_worker_kills() < MIN_WORKER_KILLS or not submitted_all.is_set():
                slot = await anyio.to_thread.run_sync(pick_victim, fleet, rng, last_role)
                if slot is not None:
                    service = fleet.services[slot]
                    await anyio.to_thread.run_sync(fleet.kill, slot)
                    # s0/w0 come back as themselves; the others as new instances (their work is reclaimed)
                    fleet.start(service.role, slot, keep_id=slot in ("s0", "w0"))
                    kills.append((time.monotonic() - chaos_started, slot))
                    last_role = service.role
                await anyio.sleep(KILL_INTERVAL_S)

        async with Client(redis_url, poll_interval_s=0.5) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit_waves, client)
                tg.start_soon(kill_loop)
            chaos_ended = time.monotonic()
            request_ids = [request.request_id for request in requests]
            async for result in client.results_as_completed(request_ids, timeout_s=RESULTS_TIMEOUT_S):
                results[result.request_id] = result
        answered_at = time.monotonic()
        sync = redis.Redis.from_url(redis_url)
        with anyio.move_on_after(10):  # the last answers' acks: nothing left un-acked or pending
            while sync.xpending(KEYS.requests, SCHEDULER_GROUP)["pending"] or sync.zcard(KEYS.pending_requests):
                await anyio.sleep(0.1)
        num_unacked = sync.xpending(KEYS.requests, SCHEDULER_GROUP)["pending"]
        num_pending = sync.zcard(KEYS.pending_requests)
    finally:
        exit_codes = fleet.stop_all()

    answered_logs = fleet.answered_counts()
    problems = [problem for request in requests for problem in check_result(sync, request, answered_logs)]
    letters = [decode(DeadLetter, fields[PAYLOAD_FIELD]) for _, fields in sync.xrange(KEYS.dead_letters)]
    statuses = Counter(result.status.value for result in results.values())
    scheduler_log, worker_log = fleet.log_text("scheduler"), fleet.log_text("worker")
    summary = {
        "prompts": NUM_PROMPTS, "kills": len(kills), "kills_by_role": dict(Counter(slot[0] for _, slot in kills)),
        "wall_s": round(time.monotonic() - started, 1), "startup_s": round(chaos_started - started, 1),
        "chaos_s": round(chaos_ended - chaos_started, 1), "drain_s": round(answered_at - chaos_ended, 1),
        "results": dict(statuses), "answered_once": sum(1 for r in requests if answered_logs[r.request_id] <= 1),
        "dead_letters": len(letters), "problems": len(problems),
        "requests_reclaimed": sum(map(int, re.findall(r"reclaimed (\d+) requests", scheduler_log))),
        "requests_reusing_kept_samples": scheduler_log.count("reusing "),
        "jobs_reclaimed": sum(map(int, re.findall(r"reclaimed (\d+) jobs", worker_log))), "exit_codes": exit_codes,
        "unacked_requests": num_unacked, "pending_requests": num_pending,
    }
    line = "CHAOS " + json.dumps(summary, sort_keys=True)
    print(line)
    summary_path = pathlib.Path(os.environ.get("ALIGNQ_CHAOS_SUMMARY", tmp_path / "chaos_summary.json"))
    summary_path.write_text(line[len("CHAOS "):] + "\n")
    sync.close()

    assert problems == [], f"{line}\n{problems}\n{fleet.log_tail('s0')}"
    assert len(results) == NUM_PROMPTS and statuses[ResultStatus.OK.value] >= NUM_PROMPTS - 6, line
    assert [(d.entry_id, d.reason) for d in letters] == [], line
    assert len(kills) >= MIN_KILLS and set(summary["kills_by_role"]) == {"s", "w"}, line
    assert num_unacked == 0 and num_pending == 0, line
    # SIGTERM drains and exits 0; None: still loading its models at the end, killed (it held nothing)
    assert all(code in (0, None) for code in exit_codes.values()), f"{line}\n{fleet.log_tail('w1')}"
