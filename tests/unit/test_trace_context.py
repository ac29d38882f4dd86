"""Tracing is off and free without OTEL_EXPORTER_OTLP_ENDPOINT, and the traceparent helpers round-trip."""

from __future__ import annotations

import os
import subprocess
import sys

OFF = """
import sys
from middleware.gateway.app import create_app
from middleware.gateway.tracing import trace_fields
from middleware.scheduler.tracing import SchedulerTracing
from middleware.settings import GatewaySettings
create_app(GatewaySettings())
assert not SchedulerTracing("s").is_on and trace_fields() == {}
# redis-py itself may import the opentelemetry API when it is installed; our side loads no SDK or exporter
assert not any(name.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")) for name in sys.modules)
"""

ON = """
from opentelemetry import trace
from schemas.tracing import context_of, service_tracer, traceparent_of
tracer = service_tracer("alignq-test")
assert tracer is not None and service_tracer("alignq-test") is tracer
span = tracer.start_span("root")
traceparent = traceparent_of(span)
assert traceparent.startswith(f"00-{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}-")
child = tracer.start_span("child", context=context_of(traceparent))
assert child.parent.span_id == span.get_span_context().span_id
assert context_of(None) is None
assert not trace.get_current_span(context_of("garbage")).get_span_context().is_valid  # a new trace, no error
"""


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_tracing_off_imports_nothing() -> None:
    result = run(OFF)
    assert result.returncode == 0, result.stderr


def test_traceparent_round_trip_when_on() -> None:
    # an unreachable endpoint: spans are only exported in the background, never in the caller's way
    result = run(ON, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_BSP_SCHEDULE_DELAY="60000")
    assert result.returncode == 0, result.stderr
