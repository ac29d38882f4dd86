"""API keys to tenants: who is calling, in which id scope, under which quotas.

A named key (``ALIGNQ_API_KEYS='{"acme": {"key": "...", "rpm": 600}}'`` or ``api_keys_file``) is the
tenant ``acme``. An unnamed key (the plain JSON list) is the tenant ``key-<HMAC-SHA256(secret, key)>``:
stable across gateways that share ``tenant_secret``, and Redis never holds the key itself. With no
keys configured, every caller is the shared tenant (None). Telemetry labels name tenants, never keys.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from middleware.client import Quota
from middleware.errors import GatewayError, UsageError
from middleware.settings import ApiKeySpec, GatewaySettings
from schemas.tenancy import key_tenant

__all__ = ["Tenant", "TenantDirectory"]


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str | None  # None: the shared tenant (no keys configured)
    quota: Quota

    @property
    def label(self) -> str:
        """The telemetry label: the tenant's name, never its key."""
        return self.name or "shared"


class TenantDirectory:
    """Looks a bearer key up in constant time per configured key."""

    def __init__(self, settings: GatewaySettings) -> None:
        specs = _load_specs(settings)
        default = Quota(settings.default_rpm, settings.default_max_samples_in_flight)
        self._by_key: list[tuple[bytes, Tenant]] = []
        for name, spec in specs:
            quota = Quota(spec.rpm or default.max_requests_per_minute,
                          spec.max_samples_in_flight or default.max_samples_in_flight)
            tenant_name = name if name is not None else key_tenant(spec.key, secret=settings.tenant_secret)
            self._by_key.append((spec.key.encode(), Tenant(tenant_name, quota)))
        self._open = Tenant(None, default) if not self._by_key else None

    @property
    def requires_key(self) -> bool:
        return self._open is None

    def tenant_of(self, request: Request) -> Tenant:
        """The caller's tenant; 401 in OpenAI's shape for a missing or unknown key."""
        if self._open is not None:
            return self._open
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        found = None
        for known, tenant in self._by_key:  # compare with every key: no early exit leaks which matched
            if key and hmac.compare_digest(key.encode(), known):
                found = tenant
        if found is None:
            raise GatewayError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")
        return found


def _load_specs(settings: GatewaySettings) -> list[tuple[str | None, ApiKeySpec]]:
    """(name, spec) from ``api_keys`` and ``api_keys_file``; unnamed keys (a JSON list) have name None."""
    sources: list[list[str] | dict[str, ApiKeySpec]] = [settings.api_keys]
    if settings.api_keys_file:
        try:
            raw = json.loads(Path(settings.api_keys_file).read_text())
            sources.append(raw if isinstance(raw, list) else {k: ApiKeySpec.model_validate(v) for k, v in raw.items()})
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"api_keys_file {settings.api_keys_file}: {e}") from e
    specs: list[tuple[str | None, ApiKeySpec]] = []
    for source in sources:
        if isinstance(source, dict):
            specs += [(name, spec if isinstance(spec, ApiKeySpec) else ApiKeySpec.model_validate(spec))
                      for name, spec in source.items()]
        else:  # plain keys: no minimum length, as before named keys existed
            specs += [(None, ApiKeySpec.model_construct(key=key, rpm=0, max_samples_in_flight=0)) for key in source]
    return specs
