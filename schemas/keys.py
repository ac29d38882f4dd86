"""Every Redis stream, group and key name alignq uses. Nothing else concatenates key strings.

All names live under one namespace (default ``alignq``) so several deployments, or tests, can share a
Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "alignq"

SCHEDULER_GROUP = "schedulers"
WORKER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Stream and key names for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- streams -------------------------------------------------------------------------------
    @property
    def requests(self) -> str:
        """AlignRequest messages from clients; consumed by the ``schedulers`` group."""
        return self._key("requests")

    @property
    def jobs(self) -> str:
        """Job messages from schedulers; consumed by the ``workers`` group."""
        return self._key("jobs")

    def samples(self, scheduler_id: str) -> str:
        """SampleSet replies for one scheduler (read by that scheduler, no group)."""
        return self._key("samples", scheduler_id)

    def events(self, request_id: str) -> str:
        """Progress events of one request; the last carries the AlignResult."""
        return self._key("events", request_id)

    @property
    def dead_letters(self) -> str:
        """Messages that could not be decoded or were delivered too often, with the reason."""
        return self._key("dead")

    # -- keys ----------------------------------------------------------------------------------
    def result(self, request_id: str) -> str:
        """The encoded AlignResult, kept for ``result_ttl_s``."""
        return self._key("result", request_id)

    def request_claim(self, request_id: str) -> str:
        """SET NX marker: the request has been answered (exactly one result per request_id)."""
        return self._key("answered", request_id)

    def job_done(self, job_id: str) -> str:
        """SET NX marker: the job's samples were published once."""
        return self._key("job-done", job_id)

    def kept_samples(self, request_id: str) -> str:
        """Hash sample_index -> encoded Sample: scored samples reused after a scheduler dies."""
        return self._key("kept", request_id)

    @property
    def pending_requests(self) -> str:
        """Sorted set request_id -> submit time (ms): accepted but not answered (backpressure)."""
        return self._key("pending")

    def heartbeat(self, role: str, instance_id: str) -> str:
        """Liveness key with a TTL, one per running scheduler, worker or gateway."""
        return self._key("heartbeat", role, instance_id)

    def heartbeat_pattern(self, role: str) -> str:
        return self._key("heartbeat", role, "*")

    # -- telemetry -----------------------------------------------------------------------------
    @property
    def metrics(self) -> str:
        """Hash of deployment-wide metric increments (see middleware.metrics), summed by every service."""
        return self._key("metrics")
