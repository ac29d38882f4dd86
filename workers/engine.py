"""Batched Best-of-N: many prompts, each with its own N, sampled together and scored.

Boundary: a synchronous core, ``Engine.run(requests) -> results``; no asyncio, no Redis. The decode
loop lives in ``workers.sampling``; this module plans rows into batches, draws each request's
randomness, decodes texts, scores them and attributes time.

A request's samples depend only on its prompt, seed, sample_offset, num_samples and sampling
parameters (and ``max_batch``), never on the other requests in the batch: its uniforms come from
its own ``torch.Generator`` seeded from (seed, sample_offset + part start), and rows never share
randomness. Exactly so in float32; in bf16 a different batch shape can change the rounding of a
logit and, rarely, a token.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.models import Policy
from workers.reward import RewardModel
from workers.sampling import decode_rows

__all__ = ["Engine", "GeneratedSample", "GenerationRequest", "GenerationResult"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class GenerationRequest:
    key: str  # caller's id (the job_id)
    prompt: str | list[dict]  # text, or chat messages [{"role", "content"}]
    num_samples: int
    max_new_tokens: int
    temperature: float = 0.8  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    sample_offset: int = 0  # samples get index sample_offset + i
    metadata: dict = field(default_factory=dict)  # passed to the reward model


@dataclass(slots=True)
class GeneratedSample:
    index: int
    text: str
    reward: float
    num_tokens: int  # generated tokens, the EOS token included
    is_finished: bool  # stopped at EOS (not at max_new_tokens)


@dataclass(slots=True)
class GenerationResult:
    key: str
    samples: list[GeneratedSample]  # by index
    generate_s: float  # this request's share of decode time
    score_s: float  # this request's share of scoring time
    error: str | None = None  # reward failed for THIS request only (others unaffected)


@dataclass(slots=True)
class _Part:
    """Up to max_batch consecutive samples of one request: decoded together, one generator."""

    request: int  # index into the requests
    first: int  # first sample (0-based within the request)
    num_rows: int


def derive_seed(seed: int, sample_offset: int) -> int:
    """A 63-bit generator seed from (seed, offset): nearby pairs give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{sample_offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def plan_parts(requests: Sequence[GenerationRequest], max_batch: int) -> list[list[_Part]]:
    """Split each request into parts of <= max_batch rows and pack parts, in order, into batches."""
    batches: list[list[_Part]] = []
    current: list[_Part] = []
    used = 0
    for r, request in enumerate(requests):
        for first in range(0, request.num_samples, max_batch):
            part = _Part(r, first, min(max_batch, request.num_samples - first))
            if used + part.num_rows > max_batch:
                batches.append(current)
                current, used = [], 0
            current.append(part)
            used += part.num_rows
    if current:
        batches.append(current)
    return batches


def _validate(request: GenerationRequest) -> None:
    if request.num_samples < 0:
        raise ValueError(f"request {request.key}: num_samples must be >= 0, got {request.num_samples}")
    if request.max_new_tokens < 1:
        raise ValueError(f"request {request.key}: max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if not (request.temperature >= 0 and math.isfinite(request.temperature)):
        raise ValueError(f"request {request.key}: temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"request {request.key}: top_p must be in (0, 1], got {request.top_p}")


class Engine:
    def __init__(self, policy: Policy, reward: RewardModel, *, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy
        self.reward = reward
        self.max_batch = max_batch
        self.eos_ids = policy.eos_token_ids()
        self.pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.max_positions = getattr(policy.model.config, "max_position_embeddings", None)

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Sample and score every request; results in the order of ``requests``."""
        for request in requests:
            _validate(request)
        prompt_ids = [self._encode(r) for r in requests]
        texts: list[list[str]] = [[""] * r.num_samples for r in requests]
        num_tokens: list[list[int]] = [[0] * r.num_samples for r in requests]
        is_finished: list[list[bool]] = [[False] * r.num_samples for r in requests]
        generate_s = [0.0] * len(requests)
        with torch.inference_mode():
            for batch in plan_parts(requests, self.max_batch):
                started = time.perf_counter()
                out_texts, out_tokens, out_finished = self._decode_batch(requests, prompt_ids, batch)
                elapsed_s = time.perf_counter() - started
                num_rows = sum(p.num_rows for p in batch)
                row = 0
                for part in batch:
                    span = slice(part.first, part.first + part.num_rows)
                    texts[part.request][span] = out_texts[row:row + part.num_rows]
                    num_tokens[part.request][span] = out_tokens[row:row + part.num_rows]
                    is_finished[part.request][span] = out_finished[row:row + part.num_rows]
                    generate_s[part.request] += elapsed_s * part.num_rows / num_rows
                    row += part.num_rows
        rewards, errors, score_s = self._score(requests, texts)
        results = []
        for i, request in enumerate(requests):
            samples = [GeneratedSample(request.sample_offset + j, texts[i][j], rewards[i][j], num_tokens[i][j],
                                       is_finished[i][j]) for j in range(request.num_samples)]
            results.append(GenerationResult(request.key, samples, generate_s[i], score_s[i], errors[i]))
        return results

    def _encode(self, request: GenerationRequest) -> list[int]:
        ids = self.policy.encode(request.prompt)
        if self.max_positions and len(ids) + request.max_new_tokens > self.max_positions:
            keep = max(1, self.max_positions - request.max_new_tokens)
            logger.warning("prompt truncated key=%s prompt_tokens=%d kept=%d", request.key, len(ids), keep)
            ids = ids[-keep:]
        return ids

    def _decode_batch(self, requests: Sequence[GenerationRequest], prompt_ids: list[list[int]],
                      batch: list[_Part]) -> tuple[list[str], list[int], list[bool]]:
        """Decode one batch of parts; returns texts, token counts and EOS flags row by row."""
        row_prompt, temperature, top_p, max_new, uniforms = [], [], [], [], []
        max_steps = max(requests[p.request].max_new_tokens for p in batch)
        unique_prompts: dict[tuple[int, ...], int] = {}  # jobs of one prompt in a batch share its prefill
        for part in batch:
            request = requests[part.request]
            prompt_index = unique_prompts.setdefault(tuple(prompt_ids[part.request]), len(unique_prompts))
            generator = torch.Generator().manual_seed(derive_seed(request.seed, request.sample_offset + part.first))
            # (rows, max_new_tokens) uniforms: step t of row j uses [j, t] whatever the batch
            drawn = torch.rand((part.num_rows, request.max_new_tokens), generator=generator)
            uniforms.append(torch.nn.functional.pad(drawn, (0, max_steps - request.max_new_tokens)))
            row_prompt += [prompt_index] * part.num_rows
            temperature += [request.temperature] * part.num_rows
            top_p += [request.top_p] * part.num_rows
            max_new += [request.max_new_tokens] * part.num_rows
        out = decode_rows(
            self.policy.model, [list(ids) for ids in unique_prompts], torch.tensor(row_prompt),
            temperature=torch.tensor(temperature, dtype=torch.float32), top_p=torch.tensor(top_p, dtype=torch.float32),
            uniforms=torch.cat(uniforms), max_new_tokens=torch.tensor(max_new), eos_ids=self.eos_ids,
            pad_id=self.pad_id)
        counts = out.num_tokens.tolist()
        finished = out.is_finished.tolist()
        # the text leaves out the EOS token; the count keeps it
        rows = [out.tokens[j, :counts[j] - int(finished[j])].tolist() for j in range(len(counts))]
        texts = self.policy.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return texts, counts, finished

    def _score(self, requests: Sequence[GenerationRequest], texts: list[list[str]],
               ) -> tuple[list[list[float]], list[str | None], list[float]]:
        """Score every sample in one call; if that fails, per request, so a failure stays with its request."""
        prompts = [r.prompt for r, ts in zip(requests, texts) for _ in ts]
        metadata = [r.metadata for r, ts in zip(requests, texts) for _ in ts]
        flat = [t for ts in texts for t in ts]
        total = max(1, len(flat))
        started = time.perf_counter()
        try:
            scores = self.reward.score(prompts, flat, metadata) if flat else []
            if len(scores) != len(flat) or not all(math.isfinite(float(s)) for s in scores):
                raise ValueError(f"reward returned {len(scores)} scores (or non-finite ones) for {len(flat)}")
            elapsed_s = time.perf_counter() - started
            rewards, start = [], 0
            for ts in texts:
                rewards.append([float(s) for s in scores[start:start + len(ts)]])
                start += len(ts)
            return rewards, [None] * len(requests), [elapsed_s * len(ts) / total for ts in texts]
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s) below
            logger.info("batched scoring failed (%s); scoring request by request", e)
        rewards, errors, score_s = [], [], []
        for request, ts in zip(requests, texts):
            started = time.perf_counter()
            try:
                values = [float(v) for v in self.reward.score([request.prompt] * len(ts), ts,
                                                              [request.metadata] * len(ts))] if ts else []
                if len(values) != len(ts) or not all(math.isfinite(v) for v in values):
                    raise ValueError(f"reward returned {len(values)} scores (or non-finite ones) for {len(ts)}")
                rewards.append(values)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - a reward failure fails this request only
                logger.warning("reward failed key=%s error=%s", request.key, e)
                rewards.append([math.nan] * len(ts))
                errors.append(f"{type(e).__name__}: {e}")
            score_s.append(time.perf_counter() - started)
        return rewards, errors, score_s
