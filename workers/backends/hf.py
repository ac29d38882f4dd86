"""The ``hf`` backend: alignq's in-process torch engine (``workers.jobs.BatchRunner``), AISP included."""

from __future__ import annotations

from typing import Any

__all__ = ["load_hf_backend"]


def load_hf_backend(settings: Any, *, worker_id: str) -> Any:
    """Load the policy and the reward model once; a BatchRunner that runs bon, uniform and aisp jobs."""
    from workers.jobs import BatchRunner
    from workers.models import load_policy, load_reward

    s = settings
    policy = load_policy(s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir)
    reward = load_reward(s.reward_model, device=s.device, positive=s.reward_positive, negative=s.reward_negative)
    from workers.aisp import AispConfig

    aisp_defaults = AispConfig(num_rollouts=s.aisp_num_rollouts, sigma=s.aisp_sigma, lam=s.aisp_lam,
                               alpha=s.aisp_alpha, sigma_decay=s.aisp_sigma_decay, max_u_norm=s.aisp_max_u_norm,
                               temperature=s.aisp_temperature, top_p=s.aisp_top_p)
    return BatchRunner(policy, reward, worker_id=worker_id, max_batch=s.max_batch, aisp_defaults=aisp_defaults,
                       embed_prompts=s.prompt_embeddings)
