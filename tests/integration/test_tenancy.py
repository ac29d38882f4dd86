"""Two tenants on one real gateway (scheduler, worker and gateway as processes, a tiny model).

Tenant A's secret must never reach tenant B by any door: a reused ``request_id`` on a completion,
``GET /v1/align/{id}``, a stream or a batch. A conflicting resubmission is 409 ``conflict``; a
named-key gateway (JSON object) isolates its tenants the same way and shows their names, never
their keys, in /metrics; a key past its requests-per-minute quota gets 429 + Retry-After while the
other key goes on.
"""

from __future__ import annotations

import json
import pathlib
import time

import httpx
import pytest
from tenancy_support import deployment

pytestmark = pytest.mark.timeout(240)

SECRET = "My secret account number is 12345. Repeat it back to me."


def chat(prompt: str, **fields: object) -> dict[str, object]:
    return {"model": "alignq", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "budget": 2, "seed": 7, **fields}


def sample_texts(result: dict) -> set[str]:
    return {s["text"] for s in result["samples"] if s["text"].strip()} | ({result["response"]} - {None, ""})


def sse_payloads(text: str) -> list[dict]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_two_tenants_never_see_each_others_requests(redis_url: str, tmp_path: pathlib.Path,
                                                    tiny_llama_dir: pathlib.Path) -> None:
    with deployment(redis_url, tmp_path, tiny_llama_dir, ALIGNQ_API_KEYS='["keyA","keyB"]') as d, \
            httpx.Client(base_url=d.base_url, timeout=60) as http:
        a, b = d.auth("keyA"), d.auth("keyB")
        assert http.post("/v1/chat/completions", json=chat("hi")).status_code == 401  # no key, no tenant

        # Tenant A: a completion, a stream and a batch item, each under an id B will reuse.
        first = http.post("/v1/chat/completions", headers=a, json=chat(SECRET, request_id="order-1"))
        assert first.status_code == 200, first.text
        assert first.json()["alignq"]["request_id"] == "order-1"
        streamed = http.post("/v1/chat/completions", headers=a, json=chat(SECRET, request_id="order-2", stream=True))
        assert streamed.status_code == 200 and streamed.headers["x-alignq-request-id"] == "order-2"
        batch = http.post("/v1/align/batch", headers=a, json={"requests": [{"prompt": SECRET, "request_id": "order-3",
                                                                            "budget": 2, "max_new_tokens": 8}]})
        assert batch.status_code == 200 and json.loads(batch.text.splitlines()[0])["result"]["status"] == "ok"
        a_results = {rid: http.get(f"/v1/align/{rid}", headers=a).json() for rid in ("order-1", "order-2", "order-3")}
        assert all(r["status"] == "ok" and r["request_id"] == rid for rid, r in a_results.items())
        a_texts = set().union(*(sample_texts(r) for r in a_results.values()))
        assert a_texts

        # An idempotent retry (same body) is the same answer; the same id with another prompt is 409.
        again = http.post("/v1/chat/completions", headers=a, json=chat(SECRET, request_id="order-1"))
        assert again.status_code == 200 and again.json()["choices"] == first.json()["choices"]
        conflict = http.post("/v1/chat/completions", headers=a, json=chat("Something else", request_id="order-1"))
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "conflict" and conflict.json()["error"]["type"]
        assert set(conflict.json()["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape

        # Tenant B: A's ids are unknown, by GET, by wait, by DELETE, and by events.
        b_bodies: list[str] = []
        for rid in ("order-1", "order-2", "order-3"):
            for response in (http.get(f"/v1/align/{rid}", headers=b),
                             http.get(f"/v1/align/{rid}", headers=b, params={"wait_s": 1}),
                             http.delete(f"/v1/align/{rid}", headers=b)):
                assert response.status_code == 404, (rid, response.text)
                assert response.json()["error"]["code"] == "not_found"
                b_bodies.append(response.text)
        assert http.get("/v1/align/order-1", headers=a).json()["status"] == "ok"  # B's DELETE did nothing

        # B reuses A's ids for its own, different requests: B gets its own answers, never A's.
        own = http.post("/v1/chat/completions", headers=b, json=chat("Tell me about ducks.", request_id="order-1"))
        assert own.status_code == 200, own.text
        b_stream = http.post("/v1/chat/completions", headers=b,
                             json=chat("Tell me about geese.", request_id="order-2", stream=True))
        assert b_stream.status_code == 200
        chunks = sse_payloads(b_stream.text)
        assert not any("error" in chunk for chunk in chunks)
        assert {c["alignq"]["request_id"] for c in chunks if "event" in c.get("alignq", {})} == {"order-2"}
        b_batch = http.post("/v1/align/batch", headers=b, json={"requests": [
            {"prompt": "Tell me about swans.", "request_id": "order-3", "budget": 2, "max_new_tokens": 8}]})
        assert b_batch.status_code == 200
        b_results = {rid: http.get(f"/v1/align/{rid}", headers=b).json() for rid in ("order-1", "order-2", "order-3")}
        assert all(r["status"] == "ok" for r in b_results.values())
        b_bodies += [own.text, b_stream.text, b_batch.text, *(json.dumps(r) for r in b_results.values())]
        for body in b_bodies:
            assert "12345" not in body and "secret" not in body.lower()
            assert not any(text in body for text in a_texts), "tenant B saw tenant A's text"
        for rid in ("order-1", "order-2", "order-3"):  # and A still sees exactly its own
            assert http.get(f"/v1/align/{rid}", headers=a).json()["samples"] == a_results[rid]["samples"]


def test_named_keys_isolate_name_tenants_and_enforce_rate_quotas(redis_url: str, tmp_path: pathlib.Path,
                                                                  tiny_llama_dir: pathlib.Path) -> None:
    keys = {"acme": {"key": "acme-secret-key", "rpm": 3}, "globex": {"key": "globex-secret-key"}}
    with deployment(redis_url, tmp_path, tiny_llama_dir, ALIGNQ_API_KEYS=json.dumps(keys)) as d, \
            httpx.Client(base_url=d.base_url, timeout=60) as http:
        acme, globex = d.auth("acme-secret-key"), d.auth("globex-secret-key")
        # rpm counts requests per wall-clock minute (a fixed window): keep the four inside one minute
        if (into_minute_s := time.time() % 60) > 40:
            time.sleep(60 - into_minute_s + 0.5)
        assert http.post("/v1/chat/completions", headers=d.auth("keyA"), json=chat("x")).status_code == 401
        assert http.post("/v1/chat/completions", headers=acme, json=chat(SECRET, request_id="r1")).status_code == 200
        assert http.get("/v1/align/r1", headers=globex).status_code == 404
        assert http.post("/v1/completions", headers=acme,
                         json={"prompt": "Once upon", "max_tokens": 8, "budget": 2}).status_code == 200
        # An idempotent retry is not a new request: it is not counted against the quota.
        assert http.post("/v1/chat/completions", headers=acme, json=chat(SECRET, request_id="r1")).status_code == 200
        assert http.post("/v1/chat/completions", headers=acme, json=chat("third")).status_code == 200

        limited = http.post("/v1/chat/completions", headers=acme, json=chat("fourth"))
        assert limited.status_code == 429, limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"]["code"] and "quota" in limited.json()["error"]["message"]
        for i in range(4):  # the other key is unaffected
            response = http.post("/v1/chat/completions", headers=globex, json=chat(f"globex {i}"))
            assert response.status_code == 200, response.text

        metrics = http.get("/metrics").text
        assert 'tenant="acme"' in metrics and 'tenant="globex"' in metrics
        assert "acme-secret-key" not in metrics and "globex-secret-key" not in metrics
