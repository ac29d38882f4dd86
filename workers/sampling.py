"""Token sampling (tensor code only; no requests, no scoring, no model).

Randomness comes in as one uniform per row, drawn by the caller (one seeded generator per request),
and a row's token is the inverse CDF of its top-p, temperature-scaled distribution at that uniform:
a row's token does not depend on the other rows in the batch. The decode loop that calls this is
``workers.decode_batch``.
"""

from __future__ import annotations

import torch

__all__ = ["sample_tokens"]

NUCLEUS_CANDIDATES = (256, 2048)  # top-p looks at this many top tokens before sorting the whole vocabulary


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
