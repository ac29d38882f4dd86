"""Generation backends: what turns a worker's batch of jobs into scored SampleSets.

    backend = load_backend(settings, worker_id=...)     # in a worker thread: loads models, may block
    replies = backend.run(jobs)                         # one SampleSet per job, in order; never raises
    backend.cancel(job_id)                              # optional: drop a running job's remaining work
    backend.close()                                     # optional: stop background work (shutdown)
    await batch_loop(backend)(worker)                   # the worker's runner loop for this backend

Two backends, one module each:

- ``hf`` (default): the in-process torch engine (``workers.jobs.BatchRunner``). The only backend
  that runs AISP, which steers the pre-logits inside the decode loop.
- ``openai``: any OpenAI-compatible server (vLLM, SGLang, TGI, llama-server). Bon and uniform only;
  the reward still runs in the worker.

Each backend brings the loop that feeds it from the worker's queue: ``hf_loop`` (continuous batching
on the engine's step API) and ``openai_loop`` (overlapping batches of server calls).

A worker advertises ``capabilities`` in its heartbeat; the client refuses an aisp request for a model
no live worker has the ``aisp`` capability for (``middleware.client.models.check_route``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import PurePath
from typing import Any, Protocol, runtime_checkable

from schemas import Job, SampleSet

__all__ = ["BACKENDS", "DEFAULT_MODEL_NAME", "Backend", "backend_capabilities", "batch_loop", "derive_model_name",
           "initial_model_name", "load_backend"]

BACKENDS = ("hf", "openai")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the policy the hf worker loads when ALIGNQ_MODEL is unset
_CAPABILITIES = {"hf": ("aisp",), "openai": ()}
_NOT_A_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.:/@+\-]")


@runtime_checkable
class Backend(Protocol):
    def run(self, jobs: list[Job]) -> list[SampleSet]: ...


def backend_capabilities(backend: str) -> list[str]:
    """What a worker of this backend can run beyond bon and uniform (heartbeat ``capabilities``)."""
    return list(_CAPABILITIES[backend])


def derive_model_name(spec: str | None) -> str:
    """The routed model name for a model spec: the file or folder name of a path (no ``.gguf`` and no
    quantisation suffix), a hub name as it is, the default policy's name for None."""
    if not spec:
        return DEFAULT_MODEL_NAME
    spec = spec.rstrip("/")
    if spec.endswith(".gguf") or spec.startswith(("/", "./", "../", "~")):
        name = PurePath(spec).name.removesuffix(".gguf")
        name = re.sub(r"\.(Q\d\w*|F16|F32|BF16|IQ\w+)$", "", name, flags=re.IGNORECASE)
    else:
        name = spec
    return _NOT_A_NAME_CHAR.sub("-", name)[:128] or DEFAULT_MODEL_NAME


def initial_model_name(settings: Any) -> str | None:
    """The model name a worker serves, known before loading: ALIGNQ_MODEL_NAME, else derived from the
    model spec (hf) or ALIGNQ_BACKEND_MODEL (openai). None: an openai worker names itself after the
    model its server reports, once loaded."""
    if settings.model_name:
        return str(settings.model_name)
    if settings.backend == "openai":
        return derive_model_name(settings.backend_model) if settings.backend_model else None
    return derive_model_name(settings.model)


def load_backend(settings: Any, *, worker_id: str) -> Any:
    """The configured backend, models loaded (blocking: call it in a worker thread); ModelLoadError
    when it cannot start."""
    if settings.backend == "openai":
        from workers.backends.openai import load_openai_backend

        return load_openai_backend(settings, worker_id=worker_id)
    from workers.backends.hf import load_hf_backend

    return load_hf_backend(settings, worker_id=worker_id)


def batch_loop(backend: Any) -> Callable[[Any], Awaitable[None]]:
    """The loop a worker runs to feed this backend: ``loop(worker)`` until the worker stops."""
    from workers.jobs import BatchRunner

    if isinstance(backend, BatchRunner):
        from workers.backends.hf_loop import stepping_loop

        return stepping_loop
    from workers.backends.openai_loop import overlapping_loop

    return overlapping_loop
