"""Noticing that the Redis primary behind a connection is a different server now.

After a Sentinel failover (or a restart that replayed an AOF) the primary may lack the last writes
that were not replicated: a scheduler's jobs, a worker's replies. Those are not WAITed for (only
submits and answers are), so a scheduler that sees a new primary re-reads its own pending requests
and plans them again, as after a restart of its own. The primary's identity is ``INFO server``'s
``run_id``, polled with the heartbeat.

    watch = PrimaryWatch(redis)
    if await watch.changed():   # False on the first call and whenever INFO is not allowed
        ...
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

__all__ = ["PrimaryWatch"]

logger = logging.getLogger(__name__)


class PrimaryWatch:
    """The run_id of the server a client writes to, compared call to call. Not on a cluster (no single primary)."""

    def __init__(self, redis: Any) -> None:
        from schemas.topology import is_cluster

        self.redis = redis
        self.run_id: str | None = None
        self.is_enabled = not is_cluster(redis)

    async def changed(self) -> bool:
        """True when the run_id differs from the last one seen. Connection errors propagate (retry)."""
        if not self.is_enabled:
            return False
        try:
            info = await self.redis.info("server")
        except ResponseError as e:  # INFO forbidden (ACL, managed Redis): no detection, say so once
            logger.info("INFO server not allowed, failover detection off: %s", e)
            self.is_enabled = False
            return False
        run_id = str(info.get("run_id", ""))
        previous, self.run_id = self.run_id, run_id
        return previous is not None and run_id != previous
