"""Tenants on the wire: request ids scoped by tenant, API keys turned into tenant names, fingerprints.

A request's wire id is ``"{tenant}/{id}"`` (``id`` alone for the shared tenant). Every key derives from
the wire id, so two tenants' ``order-1`` are two requests, and a caller who does not know a tenant's
name cannot name its keys. Callers see their own ids only: the SDK scopes on the way in and unscopes
on the way out.

The fingerprint of a request is what an idempotent retry must repeat: everything but the id, the
submit time and the trace context. The same id with another fingerprint is a conflict (409).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["SCOPE_SEPARATOR", "caller_request_id", "key_tenant", "request_fingerprint", "scoped_request_id"]

SCOPE_SEPARATOR = "/"
#: Fields a retry may change without being a different request.
_NOT_FINGERPRINTED = frozenset({"request_id", "submitted_at_ms", "traceparent", "schema_version"})


def scoped_request_id(tenant: str | None, request_id: str) -> str:
    """The wire id of a caller's ``request_id`` in ``tenant``'s scope."""
    return request_id if tenant is None else f"{tenant}{SCOPE_SEPARATOR}{request_id}"


def caller_request_id(wire_id: str) -> str:
    """The id the caller chose: the wire id without its tenant scope."""
    return wire_id.rpartition(SCOPE_SEPARATOR)[2]


def key_tenant(api_key: str, *, secret: str) -> str:
    """The tenant of an unnamed API key: a keyed hash (HMAC-SHA256), so Redis never holds the key."""
    return "key-" + hmac.new(secret.encode(), api_key.encode(), hashlib.sha256).hexdigest()[:16]


def request_fingerprint(request_fields: dict[str, Any]) -> str:
    """SHA-256 of a request's canonical JSON (``model_dump(mode="json")``), id and timing left out."""
    kept = {k: v for k, v in request_fields.items() if k not in _NOT_FINGERPRINTED}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
