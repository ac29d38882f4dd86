"""Admission of requests: the atomic submit script and the retry hint given when the queue is full.

``SUBMIT_LUA`` runs per request: if fewer than ``max_pending`` requests are accepted-but-unanswered
(``keys.pending_requests``) it ZADDs the request there and XADDs it to ``keys.requests``; otherwise
it writes nothing. Idempotent on ``request_id``: a request already pending or already answered is
not queued again, so a submit retried after a lost reply is safe. The scheduler's answer script
ZREMs the request from the pending set.
"""

from __future__ import annotations

# KEYS: pending zset, requests stream, answered marker.  ARGV: max_pending, request_id, now_ms, payload.
# Returns {status, num_pending, oldest_submitted_ms}: status 1 accepted, 2 already pending or answered
# (idempotent retry: nothing written), 0 overloaded (nothing written).
SUBMIT_LUA = """
local num_pending = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('EXISTS', KEYS[3]) == 1 then
  return {2, num_pending, 0}
end
if num_pending >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, num_pending, tonumber(oldest[2] or ARGV[3])}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'm', ARGV[4])
return {1, num_pending + 1, 0}
"""

ACCEPTED, DUPLICATE, OVERLOADED = 1, 2, 0  # first element of the script's reply
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
