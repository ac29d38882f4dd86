"""Each process's own metrics on ``ALIGNQ_METRICS_PORT``: the scrape target of one process, where
``GET /metrics`` on a gateway is the deployment's (``middleware.metrics``).

CPU, memory and GC (prometheus_client's process collectors), plus the totals of the process's
``Telemetry`` objects (a gateway app's, each scheduler shard's). The scheduler, worker and gateway
processes call ``maybe_start_process_exporter`` at start; it does nothing when the port is unset.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from middleware.metrics import Telemetry, families_from_fields

__all__ = ["METRICS_PORT_ENV", "maybe_start_process_exporter"]

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "ALIGNQ_METRICS_PORT"


class _ProcessCollector:
    """The totals of this process's Telemetry objects (one per gateway app or scheduler shard), summed."""

    def __init__(self, telemetries: Iterable[Telemetry] = ()) -> None:
        self.telemetries = list(telemetries)

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = defaultdict(float)
        for telemetry in self.telemetries:
            with telemetry._lock:
                for field, value in telemetry.totals.items():
                    totals[field] += value
        return families_from_fields(totals)


_env_exporter: tuple[int, _ProcessCollector] | None = None  # the one $ALIGNQ_METRICS_PORT started


def maybe_start_process_exporter(telemetry: Telemetry | None = None, port: int | None = None) -> int | None:
    """Serve this process's own metrics: CPU, memory, GC (prometheus_client's process collectors) and
    the totals of ``telemetry``. Returns the port, or None when no port is asked for.

    With ``port`` (0: any free one), a server of its own. Else on ``$ALIGNQ_METRICS_PORT``: started by
    the first call in the process; later calls add their ``telemetry`` to it (the scheduler, worker and
    gateway processes call this at start).
    """
    global _env_exporter
    if port is not None:
        return _start_exporter(port, _ProcessCollector([telemetry] if telemetry else []))
    if _env_exporter is None:
        raw = os.environ.get(METRICS_PORT_ENV, "").strip()
        if not raw:
            return None
        collector = _ProcessCollector()
        _env_exporter = (_start_exporter(int(raw), collector), collector)
    bound_port, collector = _env_exporter
    if telemetry is not None and telemetry not in collector.telemetries:
        collector.telemetries.append(telemetry)
    return bound_port


def _start_exporter(port: int, collector: _ProcessCollector) -> int:
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    server, _ = start_http_server(port, addr=os.environ.get("ALIGNQ_METRICS_ADDR", "127.0.0.1"), registry=registry)
    bound_port = int(server.server_address[1])
    logger.info("process metrics exporter on port=%d", bound_port)
    return bound_port
