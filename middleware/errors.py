"""Errors raised by the middleware (client, CLI, services).

    AlignqError
    ├── UsageError              bad usage or input at the CLI: exit 2 with one line of why
    └── ClientError             what the async client raises (see middleware.client)
"""

from __future__ import annotations


class AlignqError(Exception):
    """Base of every alignq middleware error."""


class UsageError(AlignqError):
    """Bad usage or bad input: printed as one line, exit code 2."""


class ClientError(AlignqError):
    """Base of the client's errors."""
