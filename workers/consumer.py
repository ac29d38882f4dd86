"""The worker's side of the job stream, on the shared protocol (``schemas.transport``).

    consumer = JobConsumer(redis, keys, worker_id)          # a StreamConsumer of the "workers" group
    await publish_replies(redis, keys, [(entry_id, job, sample_set), ...])   # XADD + HSET + XACK, MULTI/EXEC
    await dead_letter_job(redis, keys, entry_id=..., reason=..., payload=..., reply=(scheduler_id, sample_set))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from schemas import PAYLOAD_FIELD, WORKER_GROUP, Job, Keys, SampleSet, encode
from schemas.keys import LANES_BY_PRIORITY, Lane
from schemas.lifecycle import read_heartbeats
from schemas.transport import LanedConsumer, StreamEntry, check_transaction, dead_letter

__all__ = ["JobConsumer", "StreamEntry", "count_workers_on_host", "dead_letter_job", "job_stream_of",
           "publish_replies"]

logger = logging.getLogger(__name__)

SAMPLES_MAXLEN = 10_000  # approximate trim of each scheduler's reply stream
KEPT_SAMPLES_TTL_S = 3_600  # scored samples a reclaiming scheduler may reuse


class JobConsumer(LanedConsumer):
    """This worker as one consumer of the ``workers`` group on its models' job streams, every lane.

    ``models``: the model names whose jobs it takes (None: the default model's jobs).
    ``shards``: the shards whose job streams it reads (None: all of ``keys.shards``).
    """

    def __init__(self, redis: Any, keys: Keys, consumer: str, *, models: Sequence[str | None] = (None,),
                 shards: Sequence[int] | None = None) -> None:
        streams = [(lane, keys.for_shard(shard).job_stream(model, lane))
                   for shard in (keys.shards if shards is None else shards)
                   for model in models for lane in LANES_BY_PRIORITY]
        super().__init__(redis, streams, WORKER_GROUP, consumer)


def job_stream_of(keys: Keys, job: Job) -> str:
    """The stream a job was published to: a function of the job alone (its request's shard, model and lane)."""
    return keys.for_request(job.request_id).job_stream(job.model, Lane.of(job.priority))


async def publish_replies(redis: Any, keys: Keys, replies: Sequence[tuple[str, Job, SampleSet]]) -> None:
    """For each job: XADD its SampleSet to its scheduler, keep its samples (HSET + EXPIRE), XACK it.

    One MULTI/EXEC per shard (one slot each on a cluster; a single one unsharded): a job is acknowledged
    exactly when its reply is durable.
    """
    by_shard: dict[int, list[tuple[str, Job, SampleSet]]] = {}
    for reply in replies:
        by_shard.setdefault(keys.shard_of(reply[1].request_id), []).append(reply)
    for shard, shard_replies in by_shard.items():
        shard_keys = keys.for_shard(shard)
        async with redis.pipeline(transaction=True) as pipe:
            for entry_id, job, sample_set in shard_replies:
                pipe.xadd(shard_keys.samples(job.scheduler_id), {PAYLOAD_FIELD: encode(sample_set)},
                          maxlen=SAMPLES_MAXLEN, approximate=True)
                if sample_set.samples:
                    kept = keys.kept_samples(job.request_id)
                    pipe.hset(kept, mapping={str(s.index): encode(s) for s in sample_set.samples})
                    pipe.expire(kept, KEPT_SAMPLES_TTL_S)
                pipe.xack(job_stream_of(keys, job), WORKER_GROUP, entry_id)
            check_transaction(await pipe.execute(raise_on_error=False))


async def dead_letter_job(redis: Any, keys: Keys, *, entry_id: str, reason: str, payload: bytes | None,
                          request_id: str | None = None, reply: tuple[str, SampleSet] | None = None,
                          stream: str | None = None) -> None:
    """Dead-letter a job entry, with the error reply (scheduler_id, SampleSet) in the same transaction."""
    source = stream or keys.jobs
    shard_keys = keys.for_stream(source)  # the entry's shard: dead letter and reply in its slot

    def add_reply(pipe: Any) -> None:
        if reply is not None:
            scheduler_id, sample_set = reply
            pipe.xadd(shard_keys.samples(scheduler_id), {PAYLOAD_FIELD: encode(sample_set)}, maxlen=SAMPLES_MAXLEN,
                      approximate=True)

    await dead_letter(redis, keys, source_stream=source, group=WORKER_GROUP, entry_id=entry_id,
                      reason=reason, payload=payload, request_id=request_id, extra=add_reply)


async def count_workers_on_host(redis: Any, keys: Keys, hostname: str, worker_id: str) -> int:
    """Live or loading workers whose heartbeat names ``hostname``, ``worker_id`` included (at least 1)."""
    beats = [*await read_heartbeats(redis, keys, "worker"), *await read_heartbeats(redis, keys, "worker-loading")]
    others = {beat.get("worker_id") or beat.get("instance_id") for beat in beats
              if beat.get("host") == hostname and (beat.get("worker_id") or beat.get("instance_id")) != worker_id}
    return 1 + len(others)
