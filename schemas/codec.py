"""msgpack encoding of wire models, with size limits and typed errors. Never pickle."""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidMessage, MalformedMessage, MessageTooLarge

#: Bytes; a result with every sample of a large budget stays well below this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: The field name under which every stream entry carries its encoded model.
PAYLOAD_FIELD = b"m"

M = TypeVar("M", bound=BaseModel)


def encode(model: BaseModel) -> bytes:
    data = msgpack.packb(model.model_dump(mode="python", exclude_none=False), use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"{type(model).__name__} encodes to {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return data


def decode_raw(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    """Unpack to a plain map without validating (to salvage a request_id from a bad message)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes > limit {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage(f"not valid msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a msgpack map, got {type(obj).__name__}")
    return obj


def decode(model_type: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    obj = decode_raw(data, max_bytes=max_bytes)
    try:
        return model_type.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise InvalidMessage(f"invalid {model_type.__name__}: {where}: {first.get('msg')}") from e


def salvage_request_id(data: bytes) -> str | None:
    """Best effort: the request_id of a message that failed validation, so its client gets an error."""
    try:
        obj = decode_raw(data)
    except Exception:  # noqa: BLE001 - best effort on bytes that already failed: any failure means "no id"
        return None
    request_id = obj.get("request_id")
    if isinstance(request_id, str) and 0 < len(request_id) <= 128:
        import re

        if re.fullmatch(r"[A-Za-z0-9_.:\-]+", request_id):
            return request_id
    return None
