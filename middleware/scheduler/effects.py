"""The scheduler's effects: a core ``Plan`` written to Redis, and each answer published exactly once.

``PlanWriter.apply(plan)`` is the only place the scheduler service turns a plan into writes, in the order
the plan requires: events and jobs (one pipeline; an event always precedes the jobs that may answer it),
then each answer, then plain acks, then window telemetry. Stage-2 grants go with the request's kept
samples (``plans.Grant``), written in the same pipeline ahead of the jobs.

Each answer is published by ``ANSWER_LUA``: SET NX the request's claim marker and, only if it was
set, store the result, XADD the terminal event and drop the request from the pending set; in every
case XACK the request entry. A scheduler killed between publishing and acking leaves an entry that
another scheduler reclaims, finds claimed, and acks: one result per request_id. An answer is shielded
from cancellation (shutdown) and bounded by ``ANSWER_TIMEOUT_S``; one that cannot be written leaves the
entry un-acked for reclaim.

No decisions here: what to write comes from ``middleware.scheduler.core``; when, from the service's loops.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import redis.asyncio as aioredis

from middleware.metrics import Telemetry
from middleware.scheduler.plans import GRANT_FIELD, Answer, Plan, RequestState
from middleware.scheduler.results import error_result
from middleware.scheduler.tracing import SchedulerTracing
from middleware.settings import SchedulerSettings
from schemas import PAYLOAD_FIELD, SCHEDULER_GROUP, ErrorInfo, Event, Keys, encode, now_ms
from schemas.keys import Lane
from schemas.messages import terminal_event_kind
from schemas.topology import NotReplicated, eval_replicated
from schemas.transport import StreamConsumer, retry_with_backoff

__all__ = ["ANSWER_LUA", "ANSWER_TIMEOUT_S", "MAX_BACKOFF_S", "PlanWriter", "retry"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKOFF_S = 2.0
ANSWER_TIMEOUT_S = 15.0  # a shielded answer still gives up eventually (the entry stays for reclaim)

# KEYS: claim marker, result, events, pending zset, requests stream, kept samples, tenant samples hash.
# ARGV: request_id, encoded result, encoded terminal event, ttl_s, group, entry_id ('' for none), owner.
# Returns 1 if this call answered the request, 0 if it had been answered already.
ANSWER_LUA = """
local answered = 0
if redis.call('SET', KEYS[1], ARGV[7], 'NX', 'EX', ARGV[4]) then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('DEL', KEYS[6])
  redis.call('HDEL', KEYS[7], ARGV[1])
  answered = 1
end
if ARGV[6] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[5], ARGV[6])
end
return answered
"""


async def retry(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """The scheduler's Redis calls: retried with backoff (capped at ``MAX_BACKOFF_S``) until they succeed."""
    return await retry_with_backoff(what, call, max_backoff_s=MAX_BACKOFF_S)


class PlanWriter:
    """Writes plans for one scheduler. ``requests``: the core's live request states (read for tenants, spans)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: SchedulerSettings, scheduler_id: str, *,
                 consumer: StreamConsumer, requests: Mapping[str, RequestState], telemetry: Telemetry,
                 tracing: SchedulerTracing) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.scheduler_id = scheduler_id
        self.consumer = consumer
        self.requests = requests
        self.telemetry = telemetry
        self.tracing = tracing
        self._answer_script = redis.register_script(ANSWER_LUA)
        self.num_answered = 0

    async def apply(self, plan: Plan) -> None:
        """Write a plan's effects: events and jobs (one pipeline), then each answer, then plain acks."""
        self.tracing.observe(plan, self.requests)  # spans; stamps jobs with their traceparent
        if plan.events or plan.jobs or plan.grants:
            await retry("publish jobs", lambda: self._publish(plan))
        for number, answer in enumerate(plan.answers):
            if number:  # each answer is shielded: on shutdown, stop between them (the rest stay for reclaim)
                await anyio.lowlevel.checkpoint_if_cancelled()
            await self.publish_answer(answer)
        self.tracing.answered(plan, self.requests)
        if plan.acks:
            await retry("ack", lambda: self.consumer.ack(*plan.acks))
        for window in plan.windows:
            self.telemetry.record_window(window.num_prompts, window.explore_rewards, window.allocation)
            logger.info("window planned scheduler_id=%s num_prompts=%d allocation=%s", self.scheduler_id,
                        window.num_prompts, sorted(window.allocation.values(), reverse=True))

    async def answer_error(self, request_id: str, error: ErrorInfo, *, entry_id: str | None) -> None:
        """Answer a request the core never held (bad input, deliveries exhausted) with an error."""
        result = error_result(request_id, error, scheduler_id=self.scheduler_id, now_ms=now_ms())
        await self.publish_answer(Answer(result, entry_id))

    async def _publish(self, plan: Plan) -> None:
        ttl_s = self.settings.result_ttl_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in plan.events:  # before the jobs: a reply can only follow its own events
                pipe.xadd(self.keys.events(event.request_id), {PAYLOAD_FIELD: encode(event)})
                pipe.expire(self.keys.events(event.request_id), ttl_s)
            for request_id, grant in plan.grants.items():  # before the jobs: durable whenever they are
                pipe.hset(self.keys.kept_samples(request_id), GRANT_FIELD, grant.encode())
                pipe.expire(self.keys.kept_samples(request_id), ttl_s)
            for job in plan.jobs:  # a lane per priority class, a stream per model (schemas.keys)
                pipe.xadd(self.keys.job_stream(job.model, Lane.of(job.priority)), {PAYLOAD_FIELD: encode(job)})
            await pipe.execute()

    async def publish_answer(self, answer: Answer) -> None:
        """Answer once (Lua), shielded from cancellation and bounded in time."""
        result = answer.result
        kind = terminal_event_kind(result.status)
        event = Event(request_id=result.request_id, kind=kind, at_ms=result.completed_at_ms, result=result)
        rid = result.request_id
        state = self.requests.get(rid)
        tenant = state.request.tenant if state is not None else rid.rpartition("/")[0]
        keys = [self.keys.request_claim(rid), self.keys.result(rid), self.keys.events(rid),
                self.keys.pending_requests, self.keys.requests, self.keys.kept_samples(rid),
                self.keys.quota_samples(tenant or "")]
        args = [rid, encode(result), encode(event), self.settings.result_ttl_s, SCHEDULER_GROUP,
                answer.entry_id or "", self.scheduler_id]
        answered = None
        first_reply: list[Any] = []  # an attempt that answered but reached too few replicas (then retried)

        async def attempt() -> Any:
            try:
                reply = await eval_replicated(self.redis, self._answer_script, keys=keys, args=args,
                                              min_replicas=self.settings.redis_min_replicas)
            except NotReplicated as e:
                first_reply.append(getattr(e, "reply", None))
                raise
            return max([int(r) for r in first_reply if r is not None] + [int(reply)])

        with anyio.move_on_after(ANSWER_TIMEOUT_S, shield=True):
            answered = await retry("answer", attempt)
        if answered is None:
            logger.error("could not publish the answer request_id=%s; its entry stays for reclaim", rid)
            return
        if int(answered):
            self.num_answered += 1
            self.telemetry.record_result(result, stage1_best_reward=answer.stage1_best_reward)
            logger.info("answered request_id=%s status=%s reward=%s samples_used=%d total_s=%.3f", rid,
                        result.status.value, result.reward, result.samples_used, result.total_s)
        else:
            logger.info("already answered request_id=%s: acked the duplicate", rid)
