"""``alignq bench ingest``: how fast the client gets requests into Redis, against Redis itself.

Three numbers, measured against the same server in one invocation:

1. ``submit`` in a loop (one Lua round trip per request): accepted requests/s, p50/p99 latency;
2. ``submit_many`` (pipelined chunks): accepted requests/s;
3. ``redis-benchmark`` running plain ``XADD`` of a payload the size of an encoded request, over one
   connection with pipeline depth ``--pipeline`` — the ceiling any client on one connection can reach.

Wall-clock rates depend on what else the host runs, so each of 2 and 3 also reports the CPU time it
costs per request, the client's (this process, or redis-benchmark) and the server's (when Redis runs
on this host), and ``submit_many_over_redis_cpu``: redis-benchmark's CPU per XADD over submit_many's
per request, the ratio an otherwise idle host would show. ``redis_benchmark_standard_xadd_per_s`` is
redis-benchmark in its own default configuration (50 connections, no pipelining) for reference.

Plus the scheduler's allocation time for a window of 256 prompts (``middleware.allocation.plan_window``
on realistic explore rewards, median of repeats). No scheduler is needed: the benchmark writes into
its own namespace (``alignq-bench-ingest-<pid>``) and deletes every key it created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from middleware.errors import UsageError

PROMPT_TEMPLATE = "Write one friendly sentence about request number {index}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=20_000, help="requests per client phase (default 20000)")
    parser.add_argument("--chunk-size", type=int, default=500, help="submit_many: requests per pipelined round trip")
    parser.add_argument("--pipeline", type=int, default=16, help="redis-benchmark pipeline depth (-P)")
    parser.add_argument("--clients", type=int, default=1,
                        help="redis-benchmark connections (-c); 1 matches the client's single connection")
    parser.add_argument("--redis-benchmark-requests", type=int, default=200_000,
                        help="XADDs redis-benchmark sends (default 200000)")
    parser.add_argument("--standard-baseline-requests", type=int, default=None,
                        help="XADDs of the reference run in redis-benchmark's defaults (-c 50 -P 1); 0 skips it "
                             "(default: --redis-benchmark-requests, at most 100000)")
    parser.add_argument("--window", type=int, default=256, help="prompts in the allocation window")
    parser.add_argument("--window-budget", type=int, default=16, help="budget per prompt in the allocation window")
    parser.add_argument("--repeats", type=int, default=21, help="allocation repeats (median reported)")
    parser.add_argument("--allocator", default="adabon", help="allocation method timed (default adabon)")
    parser.add_argument("--shards", type=int, default=int(os.environ.get("ALIGNQ_SHARDS", "1")),
                        help="S: requests spread over S hash-tagged shards (default ALIGNQ_SHARDS, else 1)")
    parser.add_argument("--redis-url", default=None, help="Redis to publish into (default ALIGNQ_REDIS_URL, else embedded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    if min(args.requests, args.redis_benchmark_requests, args.chunk_size, args.pipeline, args.clients) < 1:
        raise UsageError("--requests, --redis-benchmark-requests, --chunk-size, --pipeline and --clients must be >= 1")
    if args.window < 1 or args.window_budget < 2 or args.repeats < 1:
        raise UsageError("--window and --repeats must be >= 1 and --window-budget >= 2")
    import anyio

    with redis_for_bench(args.redis_url) as redis_url:
        report = anyio.run(_measure_client, redis_url, args)
        server_cpu_s = server_cpu_clock(redis_url)
        server_before_s, children_before_s = server_cpu_s(), children_cpu_s()
        report["redis_benchmark_xadd_per_s"] = redis_benchmark_xadd(
            redis_url, num_requests=args.redis_benchmark_requests, payload_bytes=report["payload_bytes"],
            pipeline=args.pipeline, clients=args.clients, key=f"{report['namespace']}:redis-benchmark",
        )
        report["redis_benchmark_cpu_us"] = cpu_us_per_request(
            children_cpu_s() - children_before_s, server_cpu_s() - server_before_s, args.redis_benchmark_requests)
        standard_requests = (min(100_000, args.redis_benchmark_requests) if args.standard_baseline_requests is None
                             else args.standard_baseline_requests)
        if standard_requests > 0:
            report["redis_benchmark_standard_xadd_per_s"] = redis_benchmark_xadd(
                redis_url, num_requests=standard_requests, payload_bytes=report["payload_bytes"],
                pipeline=1, clients=50, key=f"{report['namespace']}:redis-benchmark")
    report["submit_many_over_redis"] = report["submit_many_per_s"] / report["redis_benchmark_xadd_per_s"]
    if "redis_benchmark_standard_xadd_per_s" in report:
        report["submit_many_over_redis_standard"] = (report["submit_many_per_s"]
                                                     / report["redis_benchmark_standard_xadd_per_s"])
    if report["submit_many_cpu_us"]["server"] is not None and report["redis_benchmark_cpu_us"]["server"] is not None:
        report["submit_many_over_redis_cpu"] = (report["redis_benchmark_cpu_us"]["total"]
                                                / report["submit_many_cpu_us"]["total"])
    report["submit_over_redis"] = report["submit_per_s"] / report["redis_benchmark_xadd_per_s"]
    report["allocation_ms_256" if args.window == 256 else f"allocation_ms_{args.window}"] = allocation_ms(
        num_prompts=args.window, budget=args.window_budget, repeats=args.repeats, method=args.allocator)
    report["hardware"] = hardware_info()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, args))
    return 0


async def _measure_client(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    from middleware.client import Client

    namespace = f"alignq-bench-ingest-{os.getpid()}"
    num_requests = args.requests
    # max_pending above everything we send: this measures ingest, not backpressure.
    client = Client(redis_url, namespace=namespace, max_pending=4 * num_requests + 10,
                    submit_chunk_size=args.chunk_size, num_shards=args.shards)
    try:
        await client.redis.ping()
        await delete_namespace(client.redis, namespace)
        payload_bytes = _encoded_size(client, PROMPT_TEMPLATE.format(index=10**6))
        # Warm up: the Lua script cached server-side, the connection open, code paths compiled.
        await client.submit_many([PROMPT_TEMPLATE.format(index=i) for i in range(200)])
        await client.submit(PROMPT_TEMPLATE.format(index=-1))

        latencies_s: list[float] = []
        start_s = time.perf_counter()
        for index in range(num_requests):
            before_s = time.perf_counter()
            await client.submit(PROMPT_TEMPLATE.format(index=index))
            latencies_s.append(time.perf_counter() - before_s)
        submit_s = time.perf_counter() - start_s

        # submit_many from the caller's own data (plain prompts): validation and encoding count.
        prompts = [PROMPT_TEMPLATE.format(index=index) for index in range(num_requests)]
        server_cpu_s = server_cpu_clock(redis_url)
        server_before_s, client_before_s = server_cpu_s(), time.process_time()
        start_s = time.perf_counter()
        ids = await client.submit_many(prompts)
        submit_many_s = time.perf_counter() - start_s
        submit_many_cpu_us = cpu_us_per_request(time.process_time() - client_before_s,
                                                server_cpu_s() - server_before_s, num_requests)
        assert len(ids) == num_requests

        num_queued = sum([await client.redis.xlen(client.keys.for_shard(shard).requests)
                          for shard in client.keys.shards])
    finally:
        await delete_namespace(client.redis, namespace)
        await client.aclose()
    latencies_s.sort()
    return {
        "namespace": namespace,
        "shards": args.shards,
        "cluster": client.keys.hash_tags and redis_url.startswith("redis+cluster://"),
        "requests": num_requests,
        "payload_bytes": payload_bytes,
        "submit_per_s": num_requests / submit_s,
        "submit_many_per_s": num_requests / submit_many_s,
        "submit_many_cpu_us": submit_many_cpu_us,
        "submit_p50_ms": 1000 * percentile(latencies_s, 50),
        "submit_p99_ms": 1000 * percentile(latencies_s, 99),
        "requests_queued": num_queued,
    }


def _encoded_size(client: Any, prompt: str) -> int:
    from middleware.client.building import encode_request

    return len(encode_request(client.build_request(prompt)))


async def delete_namespace(redis: Any, namespace: str) -> None:
    """UNLINK every key of the benchmark's own namespace (never anything else)."""
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)


def server_cpu_clock(redis_url: str) -> Any:
    """A function returning the Redis server's CPU seconds so far (user + system), read from /proc when the
    server runs on this host; it returns NaN when it does not (a remote or clustered Redis)."""
    from redis import Redis

    host = redis_url.split("://", 1)[1].split("/")[0].rsplit("@", 1)[-1].split(":")[0]
    if redis_url.startswith(("redis+cluster://", "redis+sentinel://")) or host not in ("127.0.0.1", "localhost", ""):
        return lambda: math.nan
    with Redis.from_url(redis_url) as connection:
        pid = int(connection.info("server").get("process_id", 0))
    stat_path = f"/proc/{pid}/stat"
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
            if not comm.read().startswith("redis"):
                return lambda: math.nan
    except OSError:
        return lambda: math.nan

    def cpu_s() -> float:
        with open(stat_path, encoding="utf-8") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in ticks

    return cpu_s


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (redis-benchmark)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_us_per_request(client_s: float, server_s: float, num_requests: int) -> dict[str, float | None]:
    """Client and server CPU microseconds per request, and their sum (server None: not measurable here)."""
    client_us, server_us = 1e6 * client_s / num_requests, 1e6 * server_s / num_requests
    if math.isnan(server_us):
        return {"client": client_us, "server": None, "total": None}
    return {"client": client_us, "server": server_us, "total": client_us + server_us}


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values) - 1e-9) - 1))
    return sorted_values[rank]


def redis_benchmark_xadd(redis_url: str, *, num_requests: int, payload_bytes: int, pipeline: int, clients: int,
                         key: str) -> float:
    """Requests/s of ``redis-benchmark ... XADD key * m <payload>``; the stream is deleted afterwards."""
    from redis import Redis

    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not found on PATH; install redis-tools (apt) to compare with Redis")
    is_cluster = redis_url.startswith("redis+cluster://")
    if is_cluster:  # one stream is one slot: benchmark the primary that owns it (one node's ceiling)
        from redis.cluster import RedisCluster

        seed = redis_url.split("://", 1)[1].split(",")[0].split("/")[0]
        with RedisCluster.from_url(f"redis://{seed}") as cluster:
            node = cluster.get_node_from_key(key)
            redis_url = f"redis://{node.host}:{node.port}"
    connection = Redis.from_url(redis_url)
    kwargs = connection.connection_pool.connection_kwargs
    command = [binary, "-n", str(num_requests), "-c", str(clients), "-P", str(pipeline), "--csv"]
    if "path" in kwargs:
        command += ["-s", kwargs["path"]]
    else:
        command += ["-h", str(kwargs.get("host", "127.0.0.1")), "-p", str(kwargs.get("port", 6379))]
    if kwargs.get("password"):
        command += ["-a", kwargs["password"]]
        if kwargs.get("username"):
            command += ["--user", kwargs["username"]]
    if not is_cluster:
        command += ["--dbnum", str(kwargs.get("db", 0))]
    command += ["XADD", key, "*", "m", "x" * payload_bytes]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    finally:
        connection.delete(key)
        connection.close()
    if completed.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({completed.returncode}): {completed.stderr.strip()[:300]}")
    return parse_redis_benchmark_csv(completed.stdout)


def parse_redis_benchmark_csv(output: str) -> float:
    """The ``rps`` column of redis-benchmark's ``--csv`` output (first data row)."""
    header: list[str] | None = None
    for line in output.splitlines():
        cells = [cell.strip().strip('"') for cell in line.split('","')]
        if not line.strip():
            continue
        if header is None and "rps" in cells:
            header = cells
            continue
        if header is not None and len(cells) >= len(header):
            return float(cells[header.index("rps")])
    raise RuntimeError(f"could not parse redis-benchmark output: {output.strip()[:300]!r}")


def realistic_explore_rewards(num_prompts: int, num_explore: int, seed: int = 0) -> dict[str, list[float]]:
    """Explore rewards like a real window: half preference-style (Gaussian, per-prompt mean and
    spread, some prompts with ties), half verifiable (Bernoulli with a per-prompt success rate)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rewards: dict[str, list[float]] = {}
    for index in range(num_prompts):
        if index % 2 == 0:
            mean, spread = rng.normal(0.0, 0.1), rng.uniform(0.0, 0.08) if index % 10 else 0.0
            values = rng.normal(mean, spread, num_explore) if spread > 0 else np.full(num_explore, mean)
        else:
            values = (rng.random(num_explore) < rng.beta(0.7, 0.7)).astype(float)
        rewards[f"prompt-{index}"] = [float(v) for v in values]
    return rewards


def allocation_ms(*, num_prompts: int, budget: int, repeats: int, method: str = "adabon") -> float:
    """Median wall time (ms) of ``plan_window`` for one window (explore rewards already in hand)."""
    from middleware.scheduler.allocation import num_explore_samples, plan_window

    num_explore = num_explore_samples(budget, 0.75)
    explore_rewards = realistic_explore_rewards(num_prompts, num_explore)
    budgets = dict.fromkeys(explore_rewards, budget)
    plan_window(explore_rewards, budgets, method=method, seed=0)  # warm-up: imports, caches
    times_ms = []
    for repeat in range(repeats):
        start_s = time.perf_counter()
        plan = plan_window(explore_rewards, budgets, method=method, seed=repeat)
        times_ms.append(1000 * (time.perf_counter() - start_s))
        assert sum(plan.values()) == num_prompts * (budget - num_explore)
    return statistics.median(times_ms)


@contextlib.contextmanager
def redis_for_bench(redis_url: str | None) -> Iterator[str]:
    """The Redis to benchmark against: ``redis_url``, else ALIGNQ_REDIS_URL, else an embedded server
    started here (and stopped on exit)."""
    redis_url = redis_url or os.environ.get("ALIGNQ_REDIS_URL")
    if redis_url:
        yield redis_url
        return
    from middleware.runtime.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


def hardware_info() -> dict[str, Any]:
    """CPU model and counts, without importing torch (ingest never needs it)."""
    import platform

    cpu_model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "cpu_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "load_avg_1m": os.getloadavg()[0]}


def format_report(report: dict[str, Any], args: argparse.Namespace) -> str:
    alloc_key = next(key for key in report if key.startswith("allocation_ms_"))
    rows = [
        ("submit (one at a time)", f"{report['submit_per_s']:,.0f} req/s",
         f"p50 {report['submit_p50_ms']:.3f} ms, p99 {report['submit_p99_ms']:.3f} ms"),
        (f"submit_many (chunks of {args.chunk_size})", f"{report['submit_many_per_s']:,.0f} req/s",
         f"{report['submit_many_over_redis']:.2f}x redis-benchmark"),
        (f"redis-benchmark XADD (-c {args.clients} -P {args.pipeline}, {report['payload_bytes']} B)",
         f"{report['redis_benchmark_xadd_per_s']:,.0f} req/s", ""),
        (f"allocation, {args.window} prompts ({args.allocator})", f"{report[alloc_key]:.2f} ms",
         f"median of {args.repeats}"),
    ]
    if "redis_benchmark_standard_xadd_per_s" in report:
        rows.insert(3, ("redis-benchmark XADD, its defaults (-c 50 -P 1)",
                        f"{report['redis_benchmark_standard_xadd_per_s']:,.0f} req/s",
                        f"submit_many {report['submit_many_over_redis_standard']:.2f}x"))
    if "submit_many_over_redis_cpu" in report:
        rows.insert(3, ("CPU per request, client + server", f"{report['submit_many_cpu_us']['total']:.1f} us",
                        (f"redis-benchmark {report['redis_benchmark_cpu_us']['total']:.1f} us: "
                         f"submit_many {report['submit_many_over_redis_cpu']:.2f}x by CPU")))
    width = max(len(row[0]) for row in rows)
    lines = [f"ingest: {report['requests']} requests per phase, {report['hardware']['cpu_model']}"]
    lines += [f"  {name:<{width}}  {value:>16}  {note}" for name, value, note in rows]
    return "\n".join(lines)
