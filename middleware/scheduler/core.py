"""The scheduler's pure core: windows, stages, per-request sample sets and the plans they produce.

No I/O, no clock, no event loop. The async shell (``middleware.scheduler.service``) feeds it what happened —
a request taken from the stream (``admit``), time passing (``tick``), a worker's reply
(``on_sample_set``), samples found kept in Redis (``on_kept_samples``) — and executes the ``Plan``
each call returns: jobs to XADD, progress events to XADD, answers to publish exactly once.

A ``bon`` request lives in a window: stage 1 explores d_i = num_explore_samples(B_i, f) samples;
when every live prompt of the window has its stage-1 samples, ``plan_window`` shares out the
window's remaining Σ(B_i − d_i) samples; a prompt allocated nothing is answered at once, the others
after their stage-2 job. ``uniform`` and ``aisp`` requests skip windows: one job each, answered when
it returns. Sample indices are unique within a request (job offset + position), so replies are
deduplicated by index and a reclaimed request reuses what is kept instead of regenerating it.

Boundary: this module owns *when* things happen (admission, windows, stages, deadlines). What a job or an
answer contains is ``middleware.scheduler.results``; how a window's samples are shared (explore fraction,
prior, allocation) is ``middleware.scheduler.window_plan``; the data it fills is ``middleware.scheduler.plans``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from middleware.scheduler.allocation import num_explore_samples
from middleware.scheduler.deadline import RoundTimer
from middleware.scheduler.limits import check_limits
from middleware.scheduler.plans import (
    FINAL_STAGES,
    Answer,
    CoreConfig,
    Grant,
    JobRef,
    Plan,
    RequestState,
    Stage,
    Window,
    WindowSummary,
)
from middleware.scheduler.prior import PROMPT_EMBEDDING_STAT, SpreadModel
from middleware.scheduler.results import (
    build_job,
    error_result,
    final_result,
    make_job_id,
    prompt_text,
    rank_samples,
    request_error_result,
    request_seed,
)
from middleware.scheduler.window_plan import allocate_window, explore_fraction, sample_tokens
from schemas import (
    AlignRequest,
    ErrorCode,
    ErrorInfo,
    Event,
    EventKind,
    Job,
    JobKind,
    Method,
    Sample,
    SampleSet,
)
from schemas.keys import Lane

# Re-exported: callers import the plan types and result helpers from the core.
__all__ = ["Answer", "CoreConfig", "Plan", "SchedulerCore", "error_result", "make_job_id", "rank_samples",
           "request_seed"]

logger = logging.getLogger(__name__)


class SchedulerCore:
    """Windows and stage bookkeeping of one scheduler. Every method is synchronous and does no I/O."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.requests: dict[str, RequestState] = {}
        self.windows: dict[int, Window] = {}
        self.forming: Window | None = None
        self._next_window_id = 0
        self.spread = SpreadModel()  # synced with Redis by the service when config.spread_prior
        self.round_timer = RoundTimer()

    # -- queries ----------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self.requests)

    def entry_ids(self) -> list[str]:
        """Request entries this scheduler holds (to keep their lease)."""
        return [s.entry_id for s in self.requests.values() if s.entry_id is not None]

    def stale_jobs(self, now_ms: int, older_than_ms: int) -> dict[str, list[str]]:
        """request_id -> job ids outstanding longer than ``older_than_ms`` (check their kept samples)."""
        stale: dict[str, list[str]] = {}
        for state in self.requests.values():
            job_ids = [job_id for job_id, ref in state.jobs.items() if now_ms - ref.issued_at_ms >= older_than_ms]
            if job_ids:
                stale[state.request_id] = job_ids
        return stale

    def validate(self, request: AlignRequest) -> ErrorInfo | None:
        """Deployment limits beyond the wire format's (the schema already checked types and ranges)."""
        return check_limits(request, max_budget=self.config.max_budget, max_prompt_chars=self.config.max_prompt_chars)

    # -- inputs -----------------------------------------------------------------------------------
    def admit(self, request: AlignRequest, *, entry_id: str | None, now_ms: int,
              kept: Iterable[Sample] = (), grant: Grant | None = None) -> Plan:
        """Take a request from the stream. ``kept``: samples a previous owner already had scored;
        ``grant``: what its window's stage 2 granted it then (a ``bon`` request finishes on it, windowless)."""
        plan = Plan()
        rid = request.request_id
        if rid in self.requests:  # redelivered while we hold it: one owner, ack the copy
            if entry_id is not None and entry_id != self.requests[rid].entry_id:
                plan.acks.append(entry_id)
            return plan
        error = self.validate(request)
        if error is not None:
            result = request_error_result(request, error, self.config.scheduler_id, now_ms)
            plan.answers.append(Answer(result, entry_id))
            return plan
        state = RequestState(request=request, entry_id=entry_id, budget=request.budget or self.config.default_budget,
                             seed=request_seed(request), taken_at_ms=now_ms)
        for sample in kept:
            state.samples.setdefault(sample.index, sample)
        self.requests[rid] = state
        plan.events.append(Event(request_id=rid, kind=EventKind.QUEUED, at_ms=now_ms,
                                 data={"scheduler_id": self.config.scheduler_id, "num_kept": len(state.samples)}))
        deadline_at_ms = request.deadline_at_ms
        if deadline_at_ms is not None and deadline_at_ms <= now_ms:
            return plan.extend(self._finish_past_deadline(state, now_ms))
        if request.method == Method.BON and grant is not None:
            return plan.extend(self._resume_granted(state, grant, now_ms))
        if request.method == Method.BON:
            if self._forming_lane() not in (None, Lane.of(request.priority)):
                # One priority lane per window: stage 2 waits for the whole window's exploration,
                # so a high-priority request must not share a window with a backlog of low ones.
                plan.extend(self._launch_forming(now_ms))
            if self.forming is None:
                self.forming = self._open_window(now_ms)
            self.forming.request_ids.append(rid)
            state.window_id = self.forming.window_id
            if len(self.forming.request_ids) >= self.config.max_window:
                plan.extend(self._launch_forming(now_ms))
        else:
            state.stage = Stage.RUNNING
            kind = JobKind.AISP if request.method == Method.AISP else JobKind.UNIFORM
            plan.jobs.extend(self._jobs_for(state, kind, 0, state.budget, now_ms))
            if not state.jobs:  # everything was kept
                plan.extend(self._answer(state, now_ms))
        return plan

    def _resume_granted(self, state: RequestState, grant: Grant, now_ms: int) -> Plan:
        """A request whose window planned stage 2 before it was dropped (failover, lost lease): the rest of
        its grant, from where its kept samples end (the same exploit job, when none of it was kept)."""
        state.stage = Stage.EXPLOITING
        state.num_explore = grant.num_explore
        state.num_exploit = max(0, grant.total - len(state.samples))
        offset = max(state.samples) + 1 if state.samples else 0
        plan = Plan(jobs=self._jobs_for(state, JobKind.EXPLOIT, offset, state.num_exploit, now_ms))
        if not state.jobs:
            plan.extend(self._answer(state, now_ms))
        return plan

    def tick(self, now_ms: int, *, close_forming: bool = False) -> Plan:
        """Close the forming window when due (or now, on shutdown); answer requests past their deadline."""
        plan = Plan()
        if self.forming is not None and (close_forming or now_ms - self.forming.opened_at_ms >= self.config.window_ms):
            plan.extend(self._launch_forming(now_ms))
        for state in list(self.requests.values()):
            deadline_at_ms = state.request.deadline_at_ms
            if deadline_at_ms is not None and deadline_at_ms <= now_ms:
                plan.extend(self._finish_past_deadline(state, now_ms))
        return plan

    def on_sample_set(self, sample_set: SampleSet, now_ms: int) -> Plan:
        """A worker's reply. Unknown requests and already-counted jobs are ignored (late or duplicate)."""
        state = self.requests.get(sample_set.request_id)
        if state is None or sample_set.job_id not in state.jobs:
            return Plan()
        del state.jobs[sample_set.job_id]
        for sample in sample_set.samples:
            state.samples.setdefault(sample.index, sample)
        state.generate_s += sample_set.generate_s
        state.score_s += sample_set.score_s
        for name, value in sample_set.stats.items():
            if name == PROMPT_EMBEDDING_STAT:
                state.prompt_embedding = value if isinstance(value, list) else None
                continue
            state.stats[name] = value
        if sample_set.error is not None:
            state.errors.append(sample_set.error)
        return self._after_progress(state, now_ms)

    def on_kept_samples(self, request_id: str, samples: Iterable[Sample], now_ms: int) -> Plan:
        """Samples found in keys.kept_samples: complete every outstanding job they fully cover.

        Recovers a job whose reply went elsewhere (e.g. to a dead scheduler's stream after a reclaim).
        """
        state = self.requests.get(request_id)
        if state is None:
            return Plan()
        for sample in samples:
            state.samples.setdefault(sample.index, sample)
        covered = [job_id for job_id, ref in state.jobs.items() if self._is_covered(state, ref)]
        if not covered:
            return Plan()
        for job_id in covered:
            del state.jobs[job_id]
        return self._after_progress(state, now_ms)

    def release(self, request_id: str, now_ms: int) -> Plan:
        """Give a request up unanswered (its lease was lost); its window may now be ready for stage 2."""
        state = self.drop(request_id)
        window = self.windows.get(state.window_id) if state is not None and state.window_id is not None else None
        return self._plan_if_explored(window, now_ms) if window is not None else Plan()

    def cancel(self, request_id: str, now_ms: int) -> Plan:
        """The request was answered ``cancelled`` elsewhere: forget it, ack its entry, reallocate nothing to it.

        Its window's stage 2 no longer waits for it, and allocates only among the others.
        """
        entry_id = self.requests[request_id].entry_id if request_id in self.requests else None
        plan = self.release(request_id, now_ms)
        if entry_id is not None:
            plan.acks.append(entry_id)
        return plan

    def drop(self, request_id: str) -> RequestState | None:
        """Forget a request without answering it (its entry stays un-acked for another scheduler)."""
        state = self.requests.pop(request_id, None)
        if state is not None and state.window_id is not None:
            window = self.windows.get(state.window_id) or (
                self.forming if self.forming is not None and self.forming.window_id == state.window_id else None)
            if window is not None and request_id in window.request_ids:
                window.request_ids.remove(request_id)
                if not window.request_ids and window is not self.forming:
                    self.windows.pop(window.window_id, None)
        return state

    # -- windows ----------------------------------------------------------------------------------
    def _forming_lane(self) -> Lane | None:
        """The priority lane of the forming window's requests (None: no window, or it emptied)."""
        if self.forming is None or not self.forming.request_ids:
            return None
        return Lane.of(self.requests[self.forming.request_ids[0]].request.priority)

    def _open_window(self, now_ms: int) -> Window:
        self._next_window_id += 1
        return Window(window_id=self._next_window_id, opened_at_ms=now_ms)

    def _launch_forming(self, now_ms: int) -> Plan:
        """Stage 1 for the forming window: explore jobs, highest priority first."""
        window, self.forming = self.forming, None
        plan = Plan()
        if window is None or not window.request_ids:
            return plan
        self.windows[window.window_id] = window
        window.launched_at_ms = now_ms
        states = sorted((self.requests[rid] for rid in window.request_ids), key=lambda s: -s.request.priority)
        fraction = explore_fraction(self.config, self.spread, self.round_timer, states, now_ms)
        for state in states:
            state.stage = Stage.EXPLORING
            state.num_explore = num_explore_samples(state.budget, fraction)
            plan.jobs.extend(self._jobs_for(state, JobKind.EXPLORE, 0, state.num_explore, now_ms))
        return plan.extend(self._plan_if_explored(window, now_ms))

    def _plan_if_explored(self, window: Window, now_ms: int) -> Plan:
        """Stage 2 once every live prompt of the window has its stage-1 replies."""
        plan = Plan()
        if window.is_planned:
            return plan
        states = [self.requests[rid] for rid in window.request_ids]
        if any(state.jobs for state in states):
            return plan
        window.is_planned = True
        if window.launched_at_ms is not None and states:
            per_prompt = max(s.num_explore * sample_tokens(s, self.config) for s in states)  # sample-tokens, the largest
            self.round_timer.record(per_prompt, now_ms - window.launched_at_ms)
        explore_rewards: dict[str, list[float]] = {}
        budgets: dict[str, int] = {}
        for state in states:
            rewards = state.finite_rewards
            if not rewards:  # nothing usable to estimate from or to answer with
                plan.extend(self._answer(state, now_ms))
                continue
            state.stage1_best_reward = max(rewards)
            explore_rewards[state.request_id] = rewards
            # Samples with a NaN reward were spent too: they count against the budget.
            budgets[state.request_id] = state.budget - (len(state.samples) - len(rewards))
            mean = sum(rewards) / len(rewards)
            std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
            plan.events.append(Event(request_id=state.request_id, kind=EventKind.EXPLORED, at_ms=now_ms,
                                     data={"reward_mean": mean, "reward_std": std, "num_samples": len(rewards)}))
        if not explore_rewards:
            return plan
        allocation = allocate_window(self.config, self.spread, window.window_id, self.requests, explore_rewards, budgets)
        plan.windows.append(WindowSummary(len(explore_rewards), explore_rewards, allocation))
        for rid, num_samples in allocation.items():
            state = self.requests[rid]
            state.num_exploit = num_samples
            state.stage = Stage.EXPLOITING
            plan.events.append(Event(request_id=rid, kind=EventKind.ALLOCATED, at_ms=now_ms,
                                     data={"num_samples": num_samples}))
        for rid in sorted(allocation, key=lambda rid: -self.requests[rid].request.priority):
            state = self.requests[rid]
            if state.num_exploit > 0:
                offset = max(state.samples) + 1  # after everything explored (or kept)
                plan.jobs.extend(self._jobs_for(state, JobKind.EXPLOIT, offset, state.num_exploit, now_ms))
                if state.jobs:  # kept with the samples: a re-read request finishes on it (Grant)
                    plan.grants[rid] = Grant(state.num_explore, len(state.samples) + state.num_exploit)
            if not state.jobs:  # allocated nothing, or all kept: easy prompts do not wait
                plan.extend(self._answer(state, now_ms))
        return plan

    # -- jobs and answers ---------------------------------------------------------------------------
    def _jobs_for(self, state: RequestState, kind: JobKind, offset: int, num_samples: int, now_ms: int) -> list[Job]:
        """One job for samples [offset, offset + num_samples), unless kept samples already cover it."""
        ref = JobRef(kind=kind, sample_offset=offset, num_samples=num_samples, issued_at_ms=now_ms)
        if num_samples <= 0 or self._is_covered(state, ref):
            return []
        job = build_job(state, self.config, kind, offset, num_samples, now_ms)
        state.jobs[job.job_id] = ref
        return [job]

    @staticmethod
    def _is_covered(state: RequestState, ref: JobRef) -> bool:
        if ref.kind == JobKind.AISP:  # n·k <= budget rollouts, written in one transaction: any means all
            return any(ref.sample_offset <= i < ref.sample_offset + ref.num_samples for i in state.samples)
        return all(i in state.samples for i in range(ref.sample_offset, ref.sample_offset + ref.num_samples))

    def _after_progress(self, state: RequestState, now_ms: int) -> Plan:
        if state.stage == Stage.EXPLORING and state.window_id is not None:
            window = self.windows.get(state.window_id)
            return self._plan_if_explored(window, now_ms) if window is not None else Plan()
        if state.stage in FINAL_STAGES and not state.jobs:
            return self._answer(state, now_ms)
        if state.stage == Stage.RUNNING:
            return Plan(events=[Event(request_id=state.request_id, kind=EventKind.PROGRESS, at_ms=now_ms,
                                      data={"num_samples": len(state.samples)})])
        return Plan()

    def _finish_past_deadline(self, state: RequestState, now_ms: int) -> Plan:
        error = ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED,
                          message=f"deadline of {state.request.deadline_ms} ms passed before any sample was scored")
        plan = self._answer(state, now_ms, partial_error=error)
        window = self.windows.get(state.window_id) if state.window_id is not None else None
        if window is not None:  # the window may have waited only for this request
            plan.extend(self._plan_if_explored(window, now_ms))
        return plan

    def _answer(self, state: RequestState, now_ms: int, *, partial_error: ErrorInfo | None = None) -> Plan:
        """Final result for ``state``; forgets the request. ``partial_error``: answered at its deadline."""
        self.drop(state.request_id)
        if self.config.spread_prior and state.request.method == Method.BON:
            self.spread.observe(prompt_text(state.request.prompt), state.finite_rewards, state.prompt_embedding,
                                model=state.request.model)
        result = final_result(state, self.config.scheduler_id, now_ms, partial_error=partial_error)
        return Plan(answers=[Answer(result, state.entry_id, state.stage1_best_reward)])
