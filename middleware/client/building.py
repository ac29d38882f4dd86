"""Building requests on the client side: validation in a tenant's scope, encoding, and the caller's trace.

No connection is needed: ``build_request`` is what ``alignq batch`` uses to check a whole file before
anything starts. Every error is ``BadRequest`` with the first invalid field named.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import ValidationError

from middleware.errors import BadRequest
from schemas import AlignRequest, SchemaError, encode, new_request_id
from schemas.tenancy import scoped_request_id
from schemas.tracing import traceparent_of

__all__ = ["build_request", "caller_trace_fields", "checked_tenant", "encode_request"]


def checked_tenant(tenant: str | None) -> str | None:
    """``tenant`` if it is a valid tenant name (or None); BadRequest otherwise."""
    if tenant is None:
        return None
    try:
        AlignRequest(request_id=f"{tenant}/x", tenant=tenant, prompt="x")
    except ValidationError as e:
        raise BadRequest(f"invalid tenant {tenant!r}: letters, digits and _ . - only (1-64)") from e
    return tenant


def build_request(prompt: Any, *, tenant: str | None = None, **fields: Any) -> AlignRequest:
    """Validate ``prompt`` and AlignRequest ``fields`` in ``tenant``'s scope, with no connection; BadRequest if invalid."""
    if "tenant" in fields:
        raise BadRequest("invalid request: tenant: set by the client (Client(tenant=...)), not per request")
    request_id = fields.pop("request_id", None)
    if request_id is not None and (not isinstance(request_id, str) or "/" in request_id):
        raise BadRequest("invalid request: request_id: letters, digits and _ . : - only (1-128)")
    try:
        if request_id is not None:
            fields["request_id"] = scoped_request_id(tenant, request_id)
        elif tenant is not None:
            fields["request_id"] = scoped_request_id(tenant, new_request_id())
        return AlignRequest(prompt=prompt, tenant=tenant, **fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        raise BadRequest(f"invalid request: {where}: {first.get('msg')}") from e
    except TypeError as e:  # e.g. prompt passed twice
        raise BadRequest(f"invalid request: {e}") from e


def encode_request(request: AlignRequest) -> bytes:
    """The request's msgpack bytes, as they go on the stream; BadRequest when too large."""
    try:
        return encode(request)
    except SchemaError as e:
        raise BadRequest(f"invalid request: {e}") from e


def caller_trace_fields() -> dict[str, str]:
    """``{"traceparent": ...}`` of the caller's active OpenTelemetry span, so a request's trace is its child.

    ``{}`` with no valid span. OpenTelemetry is never imported here: a caller with an active span has
    imported it already, and everyone else pays one dict lookup.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return {}
    traceparent = traceparent_of(span)
    return {"traceparent": traceparent} if traceparent else {}
