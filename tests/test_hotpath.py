"""The hot path (:mod:`gpuboss.hotpath`): it answers the routes it is given with their own handler
and models, and hands everything else to the application behind it, body and all, untouched.

The application behind it here is a small ASGI app that says what reached it; the service's own
use of the hot path (acquire and release) is covered by every lease test in ``test_api.py``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, TypeAdapter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from gpuboss.hotpath import HotPath, HotRoute


class Ask(BaseModel):
    n: int


class Answer(BaseModel):
    id: str
    twice: int


class Behind:
    """The application behind the hot path: answers 299 with what it received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.seen.append((scope["path"], body))
        await JSONResponse({"behind": body.decode()}, status_code=299)(scope, receive, send)


async def handler(request: Request, body: Ask, params: dict[str, str]) -> dict[str, Any]:
    if body.n < 0:
        raise ValueError("negative")
    return {"id": params["id"], "twice": 2 * body.n, "dropped": "not in the reply model"}


async def on_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=418)


class Hot:
    """A hot path with one route, ``POST /things/{id}/double``, in front of a :class:`Behind`."""

    def __init__(self) -> None:
        self.behind = Behind()
        route = HotRoute(
            "POST", re.compile("/things/(?P<id>[^/]+)/double"), Ask, TypeAdapter(Answer), 201, handler
        )
        self.app = HotPath(self.behind, [route], on_error=on_error, max_body=100)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hot") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())


@pytest.fixture
def hot() -> Hot:
    return Hot()


def test_a_hot_route_is_answered_by_its_handler_with_its_reply_model(
    hot: Hot,
) -> None:
    behind = hot.behind
    got = hot.request("POST", "/things/a1/double", json={"n": 21})
    assert (got.status_code, got.json()) == (201, {"id": "a1", "twice": 42})
    assert got.headers["content-type"] == "application/json"
    assert behind.seen == []


def test_what_the_handler_raises_is_rendered_by_on_error(hot: Hot) -> None:
    behind = hot.behind
    got = hot.request("POST", "/things/a1/double", json={"n": -1})
    assert (got.status_code, got.json()) == (418, {"error": "negative"})
    assert behind.seen == []


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"n": "many"}', {"content-type": "application/json"}),  # does not validate
        (b'{"n": 21', {"content-type": "application/json"}),  # not JSON
        (b'{"n": 21}', {"content-type": "text/plain"}),  # another content type
        (b'{"n": 21, "pad": "' + b"x" * 100 + b'"}', {"content-type": "application/json"}),  # over the cap
    ],
    ids=["invalid", "not-json", "text-plain", "too-large"],
)
def test_anything_else_reaches_the_application_with_its_body_intact(
    hot: Hot, content: bytes, headers: dict[str, str]
) -> None:
    behind = hot.behind
    got = hot.request("POST", "/things/a1/double", content=content, headers=headers)
    assert (got.status_code, got.json()) == (299, {"behind": content.decode()})
    assert behind.seen == [("/things/a1/double", content)]


def test_a_body_without_a_length_reaches_the_application(hot: Hot) -> None:
    behind = hot.behind

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"n": '
        yield b"21}"

    got = hot.request(
        "POST", "/things/a1/double", content=chunks(), headers={"content-type": "application/json"}
    )
    assert got.status_code == 299
    assert behind.seen == [("/things/a1/double", b'{"n": 21}')]


@pytest.mark.parametrize(("method", "path"), [("GET", "/things/a1/double"), ("POST", "/things/a1/triple")])
def test_other_routes_and_methods_reach_the_application(hot: Hot, method: str, path: str) -> None:
    behind = hot.behind
    got = hot.request(method, path, json={"n": 1})
    assert got.status_code == 299
    assert [p for p, _ in behind.seen] == [path]


def test_a_client_gone_before_its_body_is_answered_by_nobody(hot: Hot) -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"9")]
    scope = {"type": "http", "method": "POST", "path": "/things/a1/double", "headers": headers}
    asyncio.run(hot.app(scope, receive, send))
    assert (sent, hot.behind.seen) == ([], [])
