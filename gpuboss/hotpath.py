"""The hot path: the routes every holder calls per lease, answered without FastAPI's per-request work.

FastAPI resolves a route by trying each in turn, solves its dependencies, wraps the body in several
layers and validates the reply against the response model on every call; for an acquire or a
release that is most of the service's CPU. :class:`HotPath` sits in front of the application and
answers the routes it is given itself: it reads the body, validates it with the route's own
request model, calls the route's own handler and serialises the reply with the route's own
response model. Anything it does not take whole goes on to the application unchanged, so every
refusal (a body that does not validate, a body without a length or over the cap, another content
type) is FastAPI's, with the same errors as before; errors the handler raises go to the
application's own error handler. What a caller sees is the same either way, only cheaper.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HotPath", "HotRoute"]

#: a handler of the hot path: the request, its validated body and its path parameters
Handler = Callable[[Request, Any, dict[str, str]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """``POST``-like route ``path`` (a regular expression with named groups for the path
    parameters) whose JSON body is a ``body``; ``handler`` answers it with what ``reply`` describes,
    sent with ``status``."""

    method: str
    path: re.Pattern[str]
    body: type[BaseModel]
    reply: TypeAdapter[Any]
    status: int
    handler: Handler


class HotPath:
    """ASGI middleware answering ``routes`` (see the module docstring); ``on_error`` renders what a
    handler raises, as the application's exception handler does; bodies over ``max_body`` bytes,
    and bodies without a ``Content-Length``, go to the application."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[HotRoute],
        on_error: Callable[[Request, Exception], Awaitable[Response]],
        max_body: int,
    ) -> None:
        self.app = app
        self.routes = tuple(routes)
        self.on_error = on_error
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                if scope["method"] == route.method and (found := route.path.fullmatch(scope["path"])):
                    await self._serve(route, found.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: HotRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if (
            not length.isdigit()
            or int(length) > self.max_body
            or headers.get(b"content-type", b"").partition(b";")[0].strip() != b"application/json"
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before the body arrived: nothing to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = route.body.model_validate(json.loads(raw))
        except (ValueError, ValidationError):  # FastAPI answers it, with its own words
            await self.app(scope, _replay(raw, receive), send)
            return
        request = Request(scope, receive)
        try:
            reply = route.reply.dump_json(
                route.reply.validate_python(await route.handler(request, body, params))
            )
        except Exception as exc:
            response = await self.on_error(request, exc)
        else:
            response = Response(reply, status_code=route.status, media_type="application/json")
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an application that reads ``body`` again, then what comes after it."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
