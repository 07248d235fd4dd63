"""Noticing that an HTTP client went away while its request waits (for a lease, for a consumer).

uvicorn does not cancel a route when its client disconnects; :func:`unless_gone` awaits the work
and, the moment the client's ``http.disconnect`` arrives, cancels it and raises
:class:`ClientGone`, so that whatever the request queued for can be withdrawn at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

__all__ = ["ClientGone", "handle_gone", "unless_gone"]

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready (nobody is left to answer)."""


async def _disconnected(receive: Callable[[], Awaitable[Message]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # body the route did not read: dropped (see unless_gone)


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (and
    awaited) and :class:`ClientGone` is raised. Use it once the request's body has been read, or
    where the route reads no body: body it receives meanwhile is lost."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watch: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request.receive))
    try:
        both: set[asyncio.Future[Any]] = {task, watch}
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # its clean-up ran; its CancelledError is not ours to raise
    raise ClientGone


async def handle_gone(request: Request, exc: Exception) -> Response:
    """The answer to a request whose client is gone: nobody reads it (499, as nginx logs it)."""
    return Response(status_code=499)
