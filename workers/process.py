"""The worker process: ``alignq worker`` and ``python -m workers`` end here.

    run_worker(settings)      # blocking; serves until SIGINT/SIGTERM; 0 after a clean shutdown,
                              # 2 when Redis is not configured or the models cannot be loaded
"""

from __future__ import annotations

import logging
import os
import sys
import time

import anyio

from schemas.lifecycle import stop_on_signals
from workers.service import Worker, serve_worker
from workers.settings import WorkerSettings

__all__ = ["run_worker"]

logger = logging.getLogger(__name__)


async def _serve_until_signal(settings: WorkerSettings) -> Worker | Exception:
    """The worker, or the ModelLoadError that stopped it from starting."""
    from workers.errors import ModelLoadError

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signals, stop)
        try:
            outcome: Worker | Exception = await serve_worker(settings, stop=stop)
        except ModelLoadError as e:
            outcome = e
        tg.cancel_scope.cancel()
    return outcome


def run_worker(settings: WorkerSettings) -> int:
    """Blocking entry point of ``alignq worker`` (logging configured by the caller): 0 after a clean
    shutdown, 2 when the models cannot be loaded (the message says why)."""
    if not settings.redis_url:
        print("alignq worker: no Redis: set ALIGNQ_REDIS_URL or --redis-url", file=sys.stderr)
        return 2
    started = time.monotonic()
    worker = anyio.run(_serve_until_signal, settings)
    if isinstance(worker, Exception):
        print(f"alignq worker: {worker}", file=sys.stderr)
        return 2
    logger.info("worker exited after %.1f s", time.monotonic() - started)
    if worker.is_batch_abandoned:  # its model thread still runs; nothing it would publish is wanted now
        logging.shutdown()
        os._exit(0)
    return 0
