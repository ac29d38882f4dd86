"""Tenants on the wire: request ids scoped by tenant, API keys turned into tenant names, fingerprints.

A request's wire id is ``"{tenant}/{id}"`` (``id`` alone for the shared tenant). Every key derives from
the wire id, so two tenants' ``order-1`` are two requests, and a caller who does not know a tenant's
name cannot name its keys. Callers see their own ids only: the SDK scopes on the way in and unscopes
on the way out.

The fingerprint of a request is what an idempotent retry must repeat: everything but the id, the
submit time and the trace context. The same id with another fingerprint is a conflict (409). It hashes
canonical msgpack (fields in declaration order, metadata sorted by key), the encoding the request goes on
the wire with, so the client packs each request's fields once for both (``middleware.client.wire_form``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack

__all__ = ["NOT_FINGERPRINTED", "SCOPE_SEPARATOR", "caller_request_id", "fingerprint_fields", "hash_fingerprint",
           "key_tenant", "request_fingerprint", "scoped_request_id"]

SCOPE_SEPARATOR = "/"
#: Fields a retry may change without being a different request.
NOT_FINGERPRINTED = frozenset({"request_id", "submitted_at_ms", "traceparent", "schema_version"})


def scoped_request_id(tenant: str | None, request_id: str) -> str:
    """The wire id of a caller's ``request_id`` in ``tenant``'s scope."""
    return request_id if tenant is None else f"{tenant}{SCOPE_SEPARATOR}{request_id}"


def caller_request_id(wire_id: str) -> str:
    """The id the caller chose: the wire id without its tenant scope."""
    return wire_id.rpartition(SCOPE_SEPARATOR)[2]


def key_tenant(api_key: str, *, secret: str) -> str:
    """The tenant of an unnamed API key: a keyed hash (HMAC-SHA256), so Redis never holds the key."""
    return "key-" + hmac.new(secret.encode(), api_key.encode(), hashlib.sha256).hexdigest()[:16]


def fingerprint_fields(request_fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a fingerprint covers, in ``request_fields``' (declaration) order, metadata sorted by key."""
    kept = {k: v for k, v in request_fields.items() if k not in NOT_FINGERPRINTED}
    metadata = kept.get("metadata")
    if metadata and len(metadata) > 1:  # the caller's insertion order must not make a retry a conflict
        kept["metadata"] = dict(sorted(metadata.items()))
    return kept


def hash_fingerprint(packed_fields: bytes) -> str:
    """The fingerprint of ``msgpack.packb(fingerprint_fields(...), use_bin_type=True)``."""
    return hashlib.sha256(packed_fields).hexdigest()[:32]


def request_fingerprint(request_fields: dict[str, Any]) -> str:
    """SHA-256 of a request's canonical msgpack (``model_dump()``, declaration order), id and timing left out."""
    return hash_fingerprint(msgpack.packb(fingerprint_fields(request_fields), use_bin_type=True))
