"""Fixtures of the engine tests: the tiny random llama as a float32 policy and the distinct-words reward.

Module-scoped (each test module loads its own, as before they were shared); ``workers`` is imported
inside the fixtures, so collecting the torch-free unit tests never imports torch.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from workers.models import Policy
    from workers.reward import FunctionReward


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: pathlib.Path) -> Policy:
    from workers.models import load_policy

    return load_policy(str(tiny_llama_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def words_reward() -> FunctionReward:
    from workers.models import load_reward

    return load_reward("python:workers.scorers:distinct_words")  # type: ignore[return-value]
