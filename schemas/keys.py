"""Every Redis stream, group and key name alignq uses. Nothing else concatenates key strings.

All names live under one namespace (default ``alignq``) so several deployments, or tests, can share a
Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFAULT_NAMESPACE = "alignq"

SCHEDULER_GROUP = "schedulers"
WORKER_GROUP = "workers"


class Lane(StrEnum):
    """Priority lanes: requests and jobs of priority > 0, == 0 and < 0 wait in separate streams."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def of(cls, priority: int) -> Lane:
        return cls.HIGH if priority > 0 else cls.LOW if priority < 0 else cls.NORMAL


#: Lanes in the order they are read; every ``LOW_FIRST_EVERY``-th read starts from the lowest (no starvation).
LANES_BY_PRIORITY = (Lane.HIGH, Lane.NORMAL, Lane.LOW)
LOW_FIRST_EVERY = 4


def lane_read_order(read_index: int) -> tuple[Lane, ...]:
    """Highest lane first, except one read in ``LOW_FIRST_EVERY``, which starts from the lowest.

    So a backlog of high-priority work goes first, and a lower lane with work still gets at least
    one read in four: it is slowed, never starved.
    """
    return LANES_BY_PRIORITY[::-1] if read_index % LOW_FIRST_EVERY == LOW_FIRST_EVERY - 1 else LANES_BY_PRIORITY


@dataclass(frozen=True, slots=True)
class Keys:
    """Stream and key names for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- streams -------------------------------------------------------------------------------
    @property
    def requests(self) -> str:
        """AlignRequest messages of the normal lane; consumed by the ``schedulers`` group."""
        return self.request_stream(Lane.NORMAL)

    def request_stream(self, lane: Lane) -> str:
        """AlignRequest messages of one priority lane (``requests``, ``requests:high``, ``requests:low``)."""
        return self._key("requests") if lane == Lane.NORMAL else self._key("requests", lane.value)

    @property
    def jobs(self) -> str:
        """Job messages of the default model's normal lane; consumed by the ``workers`` group."""
        return self.job_stream(None, Lane.NORMAL)

    def job_stream(self, model: str | None, lane: Lane) -> str:
        """Jobs for one model (None: the default model) in one priority lane; read by that model's workers."""
        parts = ["jobs"] if model is None else ["jobs", "model", model]
        return self._key(*parts) if lane == Lane.NORMAL else self._key(*parts, lane.value)

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

    def fingerprint(self, request_id: str) -> str:
        """The request's fingerprint (schemas.tenancy), kept for the idempotency window: conflicts are 409."""
        return self._key("fingerprint", request_id)

    def cancelled(self, request_id: str) -> str:
        """Marker: the request was cancelled; schedulers and workers drop its work when they see it."""
        return self._key("cancelled", request_id)

    def quota_rate(self, tenant: str, minute: int) -> str:
        """Requests a tenant submitted in one wall-clock minute (INCR, expires after two)."""
        return self._key("quota", "rate", tenant, str(minute))

    def quota_samples(self, tenant: str) -> str:
        """Sorted set request_id -> samples budgeted, of the tenant's unanswered requests."""
        return self._key("quota", "samples", tenant)

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
