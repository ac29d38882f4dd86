"""Where models run and where they load from: the device a spec names, and whether the hub is off.

Shared by ``workers.models`` (policies) and ``workers.reward`` (reward models), so neither imports
the other for it.
"""

from __future__ import annotations

import os

import torch

from workers.errors import ModelLoadError

__all__ = ["is_offline", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return torch.device(device)


def is_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set: load from local files only."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
