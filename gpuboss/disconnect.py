"""Noticing that an HTTP client went away while its request waits (for a lease, for a consumer).

uvicorn does not cancel a route when its client disconnects; :func:`unless_gone` awaits the work
and, the moment the client's ``http.disconnect`` arrives, cancels it and raises
:class:`ClientGone`, so that whatever the request queued for can be withdrawn at once. To see the
disconnect it reads the request's messages; body that arrives meanwhile is kept in a
:class:`Body` (when the route streams the body on afterwards) or dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["Body", "ClientGone", "handle_gone", "unless_gone"]

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready (nobody is left to answer)."""


class Body:
    """A request's body as it arrives: what is read while the request waits is kept, and
    :meth:`stream` yields it and then the rest, as it comes (nothing else is buffered)."""

    def __init__(self, request: Request, *, content: bytes | None = None) -> None:
        self._receive = request.receive
        self._kept: list[bytes] = [] if content is None else [content]
        #: the whole body has arrived (``content``: the route read it already, here it is)
        self.done = content is not None

    async def message(self) -> bool:
        """Read the next message: False once the client is gone."""
        message = await self._receive()
        if message["type"] == "http.disconnect":
            return False
        if not self.done:
            self._kept.append(message.get("body", b""))
            self.done = not message.get("more_body", False)
        return True

    def whole(self) -> bytes | None:
        """The body, if all of it has arrived and none of it was streamed on yet."""
        return b"".join(self._kept) if self.done else None

    async def stream(self) -> AsyncIterator[bytes]:
        """The body: what was kept, then the rest; raises :class:`ClientGone` if the client leaves."""
        while self._kept:
            yield self._kept.pop(0)
        while not self.done:
            if not await self.message():
                raise ClientGone
            while self._kept:
                yield self._kept.pop(0)


async def _disconnected(body: Body) -> None:
    while await body.message():
        pass


async def unless_gone(request: Request, work: Awaitable[T], body: Body | None = None) -> T:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (and
    awaited) and :class:`ClientGone` is raised. Body that arrives meanwhile goes to ``body``
    (without one it is dropped: use this once the route read its body, or reads none)."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watch: asyncio.Future[None] = asyncio.ensure_future(_disconnected(body or Body(request)))
    try:
        both: set[asyncio.Future[Any]] = {task, watch}
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
        await asyncio.wait({watch})
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # its clean-up ran; its CancelledError is not ours to raise
    raise ClientGone


async def handle_gone(request: Request, exc: Exception) -> Response:
    """The answer to a request whose client is gone: nobody reads it (499, as nginx logs it)."""
    return Response(status_code=499)
