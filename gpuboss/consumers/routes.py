"""``/v1/consumers``: the managed consumers over HTTP: list them, ensure, release, reload.

Reading needs any token; ``ensure`` and ``release`` a holder token (they take and give memory
like a lease); ``release-all`` and ``reload`` an operator's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from gpuboss.auth import HolderDep, OperatorDep, ReaderDep
from gpuboss.disconnect import unless_gone
from gpuboss.docs import Doc, NamePath, RequestDoc, errors_doc
from gpuboss_client import GpubossError

from .manager import STATES, ConsumerManager, Unit

__all__ = ["router"]

#: the longest an ensure waits for its lease (the load and the health check come on top)
MAX_WAIT_S = 3600.0


async def get_manager(request: Request) -> ConsumerManager:
    """The service's consumer manager (made by the lifespan)."""
    manager: ConsumerManager = request.app.state.consumers
    return manager


ManagerDep = Annotated[ConsumerManager, Depends(get_manager)]


class EnsureBody(RequestDoc):
    """Which model (for a consumer serving several) and how long to wait for its memory."""

    model: str | None = Field(default=None, max_length=256)
    timeout_s: float = Field(default=60.0, ge=0, le=MAX_WAIT_S, description="seconds to wait in the queue")


class ReleaseBody(RequestDoc):
    """Which model to give back (default: every model of the consumer)."""

    model: str | None = Field(default=None, max_length=256)


class WaitingDoc(Doc):
    position: int
    reason: str
    eta_s: float | None


class ConsumerDoc(Doc):
    name: str
    model: str | None = Field(description="the model, for a consumer with a lease per model")
    kinds: list[str]
    state: str = Field(description=" | ".join(STATES))
    since_s: float = Field(description="seconds in this state")
    url: str
    pool: str
    device: str | None
    vram_mib: int = Field(description="what it leases")
    measured_mib: int | None = Field(
        description="what the agent measures its processes use (null: not measured)"
    )
    priority: int
    preemptible: bool
    keep_warm: float
    lease: str | None
    users: int = Field(description="requests using it now")
    loads: int
    unloads: int
    evictions: int
    waiting: WaitingDoc | None = Field(description="while loading: where its lease request waits")
    error: str | None


class ConsumersDoc(Doc):
    consumers: list[ConsumerDoc]
    registry: str | None = Field(description="the registry file (null: none)")
    measured: bool = Field(description="whether an agent in the boss measures the consumers")


class ReloadDoc(Doc):
    changes: list[str]


def _docs(units: list[Unit]) -> list[dict[str, Any]]:
    return [u.to_dict() for u in units]


def _listing(manager: ConsumerManager, units: list[Unit]) -> dict[str, Any]:
    return {
        "consumers": _docs(units),
        "registry": str(manager.path) if manager.path is not None else None,
        "measured": manager.agent is not None,
    }


router = APIRouter(prefix="/v1/consumers", tags=["consumers"])

_READ = errors_doc("bad_request", "unauthorized", "consumer_not_found")
_ACT = errors_doc(
    "bad_request", "unauthorized", "forbidden", "consumer_not_found", "consumer_unreachable",
    "consumer_unhealthy", "backend_unavailable",
    "acquire_timeout", "queue_full", "pool_not_found", "device_not_found", "insufficient_vram",
    "protocol_error",
)  # fmt: skip


@router.get("", summary="Every managed consumer and its state", response_model=ConsumersDoc, responses=_READ)
async def list_consumers(manager: ManagerDep, _: ReaderDep) -> dict[str, Any]:
    """One entry per consumer (per model, for a consumer with a lease per model)."""
    return _listing(manager, manager.units())


@router.post("/release-all", summary="Give back every consumer's memory", response_model=ConsumersDoc)
async def release_all(manager: ManagerDep, _: OperatorDep) -> dict[str, Any]:
    """Unload every consumer that can be unloaded; answers once each is measured free (or stuck)."""
    return _listing(manager, await manager.release_all())


@router.post("/reload", summary="Read the registry file again", response_model=ReloadDoc, responses=_READ)
async def reload(manager: ManagerDep, _: OperatorDep) -> dict[str, Any]:
    """New consumers start, removed ones are given back, changed ones take their new definition once
    unloaded; no lease is dropped. A file with errors answers 400 naming the field, and changes nothing."""
    return {"changes": await manager.reload()}


@router.get("/{name}", summary="One consumer", response_model=list[ConsumerDoc], responses=_READ)
async def get_consumer(name: NamePath, manager: ManagerDep, _: ReaderDep) -> list[dict[str, Any]]:
    """The consumer's entry (one per model, for a consumer with a lease per model)."""
    return _docs(manager.units_of(name))


@router.post(
    "/{name}/ensure",
    summary="Load a consumer and wait until it is healthy",
    response_model=ConsumerDoc,
    responses=_ACT | {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def ensure(
    name: NamePath, body: EnsureBody, request: Request, manager: ManagerDep, _: HolderDep
) -> Any:
    """Leases its memory (queueing, or evicting idle and preemptible holders, as any request), runs
    its load action and waits for its health check. Concurrent ensures share one load. A client
    that leaves while it waits withdraws (the lease request leaves the queue if nobody else waits).

    With ``Accept: text/event-stream`` the answer streams the progress instead: a ``progress``
    event at every change (state ``loading`` with where its lease request waits: ``position``,
    ``reason`` ``behind``/``no_room``/``evicting``, ``eta_s``; then ``idle`` or ``ready``), and
    last a ``ready`` event with the consumer, or an ``error`` event with the error."""
    unit = manager.unit(name, body.model)  # an unknown consumer is a 404, before any stream
    work = manager.ensure(name, body.model, body.timeout_s)
    if "text/event-stream" in request.headers.get("accept", ""):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_progress(unit, work), media_type="text/event-stream", headers=headers)
    return (await unless_gone(request, work)).to_dict()


def _sse(event: str, doc: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(doc)}\n\n"


async def _progress(unit: Unit, work: Awaitable[Unit]) -> AsyncIterator[str]:
    """The ensure's progress as server-sent events (see :func:`ensure`); a client that leaves
    cancels it, as it does a plain ensure."""
    task = asyncio.ensure_future(work)
    try:
        seen: tuple[str, Any] | None = None
        while True:
            now = (unit.state, unit.to_dict()["waiting"])
            if now != seen:
                seen = now
                yield _sse("progress", {"state": now[0], "waiting": now[1]})
            if task.done():
                break
            changed = asyncio.ensure_future(unit.changed())
            await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        error = task.exception()
        if error is None:
            yield _sse("ready", unit.to_dict())
        elif isinstance(error, GpubossError):
            yield _sse("error", error.to_dict())
        else:
            raise error
    finally:
        task.cancel()


@router.post(
    "/{name}/release",
    summary="Give a consumer's memory back",
    response_model=list[ConsumerDoc],
    responses=_ACT,
)
async def release(
    name: NamePath, body: ReleaseBody, manager: ManagerDep, _: HolderDep
) -> list[dict[str, Any]]:
    """Unloads it the engine's way; answers once the memory is measured free (or it is stuck)."""
    return _docs(await manager.release(name, body.model))
