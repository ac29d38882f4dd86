"""AISP's controlled decoding: the pre-logit hook, the prompt prefill and the batched rollout loop.

Boundary: tensor code only (no requests, no rewards, no importance math). ``prefill`` runs each
prompt once and measures its pre-logit norm; ``decode_rollouts`` continues every rollout row of a
batch in the same forward passes with v_t added to the pre-logit of the t-th generated token for
t ≤ τ, either greedily (y is a function of V) or by top-p sampling at uniforms the caller draws per
row (a row's tokens never depend on its batch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from workers.sampling import sample_tokens

__all__ = ["Prefill", "PrelogitPerturbation", "decode_rollouts", "perturb_prelogits", "prefill"]


class PrelogitPerturbation:
    """Forward pre-hook state for an LM head: adds ``delta`` (rows, d) to each row's last position.

    ``capture`` keeps the head's input (the pre-logits) of the next calls in ``captured``.
    """

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.capture = False
        self.captured: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0]  # (rows, positions, d)
        if self.capture:
            self.captured = hidden.detach()
        if self.delta is None:
            return None
        hidden = hidden.clone()
        hidden[:, -1, :] += self.delta.to(hidden.dtype)
        return (hidden, *args[1:])


@contextmanager
def perturb_prelogits(model: torch.nn.Module) -> Iterator[PrelogitPerturbation]:
    """Hook the model's output-embedding head for the duration of the block; removed even on errors."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output-embedding head: AISP perturbs its input")
    state = PrelogitPerturbation()
    handle = cast(torch.nn.Module, head).register_forward_pre_hook(state)  # torch types it Tensor | Module
    try:
        yield state
    finally:
        handle.remove()


@dataclass(slots=True)
class Prefill:
    cache: Any  # KV cache of all but the last prompt token, one row per prompt
    mask: torch.Tensor  # (P, L-1) attention mask of the cached positions
    last_tokens: torch.Tensor  # (P,) each prompt's last token: the first decode input
    positions: torch.Tensor  # (P,) position id of that last token
    mean_norm: torch.Tensor  # (P,) mean ‖z‖ over the prompt's cached positions (float32, CPU)
    width: int  # d, the pre-logit width


def prefill(policy: Any, state: PrelogitPerturbation, prompts: list[list[int]], pad_id: int) -> Prefill:
    """Run all but the last token of each prompt (left-padded) once; measure the pre-logit norms."""
    device = policy.device
    width = max(len(ids) for ids in prompts) - 1
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if len(ids) > 1:
            input_ids[row, width - len(ids) + 1:] = torch.tensor(ids[:-1])
            mask[row, width - len(ids) + 1:] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    state.capture, state.captured = True, None
    try:
        output = policy.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    finally:
        state.capture = False
    assert state.captured is not None, "the pre-hook captured the prefill's pre-logits"
    hidden = state.captured.float()  # (P, L-1, d)
    state.captured = None
    norms = hidden.norm(dim=-1) * mask
    mean_norm = (norms.sum(-1) / mask.sum(-1).clamp_min(1)).cpu()
    last_tokens = torch.tensor([ids[-1] for ids in prompts], device=device)
    return Prefill(output.past_key_values, mask, last_tokens, mask.sum(-1), mean_norm, hidden.shape[-1])


def decode_rollouts(
    policy: Any,
    state: PrelogitPerturbation,
    prefilled: Prefill,
    row_prompt: torch.Tensor,  # (R,) prompt of each rollout row
    perturbations: torch.Tensor,  # (R, τ_max, d) on the device; zero past a row's own τ
    max_tokens: torch.Tensor,  # (R,) max new tokens of each row
    eos_ids: list[int],
    pad_id: int,
    sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Rollouts with v_t added to the t-th token's pre-logit; returns tokens (EOS kept) per row.

    ``sampling``: None decodes greedily; else (temperature (R,), top_p (R,), uniforms (R, T)) and row j's
    token at step t is drawn at uniforms[j, t] (``workers.sampling.sample_tokens``; temperature 0: argmax).
    """
    device = policy.device
    prefill = prefilled
    num_rows = row_prompt.shape[0]
    cache = copy.deepcopy(prefill.cache)
    cache.reorder_cache(row_prompt.to(device))  # one cache row per rollout (nanochat's prefill-then-expand)
    row_prompt = row_prompt.to(device)
    mask = torch.cat([prefill.mask[row_prompt], torch.ones((num_rows, 1), dtype=torch.long, device=device)], 1)
    positions = prefill.positions[row_prompt].clone()
    input_ids = prefill.last_tokens[row_prompt]
    max_tokens = max_tokens.to(device)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    stopped_at_eos = torch.zeros(num_rows, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    horizon = perturbations.shape[1]
    for step in range(int(max_tokens.max())):
        state.delta = perturbations[:, step] if step < horizon else None
        output = policy.model(input_ids=input_ids[:, None], past_key_values=cache, attention_mask=mask,
                              position_ids=positions[:, None], use_cache=True)
        state.delta = None
        logits = output.logits[:, -1, :]  # (R, V)
        if sampling is None:
            next_tokens = logits.argmax(dim=-1)
        else:
            temperature, top_p, uniforms = sampling
            next_tokens = sample_tokens(logits.float(), temperature, top_p, uniforms[:, step])
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        steps.append(next_tokens)
        is_eos = torch.isin(next_tokens, eos) & ~finished
        stopped_at_eos |= is_eos
        finished |= is_eos | (step + 1 >= max_tokens)
        if bool(finished.all()):
            break
        cache = output.past_key_values
        input_ids = next_tokens
        mask = torch.cat([mask, torch.ones((num_rows, 1), dtype=torch.long, device=device)], 1)
        positions = positions + 1
    tokens = torch.stack(steps, 1).cpu() if steps else torch.zeros((num_rows, 0), dtype=torch.long)
    is_eos_row = stopped_at_eos.cpu().tolist()
    rows: list[list[int]] = []
    for row in range(num_rows):
        ids = tokens[row].tolist()
        limit = int(max_tokens[row])
        if is_eos_row[row]:
            limit = min(limit, next(i for i, t in enumerate(ids) if t in eos_ids) + 1)
        rows.append(ids[:limit])
    return rows, is_eos_row


