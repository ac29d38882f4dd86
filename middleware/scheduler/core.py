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
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from middleware.scheduler.allocation import num_explore_samples, plan_window
from middleware.scheduler.deadline import RoundTimer, choose_explore_fraction
from middleware.scheduler.limits import check_limits
from middleware.scheduler.plans import (
    FINAL_STAGES,
    Answer,
    CoreConfig,
    JobRef,
    Plan,
    RequestState,
    Stage,
    Window,
    WindowSummary,
)
from middleware.scheduler.prior import (
    PROMPT_EMBEDDING_STAT,
    SpreadModel,
    WindowPrior,
    model_kind,
    prompt_features,
    reward_kind,
    window_prior,
)
from schemas import (
    AlignRequest,
    AlignResult,
    ErrorCode,
    ErrorInfo,
    Event,
    EventKind,
    Job,
    JobKind,
    Method,
    ResultStatus,
    Sample,
    SampleSet,
)
from schemas.keys import Lane

logger = logging.getLogger(__name__)

SEED_MASK = 2**63 - 1


def prompt_text(prompt: Any) -> str:
    """A prompt's text: the string, or the chat messages' contents joined."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(getattr(m, "content", None) or (m.get("content", "") if isinstance(m, dict) else "")) for m in prompt)


def request_seed(request: AlignRequest) -> int:
    """The request's seed, or one derived from its id (stable across processes and restarts)."""
    if request.seed is not None:
        return request.seed
    digest = hashlib.blake2b(request.request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & SEED_MASK


def make_job_id(request_id: str, kind: JobKind, sample_offset: int) -> str:
    return f"{request_id}:{kind.value}:{sample_offset}"


def rank_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Best first: finite rewards descending (ties: lower index), then NaN/inf rewards by index."""
    return sorted(samples, key=lambda s: (0, -s.reward, s.index) if math.isfinite(s.reward) else (1, 0.0, s.index))


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
              kept: Iterable[Sample] = ()) -> Plan:
        """Take a request from the stream. ``kept``: samples a previous owner already had scored."""
        plan = Plan()
        rid = request.request_id
        if rid in self.requests:  # redelivered while we hold it: one owner, ack the copy
            if entry_id is not None and entry_id != self.requests[rid].entry_id:
                plan.acks.append(entry_id)
            return plan
        error = self.validate(request)
        if error is not None:
            plan.answers.append(Answer(self._error_result(request, error, now_ms), entry_id))
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
        explore_fraction = self._explore_fraction(states, now_ms)
        for state in states:
            state.stage = Stage.EXPLORING
            state.num_explore = num_explore_samples(state.budget, explore_fraction)
            plan.jobs.extend(self._jobs_for(state, JobKind.EXPLORE, 0, state.num_explore, now_ms))
        return plan.extend(self._plan_if_explored(window, now_ms))

    def _explore_fraction(self, states: list[RequestState], now_ms: int) -> float:
        """The configured f, the smaller prior one once a spread model is fitted, 1.0 when a deadline allows one round."""
        fraction = self.config.explore_fraction
        if self.config.spread_prior and self.spread.has_fit:
            fraction = self.config.prior_explore_fraction
        time_left = [s.request.deadline_at_ms - now_ms for s in states if s.request.deadline_at_ms is not None]
        if self.config.deadline_rounds and time_left:
            work = max(s.budget * self._tokens(s) for s in states)  # sample-tokens per prompt, the largest
            fraction = choose_explore_fraction(work, min(time_left), self.round_timer, explore_fraction=fraction)
        return fraction

    def _tokens(self, state: RequestState) -> int:
        return state.request.max_new_tokens or self.config.max_new_tokens

    def _window_prior(self, explore_rewards: dict[str, list[float]]) -> WindowPrior | None:
        """Predicted spreads for the window's prompts (embedding features only if every prompt has one)."""
        states = [self.requests[rid] for rid in explore_rewards]
        rewards = reward_kind([r for values in explore_rewards.values() for r in values])
        has_embeddings = all(s.prompt_embedding is not None for s in states)
        fit = self.spread.fit_for(model_kind(rewards, [0.0] if has_embeddings else None))
        if fit is None:
            return None
        features = np.stack([prompt_features(prompt_text(s.request.prompt), s.prompt_embedding if has_embeddings else None)
                             for s in states])
        if features.shape[1] != fit.weights.shape[0]:
            return None  # another encoder's embeddings: no prior rather than a wrong one
        return window_prior(fit, features, rewards == "bernoulli")

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
            per_prompt = max(s.num_explore * self._tokens(s) for s in states)  # sample-tokens, the largest
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
        allocation = self._allocate(window, explore_rewards, budgets)
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
            if not state.jobs:  # allocated nothing, or all kept: easy prompts do not wait
                plan.extend(self._answer(state, now_ms))
        return plan

    def _allocate(self, window: Window, explore_rewards: dict[str, list[float]],
                  budgets: dict[str, int]) -> dict[str, int]:
        seed_text = ",".join(sorted(explore_rewards)).encode()
        seed = int.from_bytes(hashlib.blake2b(seed_text, digest_size=8).digest(), "big") & SEED_MASK
        try:
            prior = self._window_prior(explore_rewards) if self.config.spread_prior else None
            return plan_window(explore_rewards, budgets, method=self.config.allocator, seed=seed,
                               prior=prior)  # type: ignore[arg-type]
        except ValueError as e:  # a bug or a bad allocator name: fall back to each prompt's own budget
            logger.error("allocation failed window_id=%d, using each prompt's remaining budget: %s",
                         window.window_id, e)
            return {rid: max(0, budgets[rid] - len(rewards)) for rid, rewards in explore_rewards.items()}

    # -- jobs and answers ---------------------------------------------------------------------------
    def _jobs_for(self, state: RequestState, kind: JobKind, offset: int, num_samples: int, now_ms: int) -> list[Job]:
        """One job for samples [offset, offset + num_samples), unless kept samples already cover it."""
        ref = JobRef(kind=kind, sample_offset=offset, num_samples=num_samples, issued_at_ms=now_ms)
        if num_samples <= 0 or self._is_covered(state, ref):
            return []
        request = state.request
        job = Job(
            job_id=make_job_id(request.request_id, kind, offset),
            request_id=request.request_id,
            scheduler_id=self.config.scheduler_id,
            kind=kind,
            prompt=request.prompt,
            num_samples=num_samples,
            sample_offset=offset,
            max_new_tokens=request.max_new_tokens or self.config.max_new_tokens,
            temperature=self.config.temperature if request.temperature is None else request.temperature,
            top_p=request.top_p or self.config.top_p,
            seed=state.seed,
            aisp=request.aisp,
            metadata=dict(request.metadata),
            deadline_at_ms=request.deadline_at_ms,
            model=request.model,
            priority=request.priority,
            traceparent=request.traceparent,
            created_at_ms=now_ms,
        )
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
            self.spread.observe(prompt_text(state.request.prompt), state.finite_rewards, state.prompt_embedding)
        ranked = rank_samples(state.samples.values())
        best = ranked[0] if ranked and math.isfinite(ranked[0].reward) else None
        request = state.request
        num_explore = sum(1 for i in state.samples if i < state.num_explore) if request.method == Method.BON else 0
        common: dict[str, Any] = {
            "request_id": request.request_id, "method": request.method, "samples_used": len(ranked),
            "num_tokens": sum(s.num_tokens for s in ranked), "samples": ranked,
            "explore_samples": num_explore, "exploit_samples": len(ranked) - num_explore if request.method == Method.BON else 0,
            "queued_s": max(0.0, (state.taken_at_ms - request.submitted_at_ms) / 1000),
            "total_s": max(0.0, (now_ms - request.submitted_at_ms) / 1000),
            "generate_s": state.generate_s, "score_s": state.score_s, "scheduler_id": self.config.scheduler_id,
            "stats": dict(state.stats), "completed_at_ms": now_ms,
        }
        if best is None:
            error = partial_error or (state.errors[0] if state.errors else ErrorInfo(
                code=ErrorCode.REWARD_FAILED, message="no sample has a finite reward"))
            result = AlignResult(status=ResultStatus.ERROR, error=error, **common)
        else:
            status = ResultStatus.PARTIAL if partial_error is not None else ResultStatus.OK
            result = AlignResult(status=status, response=best.text, reward=best.reward, best_index=best.index,
                                 **common)
        return Plan(answers=[Answer(result, state.entry_id, state.stage1_best_reward)])

    def _error_result(self, request: AlignRequest, error: ErrorInfo, now_ms: int) -> AlignResult:
        return AlignResult(request_id=request.request_id, status=ResultStatus.ERROR, method=request.method,
                           error=error, total_s=max(0.0, (now_ms - request.submitted_at_ms) / 1000),
                           scheduler_id=self.config.scheduler_id, completed_at_ms=now_ms)


def error_result(request_id: str, error: ErrorInfo, *, scheduler_id: str, now_ms: int,
                 method: Method | None = None) -> AlignResult:
    """An error answer for a request known only by its id (bad input, delivery exhausted)."""
    return AlignResult(request_id=request_id, status=ResultStatus.ERROR, method=method, error=error,
                       scheduler_id=scheduler_id, completed_at_ms=now_ms)

