"""One script call admits a whole chunk of requests: ``SUBMIT_LUA``'s per-request logic in a loop.

``SUBMIT_MANY_LUA`` is generated from ``middleware.client.admission.SUBMIT_LUA`` (its ``KEYS``/``ARGV``
read from per-request tables), so conflict, duplicate, quota and ``max_pending`` checks stay exactly
those of a single submit, request after request, inside one atomic step: backpressure is as exact as
before (request i sees requests 1..i-1 of its chunk), and a resubmitted chunk is answered
``DUPLICATE`` item by item (idempotent). What it saves is Redis's per-call cost of EVALSHA (script
lookup, Lua call set-up, one reply per request) and the client's per-command encoding.

Layout of one call: KEYS = the distinct keys of the chunk (the pending set, the stream and the
quota keys are shared; two keys are per request); ARGV[1] = one msgpack array with, per request, the
positions of its ``SUBMIT_LUA`` keys in KEYS and its ``SUBMIT_LUA`` ARGV (as strings, so the script sees
what EVALSHA would pass). Packing one msgpack blob in C replaces encoding ~16 arguments per request in
Python. Reply: 3 integers per request. All keys of one call must hash to one slot: the caller groups a
chunk by shard.
"""

from __future__ import annotations

import re

import msgpack

from middleware.client.admission import SUBMIT_LUA

__all__ = ["SUBMIT_MANY_LUA", "many_arguments", "split_replies"]


def _as_function(script: str) -> str:
    body = re.sub(r"\bKEYS\[", "K[", re.sub(r"\bARGV\[", "A[", script))
    return f"local function submit(K, A)\n{body}\nend\n"


SUBMIT_MANY_LUA = _as_function(SUBMIT_LUA) + """
local requests = cmsgpack.unpack(ARGV[1])
local out = {}
for _, request in ipairs(requests) do
  local K = {}
  for j, position in ipairs(request[1]) do K[j] = KEYS[position] end
  local reply = submit(K, request[2])
  out[#out + 1] = reply[1]
  out[#out + 1] = reply[2]
  out[#out + 1] = reply[3]
end
return out
"""


def many_arguments(keys: list[list[str]], args: list[list[object]]) -> tuple[list[str], list[bytes]]:
    """(KEYS, ARGV) of one SUBMIT_MANY_LUA call from each request's SUBMIT_LUA keys and args."""
    positions: dict[str, int] = {}  # key -> its 1-based position in KEYS
    requests = []
    for request_keys, request_args in zip(keys, args):
        key_positions = [positions.setdefault(key, len(positions) + 1) for key in request_keys]
        requests.append([key_positions, [value if isinstance(value, bytes) else str(value) for value in request_args]])
    # raw (str) format: the cmsgpack inside Redis reads no bin type
    return list(positions), [msgpack.packb(requests, use_bin_type=False)]


def split_replies(flat: list[int]) -> list[list[int]]:
    """The flat reply of SUBMIT_MANY_LUA as one [status, num_pending, detail] per request."""
    return [flat[i:i + 3] for i in range(0, len(flat), 3)]
