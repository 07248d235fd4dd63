"""The document bases of the HTTP API: requests refuse unknown fields and coerce nothing, responses
are the client's ``to_dict``, errors are ``{"error", "message", "retryable", ...}``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.routing import Match

from gpuboss_client import ERRORS

__all__ = [
    "INTEGRAL", "NAME_PATTERN", "POOL_PATTERN", "Doc", "ErrorDoc", "JsonInt", "NamePath", "PoolPath",
    "RequestDoc", "allowed_methods", "errors_doc", "flat_routes",
]  # fmt: skip

#: what the client accepts as a device, lease or consumer name, and as a pool, for the OpenAPI
#: document (the server checks them with its own messages, so the schema only states them)
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
POOL_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def _integral(value: Any) -> Any:
    # JSON has one number type: 412.0 is the integer 412 (JSON Schema says so too); 412.5 is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: reads an integer as JSON writes it (412 or 412.0), and nothing else: no strings, no fractions
INTEGRAL = BeforeValidator(_integral)
#: such an integer (bounds go before INTEGRAL, in the same Annotated, to reach the schema)
JsonInt = Annotated[int, INTEGRAL]
NamePath = Annotated[
    str, Path(description="1-64 of [A-Za-z0-9_.:-]", json_schema_extra={"pattern": NAME_PATTERN})
]
PoolPath = Annotated[
    str, Path(description="1-64 of [A-Za-z0-9_.-]", json_schema_extra={"pattern": POOL_PATTERN})
]


def _check_text(value: Any) -> None:
    # JSON may carry lone surrogates, which Redis cannot store as UTF-8: refuse them as bad input.
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)


class RequestDoc(BaseModel):
    """A request body: unknown fields are refused, and types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _unicode(self) -> RequestDoc:
        for name in type(self).model_fields:
            _check_text(getattr(self, name))
        return self


class Doc(BaseModel):
    """A response document (fields exactly as the client's ``to_dict``)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDoc(BaseModel):
    """An error: its stable code, a message, whether retrying may help, and details."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="stable code, e.g. lease_not_found")
    message: str
    retryable: bool


def errors_doc(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route may answer with."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERRORS[code].http_status, []).append(code)
    out: dict[int | str, dict[str, Any]] = {}
    for status, names in sorted(by_status.items()):
        doc: dict[str, Any] = {"model": ErrorDoc, "description": "error: " + ", ".join(names)}
        if any(ERRORS[name].retryable for name in names):
            doc["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        out[status] = doc
    return out


def allowed_methods(request: Request, skip: Callable[[Any], bool] = lambda route: False) -> list[str]:
    """The methods the app's routes take ``request``'s path with (a 405's ``Allow``), leaving out
    the routes ``skip`` names (a catch-all)."""
    allowed: set[str] = set()
    for route in flat_routes(request.app.router.routes):
        if not skip(route) and route.matches(request.scope)[0] != Match.NONE:
            allowed |= set(getattr(route, "methods", None) or ())
    return sorted(allowed)


def flat_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, those of included routers too (FastAPI keeps an included router whole, as a
    route holding it)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from (flat_routes(inner.routes) if inner is not None else (route,))
