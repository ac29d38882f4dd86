"""The worker's spans, written when replies are published (``schemas.tracing``; off and free by default).

    job        child of the job's traceparent (the scheduler's explore/exploit span): issued -> published
    ├── generate   the job's generation time (SampleSet.generate_s), ending where scoring starts
    └── score      its reward scoring time (SampleSet.score_s)
    batch      one per publish (the jobs a batch finished together): its own trace, linked to each job span

A batch serves many requests, so it cannot be the child of one: it links to all of them instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from schemas import Job, SampleSet
from schemas.tracing import context_of, ms_to_ns, service_tracer

__all__ = ["WorkerTracing"]

SERVICE_NAME = "alignq-worker"


class WorkerTracing:
    def __init__(self, worker_id: str) -> None:
        self.tracer = service_tracer(SERVICE_NAME)
        self.worker_id = worker_id

    def record_published(self, replies: Sequence[tuple[str, Job, SampleSet]]) -> None:
        """Spans of the jobs just published and of the batch that ran them."""
        if self.tracer is None or not replies:
            return
        from opentelemetry import trace

        end_ns = time.time_ns()
        links = []
        batch_start_ns = end_ns
        for _, job, reply in replies:
            work_ns = int((reply.generate_s + reply.score_s) * 1e9)
            start_ns = min(ms_to_ns(job.created_at_ms), end_ns - work_ns)
            job_span = self.tracer.start_span(
                "job", context=context_of(job.traceparent), start_time=start_ns,
                attributes={"alignq.job_id": job.job_id, "alignq.request_id": job.request_id,
                            "alignq.kind": job.kind.value, "alignq.num_samples": job.num_samples,
                            "alignq.samples_returned": len(reply.samples), "alignq.worker_id": self.worker_id,
                            "alignq.error": reply.error.code.value if reply.error else ""})
            inside = trace.set_span_in_context(job_span)
            score_start_ns = end_ns - int(reply.score_s * 1e9)
            self.tracer.start_span("generate", context=inside, start_time=end_ns - work_ns).end(end_time=score_start_ns)
            self.tracer.start_span("score", context=inside, start_time=score_start_ns).end(end_time=end_ns)
            job_span.end(end_time=end_ns)
            links.append(trace.Link(job_span.get_span_context(), {"alignq.job_id": job.job_id}))
            batch_start_ns = min(batch_start_ns, end_ns - work_ns)
        batch = self.tracer.start_span("batch", context=trace.set_span_in_context(trace.INVALID_SPAN),
                                       start_time=batch_start_ns, links=links,
                                       attributes={"alignq.num_jobs": len(replies), "alignq.worker_id": self.worker_id})
        batch.end(end_time=end_ns)
