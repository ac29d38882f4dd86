"""A whole deployment as real processes for the tenancy, control and tracing tests.

    with deployment(redis_url, tmp_path, tiny_llama_dir, ALIGNQ_API_KEYS='["keyA","keyB"]') as d:
        httpx.post(f"{d.base_url}/v1/chat/completions", headers=d.auth("keyA"), json=...)

``alignq scheduler``, ``alignq worker`` and ``alignq gateway`` each run as a child process (chaos_support's
Fleet), with their logs under ``tmp_path/logs``; the gateway is ready once ``/healthz`` says ``ok``.
"""

from __future__ import annotations

import pathlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from chaos_support import Fleet, free_port, wait_http_ready

from schemas import PAYLOAD_FIELD, Keys, SampleSet, decode

KEYS = Keys()
READY_TIMEOUT_S = 90.0


@dataclass(slots=True)
class Deployment:
    base_url: str
    fleet: Fleet

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@contextmanager
def deployment(redis_url: str, tmp_path: pathlib.Path, model_dir: pathlib.Path, *, num_workers: int = 1,
               worker_env: dict[str, str] | None = None, **env: str) -> Iterator[Deployment]:
    """Scheduler, ``num_workers`` workers and a gateway; ``env`` goes to all of them, ``worker_env`` to workers."""
    port = free_port()
    fleet = Fleet(redis_url, tmp_path / "logs", model_dir, ALIGNQ_WINDOW_MS="20", ALIGNQ_MAX_NEW_TOKENS="8",
                  ALIGNQ_PORT=str(port), ALIGNQ_HOST="127.0.0.1", **env)
    try:
        fleet.start("scheduler", "s0")
        workers = [f"w{i}" for i in range(num_workers)]
        for slot in workers:
            fleet.start("worker", slot, **(worker_env or {}))
        gateway = fleet.start("gateway", "g0")
        fleet.wait_ready(["s0", *workers], READY_TIMEOUT_S)
        base_url = f"http://127.0.0.1:{port}"
        wait_http_ready(f"{base_url}/healthz", gateway.process, READY_TIMEOUT_S, what="gateway",
                        ready=lambda r: r.json().get("status") == "ok", log_tail=lambda: fleet.log_tail("g0"))
        yield Deployment(base_url, fleet)
    finally:
        gateway_service = fleet.services.get("g0")
        if gateway_service is not None and gateway_service.process.poll() is None:
            gateway_service.process.send_signal(signal.SIGTERM)  # Fleet SIGTERMs heartbeating roles only
        fleet.stop_all()


def samples_generated(redis_url: str, wire_request_id: str) -> int:
    """Samples workers sent back for a request, over every scheduler's samples stream."""
    client = redis.Redis.from_url(redis_url)
    try:
        total = 0
        for stream in client.scan_iter(match=KEYS.samples("*"), count=1000):
            for _, fields in client.xrange(stream):
                sample_set = decode(SampleSet, fields[PAYLOAD_FIELD])
                if sample_set.request_id == wire_request_id:
                    total += len(sample_set.samples)
        return total
    finally:
        client.close()
