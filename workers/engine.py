"""Batched Best-of-N with continuous batching: many prompts, each with its own N, sampled and scored.

Boundary: a synchronous core, no asyncio, no Redis. ``Engine.run(requests) -> results`` for a whole
call; ``submit`` / ``step`` / ``cancel`` for a caller that feeds work while a batch runs (the worker).
Each ``step`` admits waiting samples into free rows of the running ``DecodeBatch`` (prefilling only
prompts not in the ``PromptCache``), decodes one token for every row, and scores the requests whose
last sample just finished. A long request never holds short ones back: rows free up one by one.

Per-sample determinism: a sample depends only on its request's prompt, seed, sample_offset, index
and sampling parameters (and ``max_batch``, which splits a request into seeded parts), never on the
other requests or on when it joined: its uniforms come from its part's own ``torch.Generator``
seeded from (seed, sample_offset + part start), rows never share randomness, padding is masked and
positions are counted per row. Exactly so in float32 (tested, tokens byte-identical). In bf16 the
model's matmuls round to 8 mantissa bits, and a different batch shape or padding width can change
the summation order and move a logit by one bf16 ulp; a token then flips only when the row's uniform
falls within that sliver of a CDF boundary: rare, and never a change in the distribution sampled.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.decode_batch import DecodeBatch, FinishedRow, prefill_prompts
from workers.models import Policy
from workers.prompt_cache import PROMPT_CACHE_SIZE, PromptCache
from workers.reward import RewardModel

__all__ = ["Engine", "GeneratedSample", "GenerationRequest", "GenerationResult"]

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 16  # prompts prefilled per forward pass (bounds the padded (P, T) activations)


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
    is_cancelled: bool = False  # cancelled before it finished: no samples


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


class _Row:
    """One sample of an admitted request, waiting for or holding a row of the decode batch."""

    __slots__ = ("request", "sample", "uniforms")

    def __init__(self, request: _Running, sample: int, uniforms: torch.Tensor) -> None:
        self.request = request
        self.sample = sample  # 0-based within the request
        self.uniforms = uniforms  # (max_new_tokens,) this sample's draws


@dataclass(slots=True, eq=False)
class _Running:
    """A submitted request until its result is handed back."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    texts: list[str]
    num_tokens: list[int]
    is_finished: list[bool]
    num_left: int  # samples not decoded yet
    generate_s: float = 0.0
    is_cancelled: bool = False


class Engine:
    """Continuous batching: requests join the running decode batch whenever rows are free and leave it
    sample by sample as they finish; ``run`` is submit + step until done, ``submit``/``step``/``cancel``
    let a caller feed new work while a batch runs (the worker service does)."""

    def __init__(self, policy: Policy, reward: RewardModel, *, max_batch: int = 64,
                 prompt_cache_size: int = PROMPT_CACHE_SIZE) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy
        self.reward = reward
        self.max_batch = max_batch
        self.eos_ids = policy.eos_token_ids()
        self.pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.max_positions = getattr(policy.model.config, "max_position_embeddings", None)
        self.prompt_cache = PromptCache(prompt_cache_size)
        self.batch: DecodeBatch | None = None  # built on first use (eos_ids may be changed before)
        self.waiting: collections.deque[_Row] = collections.deque()  # samples not in the batch yet
        self.running: dict[str, _Running] = {}  # by key
        self.done: list[_Running] = []  # decoded, to score at the end of this step
        self.handed_back: list[GenerationResult] = []  # finished during a run() call that did not want them
        self.num_prefill_tokens = 0  # prompt tokens run through the model (a cache hit costs none)

    # -- the synchronous whole-call API ----------------------------------------------------------
    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Sample and score every request; results in the order of ``requests``."""
        if len({r.key for r in requests}) != len(requests):
            raise ValueError("request keys must be unique within one call")
        self.submit(requests)
        keys = {r.key for r in requests}
        results: dict[str, GenerationResult] = {}
        while len(results) < len(requests):
            for result in self.step():
                if result.key in keys:
                    results[result.key] = result
                else:  # a request submitted before this call: the next step() hands it out
                    self.handed_back.append(result)
        return [results[r.key] for r in requests]

    # -- the step API ----------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.handed_back)

    @property
    def num_rows_held(self) -> int:
        """Samples decoding or waiting for a row."""
        return (self.batch.num_rows if self.batch is not None else 0) + len(self.waiting)

    @property
    def num_free_rows(self) -> int:
        """Rows the batch can take before it is full (samples already waiting count as taken)."""
        return max(0, self.max_batch - self.num_rows_held)

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue requests; their samples join the batch at the next steps, in order, as rows free up."""
        for request in requests:
            _validate(request)
            if request.key in self.running:
                raise ValueError(f"request {request.key} is already running")
        for request in requests:
            n = request.num_samples
            state = _Running(request, tuple(self._encode(request)), [""] * n, [0] * n, [False] * n, n)
            self.running[request.key] = state
            for part in plan_parts([request], self.max_batch):
                first, num_rows = part[0].first, part[0].num_rows
                generator = torch.Generator().manual_seed(derive_seed(request.seed, request.sample_offset + first))
                # (rows, max_new_tokens) uniforms: step t of sample j uses [j, t] whatever the batch
                drawn = torch.rand((num_rows, request.max_new_tokens), generator=generator)
                self.waiting.extend(_Row(state, first + j, drawn[j]) for j in range(num_rows))
            if n == 0:
                self.done.append(state)

    def cancel(self, key: str) -> bool:
        """Stop a request: its waiting samples never start, its rows leave the batch at the next step.
        Its result comes back from ``step`` with ``is_cancelled``; the other rows are untouched."""
        state = self.running.get(key)
        if state is None or state.is_cancelled:
            return False
        state.is_cancelled = True
        self.waiting = collections.deque(row for row in self.waiting if row.request is not state)
        if self.batch is not None:
            with torch.inference_mode():
                self.batch.drop({row for row in self.batch.tags if row.request is state})
        if state not in self.done:
            self.done.append(state)
        return True

    def step(self) -> list[GenerationResult]:
        """Admit waiting samples into free rows, decode one token for every row, and return the
        requests that completed (scored) or were cancelled."""
        with torch.inference_mode():
            self._admit()
            if self.batch is not None and self.batch.num_rows:
                served = self.batch.live_tags()
                started = time.perf_counter()
                finished = self.batch.step()
                self._charge(served, time.perf_counter() - started)
                self._collect(finished)
        results, self.handed_back = self.handed_back + self._complete(), []
        return results

    # -- internals -------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.batch is None:
            self.batch = DecodeBatch(self.policy.model, eos_ids=self.eos_ids, pad_id=self.pad_id)
        room = self.max_batch - self.batch.num_rows
        if room <= 0 or not self.waiting:
            return
        rows = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        started = time.perf_counter()
        unique = list(dict.fromkeys(row.request.prompt_ids for row in rows))  # jobs of one prompt share it
        states = {ids: self.prompt_cache.get(ids) for ids in unique}
        missing = [ids for ids, state in states.items() if state is None]
        for start in range(0, len(missing), PREFILL_CHUNK):
            chunk = missing[start:start + PREFILL_CHUNK]
            for state in prefill_prompts(self.policy.model, chunk, self.pad_id):
                self.prompt_cache.put(state)
                states[state.ids] = state
            self.num_prefill_tokens += sum(len(ids) for ids in chunk)
        position = {ids: i for i, ids in enumerate(unique)}
        self.batch.join(
            [states[ids] for ids in unique], [position[row.request.prompt_ids] for row in rows], rows,  # type: ignore[misc]
            temperature=[row.request.request.temperature for row in rows],
            top_p=[row.request.request.top_p for row in rows], uniforms=[row.uniforms for row in rows],
            max_new_tokens=[row.request.request.max_new_tokens for row in rows])
        self._charge(rows, time.perf_counter() - started)

    def _charge(self, rows: list[_Row], elapsed_s: float) -> None:
        """Split a step's time evenly over the rows it served."""
        if rows:
            share = elapsed_s / len(rows)
            for row in rows:
                row.request.generate_s += share

    def _collect(self, finished: list[FinishedRow]) -> None:
        if not finished:
            return
        tokenizer = self.policy.tokenizer
        # the text leaves out the EOS token; the count keeps it
        texts = tokenizer.batch_decode([f.tokens[:len(f.tokens) - int(f.is_finished)] for f in finished],
                                       skip_special_tokens=True)
        for f, text in zip(finished, texts):
            row: _Row = f.tag
            state = row.request
            state.texts[row.sample], state.num_tokens[row.sample] = text, len(f.tokens)
            state.is_finished[row.sample] = f.is_finished
            state.num_left -= 1
            if state.num_left == 0 and not state.is_cancelled:
                self.done.append(state)

    def _complete(self) -> list[GenerationResult]:
        if not self.done:
            return []
        done, self.done = self.done, []
        for state in done:
            del self.running[state.request.key]
        scored = [s for s in done if not s.is_cancelled]
        rewards, errors, score_s = self._score([s.request for s in scored], [s.texts for s in scored])
        results = [GenerationResult(s.request.key, [], s.generate_s, 0.0, "cancelled", is_cancelled=True)
                   for s in done if s.is_cancelled]
        for i, s in enumerate(scored):
            request = s.request
            samples = [GeneratedSample(request.sample_offset + j, s.texts[j], rewards[i][j], s.num_tokens[j],
                                       s.is_finished[j]) for j in range(request.num_samples)]
            results.append(GenerationResult(request.key, samples, s.generate_s, score_s[i], errors[i]))
        return results

    def _encode(self, request: GenerationRequest) -> list[int]:
        ids = self.policy.encode(request.prompt)
        if self.max_positions and len(ids) + request.max_new_tokens > self.max_positions:
            keep = max(1, self.max_positions - request.max_new_tokens)
            logger.warning("prompt truncated key=%s prompt_tokens=%d kept=%d", request.key, len(ids), keep)
            ids = ids[-keep:]
        return ids

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
            split: list[list[float]] = []
            start = 0
            for ts in texts:
                split.append([float(s) for s in scores[start:start + len(ts)]])
                start += len(ts)
            return split, [None] * len(requests), [elapsed_s * len(ts) / total for ts in texts]
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s) below
            logger.info("batched scoring failed (%s); scoring request by request", e)
        rewards: list[list[float]] = []
        errors: list[str | None] = []
        score_s: list[float] = []
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
