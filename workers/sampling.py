"""Token sampling and the batched decode loop (tensor code only; no requests, no scoring).

Boundary: ``decode_rows`` takes prompts as token ids and, per output row, which prompt it continues
and its sampling parameters; it prefills each prompt once, copies the prompt's KV cache to its rows
and decodes all rows together. Randomness comes in as a (rows, steps) tensor of uniforms drawn by
the caller (one seeded generator per request), and a row's token at step t is the inverse CDF of its
top-p, temperature-scaled distribution at that uniform: a row's tokens do not depend on the other
rows in the batch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DecodeOutput", "decode_rows", "sample_tokens"]

COMPACT_WHEN_ACTIVE_BELOW = 0.75  # drop finished rows from the batch once fewer than this share is active
NUCLEUS_CANDIDATES = (256, 2048)  # top-p looks at this many top tokens before sorting the whole vocabulary


@dataclass(slots=True)
class DecodeOutput:
    tokens: torch.Tensor  # (R, T) on the CPU; pad after a row's end
    num_tokens: torch.Tensor  # (R,) tokens generated per row, EOS included
    is_finished: torch.Tensor  # (R,) bool: the row stopped at an EOS token


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax where temperature == 0, else top-p sampling at ``uniform``.

    logits (R, V) float32; temperature, top_p, uniform (R,). Inverse-CDF sampling: the token whose
    cumulative (kept, renormalised) probability first exceeds the row's uniform. Each row is computed
    the same way whatever the other rows are, so a row's token never depends on its batch.
    """
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return logits.argmax(dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if bool(is_greedy.any()):
        tokens[is_greedy] = logits[is_greedy].argmax(dim=-1)
    for rows in (~is_greedy & (top_p >= 1), ~is_greedy & (top_p < 1)):
        if not bool(rows.any()):
            continue
        every_row = bool(rows.all())
        row_logits = logits if every_row else logits[rows]
        probs = torch.softmax(row_logits * (1.0 / temperature[rows])[:, None], dim=-1)  # (r, V)
        if bool((top_p[rows] < 1).any()):
            chosen = _sample_nucleus(probs, top_p[rows], uniform[rows])
        else:
            cumulative = probs.cumsum(dim=-1)  # any token order works for the inverse CDF
            chosen = _inverse_cdf(cumulative, uniform[rows]).clamp_max(probs.shape[-1] - 1)
        if every_row:
            return chosen
        tokens[rows] = chosen
    return tokens


def _inverse_cdf(cumulative: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(r,) first column whose cumulative weight exceeds uniform * total, per row."""
    return torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True).squeeze(-1)


def _sample_nucleus(probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Top-p sampling over the top candidates of each row, widening them only for rows whose nucleus is wider.

    A full sort of a 49k vocabulary costs ~10 ms a row on a CPU; the top 256 usually hold the nucleus.
    """
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)  # rows not sampled yet
    for num_candidates in (*NUCLEUS_CANDIDATES, probs.shape[-1]):
        num_candidates = min(num_candidates, probs.shape[-1])
        row_probs = probs if todo.shape[0] == probs.shape[0] else probs[todo]
        if num_candidates == probs.shape[-1]:
            candidate_probs, candidate_ids = row_probs.sort(dim=-1, descending=True)
        else:
            candidate_probs, candidate_ids = row_probs.topk(num_candidates, dim=-1)  # (r, k), descending
        chosen, is_covered = _sample_sorted(candidate_probs, candidate_ids, top_p[todo], uniform[todo])
        if num_candidates == probs.shape[-1]:
            is_covered = torch.ones_like(is_covered)
        tokens[todo[is_covered]] = chosen[is_covered]
        todo = todo[~is_covered]
        if todo.shape[0] == 0:
            break
    return tokens


def _sample_sorted(sorted_probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor,
                   uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus sample from the leading, descending columns of each row; also whether they hold the nucleus."""
    cumulative = sorted_probs.cumsum(dim=-1)  # (r, k)
    is_covered = cumulative[:, -1] >= top_p  # no column past k would be kept
    keep = (cumulative - sorted_probs) < top_p[:, None]  # the top token is always kept
    cumulative = (sorted_probs * keep).cumsum(dim=-1)
    last_kept = keep.sum(dim=-1) - 1
    choice = torch.minimum(_inverse_cdf(cumulative, uniform), last_kept)
    return order.gather(-1, choice[:, None]).squeeze(-1), is_covered


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _forward(model: Any, **kwargs: Any) -> Any:
    if _accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = 1  # only the last position's logits: (B, 1, V), not (B, T, V)
    return model(use_cache=True, **kwargs)


def decode_rows(model: Any, prompts: list[list[int]], row_prompt: torch.Tensor, *, temperature: torch.Tensor,
                top_p: torch.Tensor, uniforms: torch.Tensor, max_new_tokens: torch.Tensor, eos_ids: list[int],
                pad_id: int) -> DecodeOutput:
    """Prefill each prompt once, expand its KV cache to its rows, decode every row to EOS or its limit.

    prompts: P token-id lists; row_prompt (R,) prompt index of each row; temperature, top_p,
    max_new_tokens (R,); uniforms (R, T) with T >= max(max_new_tokens). Call under inference_mode.
    """
    device = next(model.parameters()).device
    num_rows, max_steps = row_prompt.shape[0], int(max_new_tokens.max())
    # 1. prefill the P prompts, left-padded, with positions counted from each prompt's first real token
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    output = _forward(model, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions.to(device))
    # 2. one cache row per sample row (index_select copies the prompt's keys/values to its N rows)
    cache = output.past_key_values
    row_prompt = row_prompt.to(device)
    cache.reorder_cache(row_prompt)
    logits = output.logits[:, -1, :][row_prompt].float()  # (R, V)
    mask = mask.to(device)[row_prompt]  # (R, W)
    next_position = mask.sum(-1)  # (R,)
    del output
    # 3. decode; `live` maps the rows still in the batch to their output rows
    temperature, top_p = temperature.to(device), top_p.to(device)
    uniforms, max_new_tokens = uniforms.to(device), max_new_tokens.to(device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    tokens = torch.full((num_rows, max_steps), pad_id, dtype=torch.long, device=device)
    num_tokens = torch.zeros(num_rows, dtype=torch.long, device=device)
    is_finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    live = torch.arange(num_rows, device=device)  # (L,) output row of each batch row
    is_active = torch.ones(num_rows, dtype=torch.bool, device=device)  # (L,) not yet at EOS or limit
    for step in range(max_steps):
        next_tokens = sample_tokens(logits, temperature[live], top_p[live], uniforms[live, step])  # (L,)
        next_tokens = torch.where(is_active, next_tokens, torch.full_like(next_tokens, pad_id))
        tokens[live, step] = next_tokens
        num_tokens[live] += is_active.long()
        stopped_at_eos = torch.isin(next_tokens, eos) & is_active
        is_finished[live] |= stopped_at_eos
        is_active &= ~stopped_at_eos & (step + 1 < max_new_tokens[live])
        if not bool(is_active.any()):
            break
        if float(is_active.float().mean()) < COMPACT_WHEN_ACTIVE_BELOW:
            keep = is_active.nonzero().squeeze(-1)  # (L',) drop finished rows from the cache and batch
            cache.batch_select_indices(keep)
            live, mask, next_position = live[keep], mask[keep], next_position[keep]
            next_tokens, is_active = next_tokens[keep], is_active[keep]
        # rows finished but still in the batch feed pad tokens; their outputs are ignored
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        output = _forward(model, input_ids=next_tokens[:, None], attention_mask=mask,
                          position_ids=next_position[:, None], past_key_values=cache)
        cache = output.past_key_values
        logits = output.logits[:, -1, :].float()
        next_position = next_position + 1
    return DecodeOutput(tokens=tokens.cpu(), num_tokens=num_tokens.cpu(), is_finished=is_finished.cpu())
