"""The OpenAI-compatible wire, as pure functions: one request body per sample, the sample out of the
reply, and which failures a retry can fix.

Per-sample requests, not ``n``: sample *i* of a request is seeded from (request seed, i) alone, so it
is the same sample whichever job, batch or worker draws it (jobs split a budget at any offset). With
``n``, children's seeds are the server's business, and llama.cpp's server refuses ``n`` > 1 outright.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["BackendRejected", "ServerSample", "is_retryable_status", "parse_sample", "rejection_message",
           "sample_request", "sample_seed"]

MAX_SEED = 2**31 - 1  # llama.cpp takes a uint32 (0xFFFFFFFF: random); 31 bits suit every server
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # besides every 5xx: timeouts, overload, rate limits


class BackendRejected(Exception):
    """The server refused a request with a 4xx that no retry fixes; carries its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"inference server answered {status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class ServerSample:
    text: str
    num_tokens: int  # completion tokens the server reports (0 if it reports none)
    is_finished: bool  # finish_reason "stop": the model ended it (not max_tokens)


def sample_seed(seed: int, index: int) -> int:
    """The server seed of sample ``index`` of a request seeded ``seed``: nearby pairs, unrelated seeds."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % MAX_SEED


def sample_request(prompt: str | list[dict], *, index: int, seed: int, max_new_tokens: int, temperature: float,
                   top_p: float, model: str | None) -> tuple[str, dict[str, Any]]:
    """(path under the /v1 base, JSON body) of one sample: chat messages to /chat/completions, text to
    /completions (sent as it is: the server applies no chat template to it)."""
    body: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                            "seed": sample_seed(seed, index), "stream": False}
    if model is not None:
        body["model"] = model
    if isinstance(prompt, str):
        return "/completions", {**body, "prompt": prompt}
    return "/chat/completions", {**body, "messages": [{"role": m["role"], "content": m["content"]} for m in prompt]}


def parse_sample(path: str, reply: Any) -> ServerSample:
    """The sample in a (non-streaming) reply; ValueError when the reply has no choice to read."""
    try:
        choice = reply["choices"][0]
        if path == "/chat/completions":
            text = choice["message"].get("content") or ""
        else:
            text = choice["text"] or ""
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"reply without a choice: {str(reply)[:200]}") from e
    usage = reply.get("usage") or {}
    num_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return ServerSample(text=str(text), num_tokens=int(num_tokens or 0),
                        is_finished=choice.get("finish_reason") == "stop")


def is_retryable_status(status: int, body: bytes = b"x") -> bool:
    """5xx and the 4xx that mean "not now" are retried; any other 4xx is the request's fault, when the
    server says why. A 4xx with an empty body is a connection out of step, not a verdict: llama.cpp's
    server answers a 503 ("Loading model") without reading the request body, and the next request on
    that kept-alive connection then parses as garbage (400, no body)."""
    return status >= 500 or status in RETRYABLE_STATUS or not body.strip()


def rejection_message(body: bytes, status: int) -> str:
    """The server's own error message from an error reply (OpenAI ``{"error": {"message"}}`` or text)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:1000] or f"HTTP {status}"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:1000]
        if isinstance(error, str):
            return error[:1000]
        if data.get("message"):  # e.g. TGI, some proxies
            return str(data["message"])[:1000]
    return str(data)[:1000]
