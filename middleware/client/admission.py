"""Admission of requests: the atomic submit and cancel scripts, and the retry hint of a full queue.

``SUBMIT_LUA`` admits a chunk of requests of one shard in one call, request after request, each as if
alone (the script is atomic, so nothing runs in between). For each request it:
- answers an idempotent retry (the id is pending or answered, with the same fingerprint) with
  ``DUPLICATE`` and writes nothing; the same id with another fingerprint is a ``CONFLICT``;
- checks the tenant's quotas when they are set: requests in this wall-clock minute, and samples
  budgeted by its unanswered requests (``RATE_LIMITED``, ``SAMPLES_LIMITED``);
- checks ``max_pending`` (``OVERLOADED``): the cut inside a chunk is exact, since the pending count
  is kept as it grows;
- else XADDs it to the requests stream, adds it to the pending set, keeps its fingerprint for the
  idempotency window, and counts it against the tenant's quotas (``ACCEPTED``).

Redis's one thread is what bounds ingest, so the common case (new ids) costs one XADD per request and
a few bulk calls per chunk: fingerprints live in one hash per idempotency window and shard
(``keys.fingerprints``; an id is looked up in this window's hash and the one before, so it stays
bound for one to two windows), read with one HMGET and written with one HSET; the pending set gets
one ZADD. Only an id seen before and no longer pending needs its answered marker: a call without
markers answers it ``RECHECK`` and the client asks again for those ids with their markers (a retry
of an answered request costs a second round trip; a new id never does). The per-request items come
as one msgpack blob (``cmsgpack``): one argument to pack, not four. Ids the client has just made
(plain prompts) are not looked up on a first attempt: 128 random bits were never seen before; a
resend after a lost reply looks them up like any other.

``CANCEL_LUA`` answers a pending request ``cancelled`` with the same exactly-once marker the
scheduler's answer script sets, and leaves a ``cancelled`` marker that schedulers and workers poll.
"""

from __future__ import annotations

from enum import IntEnum

# KEYS: pending zset, requests stream, rate counter, tenant samples hash, fingerprints of this idempotency
#       window and of the one before (keys.fingerprints); on a recheck call only, per request i (from 0):
#       its answered marker (7 + i).
# ARGV: max_pending, now_ms, seconds this window's fingerprints key lives, max_per_minute (0: no quota),
#       max_samples_in_flight (0: no quota), seconds left in the minute, then msgpack [request_id, payload,
#       fingerprint, samples, ...], then '1' when every id was made by the client for this very call.
# Returns {status, num_pending, detail} per request, flat: detail is the oldest pending submit time (ms)
# when OVERLOADED, the seconds to wait when RATE_LIMITED, else 0; when every request is queued (ACCEPTED
# or DUPLICATE), only the pending count.
SUBMIT_LUA = """
local items = cmsgpack.unpack(ARGV[7])
local num_items = #items / 4
local max_pending, now_ms = tonumber(ARGV[1]), ARGV[2]
local max_per_minute, max_samples = tonumber(ARGV[4]), tonumber(ARGV[5])
local with_markers = #KEYS > 6
local SLICE = 1000  -- arguments per bulk call: Lua's unpack() has a stack limit
local function bulk_read(command, key, args)
  local out = {}
  for first = 1, #args, SLICE do
    local part = redis.call(command, key, unpack(args, first, math.min(first + SLICE - 1, #args)))
    for j = 1, #part do out[first + j - 1] = part[j] end
  end
  return out
end
local function bulk_write(command, key, args)
  for first = 1, #args, 2 * SLICE do
    redis.call(command, key, unpack(args, first, math.min(first + 2 * SLICE - 1, #args)))
  end
end
local fresh = ARGV[8] == '1'  -- every id is new, made by the client for this call (no retry): nothing to look up
local recent, older = {}, {}
if not fresh then
  local ids = {}
  for i = 1, num_items do ids[i] = items[4 * i - 3] end
  recent, older = bulk_read('HMGET', KEYS[5], ids), bulk_read('HMGET', KEYS[6], ids)
end
local num_pending = redis.call('ZCARD', KEYS[1])
local rate, in_flight, oldest
local num_counted = 0
local taken = {}  -- fingerprints of the ids accepted by this call
local new_pending, new_fingerprints, num_new = {}, {}, 0
local out, all_queued = {}, true
for i = 0, num_items - 1 do
  local rid, fp = items[4 * i + 1], items[4 * i + 3]
  local status, pending, detail = 1, num_pending, 0
  local stored = not fresh and (taken[rid] or recent[i + 1] or older[i + 1])
  if stored and stored ~= fp then
    status, pending = 3, 0
  elseif stored and taken[rid] then
    status = 2
  elseif not fresh and redis.call('ZSCORE', KEYS[1], rid) then
    status = 2  -- pending (found even where its fingerprint predates these hashes)
  elseif stored and not with_markers then
    status = 6  -- known id, no longer pending: answered or gone; the caller asks again with the markers
  elseif stored and redis.call('EXISTS', KEYS[7 + i]) == 1 then
    status = 2
  else
    if max_per_minute > 0 then
      rate = rate or tonumber(redis.call('GET', KEYS[3]) or '0')
      if rate >= max_per_minute then status, detail = 4, tonumber(ARGV[6]) end
    end
    if status == 1 and max_samples > 0 then
      if not in_flight then
        in_flight = 0
        for _, value in ipairs(redis.call('HVALS', KEYS[4])) do in_flight = in_flight + tonumber(value) end
      end
      if in_flight + tonumber(items[4 * i + 4]) > max_samples then status = 5 end
    end
    if status == 1 and num_pending >= max_pending then
      -- nothing is added after the first refusal here, so the oldest stays the oldest
      oldest = oldest or tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or now_ms)
      status, detail = 0, oldest
    end
    if status == 1 then
      redis.call('XADD', KEYS[2], '*', 'm', items[4 * i + 2])
      if not fresh then taken[rid] = fp end
      new_pending[2 * num_new + 1], new_pending[2 * num_new + 2] = now_ms, rid
      new_fingerprints[2 * num_new + 1], new_fingerprints[2 * num_new + 2] = rid, fp
      num_new = num_new + 1
      num_pending = num_pending + 1
      pending = num_pending
      if max_per_minute > 0 then
        rate, num_counted = rate + 1, num_counted + 1
      end
      if max_samples > 0 then
        local samples = tonumber(items[4 * i + 4])
        in_flight = in_flight - tonumber(redis.call('HGET', KEYS[4], rid) or '0') + samples
        redis.call('HSET', KEYS[4], rid, samples)
      end
    end
  end
  all_queued = all_queued and (status == 1 or status == 2)
  out[3 * i + 1], out[3 * i + 2], out[3 * i + 3] = status, pending, detail
end
if num_new > 0 then
  bulk_write('ZADD', KEYS[1], new_pending)
  bulk_write('HSET', KEYS[5], new_fingerprints)
  redis.call('EXPIRE', KEYS[5], ARGV[3])
end
if num_counted > 0 then
  redis.call('INCRBY', KEYS[3], num_counted)
  redis.call('EXPIRE', KEYS[3], 120)
end
if all_queued then return num_pending end
return out
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
    RECHECK = 6  # seen before, no longer pending: decided by a second call that passes the answered markers


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
