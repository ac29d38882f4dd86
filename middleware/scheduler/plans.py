"""The scheduler core's data: the stages a request goes through, its config, and the plans it returns.

Plain dataclasses (``@dataclass(slots=True)``), no behaviour beyond bookkeeping; ``middleware.scheduler.core``
fills them, ``middleware.scheduler.effects`` executes the plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from schemas import AlignRequest, AlignResult, ErrorInfo, Event, Job, JobKind, Sample

__all__ = ["FINAL_STAGES", "GRANT_FIELD", "Answer", "CoreConfig", "Grant", "JobRef", "Plan", "RequestState", "Stage",
           "Window", "WindowSummary"]


class Stage(StrEnum):
    FORMING = "forming"  # in the window being filled; no job yet
    EXPLORING = "exploring"  # bon stage 1 jobs out
    EXPLOITING = "exploiting"  # bon stage 2 jobs out
    RUNNING = "running"  # uniform / aisp: its single job out


#: Stages whose jobs are the request's last: answered once none is outstanding.
FINAL_STAGES = frozenset({Stage.EXPLOITING, Stage.RUNNING})


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the core needs from SchedulerSettings (copied so the core never sees settings objects)."""

    scheduler_id: str
    default_budget: int = 16
    max_budget: int = 256
    explore_fraction: float = 0.75
    allocator: str = "adabon"
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    max_prompt_chars: int = 8_000
    max_window: int = 16
    window_ms: int = 50
    spread_prior: bool = False  # learn each prompt's reward spread from answered windows; use it as the prior
    prior_explore_fraction: float = 0.25  # explore fraction once a spread model is fitted
    deadline_rounds: bool = True  # one round (uniform) when a window's deadline cannot fit two

    @classmethod
    def from_settings(cls, settings: Any, scheduler_id: str) -> CoreConfig:
        names = [name for name in cls.__dataclass_fields__ if name != "scheduler_id"]
        return cls(scheduler_id=scheduler_id, **{name: getattr(settings, name) for name in names})


@dataclass(slots=True)
class Answer:
    """A terminal result to publish with the answer-once script, then XACK ``entry_id``."""

    result: AlignResult
    entry_id: str | None  # the request's entry in keys.requests (None: nothing to ack)
    stage1_best_reward: float | None = None  # for the stage-2 gain telemetry


#: The field of ``keys.kept_samples(request_id)`` (otherwise sample index -> Sample) that holds its Grant.
GRANT_FIELD = "grant"


@dataclass(frozen=True, slots=True)
class Grant:
    """What stage 2 granted a ``bon`` request: ``total`` samples in all, of which ``num_explore`` explored.

    ``total`` is the window's decision, and may exceed the request's own budget: prompts that needed
    fewer samples left theirs in the window's pool. Kept in Redis with the request's samples, so a
    request re-read after a failover or a lost lease finishes on its grant instead of being planned
    again alone, on its own budget (which under-spent the window: one sample short in test_redis_restart).
    """

    num_explore: int
    total: int

    def encode(self) -> str:
        return f"{self.num_explore},{self.total}"

    @classmethod
    def decode(cls, data: bytes | str | None) -> Grant | None:
        """The grant, or None if absent or malformed (then the request is planned as a new one)."""
        text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
        try:
            num_explore, total = map(int, text.split(","))
        except ValueError:
            return None
        return cls(num_explore, total) if 0 <= num_explore <= total else None


@dataclass(slots=True)
class WindowSummary:
    """A planned window, for telemetry."""

    num_prompts: int
    explore_rewards: dict[str, list[float]]
    allocation: dict[str, int]


@dataclass(slots=True)
class Plan:
    """Effects of one core call, in the order the shell must apply them."""

    jobs: list[Job] = field(default_factory=list)  # XADD keys.jobs
    events: list[Event] = field(default_factory=list)  # XADD keys.events(rid), non-terminal
    answers: list[Answer] = field(default_factory=list)  # answer-once script each
    acks: list[str] = field(default_factory=list)  # request entries to XACK without an answer (duplicates)
    windows: list[WindowSummary] = field(default_factory=list)
    grants: dict[str, Grant] = field(default_factory=dict)  # HSET keys.kept_samples(rid) GRANT_FIELD, before jobs

    def extend(self, other: Plan) -> Plan:
        self.grants.update(other.grants)
        self.jobs.extend(other.jobs)
        self.events.extend(other.events)
        self.answers.extend(other.answers)
        self.acks.extend(other.acks)
        self.windows.extend(other.windows)
        return self

    def __bool__(self) -> bool:
        return bool(self.jobs or self.events or self.answers or self.acks or self.windows or self.grants)


@dataclass(slots=True)
class JobRef:
    """An issued job the request still waits for."""

    kind: JobKind
    sample_offset: int
    num_samples: int
    issued_at_ms: int


@dataclass(slots=True)
class RequestState:
    request: AlignRequest
    entry_id: str | None
    budget: int  # samples (rollouts for aisp), settings default filled in
    seed: int  # deterministic per request: a re-run reproduces the same samples
    taken_at_ms: int
    stage: Stage = Stage.FORMING
    window_id: int | None = None  # bon only
    num_explore: int = 0  # d_i planned for stage 1
    num_exploit: int = 0  # a_i allocated in stage 2
    samples: dict[int, Sample] = field(default_factory=dict)  # by sample index (dedup)
    jobs: dict[str, JobRef] = field(default_factory=dict)  # outstanding, by job_id
    errors: list[ErrorInfo] = field(default_factory=list)
    generate_s: float = 0.0
    score_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    stage1_best_reward: float | None = None
    prompt_embedding: list[float] | None = None  # the reward encoder's, sent with explore replies (spread prior)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finite_rewards(self) -> list[float]:
        return [s.reward for s in self.samples.values() if math.isfinite(s.reward)]


@dataclass(slots=True)
class Window:
    window_id: int
    opened_at_ms: int
    request_ids: list[str] = field(default_factory=list)
    is_planned: bool = False  # stage 2 allocated
    launched_at_ms: int | None = None  # stage 1 jobs issued (for the round timer)
