"""One script call admits a whole chunk of requests: ``SUBMIT_LUA``'s per-request logic in a loop.

``SUBMIT_MANY_LUA`` is generated from ``middleware.client.admission.SUBMIT_LUA`` (its ``KEYS``/``ARGV``
read from per-request tables), so conflict, duplicate, quota and ``max_pending`` checks stay exactly
those of a single submit, request after request, inside one atomic step: backpressure is as exact as
before (request i sees requests 1..i-1 of its chunk), and a resubmitted chunk is answered
``DUPLICATE`` item by item (idempotent). What it saves is Redis's per-call cost of EVALSHA (script
lookup, Lua call set-up, one reply per request) and the client's per-command encoding.

Layout of one call: KEYS = ``SUBMIT_LUA``'s keys of each request, request after request; ARGV = the
number of requests, keys per request, values per request, then each request's ``SUBMIT_LUA`` ARGV.
Reply: 3 integers per request. All keys of one call must hash to one slot: the caller groups a chunk
by shard.
"""

from __future__ import annotations

import re

from middleware.client.admission import SUBMIT_LUA

__all__ = ["SUBMIT_MANY_LUA", "many_arguments", "split_replies"]


def _as_function(script: str) -> str:
    body = re.sub(r"\bKEYS\[", "K[", re.sub(r"\bARGV\[", "A[", script))
    return f"local function submit(K, A)\n{body}\nend\n"


SUBMIT_MANY_LUA = _as_function(SUBMIT_LUA) + """
local n, num_keys, num_args = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local K, A = {}, {}
  for j = 1, num_keys do K[j] = KEYS[i * num_keys + j] end
  for j = 1, num_args do A[j] = ARGV[3 + i * num_args + j] end
  local reply = submit(K, A)
  out[#out + 1] = reply[1]
  out[#out + 1] = reply[2]
  out[#out + 1] = reply[3]
end
return out
"""


def many_arguments(keys: list[list[str]], args: list[list[object]]) -> tuple[list[str], list[object]]:
    """(KEYS, ARGV) of one SUBMIT_MANY_LUA call from each request's SUBMIT_LUA keys and args."""
    flat_keys = [key for request_keys in keys for key in request_keys]
    flat_args: list[object] = [len(keys), len(keys[0]), len(args[0])]
    for request_args in args:
        flat_args.extend(request_args)
    return flat_keys, flat_args


def split_replies(flat: list[int]) -> list[list[int]]:
    """The flat reply of SUBMIT_MANY_LUA as one [status, num_pending, detail] per request."""
    return [flat[i:i + 3] for i in range(0, len(flat), 3)]
