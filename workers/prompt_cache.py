"""Prefilled prompts kept for reuse: a request's later stages (and its other jobs) skip the prefill.

A bounded LRU keyed by the prompt's token ids; an entry holds one unpadded row of KV cache per layer
(``PromptState``), so a hit costs a copy into the batch and no model call. Entries are immutable once
stored: the decode batch copies them, never writes into them.
"""

from __future__ import annotations

import collections

from workers.decode_batch import PromptState

__all__ = ["PROMPT_CACHE_SIZE", "PromptCache"]

PROMPT_CACHE_SIZE = 64  # prompts kept; SmolLM2-135M in bf16 holds ~23 KB of KV per prompt token


class PromptCache:
    def __init__(self, max_entries: int = PROMPT_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[tuple[int, ...], PromptState] = collections.OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    def get(self, ids: tuple[int, ...]) -> PromptState | None:
        state = self.entries.get(ids)
        if state is None:
            self.num_misses += 1
            return None
        self.num_hits += 1
        self.entries.move_to_end(ids)
        return state

    def put(self, state: PromptState) -> None:
        if self.max_entries <= 0:
            return
        self.entries[state.ids] = state
        self.entries.move_to_end(state.ids)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
