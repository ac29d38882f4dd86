"""The async Python SDK (no torch): ``Client`` and the errors it raises.

    from middleware.client import Client
"""

from middleware.client.admission import CancelOutcome
from middleware.client.results import RequestState
from middleware.client.sdk import Client, Quota
from middleware.errors import (
    BadRequest,
    ClientError,
    Conflict,
    ConnectionLost,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    RequestCancelled,
    RequestFailed,
    RequestLost,
    ResultTimeout,
)

__all__ = [
    "BadRequest",
    "CancelOutcome",
    "Client",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "ModelNotFound",
    "Overloaded",
    "Quota",
    "QuotaExceeded",
    "RequestCancelled",
    "RequestFailed",
    "RequestLost",
    "RequestState",
    "ResultTimeout",
]
