"""Errors raised by the torch side (model loading, sampling, scoring).

    WorkerError
    ├── ModelLoadError          a policy or reward spec that cannot be loaded (bad spec, missing path)
    └── RewardError             a reward model raised, or returned NaN/inf or the wrong number of scores
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every alignq worker error."""


class ModelLoadError(WorkerError):
    """A model spec that cannot be loaded; the message says what to do instead."""


class RewardError(WorkerError):
    """Scoring failed: the reward function raised, or returned NaN/inf or the wrong number of scores."""
