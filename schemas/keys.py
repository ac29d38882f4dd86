"""Every Redis stream, group and key name alignq uses. Nothing else concatenates key strings.

All names live under one namespace (default ``alignq``) so several deployments, or tests, can share a
Redis server.

**Shards** (``Keys.sharded``, docs/scaling.md). With ``num_shards`` S > 1, or on a Redis Cluster, every
name a script or transaction touches carries the hash tag of one shard, ``alignq:{s3}:requests``, so
each script runs on one slot. A request lives on shard ``shard_of(request_id)`` (crc32 % S): its
per-request keys are tagged by its id, and stream-level names (requests, jobs, samples, pending,
dead letters) by the shard a ``Keys`` is pinned to (``for_shard``, ``for_request``, ``for_stream``).
Heartbeats and metrics stay untagged (single-key operations). With S = 1 and no cluster the names
are exactly the unsharded ones.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass, replace
from enum import StrEnum

from redis.crc import key_slot

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


_SHARD_TAG = re.compile(r"\{s(\d+)(?:\.\d+)?\}")
NUM_SLOTS = 16_384  # Redis Cluster hash slots


def tag_of(name: str) -> str | None:
    """The hash tag in a key name (``{...}``), or None: names with one tag share its slot."""
    start = name.find("{")
    end = name.find("}", start + 1)
    return name[start + 1:end] if start >= 0 and end > start + 1 else None


@functools.lru_cache(maxsize=1024)
def shard_tag(shard: int, num_shards: int) -> str:
    """The hash tag of one shard: ``s{shard}``, or ``s{shard}.{n}`` for the first n whose slot falls in the
    shard's even share of the slot range. ``redis-cli --cluster create`` splits slots evenly, so S shards
    over S primaries land one per primary (bare ``s0..s2`` would put two on one node)."""
    low, high = shard * NUM_SLOTS // num_shards, (shard + 1) * NUM_SLOTS // num_shards
    for n in range(100_000):
        tag = f"s{shard}" if n == 0 else f"s{shard}.{n}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    return f"s{shard}"  # unreachable for any sane S: crc16 covers every slot range


def shard_of(request_id: str, num_shards: int) -> int:
    """The shard a request lives on: crc32 of its (tenant-scoped) id, mod S. Stable across processes."""
    return zlib.crc32(request_id.encode()) % num_shards if num_shards > 1 else 0


def parse_shard_ids(text: str, num_shards: int) -> list[int]:
    """``"0,2"`` -> [0, 2]; empty: every shard. ValueError for ids outside 0..S-1 (``ALIGNQ_SHARD_IDS``)."""
    if not text.strip():
        return list(range(num_shards))
    try:
        ids = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as e:
        raise ValueError(f"ALIGNQ_SHARD_IDS must be comma-separated integers, got {text!r}") from e
    if not ids or ids[0] < 0 or ids[-1] >= num_shards:
        raise ValueError(f"ALIGNQ_SHARD_IDS {text!r} outside 0..{num_shards - 1} (ALIGNQ_SHARDS={num_shards})")
    return ids


@dataclass(frozen=True, slots=True)
class Keys:
    """Stream and key names for one namespace (and, when sharded, one pinned shard)."""

    namespace: str = DEFAULT_NAMESPACE
    num_shards: int = 1  # S: requests and jobs are spread over S hash-tagged shards
    hash_tags: bool = False  # tag names with their shard (S > 1, or any Redis Cluster)
    shard: int = 0  # the shard whose streams the stream-level names below refer to

    @classmethod
    def sharded(cls, namespace: str = DEFAULT_NAMESPACE, num_shards: int = 1, *, cluster: bool = False) -> Keys:
        """Names for S shards; tagged when S > 1 or on a cluster (one slot per script needs the tag)."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        return cls(namespace, num_shards, num_shards > 1 or cluster)

    @property
    def shards(self) -> range:
        return range(self.num_shards)

    def shard_of(self, request_id: str) -> int:
        return shard_of(request_id, self.num_shards)

    def for_shard(self, shard: int) -> Keys:
        """These names pinned to ``shard`` (its requests, jobs, samples, pending set, dead letters)."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        return self if shard == self.shard else replace(self, shard=shard)

    def for_request(self, request_id: str) -> Keys:
        return self.for_shard(self.shard_of(request_id))

    def for_stream(self, stream: str) -> Keys:
        """Pinned to the shard a (tagged) stream name belongs to; untagged names: self."""
        match = _SHARD_TAG.search(stream) if self.hash_tags else None
        return self.for_shard(int(match.group(1))) if match else self

    def _tagged(self, shard: int, parts: tuple[str, ...]) -> str:
        if not self.hash_tags:
            return ":".join((self.namespace, *parts))
        return ":".join((self.namespace, f"{{{shard_tag(shard, self.num_shards)}}}", *parts))

    def _key(self, *parts: str) -> str:
        """A stream-level name, in the pinned shard."""
        return self._tagged(self.shard, parts)

    def _request_key(self, request_id: str, *parts: str) -> str:
        """A per-request name, in the request's own shard."""
        return self._tagged(self.shard_of(request_id), (*parts, request_id))

    def _global_key(self, *parts: str) -> str:
        """Never tagged: keys only ever touched alone (heartbeats, metrics)."""
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

    def all_job_streams(self, model: str | None = None) -> list[str]:
        """Every jobs stream of one model: each shard, each lane (what KEDA's triggers watch)."""
        return [self.for_shard(shard).job_stream(model, lane) for shard in self.shards for lane in LANES_BY_PRIORITY]

    def samples(self, scheduler_id: str) -> str:
        """SampleSet replies for one scheduler (read by that scheduler, no group)."""
        return self._key("samples", scheduler_id)

    def events(self, request_id: str) -> str:
        """Progress events of one request; the last carries the AlignResult."""
        return self._request_key(request_id, "events")

    @property
    def dead_letters(self) -> str:
        """Messages that could not be decoded or were delivered too often, with the reason."""
        return self._key("dead")

    # -- keys ----------------------------------------------------------------------------------
    def result(self, request_id: str) -> str:
        """The encoded AlignResult, kept for ``result_ttl_s``."""
        return self._request_key(request_id, "result")

    def request_claim(self, request_id: str) -> str:
        """SET NX marker: the request has been answered (exactly one result per request_id)."""
        return self._request_key(request_id, "answered")

    def fingerprints(self, window_s: int, window: int) -> str:
        """Hash request_id -> fingerprint (schemas.tenancy) of the requests accepted in one idempotency
        window (submit time // ``window_s``), in the pinned shard; the same id with another fingerprint
        is a conflict (409). The submit script reads this window's hash and the one before."""
        return self._key("fingerprints", str(window_s), str(window))

    def cancelled(self, request_id: str) -> str:
        """Marker: the request was cancelled; schedulers and workers drop its work when they see it."""
        return self._request_key(request_id, "cancelled")

    def quota_rate(self, tenant: str, minute: int) -> str:
        """Requests a tenant submitted in one wall-clock minute (INCR, expires after two); per shard."""
        return self._key("quota", "rate", tenant, str(minute))

    def quota_samples(self, tenant: str) -> str:
        """Hash request_id -> samples budgeted, of the tenant's unanswered requests; per shard."""
        return self._key("quota", "samples", tenant)

    def kept_samples(self, request_id: str) -> str:
        """Hash sample_index -> encoded Sample: scored samples reused after a scheduler dies; and field
        ``grant`` (middleware.scheduler.plans.Grant): what stage 2 granted the request, written by its scheduler."""
        return self._request_key(request_id, "kept")

    @property
    def pending_requests(self) -> str:
        """Sorted set request_id -> submit time (ms): accepted but not answered (backpressure)."""
        return self._key("pending")

    def heartbeat(self, role: str, instance_id: str) -> str:
        """Liveness key with a TTL, one per running scheduler, worker or gateway."""
        return self._global_key("heartbeat", role, instance_id)

    def heartbeat_pattern(self, role: str) -> str:
        return self._global_key("heartbeat", role, "*")

    # -- telemetry -----------------------------------------------------------------------------
    @property
    def metrics(self) -> str:
        """Hash of deployment-wide metric increments (see middleware.metrics), summed by every service."""
        return self._global_key("metrics")

    # -- learned state ---------------------------------------------------------------------------
    def spread_model(self, model: str | None, reward_kind: str) -> str:
        """String: the per-prompt reward-spread model (middleware.scheduler.prior_store), shared by schedulers."""
        return self._global_key("prior", model or "default", reward_kind)
