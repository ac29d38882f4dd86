"""Process lifecycle shared by every service: one heartbeat format, and signals that only set an event.

A heartbeat is a JSON object under ``keys.heartbeat(role, instance_id)`` with a TTL: who (``role``,
``instance_id``, ``host``, ``pid``), when (``at_ms``), and role-specific fields (a worker's model and
queue, a scheduler's in-flight count). Liveness is "the key exists"; readers parse the rest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import uuid
from typing import Any

import anyio

from schemas.keys import Keys
from schemas.messages import now_ms

__all__ = ["heartbeat_value", "new_instance_id", "read_heartbeats", "stop_on_signals", "write_heartbeat"]

logger = logging.getLogger(__name__)


def new_instance_id(role: str) -> str:
    """A consumer name unique to this process: role, host, pid and a random suffix."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "host"
    return f"{role}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def heartbeat_value(role: str, instance_id: str, **fields: Any) -> str:
    return json.dumps({"role": role, "instance_id": instance_id, "host": socket.gethostname(),
                       "pid": os.getpid(), "at_ms": now_ms(), **fields})


async def write_heartbeat(redis: Any, keys: Keys, role: str, instance_id: str, *, ttl_ms: int,
                          **fields: Any) -> None:
    await redis.set(keys.heartbeat(role, instance_id), heartbeat_value(role, instance_id, **fields), px=ttl_ms)


async def read_heartbeats(redis: Any, keys: Keys, role: str) -> list[dict[str, Any]]:
    """The parsed heartbeats of every live instance of ``role`` (unparseable ones are skipped)."""
    names = [key async for key in redis.scan_iter(match=keys.heartbeat_pattern(role), count=1000)]
    values = await redis.mget(names) if names else []
    beats = []
    for value in values:
        try:
            beat = json.loads(value) if value else None
        except ValueError:
            continue
        if isinstance(beat, dict):
            beats.append(beat)
    return beats


async def stop_on_signals(stop: anyio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT, and nothing else: the loops see it and drain."""
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("received %s: draining", signal.Signals(signum).name)
                stop.set()
    except (NotImplementedError, ValueError, RuntimeError):  # not the main thread: the caller stops us
        await anyio.sleep_forever()
