"""Admission of requests: the atomic submit and cancel scripts, and the retry hint of a full queue.

``SUBMIT_LUA`` runs per request. In one atomic step it:
- answers an idempotent retry (the id is pending or answered, with the same fingerprint) with
  ``DUPLICATE`` and writes nothing; the same id with another fingerprint is a ``CONFLICT``;
- checks the tenant's quotas when they are set: requests in this wall-clock minute, and samples
  budgeted by its unanswered requests (``RATE_LIMITED``, ``SAMPLES_LIMITED``);
- checks ``max_pending`` (``OVERLOADED``);
- else ZADDs the request to the pending set, XADDs it to the requests stream, keeps its fingerprint
  for the idempotency window, and counts it against the tenant's quotas (``ACCEPTED``).

``CANCEL_LUA`` answers a pending request ``cancelled`` with the same exactly-once marker the
scheduler's answer script sets, and leaves a ``cancelled`` marker that schedulers and workers poll.
"""

from __future__ import annotations

from enum import IntEnum

# KEYS: pending zset, requests stream, answered marker, fingerprint, rate counter, tenant samples hash.
# ARGV: max_pending, request_id, now_ms, payload, fingerprint, fingerprint_ttl_s, max_per_minute (0: no
#       quota), max_samples_in_flight (0: no quota), samples of this request, seconds left in the minute.
# Returns {status, num_pending, detail}: detail is the oldest pending submit time (ms) when OVERLOADED,
# the seconds to wait when RATE_LIMITED, else 0.
SUBMIT_LUA = """
local stored = redis.call('GET', KEYS[4])
if stored and stored ~= ARGV[5] then
  return {3, 0, 0}
end
local num_pending = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('EXISTS', KEYS[3]) == 1 then
  return {2, num_pending, 0}
end
local max_per_minute = tonumber(ARGV[7])
if max_per_minute > 0 and tonumber(redis.call('GET', KEYS[5]) or '0') >= max_per_minute then
  return {4, num_pending, tonumber(ARGV[10])}
end
local max_samples = tonumber(ARGV[8])
if max_samples > 0 then
  local in_flight = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[6])) do in_flight = in_flight + tonumber(value) end
  if in_flight + tonumber(ARGV[9]) > max_samples then
    return {5, num_pending, 0}
  end
end
if num_pending >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, num_pending, tonumber(oldest[2] or ARGV[3])}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'm', ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[6])
if max_per_minute > 0 then
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], 120)
end
if max_samples > 0 then
  redis.call('HSET', KEYS[6], ARGV[2], ARGV[9])
end
return {1, num_pending + 1, 0}
"""

# KEYS: answered marker, result, events, pending zset, kept samples, cancelled marker, tenant samples hash.
# ARGV: request_id, encoded result, encoded terminal event, ttl_s.
# Returns 1 cancelled now, 2 already answered (no-op), 0 unknown: never submitted, lost or expired (no-op).
CANCEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 2
end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], 'cancel', 'EX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5])
redis.call('SET', KEYS[6], '1', 'EX', ARGV[4])
redis.call('HDEL', KEYS[7], ARGV[1])
return 1
"""


class SubmitStatus(IntEnum):
    """First element of ``SUBMIT_LUA``'s reply."""

    OVERLOADED = 0
    ACCEPTED = 1
    DUPLICATE = 2  # an idempotent retry: nothing written
    CONFLICT = 3  # the id is taken by a different request
    RATE_LIMITED = 4  # the tenant's requests-per-minute quota
    SAMPLES_LIMITED = 5  # the tenant's samples-in-flight quota


#: Replies after which the request is queued (the caller gets its id back).
QUEUED_SUBMIT_STATUSES = frozenset({SubmitStatus.ACCEPTED, SubmitStatus.DUPLICATE})


class CancelOutcome(IntEnum):
    """``CANCEL_LUA``'s reply."""

    UNKNOWN = 0
    CANCELLED = 1
    ALREADY_ANSWERED = 2


MIN_RETRY_AFTER_S = 0.25
MAX_RETRY_AFTER_S = 60.0


def estimate_retry_after_s(num_pending: int, max_pending: int, oldest_age_s: float) -> float:
    """How long until the queue has room, assuming it drains at its recent rate.

    In steady state the oldest pending request has waited about as long as the whole queue takes to
    turn over, so one slot frees every ``oldest_age_s / num_pending`` seconds; we need
    ``num_pending - max_pending + 1`` of them. Clamped to [0.25 s, 60 s] so a fresh flood (age near 0)
    still backs off and a stuck deployment does not tell clients to wait for hours.
    """
    if num_pending <= 0:
        return MIN_RETRY_AFTER_S
    slots_needed = max(1, num_pending - max_pending + 1)
    estimate_s = max(0.0, oldest_age_s) / num_pending * slots_needed
    return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate_s))
