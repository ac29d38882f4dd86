"""From what a caller submits to what the submit script takes: wire id, payload, fingerprint, samples.

Built for ``submit_many``'s hot path, each request's cost paid once:
- plain prompts skip pydantic: their fields are a template validated once, and the prompt's own
  constraints (1..MAX_PROMPT_CHARS characters, not blank, valid UTF-8) are checked here; an invalid
  one goes through ``build_request`` for pydantic's own error message;
- dicts are validated in one TypeAdapter call; already-typed AlignRequests are not validated again;
  both are dumped in one more;
- ids come from one ``os.urandom`` call for the whole batch;
- the fingerprint hashes the msgpack of the fingerprinted fields, and the payload appends the rest to
  those same bytes: one msgpack pass a request, no JSON.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack
from pydantic import TypeAdapter, ValidationError

from middleware.client.building import build_request
from middleware.errors import BadRequest
from schemas import AlignRequest, Method, now_ms
from schemas.codec import MAX_MESSAGE_BYTES
from schemas.messages import MAX_PROMPT_CHARS
from schemas.tenancy import (
    NOT_FINGERPRINTED,
    SCOPE_SEPARATOR,
    caller_request_id,
    fingerprint_fields,
    hash_fingerprint,
    scoped_request_id,
)

__all__ = ["WireBatch", "WireRequest", "needs_route_check", "new_request_ids", "wire_form"]

_REQUESTS = TypeAdapter(list[AlignRequest])
_PACK = msgpack.Packer(use_bin_type=True).pack  # one Packer: msgpack.packb builds a new one per call


class WireRequest(NamedTuple):
    """One request as ``SUBMIT_LUA`` admits it."""

    wire_id: str
    payload: bytes  # the encoded AlignRequest, as XADDed
    fingerprint: str
    samples: int  # counted against the tenant's samples quota
    model: str | None
    method: str
    fresh: bool = False  # its id was made by this client just now (a plain prompt): never seen by Redis


def new_request_ids(count: int) -> list[str]:
    """``count`` fresh ids: 128 random bits as 32 hex digits each, like ``new_request_id``, one syscall."""
    digits = os.urandom(16 * count).hex()
    return [digits[32 * index:32 * index + 32] for index in range(count)]


def wire_form(fields: dict[str, Any]) -> tuple[bytes, str]:
    """(payload, fingerprint) of an AlignRequest's ``model_dump()``; BadRequest when it is too large.

    msgpack maps are their entries concatenated, so the payload is the fingerprinted fields' bytes
    followed by the other fields' bytes under one map header; it decodes to the same request.
    """
    kept = fingerprint_fields(fields)
    rest = {key: value for key, value in fields.items() if key in NOT_FINGERPRINTED}
    kept_bytes, rest_bytes = msgpack.packb(kept, use_bin_type=True), msgpack.packb(rest, use_bin_type=True)
    payload = (_map_header(len(kept) + len(rest)) + kept_bytes[len(_map_header(len(kept))):]
               + rest_bytes[len(_map_header(len(rest))):])
    if len(payload) > MAX_MESSAGE_BYTES:
        raise BadRequest(f"invalid request: AlignRequest encodes to {len(payload)} bytes > {MAX_MESSAGE_BYTES}")
    return payload, hash_fingerprint(kept_bytes)


def _map_header(size: int) -> bytes:
    if size < 16:
        return bytes([0x80 | size])
    return b"\xde" + size.to_bytes(2, "big")  # map16: no request has 65536 fields


class _PromptTemplate:
    """The wire form of requests that differ only in prompt and id: their msgpack spliced around both.

    Exactly ``wire_form`` of the template's fields with that prompt and id (a unit test checks it).
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        kept = fingerprint_fields(fields)
        rest = {key: value for key, value in fields.items() if key in NOT_FINGERPRINTED}
        self._kept_header = _map_header(len(kept))
        self._header = _map_header(len(kept) + len(rest))
        self._kept_head, self._kept_tail = _split_body(kept, "prompt")
        self._rest_head, self._rest_tail = _split_body(rest, "request_id")

    def wire_form(self, prompt: str, request_id: str) -> tuple[bytes, str]:
        kept_body = b"".join((self._kept_head, _PACK(prompt), self._kept_tail))
        payload = b"".join((self._header, kept_body, self._rest_head, _PACK(request_id), self._rest_tail))
        return payload, hash_fingerprint(self._kept_header + kept_body)


def _split_body(mapping: dict[str, Any], key: str) -> tuple[bytes, bytes]:
    """The msgpack map body of ``mapping`` before ``key``'s value (the key included) and after it."""
    items = list(mapping.items())
    at = [name for name, _ in items].index(key)
    before, after = dict(items[:at]), dict(items[at + 1:])
    head = msgpack.packb(before, use_bin_type=True)[len(_map_header(len(before))):] + msgpack.packb(key)
    return head, msgpack.packb(after, use_bin_type=True)[len(_map_header(len(after))):]


class WireBatch:
    """Requests validated up front, encoded chunk by chunk as they are sent (``encode``).

    Items are prompts, dicts of AlignRequest fields (with ``prompt``), or AlignRequests of ``tenant``.
    Every check that can fail runs here, so BadRequest comes before anything is sent.
    """

    def __init__(self, items: Sequence[str | dict | AlignRequest], *, tenant: str | None, default_budget: int,
                 trace_fields: dict[str, str]) -> None:
        self._default_budget = default_budget
        self._prompts: dict[int, str] = {}
        typed: dict[int, AlignRequest] = {}
        loose: dict[int, dict] = {}
        for index, item in enumerate(items):
            if isinstance(item, str) and 0 < len(item) <= MAX_PROMPT_CHARS and not item.isspace() and _is_text(item):
                self._prompts[index] = item  # the only field that varies: no pydantic for these
            elif isinstance(item, AlignRequest):  # already validated: only its scope is checked
                if item.tenant != tenant:
                    raise BadRequest(f"invalid request: built for tenant {item.tenant!r}, this client is {tenant!r}")
                typed[index] = item
            elif isinstance(item, dict):
                loose[index] = item
            else:  # an invalid prompt, or a chat message list: pydantic validates it and names the error
                typed[index] = build_request(item, tenant=tenant, **trace_fields)
        typed.update(zip(loose, _validated_dicts(list(loose.values()), tenant, trace_fields), strict=True))
        self._encoded = {index: self._wire_request(fields, *wire_form(fields))
                         for index, fields in zip(typed, _REQUESTS.dump_python(list(typed.values())), strict=True)}
        self.routes = {(wire.model, wire.method) for wire in self._encoded.values() if needs_route_check(wire)}
        prompt_ids = iter(new_request_ids(len(self._prompts)))
        self.wire_ids = [self._encoded[index].wire_id if index in self._encoded
                         else scoped_request_id(tenant, next(prompt_ids)) for index in range(len(items))]
        self.caller_ids = [caller_request_id(wire_id) for wire_id in self.wire_ids]  # what the caller sees
        self._template_fields = AlignRequest(  # the fields every plain prompt shares, validated once
            prompt="x", tenant=tenant, request_id=scoped_request_id(tenant, "x"),
            traceparent=trace_fields.get("traceparent")).model_dump() if self._prompts else {}

    def __len__(self) -> int:
        return len(self.wire_ids)

    def encode(self, start: int, stop: int) -> list[WireRequest]:
        """Items ``start:stop`` as the submit script takes them; prompts stamped with the time now."""
        if not self._prompts:
            return [self._encoded[index] for index in range(start, min(stop, len(self.wire_ids)))]
        template = _PromptTemplate({**self._template_fields, "submitted_at_ms": now_ms()})
        fields = self._template_fields
        samples, model, method = fields["budget"] or self._default_budget, fields["model"], fields["method"]
        wires = []
        for index in range(start, min(stop, len(self.wire_ids))):
            prompt = self._prompts.get(index)
            if prompt is None:
                wires.append(self._encoded[index])
                continue
            wire_id = self.wire_ids[index]
            wires.append(WireRequest(wire_id, *template.wire_form(prompt, wire_id), samples, model, method, True))
        return wires

    def _wire_request(self, fields: dict[str, Any], payload: bytes, fingerprint: str) -> WireRequest:
        return WireRequest(fields["request_id"], payload, fingerprint, fields["budget"] or self._default_budget,
                           fields["model"], fields["method"])


def _is_text(prompt: str) -> bool:
    """Encodable as UTF-8 (no lone surrogates), as pydantic requires of a str."""
    if prompt.isascii():
        return True
    try:
        prompt.encode()
    except UnicodeEncodeError:
        return False
    return True


def _validated_dicts(items: list[dict], tenant: str | None, trace_fields: dict[str, str]) -> list[AlignRequest]:
    """Dicts of AlignRequest fields scoped to ``tenant`` and validated in one TypeAdapter call.

    The first invalid one raises BadRequest just as ``build_request`` names it.
    """
    if not items:
        return []
    new_ids = iter(new_request_ids(len(items)))
    prepared = []
    for item in items:
        request_id = item.get("request_id")
        if "prompt" not in item or "tenant" in item or (
                request_id is not None and (not isinstance(request_id, str) or SCOPE_SEPARATOR in request_id)):
            break  # build_request below says what is wrong
        fields = {**trace_fields, **item} if "traceparent" not in item else dict(item)
        fields["request_id"] = scoped_request_id(tenant, request_id if request_id is not None else next(new_ids))
        fields["tenant"] = tenant
        prepared.append(fields)
    else:
        try:
            return _REQUESTS.validate_python(prepared)
        except ValidationError:
            pass
    for item in items:
        fields = dict(item)
        if "prompt" not in fields:
            raise BadRequest("invalid request: prompt: field required")
        build_request(fields.pop("prompt"), tenant=tenant, **{**trace_fields, **fields})
    raise AssertionError("a dict failed validation in a batch but not alone")


def needs_route_check(request: WireRequest) -> bool:
    """Only a named model or aisp needs live workers' heartbeats; the default model with bon or uniform never does."""
    return request.model is not None or request.method == Method.AISP
