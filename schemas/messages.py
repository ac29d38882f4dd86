"""Wire models: what crosses Redis between clients, schedulers and workers.

Frozen pydantic v2 models, ``extra="forbid"``, each carrying ``schema_version``. Data only: no I/O,
no settings, no torch. Validated once at the stream boundary (``schemas.codec.decode``).
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 2  # 2: tenant, model, traceparent; cancelled status

#: Hard limits of the wire format; deployments set tighter ones in their settings.
MAX_PROMPT_CHARS = 200_000
MAX_BUDGET = 4096
MAX_NEW_TOKENS = 8192

#: A caller's request id: what a client picks (no "/": that separates the tenant scope).
CallerRequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
#: The id on the wire: the caller's id, prefixed with ``{tenant}/`` when the request has a tenant.
RequestId = Annotated[str, Field(min_length=1, max_length=193,
                                 pattern=r"^([A-Za-z0-9_.\-]{1,64}/)?[A-Za-z0-9_.:\-]{1,128}$")]
#: A tenant: a configured API-key name, or a keyed hash of the key (never the key itself).
TenantName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
#: A model name as workers serve it (ALIGNQ_MODEL_NAME) and requests name it (OpenAI ``model``).
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/@+\-]+$")]
#: W3C trace context header value (``00-<trace>-<span>-<flags>``), carried across processes.
TraceParent = Annotated[str, Field(max_length=128)]
MetadataValue = str | int | float | bool | None


def now_ms() -> int:
    return int(time.time() * 1000)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Method(StrEnum):
    BON = "bon"  # two-stage prompt-adaptive Best-of-N across the window (seed 000)
    UNIFORM = "uniform"  # plain Best-of-N with the request's budget
    AISP = "aisp"  # adaptive importance sampling on pre-logits (seed 001)


class JobKind(StrEnum):
    EXPLORE = "explore"  # stage 1 of bon
    EXPLOIT = "exploit"  # stage 2 of bon
    UNIFORM = "uniform"  # the whole budget of a uniform request
    AISP = "aisp"  # the whole AISP loop of one request


class ResultStatus(StrEnum):
    OK = "ok"
    PARTIAL = "partial"  # deadline reached: best sample so far
    ERROR = "error"
    CANCELLED = "cancelled"  # the client cancelled it before it was answered


#: Results that carry a response.
ANSWERED_STATUSES = frozenset({ResultStatus.OK, ResultStatus.PARTIAL})
#: Results without one: the request failed or was cancelled (the client raises RequestFailed for them).
FAILED_STATUSES = frozenset({ResultStatus.ERROR, ResultStatus.CANCELLED})


class EventKind(StrEnum):
    QUEUED = "queued"  # a scheduler took the request into a window
    EXPLORED = "explored"  # stage 1 scored: data has reward_mean, reward_std, num_samples
    ALLOCATED = "allocated"  # stage 2 planned: data has num_samples (may be 0)
    PROGRESS = "progress"  # samples arrived (aisp iterations, uniform chunks)
    DONE = "done"  # terminal: carries the AlignResult (status ok or partial)
    ERROR = "error"  # terminal: carries the AlignResult with status error
    CANCELLED = "cancelled"  # terminal: carries the AlignResult with status cancelled


TERMINAL_EVENT_KINDS = frozenset({EventKind.DONE, EventKind.ERROR, EventKind.CANCELLED})


#: The terminal event that carries a result of each status.
TERMINAL_EVENT_BY_STATUS = {ResultStatus.OK: EventKind.DONE, ResultStatus.PARTIAL: EventKind.DONE,
                            ResultStatus.ERROR: EventKind.ERROR, ResultStatus.CANCELLED: EventKind.CANCELLED}


def terminal_event_kind(status: ResultStatus) -> EventKind:
    """The terminal event that carries a result of ``status``."""
    return TERMINAL_EVENT_BY_STATUS[status]


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # invalid input: the client must change the request
    OVERLOADED = "overloaded"  # max_pending reached: retry after retry_after_s
    DEADLINE_EXCEEDED = "deadline_exceeded"  # deadline passed with no sample to return
    REWARD_FAILED = "reward_failed"  # the reward function raised or returned NaN/inf
    DELIVERY_EXHAUSTED = "delivery_exhausted"  # a job failed max_deliveries times
    LOST = "lost"  # Redis lost the request (restart without persistence)
    CONFLICT = "conflict"  # the request_id was used before for a different request
    MODEL_NOT_FOUND = "model_not_found"  # no live worker serves the model (or the method on it)
    BACKEND_FAILED = "backend_failed"  # the inference server refused the request (a 4xx no retry fixes)
    INTERNAL = "internal"


class WireModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {value}; this build speaks {SCHEMA_VERSION}")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | Annotated[
    list[ChatMessage], Field(min_length=1, max_length=256)
]


class ErrorInfo(WireModel):
    code: ErrorCode
    message: str = Field(max_length=4000)
    retry_after_s: float | None = None  # set for OVERLOADED


class AispParams(WireModel):
    """Per-request AISP overrides; None fields take the worker's defaults."""

    num_rollouts: int | None = Field(default=None, ge=1, le=MAX_BUDGET)  # n per iteration
    num_iterations: int | None = Field(default=None, ge=1, le=MAX_BUDGET)  # k
    sigma: float | None = Field(default=None, gt=0)  # relative to the mean pre-logit norm
    lam: float | None = Field(default=None, gt=0)  # temperature of the reward softmax (λ)
    alpha: float | None = Field(default=None, ge=0, le=1)
    horizon_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)  # τ


class AlignRequest(WireModel):
    """A prompt to align. Defaults that are None are filled by the scheduler's settings."""

    request_id: RequestId = Field(default_factory=new_request_id)  # "{tenant}/{id}" when tenant is set
    prompt: Prompt
    tenant: TenantName | None = None  # who submitted it; None: the shared tenant
    model: ModelName | None = None  # None: the deployment's default model
    method: Method = Method.BON
    budget: int | None = Field(default=None, ge=1, le=MAX_BUDGET)  # samples (rollouts for aisp)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, gt=0, le=1)
    priority: int = Field(default=0, ge=-100, le=100)  # higher first within a window
    deadline_ms: int | None = Field(default=None, ge=1)  # relative to submitted_at_ms
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    aisp: AispParams | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=64)
    traceparent: TraceParent | None = None
    submitted_at_ms: int = Field(default_factory=now_ms)

    @model_validator(mode="after")
    def _scoped_to_tenant(self) -> AlignRequest:
        prefix, _, _ = self.request_id.rpartition("/")
        if prefix != (self.tenant or ""):
            raise ValueError("request_id must be '{tenant}/{id}' when tenant is set, and contain no '/' otherwise")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | list[ChatMessage]) -> str | list[ChatMessage]:
        text = value if isinstance(value, str) else "".join(m.content for m in value)
        if not text.strip():
            raise ValueError("prompt is empty")
        return value

    @property
    def deadline_at_ms(self) -> int | None:
        return None if self.deadline_ms is None else self.submitted_at_ms + self.deadline_ms


class Job(WireModel):
    """Work for one worker: generate ``num_samples`` samples for one prompt and score them."""

    job_id: str = Field(min_length=1, max_length=256)
    request_id: RequestId
    scheduler_id: str = Field(min_length=1, max_length=128)  # replies go to keys.samples(scheduler_id)
    kind: JobKind
    prompt: Prompt
    num_samples: int = Field(ge=1, le=MAX_BUDGET)  # samples, or AISP's total rollout budget
    sample_offset: int = Field(default=0, ge=0)  # index of the first sample: seeds and dedup
    max_new_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(ge=0, le=5)
    top_p: float = Field(gt=0, le=1)
    seed: int = Field(ge=0, lt=2**63)
    aisp: AispParams | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    deadline_at_ms: int | None = None  # absolute; workers drop the job after it
    model: ModelName | None = None  # the model the request named (None: the default)
    priority: int = Field(default=0, ge=-100, le=100)  # the request's; workers batch higher first
    traceparent: TraceParent | None = None  # the request's trace context: worker spans link to it
    created_at_ms: int = Field(default_factory=now_ms)


class Sample(WireModel):
    index: int = Field(ge=0)  # unique within a request: sample_offset + position
    text: str
    reward: float
    num_tokens: int = Field(ge=0)
    is_finished: bool = True  # stopped at EOS (False: hit max_new_tokens)


class SampleSet(WireModel):
    """A worker's reply to one Job."""

    job_id: str
    request_id: RequestId
    worker_id: str
    kind: JobKind
    samples: list[Sample] = Field(default_factory=list)
    generate_s: float = 0.0
    score_s: float = 0.0
    error: ErrorInfo | None = None
    stats: dict[str, float | int | list[float]] = Field(default_factory=dict)  # e.g. AISP ess per iteration


class AlignResult(WireModel):
    """The answer to one AlignRequest: the best sample found, or an error."""

    request_id: RequestId
    status: ResultStatus
    method: Method | None = None
    response: str | None = None
    reward: float | None = None
    best_index: int | None = None
    samples_used: int = 0
    num_tokens: int = 0  # generated tokens, all samples
    samples: list[Sample] = Field(default_factory=list)  # every sample scored, best first
    explore_samples: int = 0
    exploit_samples: int = 0
    queued_s: float = 0.0  # submit -> taken into a window
    total_s: float = 0.0  # submit -> answered
    generate_s: float = 0.0  # worker time spent generating for this request
    score_s: float = 0.0
    error: ErrorInfo | None = None
    scheduler_id: str | None = None
    stats: dict[str, float | int | list[float]] = Field(default_factory=dict)
    completed_at_ms: int = Field(default_factory=now_ms)


class Event(WireModel):
    request_id: RequestId
    kind: EventKind
    at_ms: int = Field(default_factory=now_ms)
    data: dict[str, Any] = Field(default_factory=dict)  # small numbers: reward_mean, num_samples, ...
    result: AlignResult | None = None  # set on DONE and ERROR

    @property
    def is_terminal(self) -> bool:
        return self.kind in TERMINAL_EVENT_KINDS


class DeadLetter(WireModel):
    """An entry the services could not process, kept for an operator with the reason."""

    source_stream: str
    entry_id: str
    reason: str
    payload: bytes = b""
    request_id: str | None = None
    at_ms: int = Field(default_factory=now_ms)
