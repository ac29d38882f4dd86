"""Helpers of the engine tests: a generation request with test defaults, and a result's sample texts."""

from __future__ import annotations

from typing import Any

from workers.engine import GenerationRequest, GenerationResult


def engine_request(key: str = "r", prompt: str | list[dict] = "Hello there", **fields: Any) -> GenerationRequest:
    """Four samples of 8 new tokens at temperature 1, seed 0, unless ``fields`` say otherwise."""
    fields = {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0, "seed": 0} | fields
    return GenerationRequest(key=key, prompt=prompt, **fields)


def texts(result: GenerationResult) -> list[str]:
    return [s.text for s in result.samples]
