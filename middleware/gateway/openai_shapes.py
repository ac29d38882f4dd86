"""OpenAI-compatible response shapes for the gateway: completions, stream chunks (pure: no I/O).

The request bodies are in ``middleware.gateway.bodies``; chat and text completions map onto one
AlignRequest, and ``n`` choices are the top-n distinct samples by reward.

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
from typing import Any

from middleware.gateway.bodies import AlignqFields
from schemas import AlignRequest, AlignResult, Event, ResultStatus, Sample

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3


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
            end: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
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
