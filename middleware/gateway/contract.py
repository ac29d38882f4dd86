"""What the gateway's OpenAPI document promises, and the answers that keep the promise.

FastAPI documents a 422 for every body and parameter; the gateway answers bad input with 400 in
OpenAI's error shape instead (``on_validation_error``), so the document drops 422 and its schemas.
A 405 names every method the path supports in ``Allow`` (Starlette names only the first route's).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match

__all__ = ["allowed_methods", "openapi_document"]

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document without the 422s it never sends (built once, then cached)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        schemas = document.get("components", {}).get("schemas", {})
        for name in _FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)
        app.openapi_schema = document
    return app.openapi_schema


def allowed_methods(app: FastAPI, scope: MutableMapping[str, Any]) -> list[str]:
    """Every method some route of ``app`` answers on this request's path, sorted."""
    methods: set[str] = set()
    for route in _leaf_routes(app.router.routes):
        match, _ = route.matches(scope)
        if match != Match.NONE:  # PARTIAL: the path matches, the method does not
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes with methods, looking inside included routers (FastAPI keeps those as one route)."""
    for route in routes:
        included = getattr(route, "original_router", None) or getattr(route, "router", None)
        if included is not None and hasattr(included, "routes"):
            yield from _leaf_routes(included.routes)
        else:
            yield route
