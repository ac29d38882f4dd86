"""The gateway's request bodies: as strict as the validation behind them, so the OpenAPI document
tells a client exactly what is accepted (pure: no I/O).

Every limit here is the wire format's (``schemas.messages``): a body that fits this schema becomes
a valid ``AlignRequest``. A deployment may set tighter limits (``max_budget``, ``max_prompt_chars``
of the scheduler); a request past those is answered 400 by the scheduler.

Chat and text completions accept the fields OpenAI defines and alignq cannot honour (``stop``,
penalties, ``logprobs``, tools...) and ignore them, so existing clients work unchanged. alignq's own
knobs are extra body fields (``budget``, ``method``, ``priority``, ``deadline_ms``, ``seed``,
``metadata``, ``request_id``); ``n`` keeps OpenAI's meaning: the number of choices, here the top-n
distinct samples by reward. Batch bodies accept nothing they do not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from schemas import MAX_BUDGET, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, Method
from schemas.messages import CallerRequestId, ModelName

__all__ = ["AlignqFields", "BatchBody", "ChatCompletionBody", "CompletionBody"]

MAX_CHOICES = 64
MAX_BATCH_ITEMS = 10_000
MAX_MESSAGES = 256
#: ``model`` values that mean "the deployment's default model" (OpenAI clients must send something).
DEFAULT_MODEL_ALIASES = frozenset({"", "alignq", "default"})



def _json_number(value: Any) -> Any:
    """Numbers as JSON has them: no strings ("5") and no booleans, which pydantic would coerce."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a JSON number")  # noqa: TRY004 - pydantic reports only ValueError
    return value


Number = BeforeValidator(_json_number)
#: A character Python does not count as white space (``str.isspace``: the wire's blank check), spelled
#: with \\u escapes that JSON Schema (ECMA-262), Rust (pydantic-core) and Python regexes read alike.
NOT_BLANK = r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
#: Text with something in it: a prompt that is only white space is refused.
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)]
Flag = Annotated[bool, Field(strict=True)]
Budget = Annotated[int, Field(ge=1, le=MAX_BUDGET, description="samples (rollouts for aisp); a "
                                      "deployment's max_budget may be lower"), Number]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS), Number]
Temperature = Annotated[float, Field(ge=0, le=5), Number]
TopP = Annotated[float, Field(gt=0, le=1), Number]
Priority = Annotated[int, Field(ge=-100, le=100, description="higher first within a window"), Number]
DeadlineMs = Annotated[int, Field(ge=1, lt=2**53, description="relative to submission; then the best so far"),
                      Number]
#: below 2**53 (the wire takes 2**63): larger integers are not exact in every JSON parser
Seed = Annotated[int, Field(ge=0, lt=2**53), Number]
MetadataValue = str | Annotated[int, Field(ge=-(2**63), lt=2**63)] | float | bool | None
Metadata = Annotated[dict[str, MetadataValue], Field(max_length=64)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Flag = False


class RequestKnobs(BaseModel):
    """The AlignRequest fields every body spells the same way (None: the deployment's default)."""

    method: Method | None = None
    budget: Budget | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    priority: Priority | None = None
    deadline_ms: DeadlineMs | None = None
    seed: Seed | None = None
    metadata: Metadata | None = None


class AlignqFields(RequestKnobs):
    """The fields both completion endpoints share: OpenAI's sampling knobs and alignq's own."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9_.:/@+\-]*$")] = Field(
        default="alignq", description="a model live workers serve; alignq, default or empty: the default model")
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), Number] = 1
    max_tokens: NewTokens | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    request_id: CallerRequestId | None = None
    #: how progress shows in a stream: chunks with empty ``choices`` and an ``alignq`` field
    #: (default), SSE comments (invisible to strict clients), or nothing.
    alignq_progress: Literal["chunks", "comments", "none"] = "chunks"

    def request_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "budget": self.budget, "method": self.method, "priority": self.priority, "deadline_ms": self.deadline_ms,
            "seed": self.seed, "max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "metadata": self.metadata, "request_id": self.request_id,
            "model": None if self.model in DEFAULT_MODEL_ALIASES else self.model,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessageBody(BaseModel):
    """A chat message; ``developer`` is taken as ``system``. Text content only."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionBody(AlignqFields):
    messages: list[ChatMessageBody] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: NewTokens | None = None

    def prompt(self) -> list[dict[str, str]]:
        return [message.as_message() for message in self.messages]

    def request_fields(self) -> dict[str, Any]:
        fields = super().request_fields()
        if self.max_completion_tokens is not None:
            fields["max_new_tokens"] = self.max_completion_tokens
        return fields


class CompletionBody(AlignqFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one is accepted; POST /v1/align/batch takes many)")
    best_of: Budget | None = Field(default=None, description="OpenAI's server-side candidates: the budget "
                                   "when budget is unset")

    def text_prompt(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def request_fields(self) -> dict[str, Any]:
        fields = super().request_fields()
        if self.budget is None and self.best_of is not None:
            fields["budget"] = self.best_of
        return fields


# -- batch ----------------------------------------------------------------------------------------
class MessageBody(BaseModel):
    """A chat message of a batch item, as the wire format has it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class AispBody(BaseModel):
    """Per-request AISP overrides (``schemas.AispParams``); unset: the worker's defaults."""

    model_config = ConfigDict(extra="forbid")

    num_rollouts: Annotated[int, Field(ge=1, le=MAX_BUDGET), Number] | None = None
    num_iterations: Annotated[int, Field(ge=1, le=MAX_BUDGET), Number] | None = None
    sigma: Annotated[float, Field(gt=0), Number] | None = None
    lam: Annotated[float, Field(gt=0), Number] | None = None
    alpha: Annotated[float, Field(ge=0, le=1), Number] | None = None
    horizon_tokens: NewTokens | None = None


class RequestDefaults(RequestKnobs):
    """AlignRequest fields for every item of a batch; an item's own fields win."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = None
    max_new_tokens: NewTokens | None = None
    aisp: AispBody | None = None


class BatchItem(RequestDefaults):
    prompt: Text | Annotated[list[MessageBody], Field(min_length=1, max_length=MAX_MESSAGES)]
    request_id: CallerRequestId | None = None


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    timeout_s: Annotated[float, Field(gt=0, description="capped by the gateway's request_timeout_s"),
                         Number] | None = None

    def item_fields(self, index: int) -> dict[str, Any]:
        """The AlignRequest fields of item ``index``: the defaults, then the item's own (None: unset)."""
        defaults = self.defaults.model_dump(exclude_none=True)
        return {**defaults, **self.requests[index].model_dump(exclude_none=True)}
