"""The scheduler's spans: one request's life in this process, read off the plans the core returns.

    alignq.request                     (child of the request's traceparent: the gateway's span)
    ├── queue      submitted -> taken by this scheduler
    ├── window     taken -> its window launched (explore jobs issued)
    ├── explore    explore jobs issued -> the window's explore rewards all in
    ├── allocate   -> stage 2 planned (exploit jobs issued)
    ├── exploit    -> the last sample in      (``uniform`` / ``aisp``: one span for the single job)
    └── answer     the answer published (exactly once)

Jobs are issued with the ``traceparent`` of their stage span, so a worker's job span is its child.
``observe(plan)`` runs before a plan is applied and ``answered(plan)`` after; both return at once when
tracing is off (``schemas.tracing``). Requests released without an answer here (cancelled, lease lost)
end their spans with ``alignq.outcome`` = ``released``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas import EventKind, JobKind
from schemas.tracing import context_of, ms_to_ns, service_tracer, traceparent_of

__all__ = ["SchedulerTracing"]

SERVICE_NAME = "alignq-scheduler"


@dataclass(slots=True)
class _Spans:
    request: Any  # the request's span in this process
    stage: Any  # the open stage span (window, explore, allocate, exploit...)
    stage_name: str
    stage_traceparent: str | None = None  # of the open stage span, computed once for all its jobs


class SchedulerTracing:
    def __init__(self, scheduler_id: str) -> None:
        self.tracer: Any = service_tracer(SERVICE_NAME)  # None: tracing off (every hook returns at once)
        self.scheduler_id = scheduler_id
        self._open: dict[str, _Spans] = {}

    @property
    def is_on(self) -> bool:
        return self.tracer is not None

    def observe(self, plan: Any, requests: Mapping[str, Any]) -> None:
        """Open and close stage spans for the plan's events and jobs; stamp jobs with their stage span.

        ``requests``: the core's request states (request_id -> state with ``.request``).
        """
        if self.tracer is None:
            return
        now_ns = time.time_ns()
        for event in plan.events:
            if event.kind == EventKind.QUEUED and event.request_id not in self._open:
                state = requests.get(event.request_id)
                if state is not None:
                    self._start(state.request, ms_to_ns(event.at_ms))
            elif event.kind == EventKind.EXPLORED:
                self._next_stage(event.request_id, "allocate", ms_to_ns(event.at_ms))
        for index, job in enumerate(plan.jobs):
            spans = self._open.get(job.request_id)
            if spans is None:
                continue
            stage = job.kind.value
            if spans.stage_name != stage:
                if job.kind == JobKind.EXPLOIT and spans.stage_name == "allocate":
                    self._next_stage(job.request_id, stage, now_ns)
                else:
                    self._next_stage(job.request_id, stage, ms_to_ns(job.created_at_ms))
            if spans.stage_traceparent is None:
                spans.stage_traceparent = traceparent_of(spans.stage)
            plan.jobs[index] = job.model_copy(update={"traceparent": spans.stage_traceparent})
        for event in plan.events:  # a window that allocated nothing: no exploit jobs, straight to the answer
            if event.kind == EventKind.ALLOCATED and not event.data.get("num_samples"):
                self._next_stage(event.request_id, "exploit", now_ns)
        for answer in plan.answers:
            self._next_stage(answer.result.request_id, "answer", now_ns)

    def answered(self, plan: Any, requests: Mapping[str, Any]) -> None:
        """After the plan's answers are published: end their spans; end the spans of released requests."""
        if self.tracer is None or not self._open:
            return
        now_ns = time.time_ns()
        for answer in plan.answers:
            result = answer.result
            self._end(result.request_id, now_ns, status=result.status.value, samples_used=result.samples_used)
        if plan.acks or plan.answers:
            for request_id in [rid for rid in self._open if rid not in requests]:
                self._end(request_id, now_ns, outcome="released")

    # -- spans ------------------------------------------------------------------------------------
    def _start(self, request: Any, taken_ns: int) -> None:
        parent = context_of(request.traceparent)
        attributes = {"alignq.request_id": request.request_id, "alignq.tenant": request.tenant or "shared",
                      "alignq.method": request.method.value, "alignq.priority": request.priority,
                      "alignq.budget": request.budget or 0, "alignq.scheduler_id": self.scheduler_id}
        submitted_ns = min(ms_to_ns(request.submitted_at_ms), taken_ns)
        span = self.tracer.start_span("alignq.request", context=parent, start_time=submitted_ns,
                                      attributes=attributes)
        from opentelemetry import trace

        child_context = trace.set_span_in_context(span)
        queue = self.tracer.start_span("queue", context=child_context, start_time=submitted_ns)
        queue.end(end_time=taken_ns)
        window = self.tracer.start_span("window", context=child_context, start_time=taken_ns)
        self._open[request.request_id] = _Spans(span, window, "window")

    def _next_stage(self, request_id: str, name: str, at_ns: int) -> None:
        spans = self._open.get(request_id)
        if spans is None or spans.stage_name == name:
            return
        from opentelemetry import trace

        at_ns = max(at_ns, spans.stage.start_time or 0)
        spans.stage.end(end_time=at_ns)
        spans.stage = self.tracer.start_span(name, context=trace.set_span_in_context(spans.request),
                                             start_time=at_ns)
        spans.stage_name = name
        spans.stage_traceparent = None

    def _end(self, request_id: str, at_ns: int, **attributes: Any) -> None:
        spans = self._open.pop(request_id, None)
        if spans is None:
            return
        at_ns = max(at_ns, spans.stage.start_time or 0)
        spans.stage.end(end_time=at_ns)
        spans.request.set_attributes({f"alignq.{key}": value for key, value in attributes.items()})
        spans.request.end(end_time=at_ns)
