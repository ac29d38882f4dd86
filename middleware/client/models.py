"""Which models live workers serve, from their heartbeats: routing checks that fail fast, never wait.

A worker's heartbeat names its ``model_name``, whether it also takes the default model's jobs
(``serves_default``), its backend and its capabilities (``aisp`` needs the in-process ``hf`` engine).
Workers still loading count as serving: a request queues for them instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from middleware.errors import BadRequest, ModelNotFound
from schemas import Keys, Method
from schemas.lifecycle import read_heartbeats

__all__ = ["ServedModel", "check_route", "served_models"]

WORKER_ROLES = ("worker", "worker-loading")


@dataclass(slots=True)
class ServedModel:
    name: str
    num_workers: int = 0
    backends: set[str] = field(default_factory=set)
    capabilities: set[str] = field(default_factory=set)
    is_default: bool = False  # some worker takes the default model's jobs with it


async def served_models(redis: Any, keys: Keys) -> dict[str, ServedModel]:
    """Model name -> what its live (or loading) workers offer."""
    models: dict[str, ServedModel] = {}
    for role in WORKER_ROLES:
        for beat in await read_heartbeats(redis, keys, role):
            name = beat.get("model_name")
            if not isinstance(name, str):
                continue
            served = models.setdefault(name, ServedModel(name))
            served.num_workers += 1
            served.backends.add(str(beat.get("backend", "hf")))
            served.capabilities.update(beat.get("capabilities") or [])
            served.is_default = served.is_default or bool(beat.get("serves_default", True))
    return models


def check_route(models: dict[str, ServedModel], model: str | None, method: Method) -> None:
    """ModelNotFound for a model no live worker serves; BadRequest for aisp where no worker can run it.

    With no live worker at all, a request for the default model queues (workers may be starting); a
    named model fails at once.
    """
    if model is not None:
        served = models.get(model)
        if served is None:
            names = ", ".join(sorted(models)) or "none"
            raise ModelNotFound(f"model {model!r} is not served by any live worker (served: {names})")
        candidates = [served]
    else:
        candidates = [m for m in models.values() if m.is_default]
        if not candidates:
            return
    if method == Method.AISP and not any("aisp" in m.capabilities for m in candidates):
        where = repr(model) if model is not None else "the default model"
        raise BadRequest(f"invalid request: method: aisp needs a worker with the in-process hf backend, and no "
                         f"live worker of {where} has one (use method bon or uniform, or start an hf worker)")
