"""Built-in ``python:`` reward functions (``python:workers.scorers:<name>``).

Each takes ``(prompt, response, metadata)`` and returns a float. They are cheap, need no model,
and double as examples for users writing their own scorer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9.\-]+", " ", text.lower()).strip()


def exact_answer(prompt: Any, response: str, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 when the response states ``metadata["answer"]`` (a verifiable reward), else 0.0.

    Numbers match as numbers (``"12.0"`` states ``12``); other answers as whole words, case-insensitive.
    """
    answer = str((metadata or {}).get("answer", "")).strip()
    if not answer:
        raise ValueError("exact_answer needs metadata['answer']")
    try:
        target = float(answer)
    except ValueError:
        pattern = r"(?<![a-z0-9])" + re.escape(_normalise(answer)) + r"(?![a-z0-9])"
        return 1.0 if re.search(pattern, _normalise(response)) else 0.0
    numbers = [float(n.replace(",", ".")) for n in _NUMBER.findall(response)]
    return 1.0 if any(abs(n - target) < 1e-9 for n in numbers) else 0.0


def distinct_words(prompt: Any, response: str, metadata: Mapping[str, Any] | None = None) -> float:
    """Share of distinct words, times a length term that saturates at 12 words.

    A continuous, model-free reward for tests and smoke runs: it prefers varied, non-empty text.
    """
    words = response.lower().split()
    if not words:
        return 0.0
    return len(set(words)) / len(words) * min(1.0, len(words) / 12)
