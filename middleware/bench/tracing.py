"""``alignq bench tracing``: the scheduler's CPU cost per request with OpenTelemetry tracing off and on.

A real ``alignq scheduler`` process per mode, against the same Redis. Workers are replaced by an echo
loop in this process that answers every job at once with canned samples, so the only model-free
work measured is the scheduler's: windows, allocation, events, answers, and (on) its spans, exported
over OTLP/HTTP to a sink here that accepts and drops them. The number is the scheduler process's CPU
time (user + system, from /proc) per request over ``--requests`` requests after a warm-up, and the
requests/s the whole loop reached. Each mode uses its own namespace, deleted afterwards.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from middleware.errors import UsageError

WARMUP_REQUESTS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=2000, help="requests measured per mode (default 2000)")
    parser.add_argument("--budget", type=int, default=4, help="samples per request (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating off/on runs; medians reported")
    parser.add_argument("--redis-url", default=None, help="Redis to use (default ALIGNQ_REDIS_URL, else embedded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the default output)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.budget < 2 or args.repeats < 1:
        raise UsageError("--requests and --repeats must be >= 1 and --budget >= 2")
    if not sys.platform.startswith("linux"):
        raise UsageError("bench tracing reads the scheduler's CPU time from /proc: Linux only")
    import anyio

    from middleware.bench.ingest import hardware_info, redis_for_bench

    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with redis_for_bench(args.redis_url) as redis_url, OtlpReceiver() as sink:
        for repeat in range(args.repeats):
            for mode in ("off", "on"):
                runs[mode].append(anyio.run(_measure, redis_url, mode, sink.endpoint, args, repeat))
    summary = {mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for mode, results in runs.items()}
    overhead_ms = summary["on"]["scheduler_cpu_ms_per_request"] - summary["off"]["scheduler_cpu_ms_per_request"]
    print(json.dumps({"bench": "tracing", "requests": args.requests, "budget": args.budget, "repeats": args.repeats,
                      "off": summary["off"], "on": summary["on"], "overhead_cpu_ms_per_request": round(overhead_ms, 4),
                      "spans_exported": sink.num_exports, "runs": runs, "hardware": hardware_info()}, indent=2))
    return 0


async def _measure(redis_url: str, mode: str, endpoint: str, args: argparse.Namespace, repeat: int) -> dict[str, float]:
    import anyio

    from middleware.client import Client
    from middleware.runtime.launcher import alignq_command, stop_process
    from schemas import Keys
    from schemas.lifecycle import read_heartbeats

    namespace = f"alignq-bench-tracing-{os.getpid()}-{mode}-{repeat}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(ALIGNQ_REDIS_URL=redis_url, ALIGNQ_NAMESPACE=namespace, ALIGNQ_WINDOW_MS="10",
               ALIGNQ_MAX_IN_FLIGHT="1024", ALIGNQ_SHARDS="1")
    if mode == "on":
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
    keys = Keys(namespace)
    scheduler = await anyio.open_process(alignq_command("scheduler"), env=env, stdout=subprocess.DEVNULL,
                                         stderr=None)
    try:
        async with Client(redis_url, namespace=namespace, max_pending=100_000) as client, \
                anyio.create_task_group() as tg:
            tg.start_soon(_echo_worker, client.redis, keys)
            with anyio.fail_after(60):
                while not await read_heartbeats(client.redis, keys, "scheduler"):
                    await anyio.sleep(0.05)
            await _round(client, WARMUP_REQUESTS, args.budget, "warm")
            cpu_before_s = _cpu_s(scheduler.pid)
            started = time.perf_counter()
            latencies = await _round(client, args.requests, args.budget, "m")
            wall_s = time.perf_counter() - started
            cpu_s = _cpu_s(scheduler.pid) - cpu_before_s
            tg.cancel_scope.cancel()
        return {"scheduler_cpu_ms_per_request": round(1000 * cpu_s / args.requests, 4),
                "requests_per_s": round(args.requests / wall_s, 1),
                "p50_latency_ms": round(1000 * statistics.median(latencies), 2)}
    finally:
        await stop_process(scheduler, grace_s=30)
        with anyio.CancelScope(shield=True):
            await _delete_namespace(redis_url, namespace)


async def _round(client: Any, num_requests: int, budget: int, tag: str) -> list[float]:
    ids = await client.submit_many([{"prompt": f"bench {tag} {i}", "budget": budget, "max_new_tokens": 8}
                                    for i in range(num_requests)])
    latencies = []
    async for result in client.results_as_completed(ids, timeout_s=300):
        if result.status.value != "ok":
            raise RuntimeError(f"bench request failed: {result.error}")
        latencies.append(result.total_s)
    return latencies


async def _echo_worker(redis: Any, keys: Any) -> None:
    """Answer every job at once with canned samples (rewards vary by index, so allocation has work)."""
    from schemas import PAYLOAD_FIELD, WORKER_GROUP, Job, Sample, SampleSet, decode, encode
    from schemas.keys import LANES_BY_PRIORITY
    from schemas.transport import LanedConsumer

    consumer = LanedConsumer(redis, [(lane, keys.job_stream(None, lane)) for lane in LANES_BY_PRIORITY],
                             WORKER_GROUP, "bench-echo")
    await consumer.ensure_group()
    while True:
        entries = await consumer.read(count=256, block_ms=100)
        if not entries:
            continue
        async with redis.pipeline(transaction=True) as pipe:
            for entry in entries:
                job = decode(Job, entry.fields[PAYLOAD_FIELD])
                samples = [Sample(index=job.sample_offset + i, text=f"answer {job.sample_offset + i}",
                                  reward=((job.sample_offset + i) * 37 % 11) / 10, num_tokens=8)
                           for i in range(job.num_samples)]
                reply = SampleSet(job_id=job.job_id, request_id=job.request_id, worker_id="bench-echo",
                                  kind=job.kind, samples=samples)
                pipe.xadd(keys.samples(job.scheduler_id), {PAYLOAD_FIELD: encode(reply)})
                pipe.xack(entry.stream, WORKER_GROUP, entry.entry_id)
            await pipe.execute()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _delete_namespace(redis_url: str, namespace: str) -> None:
    from schemas.transport import connect

    redis = connect(redis_url)
    try:
        names = [key async for key in redis.scan_iter(match=f"{namespace}:*", count=1000)]
        for start in range(0, len(names), 500):
            await redis.delete(*names[start:start + 500])
    finally:
        await redis.aclose()


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on a free loopback port, served from a thread: ``POST /v1/traces``.

    Each export's body (gunzipped) goes to ``on_export`` (none: counted and dropped, as the bench does;
    the tests' collector decodes the spans). The reply is an empty ExportTraceServiceResponse: zero bytes
    of protobuf. Other paths get 404.
    """

    def __init__(self, on_export: Callable[[bytes], None] | None = None) -> None:
        receiver = self
        self.num_exports = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    if on_export is not None:
                        on_export(body)
                    receiver.num_exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
