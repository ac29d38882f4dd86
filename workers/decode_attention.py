"""Attention for decode steps (one query token per row), used by ``workers.decode_batch`` only.

Why: on a CPU, ``torch``'s fused SDPA kernel (flash attention for CPU) costs ~4 ms a layer for a
64-row decode step of SmolLM2-135M (q of length 1, ~80 cached columns, grouped KV heads): its
blocking is built for long queries. Two small matmuls and a float32 softmax do the same in
about half that (measured side by side, one thread, bf16). Prefill (queries longer than one
token) and anything unusual (dropout, softcap, position bias, sliding windows, float masks) go to
the stock SDPA path unchanged.

The switch is per call: ``decode_attention(model)`` sets the model's attention implementation for
the duration of one forward pass and puts the previous one back, so other users of the same
loaded model (``model.generate``, AISP, the bench's ``generate()`` loop) keep transformers' own.

Numerics: the same math as transformers' ``eager`` attention (scores in the model's dtype,
softmax in float32). A row's output depends only on its own query, keys, values and mask: each
(row, head) is its own matrix product, and masked (padding) columns get probability exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["DECODE_ATTENTION", "decode_attention", "one_token_attention"]

DECODE_ATTENTION = "alignq_decode"
_REPLACES = ("sdpa", "eager")  # implementations whose math this one reproduces for a single query token


def one_token_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, 1, D), key/value (B, H_kv, T, D), mask (B, 1, 1, T) bool or None -> (B, 1, H, D)."""
    batch, heads, q_length, dim = query.shape
    kv_heads = key.shape[1]
    if (q_length != 1 or dropout or heads % kv_heads or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("sliding_window")
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    group = heads // kv_heads
    # the query heads of one KV head become that head's "query rows": no repeat_kv copy of the cache
    grouped = query.reshape(batch, kv_heads, group, dim)
    # keys @ query^T, not query @ keys^T: the keys are a view into a buffer with room
    # (decode_batch.RoomyLayer), and bf16 bmm takes a slow path for a transposed strided operand
    scores = torch.matmul(key, grouped.transpose(-1, -2)).float().transpose(-1, -2)  # (B, H_kv, G, T)
    scores *= scaling if scaling is not None else dim ** -0.5
    if attention_mask is not None:
        scores.masked_fill_(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    output = torch.matmul(probs, value)  # (B, H_kv, G, D)
    return output.reshape(batch, 1, heads, dim), None


ALL_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, one_token_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)  # the same boolean mask SDPA gets


@contextlib.contextmanager
def decode_attention(model: Any) -> Iterator[None]:
    """Run the model's attention through ``one_token_attention`` inside this block (if it uses SDPA or eager)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous not in _REPLACES:
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
