"""A running decode batch that rows join and leave at any step (continuous batching; tensor code only).

Boundary: token ids and tensors in, token ids out; no requests, no scoring, no Redis. The caller
(``workers.engine``) decides which rows join and when; this module keeps their KV cache.

Layout: every row of the batch shares one column axis of width T in the KV cache, left-padded: a row's
keys and values sit in its last columns, its ``mask`` row is 1 there and 0 on the padding. A joining
row is left-padded to the batch's width (or the batch to the row's), so joining costs one copy of the
cache and never recomputes it. Positions are counted per row from its first real token, so padding
never shifts RoPE. Rows that leave are dropped at the next compaction, and all-padding columns at
the left go with them.

A row's token at step t is drawn from the row's own logits with the row's own uniform ``[t]`` (see
``workers.sampling.sample_tokens``): nothing a row samples depends on which other rows share the
batch, beyond floating-point rounding in the model's batched matmuls (exact in float32 here, tested;
in bf16 a different batch shape can move a logit by one bf16 ulp and, rarely, flip a token whose
uniform falls on that boundary).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from workers.decode_attention import decode_attention
from workers.sampling import sample_tokens

__all__ = ["DecodeBatch", "FinishedRow", "PromptState", "prefill_prompts"]

COMPACT_WHEN_GONE_ABOVE = 0.25  # compact once more than this share of the rows has left


@dataclass(slots=True)
class PromptState:
    """A prompt's prefilled KV cache (one row, no padding) and its next-token logits."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, H, L, D)
    logits: torch.Tensor  # (V,) float32: the distribution of the first generated token


@dataclass(slots=True)
class FinishedRow:
    tag: Any  # the caller's id of the row
    tokens: list[int]  # generated tokens, EOS included
    is_finished: bool  # stopped at EOS (not at its token limit)


_FORWARD_PARAMETERS: dict[Any, frozenset[str]] = {}  # per model class: the names forward() takes


def _forward_parameters(model_class: Any) -> frozenset[str]:
    if model_class not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[model_class] = frozenset(inspect.signature(model_class.forward).parameters)
    return _FORWARD_PARAMETERS[model_class]


def _forward(model: Any, cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """(logits (B, 1, V), cache) of one forward pass; transformers 5 names the cache ``cache``."""
    parameters = _forward_parameters(type(model))
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1  # only the last position's logits: (B, 1, V), not (B, T, V)
    if cache is not None:
        kwargs["cache" if "cache" in parameters else "past_key_values"] = cache
    output = model(use_cache=True, **kwargs)
    new_cache = output.cache if "cache" in parameters else output.past_key_values
    return output.logits, new_cache


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
        raise TypeError(f"continuous batching needs a plain DynamicCache, got {type(cache).__name__}")
    return [(layer.keys, layer.values) for layer in layers]


class RoomyLayer(DynamicLayer):
    """A cache layer whose keys and values are views of buffers with free columns on the right.

    A decode step writes its one new column in place; ``DynamicLayer.update`` concatenates, which
    copies the layer's whole cache at every step (measured: ~10% of a 64-row decode step on a CPU).
    The buffers are sized for the rows' remaining tokens when rows join or the batch is compacted.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, width: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = key_buffer, value_buffer  # (R, H, capacity, D)
        self.device = key_buffer.device
        self.is_initialized = True
        self._set_width(width)

    def _set_width(self, width: int) -> None:
        self.width = width
        self.keys, self.values = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]
        self.live: tuple[torch.Tensor, torch.Tensor] = (self.keys, self.values)  # typed: keys/values are Optional

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self.width + new > self.key_buffer.shape[2]:  # out of room (not planned for): grow, one copy
            room = max(new, self.width // 2 + 16)
            self.key_buffer, self.value_buffer = _with_room(self.live[0], room), _with_room(self.live[1], room)
        self.key_buffer[:, :, self.width:self.width + new] = key_states
        self.value_buffer[:, :, self.width:self.width + new] = value_states
        self._set_width(self.width + new)
        return self.live

    def select(self, rows: torch.Tensor, first: int) -> None:
        """Keep only ``rows`` and the columns from ``first`` on (one copy; the room on the right stays)."""
        self.key_buffer = self.key_buffer[:, :, first:].index_select(0, rows)
        self.value_buffer = self.value_buffer[:, :, first:].index_select(0, rows)
        self._set_width(self.width - first)


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """(B, H, T, D) -> a zeroed (B, H, T + room, D) buffer holding x in its first T columns."""
    buffer = x.new_zeros((x.shape[0], x.shape[1], x.shape[2] + room, x.shape[3]))
    buffer[:, :, :x.shape[2]] = x
    return buffer


def prefill_prompts(model: Any, prompts: list[tuple[int, ...]], pad_id: int) -> list[PromptState]:
    """Prefill P prompts in one left-padded forward pass; each comes back unpadded, on its own."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits, cache = _forward(model, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device))
    layers = _layer_tensors(cache)
    logits = logits[:, -1, :].float()  # (P, V)
    return [PromptState(ids, [(k[i:i + 1, :, width - len(ids):].clone(), v[i:i + 1, :, width - len(ids):].clone())
                              for k, v in layers], logits[i].clone())
            for i, ids in enumerate(prompts)]


class DecodeBatch:
    """Rows decoding together; ``join`` adds rows, ``step`` samples one token for every row."""

    def __init__(self, model: Any, *, eos_ids: list[int], pad_id: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self._clear()

    def _clear(self) -> None:
        self.tags: list[Any] = []  # (R,) the caller's id of each row
        self.cache: Any = None  # a Cache of RoomyLayers: per layer keys, values (R, H, T, D)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (R, T) 1 on real columns
        self.logits = torch.zeros((0, 0), device=self.device)  # (R, V) next-token logits
        self.position = torch.zeros(0, dtype=torch.long, device=self.device)  # (R,) next position
        self.temperature = torch.zeros(0, device=self.device)  # (R,)
        self.top_p = torch.zeros(0, device=self.device)  # (R,)
        self.uniforms = torch.zeros((0, 0), device=self.device)  # (R, S) row r's uniform of step t
        self.tokens = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (R, S) generated
        self.num_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # (R,) generated so far
        self.max_new = torch.zeros(0, dtype=torch.long, device=self.device)  # (R,)
        self.is_gone = torch.zeros(0, dtype=torch.bool, device=self.device)  # (R,) left, not compacted yet

    @property
    def num_rows(self) -> int:
        """Rows still decoding (left rows awaiting compaction excluded)."""
        return len(self.tags) - int(self.is_gone.sum())

    def live_tags(self) -> list[Any]:
        return [tag for tag, is_gone in zip(self.tags, self.is_gone.tolist()) if not is_gone]

    def join(self, states: list[PromptState], row_state: list[int], tags: list[Any], *, temperature: list[float],
             top_p: list[float], uniforms: list[torch.Tensor], max_new_tokens: list[int]) -> None:
        """Add rows: row i continues ``states[row_state[i]]`` with uniforms[i] (its (max_new_tokens[i],) draws)."""
        if not tags:
            return
        self._compact()
        dev = self.device
        width = max(len(s.ids) for s in states)
        old_width = self.mask.shape[1] if self.tags else 0
        total = max(width, old_width)
        index = torch.tensor(row_state, dtype=torch.long, device=dev)
        num_old = len(self.tags)
        # columns for every token the rows may still generate: decode steps then never copy the cache
        room = max(max(max_new_tokens), int((self.max_new - self.num_tokens).max()) if num_old else 0)
        rows_of = [(s, torch.tensor([num_old + i for i, p in enumerate(row_state) if p == state], dtype=torch.long,
                                    device=dev)) for state, s in enumerate(states)]
        new_layers: list[Any] = []
        for layer in range(len(states[0].layers)):
            shape = states[0].layers[layer][0].shape  # (1, H, L, D)
            keys = states[0].layers[layer][0].new_empty((num_old + len(tags), shape[1], total + room, shape[3]))
            values = torch.empty_like(keys)
            keys[:, :, :total].zero_()  # padding must be finite (masked, weight 0); the room is written before read
            values[:, :, :total].zero_()
            if num_old:  # one copy of the running rows, right-aligned at the new width
                old_keys, old_values = self._layer(layer)
                keys[:num_old, :, total - old_width:total] = old_keys
                values[:num_old, :, total - old_width:total] = old_values
            for s, rows in rows_of:  # each prompt's KV into its rows, right-aligned
                if rows.numel():
                    keys[rows, :, total - len(s.ids):total] = s.layers[layer][0]
                    values[rows, :, total - len(s.ids):total] = s.layers[layer][1]
            new_layers.append(RoomyLayer(keys, values, total))
        lengths = torch.tensor([len(states[i].ids) for i in row_state], dtype=torch.long, device=dev)
        new_mask = (torch.arange(total, device=dev)[None, :] >= (total - lengths)[:, None]).long()  # (n, total)
        steps = max(int(u.shape[0]) for u in uniforms)
        old_steps = self.uniforms.shape[1]
        all_steps = max(steps, old_steps)
        new_uniforms = torch.stack([torch.nn.functional.pad(u.to(dev), (0, steps - u.shape[0])) for u in uniforms])
        n = len(tags)
        self.cache = Cache(layers=new_layers)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (total - old_width, 0)), new_mask])
        self.logits = torch.cat([self.logits.reshape(-1, states[0].logits.shape[0]),
                                 torch.stack([s.logits for s in states]).to(dev)[index]])
        self.position = torch.cat([self.position, lengths])
        self.temperature = torch.cat([self.temperature, torch.tensor(temperature, dtype=torch.float32, device=dev)])
        self.top_p = torch.cat([self.top_p, torch.tensor(top_p, dtype=torch.float32, device=dev)])
        self.uniforms = torch.cat([torch.nn.functional.pad(self.uniforms, (0, all_steps - old_steps)),
                                   torch.nn.functional.pad(new_uniforms, (0, all_steps - steps))])
        self.tokens = torch.cat([torch.nn.functional.pad(self.tokens, (0, all_steps - old_steps), value=self.pad_id),
                                 torch.full((n, all_steps), self.pad_id, dtype=torch.long, device=dev)])
        self.num_tokens = torch.cat([self.num_tokens, torch.zeros(n, dtype=torch.long, device=dev)])
        self.max_new = torch.cat([self.max_new, torch.tensor(max_new_tokens, dtype=torch.long, device=dev)])
        self.is_gone = torch.cat([self.is_gone, torch.zeros(n, dtype=torch.bool, device=dev)])
        self.tags = [*self.tags, *tags]

    def drop(self, tags: set[Any]) -> int:
        """Rows whose tag is in ``tags`` leave now (their samples are not wanted); returns how many."""
        rows = [r for r, tag in enumerate(self.tags) if tag in tags and not bool(self.is_gone[r])]
        if rows:
            self.is_gone[rows] = True
        return len(rows)

    def step(self) -> list[FinishedRow]:
        """Sample one token for every row, hand back the rows that finished, run the model for the rest."""
        if self.num_rows == 0:
            self._clear()
            return []
        rows = torch.arange(len(self.tags), device=self.device)
        step = self.num_tokens.clamp_max(self.uniforms.shape[1] - 1)
        next_tokens = sample_tokens(self.logits, self.temperature, self.top_p, self.uniforms[rows, step])  # (R,)
        is_live = ~self.is_gone
        next_tokens = torch.where(is_live, next_tokens, torch.full_like(next_tokens, self.pad_id))
        self.tokens[rows, step] = torch.where(is_live, next_tokens, self.tokens[rows, step])
        self.num_tokens += is_live.long()
        at_eos = torch.isin(next_tokens, self.eos) & is_live
        is_done = (at_eos | (self.num_tokens >= self.max_new)) & is_live
        finished = []
        if bool(is_done.any()):
            done_rows = is_done.nonzero().squeeze(-1).tolist()
            counts, eos_flags = self.num_tokens.tolist(), at_eos.tolist()
            for r in done_rows:
                finished.append(FinishedRow(self.tags[r], self.tokens[r, :counts[r]].tolist(), eos_flags[r]))
            self.is_gone |= is_done
        if self.num_rows == 0:
            self._clear()
            return finished
        if float(self.is_gone.float().mean()) > COMPACT_WHEN_GONE_ABOVE:
            next_tokens = next_tokens[~self.is_gone]
            self._compact()
        # rows gone but still in the batch feed pad tokens; their outputs are ignored
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype,
                                                     device=self.device)], dim=1)
        with decode_attention(self.model):  # a faster kernel for one query token (workers.decode_attention)
            logits, self.cache = _forward(self.model, self.cache, input_ids=next_tokens[:, None],
                                          attention_mask=self.mask, position_ids=self.position[:, None])
        self.logits = logits[:, -1, :].float()  # the cache is the same object, one column longer
        self.position = self.position + 1
        return finished

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cache is not None
        return self.cache.layers[layer].keys, self.cache.layers[layer].values

    def _compact(self) -> None:
        """Drop rows that left and the all-padding columns at the left."""
        if not bool(self.is_gone.any()):
            return
        keep = (~self.is_gone).nonzero().squeeze(-1)
        if keep.numel() == 0:
            self._clear()
            return
        mask = self.mask[keep]
        first = int(mask.any(0).long().argmax())  # first column some remaining row uses
        for layer in self.cache.layers:
            layer.select(keep, first)
        self.mask = mask[:, first:]
        for name in ("logits", "position", "temperature", "top_p", "uniforms", "tokens", "num_tokens", "max_new"):
            setattr(self, name, getattr(self, name)[keep])
        self.is_gone = self.is_gone[keep]
        keep_list = keep.tolist()
        self.tags = [self.tags[r] for r in keep_list]
