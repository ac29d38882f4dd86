"""OpenAI-compatible request bodies and response shapes for the gateway (pure: no I/O).

Chat and text completions map onto one AlignRequest. alignq's own knobs are extra body fields
(``budget``, ``method``, ``priority``, ``deadline_ms``, ``seed``, ``metadata``, ``request_id``);
``n`` keeps OpenAI's meaning: the number of choices, here the top-n distinct samples by reward.
Fields OpenAI defines that alignq cannot honour (``stop``, penalties, ``logprobs``, tools...) are
accepted and ignored, so existing clients work unchanged.

Token counts in ``usage``: ``completion_tokens`` counts every token generated for the request (all
samples, as OpenAI's legacy ``best_of`` did), because that is what the request cost.
``prompt_tokens`` is an estimate (about 4 characters per token, plus 3 per chat message): the
gateway has no tokenizer, by design (no torch in middleware).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas import AlignRequest, AlignResult, Event, Method, ResultStatus, Sample

MAX_CHOICES = 64
MAX_BATCH_ITEMS = 10_000
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3
#: ``model`` values that mean "the deployment's default model" (OpenAI clients must send something).
DEFAULT_MODEL_ALIASES = frozenset({"", "alignq", "default"})


class AlignqFields(BaseModel):
    """alignq's extra body fields, shared by both completion endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str = "alignq"
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    budget: int | None = None
    method: Method | None = None
    priority: int | None = None
    deadline_ms: int | None = None
    metadata: dict[str, Any] | None = None
    request_id: str | None = None
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
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    defaults: dict[str, Any] = Field(default_factory=dict)  # AlignRequest fields applied to every item
    timeout_s: float | None = Field(default=None, gt=0)


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(AlignqFields):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def prompt(self) -> list[dict[str, str]]:
        return [{"role": _role(m.role), "content": _text(m.content)} for m in self.messages]

    def request_fields(self) -> dict[str, Any]:
        fields = super().request_fields()
        if self.max_completion_tokens is not None:
            fields["max_new_tokens"] = self.max_completion_tokens
        return fields


class CompletionBody(AlignqFields):
    prompt: str | list[str]
    best_of: int | None = Field(default=None, ge=1)  # OpenAI's server-side candidates: our budget

    def text_prompt(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: send one prompt per call (use POST /v1/align/batch for many)")
        return self.prompt[0]

    def request_fields(self) -> dict[str, Any]:
        fields = super().request_fields()
        if self.budget is None and self.best_of is not None:
            fields["budget"] = self.best_of
        return fields


def _role(role: str) -> str:
    if role in ("system", "user", "assistant"):
        return role
    if role == "developer":
        return "system"
    raise ValueError(f"messages: role {role!r} is not supported (system, developer, user, assistant)")


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"messages: content part of type {part.get('type')!r} is not supported (text only)")
        parts.append(part["text"])
    return "".join(parts)


# -- responses ------------------------------------------------------------------------------------
def estimate_prompt_tokens(prompt: str | list[dict[str, str]]) -> int:
    if isinstance(prompt, str):
        return math.ceil(len(prompt) / CHARS_PER_TOKEN)
    return sum(TOKENS_PER_MESSAGE + math.ceil(len(m["content"]) / CHARS_PER_TOKEN) for m in prompt) + TOKENS_PER_MESSAGE


def top_distinct_samples(result: AlignResult, n: int) -> list[Sample]:
    """The n best samples with distinct texts, best first (the answer always first)."""
    ranked = sorted(result.samples, key=lambda s: (s.index != result.best_index, -s.reward))
    if not ranked and result.response is not None:
        ranked = [Sample(index=result.best_index or 0, text=result.response, reward=result.reward or 0.0,
                         num_tokens=0)]
    chosen: list[Sample] = []
    seen_texts: set[str] = set()
    for sample in ranked:
        if sample.text not in seen_texts:
            seen_texts.add(sample.text)
            chosen.append(sample)
            if len(chosen) == n:
                break
    return chosen


def finish_reason(sample: Sample) -> str:
    return "stop" if sample.is_finished else "length"


def usage(result: AlignResult, prompt: str | list[dict[str, str]]) -> dict[str, int]:
    prompt_tokens = estimate_prompt_tokens(prompt)
    completion_tokens = result.num_tokens or sum(s.num_tokens for s in result.samples)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def alignq_field(result: AlignResult, choices: list[Sample]) -> dict[str, Any]:
    return {
        "request_id": result.request_id,
        "status": result.status.value,
        "method": result.method.value if result.method else None,
        "reward": result.reward,
        "rewards": [s.reward for s in choices],
        "samples_used": result.samples_used,
        "explore_samples": result.explore_samples,
        "exploit_samples": result.exploit_samples,
        "generated_tokens": result.num_tokens,
        "queued_s": result.queued_s,
        "total_s": result.total_s,
        "partial": result.status == ResultStatus.PARTIAL,
    }


def completion_response(result: AlignResult, body: AlignqFields, request: AlignRequest, *, chat: bool) -> dict[str, Any]:
    choices = top_distinct_samples(result, body.n)
    if chat:
        rendered = [{"index": i, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                     "finish_reason": finish_reason(s)} for i, s in enumerate(choices)]
    else:
        rendered = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": finish_reason(s)}
                    for i, s in enumerate(choices)]
    prompt = request.prompt if isinstance(request.prompt, str) else [m.model_dump() for m in request.prompt]
    return {
        "id": _response_id(result.request_id, chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": result.completed_at_ms // 1000,
        "model": body.model,
        "system_fingerprint": None,
        "choices": rendered,
        "usage": usage(result, prompt),
        "alignq": alignq_field(result, choices),
    }


def _response_id(request_id: str, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"


class ChunkWriter:
    """SSE lines for one streamed completion, OpenAI chunk shapes."""

    def __init__(self, request: AlignRequest, body: AlignqFields, *, chat: bool) -> None:
        self.request = request
        self.body = body
        self.chat = chat
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": _response_id(self.request.request_id, self.chat),
                 "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.body.model, "system_fingerprint": None,
                 "choices": choices, **{key: value for key, value in extra.items() if value is not None}}
        return sse_data(chunk)

    def progress(self, event: Event) -> str:
        """A progress event as the stream wants it ('' when progress is off)."""
        payload = {"event": event.kind.value, "request_id": event.request_id, "at_ms": event.at_ms, "data": event.data}
        if self.body.alignq_progress == "chunks":
            return self._chunk([], alignq=payload)
        if self.body.alignq_progress == "comments":
            return f": alignq {json.dumps(payload, separators=(',', ':'))}\n\n"
        return ""

    def answer(self, result: AlignResult) -> list[str]:
        """The chosen texts as delta chunks, then a finish chunk per choice, then usage if asked."""
        choices = top_distinct_samples(result, self.body.n)
        lines = []
        for index, sample in enumerate(choices):
            if self.chat:
                lines.append(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
            for piece in split_text(sample.text):
                delta = {"delta": {"content": piece}} if self.chat else {"text": piece}
                lines.append(self._chunk([{"index": index, **delta, "logprobs": None, "finish_reason": None}]))
            end = {"delta": {}} if self.chat else {"text": ""}
            lines.append(self._chunk([{"index": index, **end, "logprobs": None, "finish_reason": finish_reason(sample)}],
                                     alignq=alignq_field(result, choices) if index == len(choices) - 1 else None))
        if self.body.include_usage_chunk:
            prompt = self.request.prompt if isinstance(self.request.prompt, str) else \
                [m.model_dump() for m in self.request.prompt]
            lines.append(self._chunk([], usage=usage(result, prompt)))
        return lines


def split_text(text: str, *, words_per_chunk: int = 4) -> list[str]:
    """Pieces of about ``words_per_chunk`` words that concatenate back to ``text`` exactly."""
    words = re.findall(r"\s*\S+|\s+$", text)
    if not words:
        return [text] if text else []
    return ["".join(words[i:i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


def sse_data(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse_data("[DONE]")
SSE_KEEPALIVE = ": keep-alive\n\n"
