"""Forwarding one request to a managed consumer.

The consumer is ensured and marked in use (:meth:`ConsumerManager.begin_use`: it queues, evicts
and loads as any request would, and is never evicted while in use); a client that leaves while
it waits leaves the queue at once. Then the request goes upstream and the answer streams back as
it comes, both bodies unbuffered; hop-by-hop headers stay behind, and the consumer is in use
until the last byte is relayed or the client goes away (which closes the upstream request).
The answer carries ``X-Gpuboss-Consumer`` and ``X-Gpuboss-Wait-Ms``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

from gpuboss.consumers.manager import ConsumerManager, Unit
from gpuboss.disconnect import Body, unless_gone
from gpuboss.settings import ServiceSettings
from gpuboss_client import ConsumerUnreachable, GpubossError

__all__ = ["HOP_BY_HOP", "Upstreams", "forward"]

#: headers that belong to one connection, not to the request (RFC 9110 7.6.1), and those the
#: client library sets itself
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip


class Upstreams:
    """The HTTP client every forwarded request goes through (a pool of connections per host).
    No read timeout: a long generation or a slow stream is the upstream's business."""

    def __init__(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None, write=None, pool=None))

    async def aclose(self) -> None:
        await self.client.aclose()


def _request_headers(request: Request, keep_auth: bool, keep_length: bool) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP if keep_auth else HOP_BY_HOP | {"authorization"}
    if keep_length:  # the body streams through as the client sent it: its length still holds
        drop = drop - {"content-length"}
    return [(k, v) for k, v in request.headers.items() if k.lower() not in drop]


async def forward(
    request: Request,
    manager: ConsumerManager,
    upstreams: Upstreams,
    *,
    name: str,
    model: str | None,
    path: str,
    raw: bytes | None,
) -> StreamingResponse:
    """Send ``request`` to ``path`` of consumer ``name`` (its ``model``) once it is ready, waiting
    at most the service's ``max_wait_s`` for it.

    ``raw`` is the body if the route read it already (else it streams through). The client's
    ``Authorization`` passes on only when the boss itself takes no tokens, so its own never leak.
    Raises the ensure's errors, :class:`ConsumerUnreachable` when the upstream does not answer,
    and :class:`~gpuboss.disconnect.ClientGone` when the client leaves while it waits.
    """
    settings: ServiceSettings = request.app.state.settings
    timeout, keep_auth = settings.max_wait_s, not settings.auth
    body = Body(request) if raw is None else Body(request, content=raw)
    started = time.monotonic()
    try:
        unit = await unless_gone(request, manager.begin_use(name, model, timeout), body)
    except GpubossError as exc:  # acquire_timeout, queue_full, ...: say for which consumer
        exc.details.setdefault("consumer", name)
        raise
    waited_ms = round((time.monotonic() - started) * 1000)
    query = request.url.query
    url = f"{unit.consumer.url}/{path.lstrip('/')}" + (f"?{query}" if query else "")
    whole = body.whole()
    headers = _request_headers(request, keep_auth, keep_length=whole is None)
    content = body.stream() if whole is None else whole
    try:
        upstream = await upstreams.client.send(
            upstreams.client.build_request(request.method, url, headers=headers, content=content), stream=True
        )
    except BaseException as exc:
        await manager.end_use(unit)
        if isinstance(exc, httpx.HTTPError):
            what = f"consumer {unit.key}: {request.method} {url} failed: {exc!r}"
            raise ConsumerUnreachable(what, consumer=unit.consumer.name) from None
        raise
    answer = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    answer |= {"x-gpuboss-consumer": unit.key, "x-gpuboss-wait-ms": str(waited_ms)}
    return StreamingResponse(
        _relay(upstream, manager, unit), status_code=upstream.status_code, headers=answer
    )


async def _relay(upstream: httpx.Response, manager: ConsumerManager, unit: Unit) -> AsyncIterator[bytes]:
    """The upstream's answer as it comes; the consumer stays in use until it ends or is abandoned."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()
        await manager.end_use(unit)
