"""AISP: adaptive importance sampling on pre-logits (DESIGN.md §4), batched over prompts.

Boundary: this module loops; the importance math lives in ``workers.aisp_weights`` (pure
functions), the hooked decode loop in ``workers.aisp_decode``. It needs a loaded ``Policy`` (any
Hugging Face causal LM with an output-embedding head) and a ``RewardModel``; it never touches Redis.

How a batch runs (``run_aisp``):
1. Requests are grouped so one group's rollouts (Σ n) fit ``max_batch`` rows.
2. Each group's prompts are prefilled once (all but their last token, left-padded); the pre-logit
   norm ‖z‖ is measured there, which scales a relative σ and the ‖u_t‖ cap.
3. k iterations: each prompt draws V_i = U + σ ε_i (and, for sampled rollouts, its uniforms) from
   its own seeded generator, every rollout of every prompt is decoded in the same forward passes
   (cache rows repeated from the prefill), greedily (DESIGN.md §4) or sampled as in the paper's
   Fig. 1 (``temperature`` > 0), v_t is added to the pre-logit of the t-th generated token for t ≤ τ by a
   forward pre-hook on the LM head, rollouts are scored, and U moves to the importance-weighted
   mean (with ``keep_elite``, the best (V, r) so far takes part in every update).
4. The answer is the best-reward rollout over all n·k.

A ``schedule`` (``workers.aisp_window``) puts all requests in one group and decides after each
round which requests run another iteration: AISP iterations shared out across a window.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from workers.aisp_decode import PrelogitPerturbation, decode_rollouts, perturb_prelogits, prefill
from workers.aisp_weights import importance_step
from workers.engine import GeneratedSample
from workers.errors import RewardError

if TYPE_CHECKING:
    from workers.models import Policy
    from workers.reward import RewardModel

logger = logging.getLogger(__name__)

__all__ = ["AispConfig", "AispProgress", "AispRequest", "AispResult", "PrelogitPerturbation", "Schedule",
           "perturb_prelogits", "run_aisp", "split_budget"]


@dataclass(slots=True)
class AispConfig:
    num_rollouts: int = 8  # n: rollouts per iteration (per prompt)
    num_iterations: int = 4  # k when the caller has no budget; a request's budget decides k (split_budget)
    sigma: float = 0.3  # perturbation scale; relative: E‖σ ε_t‖ ≈ sigma · mean ‖z‖ of the prompt
    sigma_is_relative: bool = True  # False: sigma is the absolute per-coordinate standard deviation
    lam: float = 0.3  # λ, temperature of the softmax over (standardised) rewards
    alpha: float = 0.999  # α, weight of the prior term; 1: weights are softmax(r/λ)
    horizon_tokens: int | None = None  # τ, perturbed tokens; None: max_new_tokens
    standardize_rewards: bool = True  # z-score rewards within each iteration before dividing by λ
    max_u_norm: float | None = 0.4  # cap on ‖u_t‖ relative to mean ‖z‖ (absolute if sigma is); None: no cap
    sigma_decay: float = 0.5  # σ of iteration j is sigma · sigma_decay**j (< 1: explore, then refine)
    temperature: float = 0.0  # rollout sampling temperature under the perturbation; 0: greedy (the worker: 0.8)
    top_p: float = 1.0  # nucleus of sampled rollouts
    keep_elite: bool = False  # the best (V, r) of all past iterations joins every importance step

    def validate(self) -> None:
        if self.num_rollouts < 1 or self.num_iterations < 1:
            raise ValueError("num_rollouts and num_iterations must be >= 1")
        if not self.sigma > 0 or not self.lam > 0:
            raise ValueError("sigma and lam must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if self.horizon_tokens is not None and self.horizon_tokens < 0:
            raise ValueError("horizon_tokens must be >= 0")
        if not self.sigma_decay > 0:
            raise ValueError("sigma_decay must be > 0")
        if self.max_u_norm is not None and self.max_u_norm < 0:
            raise ValueError("max_u_norm must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)) or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass(slots=True)
class AispRequest:
    key: str  # caller's id (the job_id)
    prompt: str | list[dict]  # text, or chat messages
    budget: int  # rollouts allowed; n·k <= budget are used (split_budget)
    max_new_tokens: int
    seed: int = 0  # seeds this prompt's own noise generator: results do not depend on the batch
    metadata: dict = field(default_factory=dict)  # passed to the reward model
    config: AispConfig | None = None  # None: the call's config


@dataclass(slots=True)
class AispResult:
    key: str
    samples: list[GeneratedSample]  # all rollouts, index = iteration * n + i; len() = rollouts used
    best_index: int  # index of the best-reward sample; -1 when there are none
    ess: list[float]  # effective sample size 1/Σw² per iteration
    iteration_mean: list[float]  # mean reward of each iteration's rollouts
    iteration_best: list[float]  # best reward within each iteration
    generate_s: float  # decode time of the group this request ran in (shared by its requests)
    score_s: float  # reward time of that group
    error: str | None = None  # reward failed for this request: samples so far, no more iterations


@dataclass(slots=True)
class AispProgress:
    """What ``run_aisp``'s ``on_iteration`` callback sees after each iteration of a request."""

    key: str
    iteration: int  # 0-based
    num_rollouts_done: int  # rollouts of this request so far
    ess: float
    reward_mean: float  # this iteration's
    reward_best: float  # best so far, over all iterations
    mean: torch.Tensor  # U after the update (τ, d), float32 on CPU; do not modify


def split_budget(budget: int, num_rollouts: int) -> tuple[int, int]:
    """Map a rollout budget N to (n, k): n = min(num_rollouts, N) per iteration, k = N // n iterations.

    So n·k <= N, at most n − 1 rollouts are left unused, and a budget below num_rollouts becomes a
    single iteration of N rollouts (plain perturbed sampling, no adaptation).
    """
    if budget < 1 or num_rollouts < 1:
        raise ValueError(f"budget and num_rollouts must be >= 1, got {budget}, {num_rollouts}")
    n = min(num_rollouts, budget)
    return n, budget // n


@dataclass(slots=True)
class _Chain:
    """One request's loop state."""

    request: AispRequest
    config: AispConfig
    num_rollouts: int
    num_iterations: int
    horizon: int
    generator: torch.Generator
    prompt_ids: list[int] = field(default_factory=list)
    mean: torch.Tensor | None = None  # U (τ, d), float32 on CPU
    sigma_abs: float = 0.0  # σ of the current iteration, absolute
    max_norm_abs: float | None = None
    elite: tuple[float, torch.Tensor] | None = None  # best (reward, V (τ, d)) so far, with keep_elite
    is_paused: bool = False  # a schedule left it out of the next round
    result: AispResult | None = None

    @property
    def is_active(self) -> bool:
        assert self.result is not None
        return self.result.error is None and len(self.result.ess) < self.num_iterations



def _new_chain(request: AispRequest, default: AispConfig) -> _Chain:
    config = request.config or default
    config.validate()
    if request.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    num_rollouts, num_iterations = split_budget(request.budget, config.num_rollouts)
    horizon = request.max_new_tokens if config.horizon_tokens is None else min(config.horizon_tokens,
                                                                                request.max_new_tokens)
    generator = torch.Generator().manual_seed(request.seed)
    chain = _Chain(request, config, num_rollouts, num_iterations, horizon, generator)
    chain.result = AispResult(request.key, [], -1, [], [], [], 0.0, 0.0)
    return chain


def _score(reward: Any, chains: list[_Chain], texts: list[list[str]]) -> list[list[float] | str]:
    """Rewards per chain, or an error string for a chain whose scoring failed (others unaffected)."""

    def one_call(batch: list[_Chain], batch_texts: list[list[str]]) -> list[list[float]]:
        prompts = [c.request.prompt for c, ts in zip(batch, batch_texts) for _ in ts]
        metadata = [c.request.metadata for c, ts in zip(batch, batch_texts) for _ in ts]
        flat = [float(r) for r in reward.score(prompts, [t for ts in batch_texts for t in ts], metadata)]
        if len(flat) != len(prompts):
            raise RewardError(f"reward returned {len(flat)} scores for {len(prompts)} responses")
        out, start = [], 0
        for ts in batch_texts:
            out.append(flat[start:start + len(ts)])
            start += len(ts)
        return out

    try:
        scored: list[list[float] | str] = list(one_call(chains, texts))
    except RewardError:  # isolate the request that breaks the reward; the others go on
        scored = []
        for chain, chain_texts in zip(chains, texts):
            try:
                scored.append(one_call([chain], [chain_texts])[0])
            except RewardError as e:
                scored.append(f"reward failed: {e}")
    for i, rewards in enumerate(scored):
        if not isinstance(rewards, str) and not all(math.isfinite(r) for r in rewards):
            scored[i] = "reward failed: NaN or inf reward"
    return scored


def _sampling(active: list[tuple[int, _Chain]], max_steps: int) -> tuple[torch.Tensor, ...] | None:
    """(temperature (R,), top_p (R,), uniforms (R, T)) for the rows of ``active``; None if all are greedy.

    A sampled chain draws its (n, max_new_tokens) uniforms from its own generator after its noise.
    """
    if all(c.config.temperature == 0 for _, c in active):
        return None
    temperature, top_p, uniforms = [], [], []
    for _, c in active:
        n = c.num_rollouts
        temperature += [c.config.temperature] * n
        top_p += [c.config.top_p] * n
        drawn = (torch.rand((n, c.request.max_new_tokens), generator=c.generator) if c.config.temperature > 0
                 else torch.zeros((n, c.request.max_new_tokens)))
        uniforms.append(torch.nn.functional.pad(drawn, (0, max_steps - c.request.max_new_tokens)))
    return (torch.tensor(temperature), torch.tensor(top_p), torch.cat(uniforms))


def _draw(chain: _Chain, width: int) -> torch.Tensor:
    """V_i = U + σ ε_i for the chain's n rollouts, from its own generator: (n, τ, d)."""
    assert chain.mean is not None, "a chain's mean is set when its prompt is prefilled"
    noise = torch.randn((chain.num_rollouts, chain.horizon, width), generator=chain.generator)
    return chain.mean + chain.sigma_abs * noise


def _importance_inputs(chain: _Chain, rewards: list[float], draw: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """This iteration's (rewards, V), with the elite (best so far, before this iteration) appended."""
    if chain.elite is None:
        return rewards, draw
    elite_reward, elite_v = chain.elite
    return [*rewards, elite_reward], torch.cat([draw, elite_v[None]])


def _update_elite(chain: _Chain, rewards: list[float], draw: torch.Tensor) -> None:
    best = max(range(len(rewards)), key=rewards.__getitem__)
    if chain.elite is None or rewards[best] > chain.elite[0]:
        chain.elite = (rewards[best], draw[best].clone())


Schedule = Callable[[list[AispResult], list[int]], set[str]]  # (results, n of each) of eligible requests -> keys


def _run_group(policy: Any, reward: Any, chains: list[_Chain], state: PrelogitPerturbation, max_batch: int,
               on_iteration: Callable[[AispProgress], None] | None, schedule: Schedule | None = None) -> None:
    tokenizer = policy.tokenizer
    eos_ids = policy.eos_token_ids()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    generate_s = score_s = 0.0
    start = time.perf_counter()
    prefilled = prefill(policy, state, [c.prompt_ids for c in chains], pad_id)
    width = prefilled.width
    for p, chain in enumerate(chains):
        norm = float(prefilled.mean_norm[p])
        relative = chain.config.sigma_is_relative
        chain.sigma_abs = chain.config.sigma * norm / math.sqrt(width) if relative else chain.config.sigma
        cap = chain.config.max_u_norm
        chain.max_norm_abs = None if cap is None else cap * norm if relative else cap
        chain.mean = torch.zeros((chain.horizon, width))
        logger.debug("aisp key=%s prelogit_norm=%.2f sigma_abs=%.4g", chain.request.key, norm, chain.sigma_abs)
    generate_s += time.perf_counter() - start
    while active := [(p, c) for p, c in enumerate(chains) if c.is_active and not c.is_paused]:
        # 1. V_i = U + σ ε_i from each prompt's own generator: (n, τ, d) per chain
        start = time.perf_counter()
        horizon = max(c.horizon for _, c in active)
        draws = [_draw(c, width) for _, c in active]
        row_prompt = torch.tensor([p for p, c in active for _ in range(c.num_rollouts)])
        max_tokens = torch.tensor([c.request.max_new_tokens for _, c in active for _ in range(c.num_rollouts)])
        padded = torch.zeros((len(row_prompt), horizon, width))
        row = 0
        for draw in draws:
            padded[row:row + draw.shape[0], :draw.shape[1]] = draw
            row += draw.shape[0]
        sampling = _sampling(active, int(max_tokens.max()))
        # 2. rollouts of every prompt's rows together, max_batch rows per forward pass
        padded = padded.to(policy.device, policy.dtype)
        tokens: list[list[int]] = []
        is_eos: list[bool] = []
        for lo in range(0, len(row_prompt), max_batch):
            chunk = slice(lo, lo + max_batch)
            chunk_tokens, chunk_eos = decode_rollouts(
                policy, state, prefilled, row_prompt[chunk], padded[chunk], max_tokens[chunk], eos_ids, pad_id,
                None if sampling is None else (sampling[0][chunk].to(policy.device),
                                               sampling[1][chunk].to(policy.device),
                                               sampling[2][chunk].to(policy.device)))
            tokens += chunk_tokens
            is_eos += chunk_eos
        texts_flat = tokenizer.batch_decode([[t for t in ids if t not in eos_ids] for ids in tokens],
                                            skip_special_tokens=True)
        generate_s += time.perf_counter() - start
        # 3. rewards, per chain
        start = time.perf_counter()
        texts, row = [], 0
        for _, c in active:
            texts.append(texts_flat[row:row + c.num_rollouts])
            row += c.num_rollouts
        scored = _score(reward, [c for _, c in active], texts)
        score_s += time.perf_counter() - start
        # 4. importance step per chain (n and τ may differ between requests)
        row = 0
        for (_, chain), draw, rewards, chain_texts in zip(active, draws, scored, texts):
            result = chain.result
            assert result is not None and chain.mean is not None
            rows = range(row, row + chain.num_rollouts)
            row += chain.num_rollouts
            if isinstance(rewards, str):
                result.error = rewards
                logger.warning("aisp key=%s iteration=%d %s", chain.request.key, len(result.ess), rewards)
                continue
            iteration = len(result.ess)
            for i, (r, text) in enumerate(zip(rows, chain_texts)):
                result.samples.append(GeneratedSample(index=iteration * chain.num_rollouts + i, text=text,
                                                      reward=rewards[i], num_tokens=len(tokens[r]),
                                                      is_finished=is_eos[r]))
            step_rewards, step_draws = _importance_inputs(chain, rewards, draw)
            if chain.config.keep_elite:
                _update_elite(chain, rewards, draw)
            new_mean, _, ess = importance_step(
                torch.tensor([step_rewards], dtype=torch.float64), chain.mean[None], step_draws[None],
                sigma=chain.sigma_abs, lam=chain.config.lam, alpha=chain.config.alpha,
                standardize=chain.config.standardize_rewards, max_norm=chain.max_norm_abs)
            chain.mean = new_mean[0].float()
            chain.sigma_abs *= chain.config.sigma_decay
            result.ess.append(float(ess[0]))
            result.iteration_mean.append(sum(rewards) / len(rewards))
            result.iteration_best.append(max(rewards))
            logger.info("aisp key=%s iteration=%d ess=%.2f reward_mean=%.4f reward_best=%.4f u_norm=%.3f",
                        chain.request.key, iteration, result.ess[-1], result.iteration_mean[-1],
                        result.iteration_best[-1], float(chain.mean.norm(dim=-1).mean()))
            if on_iteration is not None:
                on_iteration(AispProgress(chain.request.key, iteration, len(result.samples), result.ess[-1],
                                          result.iteration_mean[-1], max(result.iteration_best), chain.mean))
        if schedule is not None:  # 5. which requests run the next round
            eligible = [c for c in chains if c.is_active]
            chosen = schedule([c.result for c in eligible if c.result is not None],
                              [c.num_rollouts for c in eligible]) if eligible else set()
            for c in eligible:
                c.is_paused = c.request.key not in chosen
    for chain in chains:
        assert chain.result is not None
        chain.result.generate_s, chain.result.score_s = generate_s, score_s
        if chain.result.samples:
            chain.result.best_index = max(chain.result.samples, key=lambda s: s.reward).index


def run_aisp(policy: Policy, reward: RewardModel, requests: Sequence[AispRequest], config: AispConfig,
             *, max_batch: int = 64, on_iteration: Callable[[AispProgress], None] | None = None,
             schedule: Schedule | None = None) -> list[AispResult]:
    """Run the AISP loop for each request; results in the requests' order.

    Requests share forward passes in groups of at most ``max_batch`` rollout rows (a request with more
    rollouts than that is decoded in chunks). A request's result depends only on its prompt, seed,
    budget and config, not on the other requests in the batch. ``on_iteration`` is called after each
    iteration of each request (progress events, diagnostics).

    ``schedule``: all requests form one group (decoded in chunks of ``max_batch`` rows); after each
    round it gets the results and n of the requests that have iterations left and returns the keys
    that run the next round (the others wait; an empty set ends the loop). A request's result then
    depends on the whole window.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    config.validate()
    chains = [_new_chain(request, config) for request in requests]
    runnable = []
    for chain in chains:
        assert chain.result is not None
        chain.prompt_ids = policy.encode(chain.request.prompt)
        if len(chain.prompt_ids) < 2:  # the first rollout token is decoded from the cached prompt
            chain.result.error = "prompt too short: it must render to at least 2 tokens"
        else:
            runnable.append(chain)
    groups: list[list[_Chain]] = []
    for chain in runnable:
        if groups and (schedule is not None
                       or sum(c.num_rollouts for c in groups[-1]) + chain.num_rollouts <= max_batch):
            groups[-1].append(chain)
        else:
            groups.append([chain])
    with torch.inference_mode(), perturb_prelogits(policy.model) as state:
        for group in groups:
            _run_group(policy, reward, group, state, max_batch, on_iteration, schedule)
    return [chain.result for chain in chains if chain.result is not None]
