"""OpenTelemetry for every alignq process: one tracer per service, W3C ``traceparent`` on the wire.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set
and the optional ``tracing`` extra (opentelemetry-sdk, the OTLP/HTTP exporter) is installed. Spans
then go over OTLP/HTTP in batches (``OTEL_BSP_*`` tune it) and are flushed at exit. Otherwise
``service_tracer`` returns None, every hook returns at once, and nothing is imported: off and free.

The trace context a request carries is the W3C ``traceparent`` header value
(``00-<trace id>-<span id>-<flags>``) in ``AlignRequest.traceparent`` and ``Job.traceparent``; it is
not part of a request's idempotency fingerprint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["context_of", "is_tracing_configured", "ms_to_ns", "service_tracer", "traceparent_of"]

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_tracers: dict[str, Any] = {}  # service name -> Tracer (None: tracing off), one provider each


def is_tracing_configured() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def service_tracer(service_name: str) -> Any | None:
    """The tracer of one service (``alignq-gateway``, ``alignq-scheduler``, ``alignq-worker``), or None when off.

    A provider per service name, not the global one: ``alignq serve`` runs a scheduler and a gateway
    in one process, and each reports as itself.
    """
    if service_name in _tracers:
        return _tracers[service_name]
    tracer = None
    if is_tracing_configured():
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is not installed (%s): "
                           "pip install 'alignq[tracing]'; tracing stays off", e)
        else:
            provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            tracer = provider.get_tracer("alignq")
            logger.info("tracing on service=%s", service_name)
    _tracers[service_name] = tracer
    return tracer


def context_of(traceparent: str | None) -> Any | None:
    """The OpenTelemetry Context a ``traceparent`` names (None: none, or malformed: a new trace starts)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent_of(span: Any) -> str | None:
    """The ``traceparent`` value that makes ``span`` the parent of spans in other processes (W3C level 1)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def ms_to_ns(ms: float) -> int:
    """Epoch milliseconds (the wire's clock) as the epoch nanoseconds spans take."""
    return int(ms * 1_000_000)
