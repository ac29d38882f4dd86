"""The client's wire form: spliced prompt payloads equal the plain encoding, and fingerprints are canonical."""

from __future__ import annotations

import pytest

from middleware.client.building import build_request
from middleware.client.wire_form import WireBatch, new_request_ids, wire_form
from middleware.errors import BadRequest
from schemas import AlignRequest, ChatMessage, decode
from schemas.messages import MAX_PROMPT_CHARS
from schemas.tenancy import request_fingerprint

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("tenant", "trace_fields"), [(None, {}), ("acme", {"traceparent": TRACEPARENT})])
def test_prompt_fast_path_encodes_exactly_like_a_built_request(tenant: str | None, trace_fields: dict) -> None:
    prompts = ["Write a haiku.", "ünïcödé ✓ " * 40, "x" * 70_000]
    batch = WireBatch(prompts, tenant=tenant, default_budget=16, trace_fields=trace_fields)
    for prompt, wire in zip(prompts, batch.encode(0, len(prompts)), strict=True):
        request = decode(AlignRequest, wire.payload)
        assert (request.prompt, request.request_id, request.tenant) == (prompt, wire.wire_id, tenant)
        assert request.traceparent == trace_fields.get("traceparent")
        fields = request.model_dump()
        assert wire_form(fields)[1] == wire.fingerprint == request_fingerprint(fields)
        assert wire.samples == 16 and wire.wire_id.startswith(f"{tenant}/" if tenant else "")
        # the same request built field by field: same fingerprint (an idempotent retry through submit())
        caller_id = wire.wire_id.rpartition("/")[2]
        rebuilt = build_request(prompt, tenant=tenant, request_id=caller_id, **trace_fields)
        assert request_fingerprint(rebuilt.model_dump()) == wire.fingerprint


def test_fingerprint_ignores_id_time_trace_and_metadata_order() -> None:
    a = AlignRequest(prompt="p", request_id="a", metadata={"x": 1, "y": "2"}, submitted_at_ms=1)
    b = AlignRequest(prompt="p", request_id="b", metadata={"y": "2", "x": 1}, submitted_at_ms=2, traceparent=TRACEPARENT)
    assert request_fingerprint(a.model_dump()) == request_fingerprint(b.model_dump())
    assert request_fingerprint(a.model_dump()) == request_fingerprint(a.model_dump(mode="json"))
    for change in ({"prompt": "q"}, {"budget": 4}, {"metadata": {"x": 2, "y": "2"}}, {"method": "uniform"}):
        other = AlignRequest(**{**a.model_dump(), **change})
        assert request_fingerprint(other.model_dump()) != request_fingerprint(a.model_dump())


def test_typed_and_dict_items_keep_their_fields_and_errors_name_the_field() -> None:
    chat = [ChatMessage(role="user", content="hi")]
    items: list = [{"prompt": "d", "budget": 4, "request_id": "mine"}, AlignRequest(prompt="m", tenant="t", request_id="t/m"),
                   [{"role": "user", "content": "hi"}]]
    wires = WireBatch(items, tenant="t", default_budget=16, trace_fields={}).encode(0, 3)
    assert [w.wire_id for w in wires[:2]] == ["t/mine", "t/m"] and [w.samples for w in wires] == [4, 16, 16]
    assert decode(AlignRequest, wires[2].payload).prompt == chat
    for bad, where in (("   ", "prompt"), ("a\ud800b", "prompt"), ("x" * (MAX_PROMPT_CHARS + 1), "prompt"), ({"budget": 4}, "prompt"),
                       ({"prompt": "p", "budget": 0}, "budget"), ({"prompt": "p", "request_id": "a/b"}, "request_id")):
        with pytest.raises(BadRequest, match=where):
            WireBatch(["fine", bad], tenant="t", default_budget=16, trace_fields={})
    with pytest.raises(BadRequest, match="tenant"):
        WireBatch([AlignRequest(prompt="m", tenant="other", request_id="other/m")], tenant="t", default_budget=16,
                  trace_fields={})


def test_new_request_ids_are_distinct_hex() -> None:
    ids = new_request_ids(10_000)
    assert len(set(ids)) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
