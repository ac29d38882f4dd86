"""Settings of the scheduler, client and gateway processes (``ALIGNQ_`` environment variables)."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.keys import parse_shard_ids


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNQ_", env_nested_delimiter="__", extra="ignore")

    redis_url: str | None = Field(default=None, description="Redis URL: redis://, rediss:// (TLS), redis+sentinel://, redis+cluster://; none: embedded")
    namespace: str = Field(default="alignq", description="Prefix of every Redis key and stream")
    shards: int = Field(default=1, ge=1, le=1024, description="S: requests and jobs spread over S hash-tagged shards (same in every process)")
    redis_min_replicas: int = Field(default=0, ge=0, description="Replicas a submit and an answer wait for (WAIT) before they count")
    shard_ids: str = Field(default="", description="Shards this process consumes, e.g. 0,2 (empty: all of 0..S-1)")

    @model_validator(mode="after")
    def _check_shard_ids(self) -> Self:
        parse_shard_ids(self.shard_ids, self.shards)  # a ValueError here is a settings error naming both
        return self

    max_window: int = Field(default=16, ge=1, description="Max prompts in one scheduling window")
    window_ms: int = Field(default=50, ge=0, description="Window closes this long (ms) after its first prompt")
    default_budget: int = Field(default=16, ge=1, description="Samples per prompt when a request sets none")
    max_budget: int = Field(default=256, ge=1, description="Largest budget a request may ask for")
    explore_fraction: float = Field(default=0.75, gt=0, le=1, description="Share of each budget spent exploring (d = f·B)")
    allocator: str = Field(default="adabon", description="Stage-2 allocator (see middleware.scheduler.allocation)")
    spread_prior: bool = Field(default=False, description="Learn each prompt's reward spread from answered windows (shared in Redis) and use it as the allocator's prior")
    prior_explore_fraction: float = Field(default=0.25, gt=0, le=1, description="Explore fraction once the spread model is fitted (spread_prior)")
    spread_sync_s: float = Field(default=5.0, gt=0, description="Period (s) of pushing answered windows to the shared spread model and refitting")
    deadline_rounds: bool = Field(default=True, description="A window whose deadline cannot fit two rounds is sampled in one (uniform Best-of-N)")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens per sample when a request sets none")
    temperature: float = Field(default=0.8, ge=0, description="Sampling temperature when a request sets none")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling when a request sets none")
    max_prompt_chars: int = Field(default=8_000, ge=1, description="Longer prompts get a bad_request error")
    max_pending: int = Field(default=10_000, ge=1, description="Accepted-but-unanswered requests before submit fails")
    claim_idle_ms: int = Field(default=15_000, ge=100, description="Reclaim requests idle this long (ms) from dead schedulers")
    heartbeat_ms: int = Field(default=2_000, ge=50, description="Heartbeat and lease-renewal period (ms)")
    max_deliveries: int = Field(default=3, ge=1, description="Deliveries of a request before it is dead-lettered")
    result_ttl_s: int = Field(default=3_600, ge=1, description="How long results and events are kept (s)")
    scheduler_id: str | None = Field(default=None, description="Consumer name of this scheduler; none: host-pid-random")
    max_in_flight: int = Field(default=256, ge=1, description="Requests one scheduler holds at once (the rest wait in Redis)")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM, time (s) to finish in-flight windows")
    log_level: str = Field(default="INFO", description="Logging level")


class ApiKeySpec(BaseModel):
    """One named API key and its quotas (0: the gateway's default)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=8, description="The secret bearer key")
    rpm: int = Field(default=0, ge=0, description="Requests per minute")
    max_samples_in_flight: int = Field(default=0, ge=0, description="Samples budgeted by unanswered requests")


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNQ_", env_nested_delimiter="__", extra="ignore")

    redis_url: str | None = Field(default=None, description="Redis URL: redis://, rediss:// (TLS), redis+sentinel://, redis+cluster://")
    namespace: str = Field(default="alignq", description="Prefix of every Redis key and stream")
    shards: int = Field(default=1, ge=1, le=1024, description="S: requests and jobs spread over S hash-tagged shards (same in every process)")
    redis_min_replicas: int = Field(default=0, ge=0, description="Replicas a submit and an answer wait for (WAIT) before they count")
    host: str = Field(default="127.0.0.1", description="Gateway bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="Gateway port")
    api_keys: list[str] | dict[str, ApiKeySpec] = Field(
        default_factory=list,
        description='Bearer keys: a JSON list, or {"name": {"key": ..., "rpm": ..., "max_samples_in_flight": ...}}; '
                    "empty: no auth, one shared tenant")
    api_keys_file: str | None = Field(default=None, description="JSON file of named keys (same shape as api_keys)")
    tenant_secret: str = Field(default="alignq-tenants", description="HMAC key naming the tenant of an unnamed key")
    default_rpm: int = Field(default=0, ge=0, description="Requests per minute per key when its spec sets none (0: no limit)")
    default_max_samples_in_flight: int = Field(
        default=0, ge=0, description="Samples budgeted by a key's unanswered requests, max (0: no limit)")
    default_budget: int = Field(default=16, ge=1, description="Samples counted against a quota when a request sets none")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Longest a gateway call waits for a result (s)")
    max_pending: int = Field(default=10_000, ge=1, description="Accepted-but-unanswered requests before 429")
    log_level: str = Field(default="INFO", description="Logging level")
