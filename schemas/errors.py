"""Errors of the wire contract.

    SchemaError                 anything that is not a valid alignq message
    ├── MessageTooLarge         payload above the size limit
    ├── MalformedMessage        not msgpack, or not a map
    └── InvalidMessage          msgpack, but fails validation (unknown field, wrong type, version)
"""

from __future__ import annotations


class SchemaError(ValueError):
    """A message that cannot be turned into an alignq wire model."""


class MessageTooLarge(SchemaError):
    pass


class MalformedMessage(SchemaError):
    pass


class InvalidMessage(SchemaError):
    pass
