"""Schemathesis against the app's own OpenAPI document, through ASGI, on the real Redis.

Generated requests (valid and invalid) for every operation must never get a 5xx, and every reply
must match the documented status codes, content types and schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi
from test_api import make_settings

from gpuboss.api import create_app
from gpuboss.settings import Token

SECRET = "schema-operator-0123456789"
EXAMPLES = 50


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """No 5xx, except the one a valid acquire may get by design: 503 ``acquire_timeout`` (the
    service waits at most ``max_wait_s``, 0.1 s here, and the leases it grants stay)."""
    if response.status_code == 503 and response.json().get("error") == "acquire_timeout":
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
#: Operations whose schema-valid input the server may still refuse (400), and why; every other
#: operation must take what its schema allows (schemathesis ST202: constraints the server
#: enforces are stated in the OpenAPI document).
REFUSES_SOME_VALID_INPUT = {
    ("PUT", "/v1/devices/{name}"): "sizes like 8GiB: checked, not stated",
    ("GET", "/v1/events/stream"): "the stream never ends: each reply is cut at the read timeout",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def schema_app(redis_url: str) -> Iterator[FastAPI]:
    """The app with an operator token, short waits (acquires give up after 0.1 s) and a small queue."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    conf = make_settings(
        redis_url,
        tokens=[Token("fuzz", "operator", SECRET)],
        max_wait_s=0.1,
        max_queue=5,
        reap_interval_s=0.5,
    )
    app = create_app(conf, redis_url)
    yield app
    # schemathesis keeps an app's lifespan running for the rest of the process: stop the reaper
    # and the hub now, so they touch nothing while other tests run.
    asgi.shutdown_lifespans()
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def api_schema(schema_app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", schema_app)


def operations() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every documented operation; invalid input only where the
    operation takes some."""
    app = create_app(make_settings("redis://127.0.0.1:1/0"), "redis://127.0.0.1:1/0")
    out = []
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if operation.get("parameters") or operation.get("requestBody"):
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return sorted(out)


OPERATIONS = operations()


@pytest.mark.parametrize(
    ("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS]
)
def test_no_server_errors_and_replies_match_the_schema(
    method: str, path: str, mode: GenerationMode, api_schema: schemathesis.BaseSchema
) -> None:
    operation = api_schema[path][method]

    # An event stream never ends by itself: each reply is cut at the read timeout, which must still
    # leave a loaded machine time to start the reply (headers that come later fail the case).
    stream = path == "/v1/events/stream"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=6 if stream else EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {SECRET}"}, timeout=1.0 if stream else 10)
        strict = mode is GenerationMode.POSITIVE and (method, path) not in REFUSES_SOME_VALID_INPUT
        case.validate_response(response, checks=[*CHECKS, positive_data_acceptance] if strict else CHECKS)

    check()
