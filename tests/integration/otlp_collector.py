"""A real OTLP/HTTP trace collector for tests: ``POST /v1/traces`` protobuf in, decoded spans kept.

    with OtlpCollector() as collector:      # serves on a free loopback port, in a thread
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        ...
        collector.spans                     # CollectedSpan per span received

The HTTP side is the bench's receiver (``middleware.bench.tracing.OtlpReceiver``); this module adds only
the protobuf decoding the tests assert on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from middleware.bench.tracing import OtlpReceiver


@dataclass(frozen=True, slots=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id)


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


def decode_export(body: bytes) -> list[CollectedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(CollectedSpan(
                    service=str(resource.get("service.name", "")), name=span.name, trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in span.attributes},
                    links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links)))
    return spans


class OtlpCollector(OtlpReceiver):
    """Keeps every span it receives, decoded (``spans``; ``snapshot()`` for a copy while exports arrive)."""

    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        super().__init__(on_export=lambda body: self.spans.extend(decode_export(body)))

    def snapshot(self) -> list[CollectedSpan]:
        with self.lock:
            return list(self.spans)
