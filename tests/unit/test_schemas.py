"""The wire contract: round trips, and a typed error for everything malformed."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

import schemas
from schemas import (
    AlignRequest,
    AlignResult,
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    Event,
    EventKind,
    InvalidMessage,
    Job,
    JobKind,
    MalformedMessage,
    MessageTooLarge,
    ResultStatus,
    Sample,
    SampleSet,
    decode,
    encode,
)


def make_request(**overrides: object) -> AlignRequest:
    fields: dict[str, object] = {"prompt": "What is 2+2?", "budget": 8, "metadata": {"answer": "4"}}
    fields.update(overrides)
    return AlignRequest(**fields)


def make_sample(index: int = 0) -> Sample:
    return Sample(index=index, text=f"answer {index}", reward=0.5 + index, num_tokens=3)


ALL_MODELS = [
    make_request(),
    make_request(prompt=[ChatMessage(role="system", content="be nice"), ChatMessage(role="user", content="hi")]),
    Job(job_id="r1:explore", request_id="r1", scheduler_id="s1", kind=JobKind.EXPLORE, prompt="hi",
        num_samples=4, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7),
    SampleSet(job_id="r1:explore", request_id="r1", worker_id="w1", kind=JobKind.EXPLORE,
              samples=[make_sample(0), make_sample(1)], stats={"ess": [1.5, 2.0]}),
    AlignResult(request_id="r1", status=ResultStatus.OK, response="4", reward=1.0, samples=[make_sample()]),
    Event(request_id="r1", kind=EventKind.EXPLORED, data={"reward_mean": 0.1, "num_samples": 6}),
    ErrorInfo(code=ErrorCode.OVERLOADED, message="busy", retry_after_s=1.0),
]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: type(m).__name__)
def test_round_trip(model: object) -> None:
    assert decode(type(model), encode(model)) == model


def test_unknown_field_is_invalid() -> None:
    raw = make_request().model_dump(mode="python")
    raw["surprise"] = 1
    with pytest.raises(InvalidMessage, match="surprise"):
        decode(AlignRequest, msgpack.packb(raw))


def test_wrong_type_is_invalid() -> None:
    raw = make_request().model_dump(mode="python")
    raw["budget"] = "lots"
    with pytest.raises(InvalidMessage, match="budget"):
        decode(AlignRequest, msgpack.packb(raw))


def test_wrong_schema_version_is_invalid() -> None:
    raw = make_request().model_dump(mode="python")
    raw["schema_version"] = 99
    with pytest.raises(InvalidMessage, match="schema_version"):
        decode(AlignRequest, msgpack.packb(raw))


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x93\x01\x02\x03", b"not msgpack at all \xff\xfe"])
def test_garbage_is_malformed(garbage: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(AlignRequest, garbage)


def test_oversize_payload() -> None:
    with pytest.raises(MessageTooLarge):
        decode(AlignRequest, b"\x00" * 100, max_bytes=10)


@pytest.mark.parametrize("bad", [{"prompt": ""}, {"prompt": "   "}, {"budget": 0}, {"method": "beam"},
                                 {"request_id": "has space"}, {"prompt": []}])
def test_bad_requests_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_request(**bad)


def test_salvage_request_id_from_invalid_message() -> None:
    raw = make_request(request_id="abc-1").model_dump(mode="python")
    raw["budget"] = -5
    assert schemas.salvage_request_id(msgpack.packb(raw)) == "abc-1"
    assert schemas.salvage_request_id(b"\xc1") is None


def test_keys_are_namespaced() -> None:
    keys = schemas.Keys()
    assert keys.requests == "alignq:requests"
    assert keys.samples("s1") == "alignq:samples:s1"
    assert schemas.Keys("t").result("r") == "t:result:r"


def test_public_api_is_pinned() -> None:
    assert "encode" in schemas.__all__ and "AlignRequest" in schemas.__all__
    assert all(hasattr(schemas, name) for name in schemas.__all__)


def test_client_side_does_not_import_torch() -> None:
    code = "import sys, schemas, middleware, middleware.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)
