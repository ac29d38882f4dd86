"""Priorities across windows and workers: under a backlog, high-priority requests' jobs start first.

40 low-priority prompts are queued, then 5 high-priority ones. The worker takes a few jobs per batch
(``max_batch=4`` rows, ``max_batch_jobs=2``), so most of the backlog waits in the jobs streams; the high lane is read first
(3 reads in 4), so the 5 late prompts finish ahead of most of the backlog. p50 latency of each class
is printed (run with ``-s``).
"""

from __future__ import annotations

import pathlib
import statistics

import anyio
import pytest
from tenancy_support import deployment

from middleware.client import Client

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(400)]

NUM_LOW, NUM_HIGH = 40, 5


async def test_high_priority_finishes_first_under_a_backlog(redis_url: str, tmp_path: pathlib.Path,
                                                           tiny_llama_dir: pathlib.Path) -> None:
    with deployment(redis_url, tmp_path, tiny_llama_dir, worker_env={"ALIGNQ_MAX_BATCH": "4", "ALIGNQ_MAX_BATCH_JOBS": "2"}):
        async with Client(redis_url) as client:
            common = {"budget": 4, "max_new_tokens": 8, "seed": 1}
            low = await client.submit_many([{"prompt": f"Low priority question {i}?", "priority": -10, **common}
                                            for i in range(NUM_LOW)])
            high = await client.submit_many([{"prompt": f"Urgent question {i}?", "priority": 10, **common}
                                             for i in range(NUM_HIGH)])
            finish_order: list[str] = []
            latency_s: dict[str, float] = {}
            with anyio.fail_after(300):
                async for result in client.results_as_completed([*low, *high]):
                    assert result.status.value == "ok", result.error
                    finish_order.append(result.request_id)
                    latency_s[result.request_id] = result.total_s
    p50_high = statistics.median(latency_s[rid] for rid in high)
    p50_low = statistics.median(latency_s[rid] for rid in low)
    last_high = max(finish_order.index(rid) for rid in high)
    print(f"priorities: p50 latency high={p50_high:.2f}s low={p50_low:.2f}s; last high finished "
          f"#{last_high + 1} of {len(finish_order)}")
    assert p50_high < p50_low
    assert last_high < NUM_HIGH + NUM_LOW // 2  # the 5 late ones overtake most of the backlog
