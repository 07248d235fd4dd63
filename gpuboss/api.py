"""The boss service's HTTP API: FastAPI over :class:`gpuboss_client.AsyncBoss`.

Each route validates its input, checks who may do it (:mod:`gpuboss.auth`) and runs one client
operation; the logic of leasing lives in the client and the Lua scripts, never here. Every error
is a :class:`gpuboss_client.GpubossError` rendered by the one exception handler as
``{"error", "message", "retryable", ...}`` with the error's HTTP status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuboss_client import (
    AsyncBoss,
    BackendUnavailable,
    BadRequest,
    Event,
    Forbidden,
    GpubossError,
    LeaseEvicted,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PoolNotFound,
    QueueFull,
    Unauthorized,
    __version__,
    ops,
    split_queue,
    status_document,
)
from gpuboss_client.keys import valid_pool
from gpuboss_client.units import MAX_MIB, MAX_TTL_MS, parse_ttl_ms

from . import dashboard, metrics
from .agent import Agent
from .auth import HolderDep, OperatorDep, Principal, ReaderDep, authenticate, bearer
from .consumers import routes as consumer_routes
from .consumers.routes import ManagerDep
from .consumers.service import managed_consumers
from .disconnect import ClientGone, handle_gone, unless_gone
from .docs import (
    INTEGRAL,
    NAME_PATTERN,
    POOL_PATTERN,
    Doc,
    JsonInt,
    NamePath,
    PoolPath,
    RequestDoc,
    allowed_methods,
    errors_doc,
    flat_routes,
)
from .hotpath import HotPath, HotRoute
from .hub import EventHub, Subscription, event_key
from .proxy import routes as proxy_routes
from .proxy.forward import Upstreams
from .reaper import Reaper
from .settings import ServiceSettings

__all__ = ["create_app", "lifespan"]

log = logging.getLogger("gpuboss")

BOSS_HOLDER = "gpuboss-boss"
DEFAULT_POOL = "default"
#: an acquire that gives no timeout_s waits this long (or max_wait_s, if that is shorter)
DEFAULT_WAIT_S = 30.0
#: what Retry-After says for the retryable errors
RETRY_AFTER_S = 1
#: an SSE stream sends a comment this often when nothing happens, so proxies keep it open
KEEPALIVE_S = 15.0
#: the most events a reconnecting stream replays from Redis (the size of a pool's capped stream)
REPLAY_MAX = 10_000
MAX_SECONDS = MAX_TTL_MS / 1000
#: the largest request body taken (a lease request with 4 KiB of labels is far smaller)
MAX_BODY_BYTES = 64 * 1024
#: the most read of a body sent without a length before it is refused (in plain text)
API_BODY_BACKSTOP = 16 * MAX_BODY_BYTES


# --- request and response documents ---------------------------------------------------------------


def _from_a_millisecond(schema: dict[str, Any]) -> None:
    # Durations are whole milliseconds, rounded up from what is given: state "at least 1 ms".
    schema.pop("exclusiveMinimum", None)
    schema["minimum"] = 0.001


Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, json_schema_extra=_from_a_millisecond)]
#: 0 (off), or seconds from a millisecond (they count in whole milliseconds)
OffOrSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=MAX_SECONDS,
        json_schema_extra={
            "anyOf": [{"enum": [0]}, {"minimum": 0.001, "maximum": MAX_SECONDS}],
        },
    ),
]
#: sizes the schema states (the server reads more: "16TiB", " 8 gb ", ...), none out of range
SIZE_PATTERN = r"^([1-9][0-9]{0,6} ?(M|MB|MiB)?|[1-9][0-9]{0,3}(\.[0-9]{1,3})? ?(G|GB|GiB))$"
Size = Annotated[
    JsonInt | str,
    Field(
        description='MiB as an int, or a size like "8GiB", "512MiB", "1.5G"',
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_MIB},
                {"type": "string", "pattern": SIZE_PATTERN},
            ]
        },
    ),
]
Priority = Annotated[
    JsonInt | str,
    Field(
        description='"low" (10), "normal" (50), "high" (90), or 0-100',
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 100},
                {"type": "string", "pattern": "^(low|normal|high)$"},
            ]
        },
    ),
]
#: text Redis stores: no lone surrogates (JSON can carry them, UTF-8 cannot)
TEXT_PATTERN = r"^[^\ud800-\udfff]*$"
#: exactly one of vram and vram_gb, given and not null
ONE_SIZE: dict[str, Any] = {
    "oneOf": [
        {"required": ["vram"], "properties": {"vram": {"not": {"type": "null"}}}},
        {"required": ["vram_gb"], "properties": {"vram_gb": {"not": {"type": "null"}}}},
    ]
}
#: a gang of devices cannot name one device
GANG_NAMES_NO_DEVICE: dict[str, Any] = {
    "if": {"required": ["devices"], "properties": {"devices": {"minimum": 2}}},
    "then": {"properties": {"device": {"type": "null"}}},
}
PoolName = Annotated[
    str,
    Field(description="1-64 of [A-Za-z0-9_.-]", max_length=64, json_schema_extra={"pattern": POOL_PATTERN}),
]


class AcquireBody(RequestDoc):
    """Lease ``vram`` (or ``vram_gb``) on ``device`` or the best fit in ``pool``."""

    model_config = ConfigDict(json_schema_extra=ONE_SIZE | GANG_NAMES_NO_DEVICE)

    vram: Size | None = None
    vram_gb: float | None = Field(
        default=None,
        gt=0,
        le=16384,
        description="GiB; give exactly one of vram and vram_gb",
        json_schema_extra={"minimum": 0.001},
    )
    priority: Priority = "normal"
    pool: PoolName = DEFAULT_POOL
    device: str | None = Field(
        default=None,
        max_length=64,
        description="a device name; null: best fit",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    devices: JsonInt = Field(
        default=1, ge=1, le=16, description="a gang: the same amount on N devices of a host"
    )
    ttl_s: Seconds = Field(
        default=ops.DEFAULT_TTL, description="the lease expires this long after the last heartbeat"
    )
    max_hold_s: Seconds | None = Field(
        default=None, description="a hard cap: the lease ends this long after its grant, heartbeats or not"
    )
    timeout_s: float = Field(
        default=DEFAULT_WAIT_S,
        ge=0,
        description="seconds to wait in the queue (0: try once); at most the service's max_wait_s",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="e.g. the model name; 4 KiB at most",
        json_schema_extra={
            "maxProperties": 16,
            "propertyNames": {"maxLength": 64, "pattern": TEXT_PATTERN},
            "additionalProperties": {"type": "string", "maxLength": 64, "pattern": TEXT_PATTERN},
        },
    )
    request_id: str | None = Field(
        default=None,
        max_length=64,
        description="the lease id; retrying the same one never grants twice",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    preemptible: bool = Field(default=False, description="a request of higher priority may evict it")
    grace_s: Seconds = Field(default=ops.DEFAULT_GRACE, description="time to give memory back")
    exclusive: bool = Field(default=False, description="nothing else may share the device")
    holder: str | None = Field(
        default=None,
        max_length=128,
        description='who holds it (1-128 bytes): default the token\'s name, or "http"',
        json_schema_extra={"minLength": 1, "maxLength": 32, "pattern": TEXT_PATTERN},
    )
    host: str | None = Field(
        default=None,
        max_length=255,
        description="default: the caller's address",
        json_schema_extra={"maxLength": 63, "pattern": TEXT_PATTERN},
    )
    pid: Annotated[int, Field(ge=0, le=2**32 - 1), INTEGRAL] | None = Field(
        default=None, description="default: 0"
    )


class TokenBody(RequestDoc):
    """A held lease's pool and fencing token."""

    pool: PoolName = DEFAULT_POOL
    token: JsonInt = Field(ge=0, le=2**53 - 1, description="the lease's fencing token, from the acquire")


class HeartbeatBody(TokenBody):
    """Renew a held lease."""

    ttl_s: Seconds | None = Field(default=None, description="new lifetime from now; null: the lease's own")


class PlanBody(RequestDoc):
    """A request to judge, without acting on it."""

    model_config = ConfigDict(json_schema_extra=ONE_SIZE | GANG_NAMES_NO_DEVICE)

    vram: Size | None = None
    vram_gb: float | None = Field(default=None, gt=0, le=16384, json_schema_extra={"minimum": 0.001})
    priority: Priority = "normal"
    pool: PoolName = DEFAULT_POOL
    device: str | None = Field(default=None, max_length=64, json_schema_extra={"pattern": NAME_PATTERN})
    exclusive: bool = False
    devices: JsonInt = Field(default=1, ge=1, le=16)


class DeviceBody(RequestDoc):
    """A device's size and place."""

    vram: Size
    reserved: Size = Field(default=0, description="headroom never leased")
    pool: PoolName = DEFAULT_POOL
    host: str | None = Field(default=None, max_length=255, description="default: the boss's host name")
    cuda_index: Annotated[int, Field(ge=0, le=1023), INTEGRAL] | None = None


class PoolBody(RequestDoc):
    """Which pool to act on; null searches (or acts on) every pool."""

    pool: PoolName | None = None


class PoolConfigBody(RequestDoc):
    """A pool's eviction and starvation guards, seconds (0 turns either off)."""

    min_residency_s: OffOrSeconds = 0
    aging_s: OffOrSeconds = 0


class DeviceDoc(Doc):
    pool: str
    name: str
    host: str
    cuda_index: int | None
    total_mib: int
    reserved_mib: int
    unmanaged_mib: int
    budget_mib: int
    used_mib: int
    free_mib: int
    leases: int


class LeaseDoc(Doc):
    id: str
    pool: str
    state: str = Field(description="queued, active, idle, evicting, or how it ended")
    holder: str
    holder_host: str
    holder_pid: int
    mib: int
    priority: int
    device: str | None = Field(description="the device (a gang's joined by commas); a waiter's wish")
    token: int | None
    cuda_indexes: list[int]
    cuda_index: int | None
    devices: list[str]
    device_host: str | None
    ttl_ms: int
    expires_at_ms: int | None
    requested_at_ms: int | None
    granted_at_ms: int | None
    ended_at_ms: int | None
    reason: str | None
    labels: dict[str, str]


class GrantDoc(LeaseDoc):
    env: dict[str, str] = Field(description="CUDA_VISIBLE_DEVICES, GPUBOSS_LEASE_ID, ... for the process")


class BeatDoc(Doc):
    id: str
    state: str = Field(description="active, idle, or evicting: release before evict_deadline_ms")
    now_ms: int
    expires_at_ms: int | None
    evict_deadline_ms: int | None


class PoolDoc(Doc):
    pool: str
    now_ms: int
    granted: int
    queued: int
    devices: list[DeviceDoc]
    leases: list[LeaseDoc]
    queue: list[LeaseDoc]


class StatusDoc(Doc):
    pools: dict[str, PoolDoc]


class DevicesDoc(Doc):
    devices: list[DeviceDoc]


class LeasesDoc(Doc):
    leases: list[LeaseDoc]


class WaiterDoc(LeaseDoc):
    position: int = Field(description="how many wait ahead of it in its pool")
    consumer: str | None = Field(
        default=None, description="the managed consumer this lease request is for (the gated proxy, ensure)"
    )
    wait_reason: str | None = Field(
        default=None, description="a consumer's request: why it waits (behind, no_room, evicting)"
    )
    eta_s: float | None = Field(default=None, description="a consumer's request: estimated seconds left")


class QueueDoc(Doc):
    queue: list[WaiterDoc]


class EventDoc(Doc):
    pool: str
    id: str = Field(description="the stream entry id, <ms>-<n>")
    time_ms: int
    event: str
    fields: dict[str, str]


class EventsDoc(Doc):
    events: list[EventDoc]


class DeviceHealthDoc(Doc):
    name: str
    pool: str
    state: Literal["ok", "lost", "unmeasured"]
    agent_host: str | None
    total_mib: int
    unmanaged_mib: int
    seen_mib: int | None
    leak_mib: int
    leak_pids: list[int]
    measured_at_ms: int | None


class LeaseUsageDoc(Doc):
    id: str
    pool: str
    holder: str
    holder_host: str
    holder_pid: int
    device: str
    mib: int
    measured_mib: int
    peak_mib: int
    finding: Literal["over_use", "under_use"] | None
    measured_at_ms: int
    labels: dict[str, str]


class PoolFindingsDoc(Doc):
    pool: str
    now_ms: int
    devices: list[DeviceHealthDoc]
    leases: list[LeaseUsageDoc]
    label_peaks: dict[str, int] = Field(description='peak measured MiB per lease label, "key=value"')


class FindingsDoc(Doc):
    findings: list[PoolFindingsDoc]


class PlanDoc(Doc):
    outcome: Literal["grant", "evict", "wait", "never"]
    device: str | None
    victims: list[str]
    ahead: int
    largest_mib: int


class ReleasedDoc(Doc):
    id: str
    state: Literal["released"]


class DevicePutDoc(Doc):
    created: bool
    device: DeviceDoc


class DeviceRemovedDoc(Doc):
    removed: str
    pool: str


class ReapedDoc(Doc):
    reaped: int


class PoolConfigDoc(Doc):
    pool: str
    min_residency_s: float
    aging_s: float


class HealthDoc(Doc):
    status: Literal["ok"]
    version: str


class ReadyDoc(Doc):
    status: Literal["ready"]
    redis: Literal["ok"]
    scripts: dict[str, str] = Field(description="SHA1 of each Lua script, loaded in Redis")


class GpuDeviceDoc(Doc):
    pool: str
    name: str
    host: str
    cuda_index: int | None
    total_mib: int
    budget_mib: int = Field(description="total - reserved - unmanaged")
    used_mib: int = Field(description="held by leases")
    free_mib: int = Field(ge=0, description="budget - used, 0 when used (or unmanaged) exceeds the budget")


class GpuHealthDoc(Doc):
    gpu_available: bool = Field(description="a device exists and some device has free memory")
    vram_total: int = Field(ge=0, description="MiB: total_mib summed over the devices")
    vram_free: int = Field(ge=0, description="MiB: free_mib summed over the devices")
    devices: list[GpuDeviceDoc]


# --- errors ---------------------------------------------------------------------------------------

_BY_STATUS: dict[int, type[GpubossError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    429: QueueFull,
    503: BackendUnavailable,
}


def _error_of(request: Request, exc: Exception) -> tuple[GpubossError, int, dict[str, str]]:
    if isinstance(exc, GpubossError):
        return exc, exc.http_status, {}
    if isinstance(exc, RequestValidationError):
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems) or "bad request"
        return BadRequest(message, problems=problems), 400, {}
    if isinstance(exc, StarletteHTTPException):
        cls = _BY_STATUS.get(exc.status_code, BadRequest if exc.status_code < 500 else GpubossError)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            allowed = allowed_methods(
                request, skip=lambda route: "proxy" in (getattr(route, "tags", None) or ())
            )
            return MethodNotAllowed(message), 405, {"Allow": ", ".join(allowed)}
        else:
            message = str(exc.detail)
        return cls(message), exc.status_code, dict(exc.headers or {})
    # A bug: the server logs the traceback (Starlette re-raises it after this reply).
    return GpubossError("internal error; the service log has the details"), 500, {}


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: every error as ``GpubossError.to_dict()`` with its status."""
    err, status, headers = _error_of(request, exc)
    if err.retryable:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


_REDIS = ("backend_unavailable", "protocol_error")
_READ = ("bad_request", "unauthorized", *_REDIS)
_HOLD = ("bad_request", "unauthorized", "forbidden", *_REDIS)
_LEASE = (*_HOLD, "lease_not_found", "lease_not_held", "lease_lost", "lease_evicted")
_PLACE = ("pool_not_found", "device_not_found", "insufficient_vram", "request_conflict")
_ACQUIRE = (*_LEASE, *_PLACE, "acquire_timeout", "queue_full")


#: one message of the event stream, as OpenAPI 3.1 describes an item of ``text/event-stream``
_SSE: dict[str, Any] = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["id", "event", "data"],
            "properties": {
                "id": {"type": "string", "description": "<pool>/<entry id>: send it back as Last-Event-ID"},
                "event": {"type": "string", "description": "the event's name: granted, released, ..."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/EventDoc"},
                },
                "retry": {"type": "integer"},
            },
        }
    }
}


# --- dependencies ---------------------------------------------------------------------------------
# All async: FastAPI runs a plain ``def`` dependency in a worker thread, which costs more than it does.


async def get_boss(request: Request) -> AsyncBoss:
    """The service's client (made by the lifespan)."""
    boss: AsyncBoss = request.app.state.boss
    return boss


async def get_settings(request: Request) -> ServiceSettings:
    """The service's settings."""
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_hub(request: Request) -> EventHub:
    """The service's event hub."""
    hub: EventHub = request.app.state.hub
    return hub


BossDep = Annotated[AsyncBoss, Depends(get_boss)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
HubDep = Annotated[EventHub, Depends(get_hub)]
PoolQuery = Annotated[
    str | None,
    Query(
        description="only this pool (default: every pool)",
        max_length=64,
        json_schema_extra={"pattern": POOL_PATTERN},
    ),
]
OnePoolQuery = Annotated[
    str, Query(description="the lease's pool", max_length=64, json_schema_extra={"pattern": POOL_PATTERN})
]


async def _held(boss: AsyncBoss, who: Principal, pool: str, lease_id: str) -> None:
    """For a holder token: refuse a lease another holder holds (reading it costs one round trip)."""
    if not who.is_operator:
        who.check_holds(await boss.run(ops.lease_info(pool, lease_id)))


# --- routes ---------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="The process is up", response_model=HealthDoc)
async def healthz() -> dict[str, Any]:
    """Answers while the process runs, whether or not Redis is reachable."""
    return {"status": "ok", "version": __version__}


@router.get(
    "/readyz",
    tags=["health"],
    summary="Redis is reachable and the scripts are loaded",
    response_model=ReadyDoc,
    responses=errors_doc(*_REDIS),
)
async def readyz(boss: BossDep, settings: SettingsDep) -> dict[str, Any]:
    """Pings Redis and checks (``SCRIPT EXISTS``) that every Lua script is cached, and that the
    function library is loaded where the service calls it, loading what is missing (after a Redis
    restart); answers 503 ``backend_unavailable`` when Redis is not reachable within
    ``redis_timeout_s``."""
    try:
        async with asyncio.timeout(settings.redis_timeout_s):
            shas = await boss.load_scripts()
    except TimeoutError:
        raise BackendUnavailable(f"Redis did not answer within {settings.redis_timeout_s} s") from None
    return {"status": "ready", "redis": "ok", "scripts": shas}


@router.get(
    "/health",
    tags=["health"],
    summary="Whether a GPU has free memory, in MiB",
    response_model=GpuHealthDoc,
    responses=errors_doc("bad_request", *_REDIS, "pool_not_found"),
)
async def health(boss: BossDep, settings: SettingsDep, pool: PoolQuery = None) -> dict[str, Any]:
    """VRAM summed over the devices of ``pool`` (or of every pool), with each device's figures;
    needs no token, like ``/readyz`` and ``/metrics``. A ``pool`` with no devices is 404
    ``pool_not_found`` (as acquire and plan answer); 503 ``backend_unavailable`` when Redis is not
    reachable within ``redis_timeout_s``."""
    try:
        async with asyncio.timeout(settings.redis_timeout_s):
            pools = await boss.status(pool)
    except TimeoutError:
        raise BackendUnavailable(f"Redis did not answer within {settings.redis_timeout_s} s") from None
    devices: list[dict[str, Any]] = [
        {
            "pool": d.pool,
            "name": d.name,
            "host": d.host,
            "cuda_index": d.cuda_index,
            "total_mib": d.total_mib,
            "budget_mib": d.budget_mib,
            "used_mib": d.used_mib,
            "free_mib": max(0, d.free_mib),
        }
        for p in pools
        for d in p.devices
    ]
    if pool is not None and not devices:
        raise PoolNotFound(f"pool {pool!r} has no devices", pool=pool)
    return {
        "gpu_available": any(d["free_mib"] > 0 for d in devices),
        "vram_total": sum(d["total_mib"] for d in devices),
        "vram_free": sum(d["free_mib"] for d in devices),
        "devices": devices,
    }


@router.get(
    "/v1/status",
    tags=["status"],
    summary="Devices, leases and queue of every pool",
    response_model=StatusDoc,
    responses=errors_doc(*_READ, "pool_not_found"),
)
async def get_status(boss: BossDep, _: ReaderDep, pool: PoolQuery = None) -> dict[str, Any]:
    """Per pool: counts, Redis time, devices with budgets, granted leases and the queue in order.
    A ``pool`` with no devices is 404 ``pool_not_found``, on this route and the others here."""
    pools = await boss.status(pool)
    if pool is not None and not any(p.devices for p in pools):
        raise PoolNotFound(f"pool {pool!r} has no devices", pool=pool)
    return status_document(pools, await boss.leases(pool))


async def _pool_exists(boss: AsyncBoss, pool: str | None) -> None:
    """404 ``pool_not_found`` for a ``pool`` with no devices, as acquiring in it answers."""
    if pool is not None and not await boss.devices(pool):
        raise PoolNotFound(f"pool {pool!r} has no devices", pool=pool)


@router.get(
    "/v1/devices",
    tags=["status"],
    summary="Devices and their memory",
    response_model=DevicesDoc,
    responses=errors_doc(*_READ, "pool_not_found"),
)
async def get_devices(boss: BossDep, _: ReaderDep, pool: PoolQuery = None) -> dict[str, Any]:
    """Every device of ``pool`` (or of every pool), sizes in MiB."""
    devices = await boss.devices(pool)
    if pool is not None and not devices:
        raise PoolNotFound(f"pool {pool!r} has no devices", pool=pool)
    return {"devices": [d.to_dict() for d in devices]}


@router.get(
    "/v1/leases",
    tags=["status"],
    summary="Live leases and waiters",
    response_model=LeasesDoc,
    responses=errors_doc(*_READ, "pool_not_found"),
)
async def get_leases(boss: BossDep, _: ReaderDep, pool: PoolQuery = None) -> dict[str, Any]:
    """Every live lease and waiting request, soonest expiry first per pool."""
    await _pool_exists(boss, pool)
    return {"leases": [x.to_dict() for x in await boss.leases(pool)]}


@router.get(
    "/v1/queue",
    tags=["status"],
    summary="Waiters in queue order",
    response_model=QueueDoc,
    responses=errors_doc(*_READ, "pool_not_found"),
)
async def get_queue(
    boss: BossDep, manager: ManagerDep, _: ReaderDep, pool: PoolQuery = None
) -> dict[str, Any]:
    """The waiting requests, by priority and then arrival, each with its ``position`` in its pool.
    A managed consumer's lease request (for the gated proxy or an ensure) also says which
    ``consumer``, why it waits (``wait_reason``) and the estimate (``eta_s``) when there is one."""
    await _pool_exists(boss, pool)
    waiting = {u.wait.request_id: u for u in manager.units() if u.wait is not None and u.state == "loading"}
    out, ahead = [], Counter[str]()
    for x in split_queue(await boss.leases(pool))[1]:
        doc = x.to_dict() | {"position": ahead[x.pool]}
        ahead[x.pool] += 1
        unit = waiting.get(x.id)
        if unit is not None and (wait := unit.to_dict()["waiting"]) is not None:
            doc |= {"consumer": unit.consumer.name, "wait_reason": wait["reason"], "eta_s": wait["eta_s"]}
        out.append(doc)
    return {"queue": out}


@router.get(
    "/v1/findings",
    tags=["status"],
    summary="What the NVML agent measured",
    response_model=FindingsDoc,
    responses=errors_doc(*_READ, "pool_not_found"),
)
async def get_findings(boss: BossDep, _: ReaderDep, pool: PoolQuery = None) -> dict[str, Any]:
    """Per pool: device health (ok, lost, unmeasured; leaks), the measured leases with their
    findings (over_use, under_use), and the peak measured use per lease label."""
    await _pool_exists(boss, pool)
    return {"findings": [f.to_dict() for f in await boss.findings(pool)]}


@router.get(
    "/v1/leases/{id}",
    tags=["leases"],
    summary="One lease or waiter",
    response_model=LeaseDoc,
    responses=errors_doc(*_READ, "lease_not_found"),
)
async def get_lease(
    id: NamePath, boss: BossDep, _: ReaderDep, pool: OnePoolQuery = DEFAULT_POOL
) -> dict[str, Any]:
    """A lease as Redis holds it; an ended one stays readable for two minutes."""
    return (await boss.run(ops.lease_info(pool, id))).to_dict()


@router.post(
    "/v1/leases",
    tags=["leases"],
    status_code=201,
    summary="Acquire a lease (waits up to timeout_s)",
    response_model=GrantDoc,
    responses=errors_doc(*_ACQUIRE),
)
async def acquire(
    body: AcquireBody, request: Request, boss: BossDep, settings: SettingsDep, who: HolderDep
) -> dict[str, Any]:
    """Grants at once when the memory is free, else waits in the pool's queue (a long poll) until
    granted or ``timeout_s`` passes: then 503 ``acquire_timeout`` and the request has left the
    queue. ``timeout_s`` above the service's ``max_wait_s`` is refused; without ``timeout_s`` it
    waits 30 s or ``max_wait_s``, whichever is shorter. 429 ``queue_full`` when the pool already
    has ``max_queue`` waiters. Retrying with the same ``request_id`` returns the same lease.

    Heartbeat before ``ttl_s`` passes; eviction notices come in heartbeat replies."""
    timeout = (
        body.timeout_s if "timeout_s" in body.model_fields_set else min(DEFAULT_WAIT_S, settings.max_wait_s)
    )
    if timeout > settings.max_wait_s:
        raise BadRequest(f"timeout_s must be at most {settings.max_wait_s} (max_wait_s), not {timeout}")
    req = ops.AcquireRequest.build(
        vram=body.vram, vram_gb=body.vram_gb, priority=body.priority, device=body.device, pool=body.pool,
        ttl=body.ttl_s, timeout=timeout, labels=body.labels, request_id=body.request_id,
        preemptible=body.preemptible, grace=body.grace_s, exclusive=body.exclusive, devices=body.devices,
        max_hold=body.max_hold_s, max_queue=settings.max_queue,
    )  # fmt: skip
    client_host = request.client.host if request.client else ""
    # No pub/sub channel: an HTTP holder learns of eviction from its heartbeat replies. The queue
    # cap is checked inside the acquire script (a retry of a request that waits already passes).
    holder = ops.Holder(who.holder_for(body.holder), body.host or client_host, body.pid or 0, notify="")
    acquiring = boss.run(ops.acquire(req, holder, time.monotonic, max_block=boss.max_block))
    try:
        # A try-once acquire never waits in the queue: nothing to withdraw if the client leaves.
        lease = await (unless_gone(request, acquiring) if timeout > 0 else acquiring)
    except ClientGone:
        await boss.run(ops.withdraw(req, holder))  # nobody is waiting for it any more
        raise
    info = lease.info
    if info.requested_at_ms is None or info.granted_at_ms is None:
        # Granted after waiting: the wake-up carries no times; the lease's record has them.
        info = await boss.run(ops.lease_info(info.pool, info.id))
    return info.to_dict() | {"env": lease.env}


@router.post(
    "/v1/leases/{id}/heartbeat",
    tags=["leases"],
    summary="Renew a lease and learn its state",
    response_model=BeatDoc,
    responses=errors_doc(*_LEASE),
)
async def heartbeat(id: NamePath, body: HeartbeatBody, boss: BossDep, who: HolderDep) -> dict[str, Any]:
    """Pushes the expiry ``ttl_s`` (default: the lease's own TTL) into the future. ``state``
    ``evicting`` means gpuboss wants the memory back: release before ``evict_deadline_ms``.
    409 ``lease_lost`` (or ``lease_evicted``) when the lease has ended."""
    if body.ttl_s is None:
        info = await boss.run(ops.lease_info(body.pool, id))
        who.check_holds(info)
        ttl_ms = info.ttl_ms
    else:
        await _held(boss, who, body.pool, id)
        ttl_ms = parse_ttl_ms(body.ttl_s, "ttl_s")
    beat = await boss.run(ops.heartbeat_ref(ops.LeaseRef(body.pool, id, body.token), ttl_ms))
    return beat.to_dict()


@router.post(
    "/v1/leases/{id}/release",
    tags=["leases"],
    summary="Release a lease",
    response_model=ReleasedDoc,
    responses=errors_doc(*_LEASE),
)
async def release(id: NamePath, body: TokenBody, boss: BossDep, who: HolderDep) -> dict[str, Any]:
    """Frees the memory and, in the same step, grants the waiters that now fit. 409 ``lease_lost``
    when it had already ended otherwise (expired, revoked, force-released)."""
    await _held(boss, who, body.pool, id)
    await boss.run(ops.release_ref(ops.LeaseRef(body.pool, id, body.token)))
    return {"id": id, "state": "released"}


@router.post(
    "/v1/leases/{id}/idle",
    tags=["leases"],
    summary="Keep a lease warm (evictable)",
    response_model=BeatDoc,
    responses=errors_doc(*_LEASE),
)
async def idle(id: NamePath, body: TokenBody, boss: BossDep, who: HolderDep) -> dict[str, Any]:
    """The model stays resident, but anyone who needs the room may evict it, least recently used
    first. Keep heartbeating."""
    await _held(boss, who, body.pool, id)
    return (await boss.run(ops.mark_ref(ops.LeaseRef(body.pool, id, body.token), "idle"))).to_dict()


@router.post(
    "/v1/leases/{id}/busy",
    tags=["leases"],
    summary="Take a warm lease back into use",
    response_model=BeatDoc,
    responses=errors_doc(*_LEASE),
)
async def busy(id: NamePath, body: TokenBody, boss: BossDep, who: HolderDep) -> dict[str, Any]:
    """409 ``lease_evicted`` when the lease is being evicted: release it and acquire again."""
    await _held(boss, who, body.pool, id)
    beat = await boss.run(ops.mark_ref(ops.LeaseRef(body.pool, id, body.token), "busy"))
    if beat.state == "evicting":
        raise LeaseEvicted(
            f"lease {id} is being evicted: release it before {beat.evict_deadline_ms}",
            lease=id,
            evict_deadline_ms=beat.evict_deadline_ms,
        )
    return beat.to_dict()


@router.post(
    "/v1/plan",
    tags=["status"],
    summary="Dry run: what would happen to a request now",
    response_model=PlanDoc,
    responses=errors_doc(*_READ, "pool_not_found", "device_not_found"),
)
async def plan(body: PlanBody, boss: BossDep, _: ReaderDep) -> dict[str, Any]:
    """``grant`` on a device, ``evict`` these victims, ``wait`` behind ``ahead`` requests, or
    ``never`` (bigger than every budget). Changes nothing."""
    p = await boss.plan(
        body.vram, vram_gb=body.vram_gb, priority=body.priority, device=body.device, pool=body.pool,
        exclusive=body.exclusive, devices=body.devices,
    )  # fmt: skip
    return dataclasses.asdict(p) | {"victims": list(p.victims)}


@router.get(
    "/v1/events",
    tags=["events"],
    summary="Recent events",
    response_model=EventsDoc,
    responses=errors_doc(*_READ),
)
async def get_events(
    boss: BossDep,
    _: ReaderDep,
    pool: PoolQuery = None,
    count: Annotated[int, Query(ge=1, le=ops.MAX_EVENTS)] = 100,
) -> dict[str, Any]:
    """The last ``count`` events of ``pool`` (or of every pool), oldest first."""
    return {"events": [e.to_dict() for e in await boss.events(pool, count=count)]}


@router.get(
    "/v1/events/stream",
    tags=["events"],
    summary="Live events (server-sent events)",
    response_class=StreamingResponse,
    responses=errors_doc(*_READ) | {200: {"description": "server-sent events", "content": _SSE}},
)
async def stream_events(
    boss: BossDep,
    hub: HubDep,
    _: ReaderDep,
    pool: PoolQuery = None,
    last: Annotated[int, Query(ge=0, le=ops.MAX_EVENTS, description="replay this many past events")] = 0,
    last_event_id: Annotated[
        str,
        Header(
            description="resume after this event id (<pool>/<entry id>)",
            json_schema_extra={"pattern": r"^[A-Za-z0-9_.-]{1,64}/[0-9]{1,19}-[0-9]{1,19}$"},
        ),
    ] = "",
) -> StreamingResponse:
    """The last ``last`` events, then live ones as they happen. A reconnecting client (browsers'
    ``EventSource`` do it by themselves) sends ``Last-Event-ID`` and gets what it missed. A comment
    line every 15 s keeps idle connections open."""
    if pool is not None and not valid_pool(pool):
        raise BadRequest(f"pool must be 1-64 of [A-Za-z0-9_.-], not {pool!r}")
    resume = _parse_event_id(last_event_id) if last_event_id else None
    sub = hub.subscribe(pool)  # before reading the backlog, so nothing falls between the two
    try:
        backlog = await _backlog(boss, pool, last, resume)
    except BaseException:
        sub.close()
        raise
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_sse(sub, backlog), media_type="text/event-stream", headers=headers)


_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _parse_event_id(text: str) -> tuple[str, str]:
    pool, _, entry = text.partition("/")
    if not valid_pool(pool) or not _ENTRY_ID.fullmatch(entry):
        raise BadRequest(f"Last-Event-ID must be <pool>/<ms>-<n> as the stream sent it, not {text!r}")
    return pool, entry


async def _backlog(
    boss: AsyncBoss, pool: str | None, last: int, resume: tuple[str, str] | None
) -> list[Event]:
    if resume is None:
        return await boss.events(pool, count=last) if last else []
    # Entry ids are Redis times, so the resumed id is also the right cursor for the other pools.
    out: list[Event] = []
    async for event in boss.follow(pool, after=resume[1], block=None):
        out.append(event)
        if len(out) >= REPLAY_MAX:
            break
    return out


def _sse_message(event: Event) -> str:
    data = json.dumps(event.to_dict(), separators=(",", ":"))
    return f"id: {event.pool}/{event.id}\nevent: {event.name}\ndata: {data}\n\n"


async def _sse(sub: Subscription, backlog: list[Event]) -> AsyncIterator[str]:
    with sub:
        seen: dict[str, tuple[int, int]] = {}
        for past in backlog:
            seen[past.pool] = max(seen.get(past.pool, (0, 0)), event_key(past.id))
            yield _sse_message(past)
        yield "retry: 2000\n\n"  # also tells a reader that the live part begins
        while True:
            try:
                event = await sub.get(timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event is None:  # the hub stopped, or dropped this subscriber for falling behind
                return
            if event.pool in seen and event_key(event.id) <= seen[event.pool]:
                continue  # already sent from the backlog
            yield _sse_message(event)


@router.put(
    "/v1/devices/{name}",
    tags=["admin"],
    summary="Add or update a device (operator)",
    response_model=DevicePutDoc,
    responses=errors_doc(*_HOLD, "device_not_found"),
)
async def put_device(name: NamePath, body: DeviceBody, boss: BossDep, _: OperatorDep) -> dict[str, Any]:
    """Adds a device of ``vram`` (``reserved`` of it never leased) to ``pool``, or updates it."""
    created = await boss.add_device(
        name, body.vram, reserved=body.reserved, pool=body.pool, host=body.host, cuda_index=body.cuda_index
    )
    for device in await boss.devices(body.pool):
        if device.name == name:
            return {"created": created, "device": device.to_dict()}
    raise NotFound(f"device {name} was removed meanwhile")


@router.delete(
    "/v1/devices/{name}",
    tags=["admin"],
    summary="Remove a device (operator)",
    response_model=DeviceRemovedDoc,
    responses=errors_doc(*_HOLD, "device_not_found", "pool_not_found", "device_busy"),
)
async def delete_device(
    name: NamePath,
    boss: BossDep,
    _: OperatorDep,
    pool: OnePoolQuery = DEFAULT_POOL,
    force: bool = False,
) -> dict[str, Any]:
    """Refused with 409 ``device_busy`` while it has leases, unless ``force`` (which force-releases
    them)."""
    await boss.remove_device(name, pool=pool, force=force)
    return {"removed": name, "pool": pool}


@router.post(
    "/v1/leases/{id}/force-release",
    tags=["admin"],
    summary="End a lease without its token (operator)",
    response_model=LeaseDoc,
    responses=errors_doc(*_HOLD, "lease_not_found", "pool_not_found", "lease_lost"),
)
async def force_release(
    id: NamePath, boss: BossDep, _: OperatorDep, body: Annotated[PoolBody | None, Body()] = None
) -> dict[str, Any]:
    """Frees a stale lease (or drops a waiter) in ``pool``, or in whichever pool has it. Returns
    the ended lease."""
    return (await boss.force_release(id, body.pool if body else None)).to_dict()


@router.post(
    "/v1/reap",
    tags=["admin"],
    summary="Reap expired leases now (operator)",
    response_model=ReapedDoc,
    responses=errors_doc(*_HOLD, "pool_not_found"),
)
async def reap(
    boss: BossDep, _: OperatorDep, body: Annotated[PoolBody | None, Body()] = None
) -> dict[str, Any]:
    """Ends expired leases and abandoned waiters of ``pool`` (or of every pool) now; the reaper
    does this every ``reap_interval_s`` anyway."""
    return {"reaped": await boss.reap(body.pool if body else None)}


@router.put(
    "/v1/pools/{pool}/config",
    tags=["admin"],
    summary="Set a pool's eviction and starvation guards (operator)",
    response_model=PoolConfigDoc,
    responses=errors_doc(*_HOLD, "pool_not_found"),
)
async def configure_pool(
    pool: PoolPath, body: PoolConfigBody, boss: BossDep, _: OperatorDep
) -> dict[str, Any]:
    """``min_residency_s``: a lease younger than this is evicted only when nothing else makes
    room. ``aging_s``: a waiter rises one priority level (10) per this many seconds waited."""
    await boss.configure_pool(pool, min_residency=body.min_residency_s, aging=body.aging_s)
    return {"pool": pool, "min_residency_s": body.min_residency_s, "aging_s": body.aging_s}


# --- the application ------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect, load the scripts, register the configured devices, run the reaper and the event
    hub; stop them and disconnect at exit. Fails to start when Redis is unreachable."""
    settings: ServiceSettings = app.state.settings
    url: str = app.state.redis_url
    boss = AsyncBoss.from_url(url, holder=BOSS_HOLDER, socket_connect_timeout=settings.redis_timeout_s)
    try:
        shas = await boss.load_scripts()
        log.info("scripts: %s", " ".join(f"{name}={sha}" for name, sha in shas.items()))
        for spec in settings.devices:
            created = await boss.add_device(
                spec.name, spec.mib, pool=settings.pool, cuda_index=spec.cuda_index
            )
            verb = "added" if created else "updated"
            log.info("%s device %s: %d MiB in pool %s", verb, spec.name, spec.mib, settings.pool)
        if not await boss.devices():
            log.warning(
                "no devices yet: nothing can be leased until some are added (--device gpu0=24GiB, "
                "GPUBOSS_DEVICES, PUT /v1/devices/{name}, gpuboss devices add, or the agent)"
            )
    except BaseException as exc:
        await boss.aclose()
        if isinstance(exc, GpubossError):
            log.error("cannot start: %s", exc.message)
        raise
    hub = EventHub(boss)
    reaper = Reaper(boss, settings.reap_interval_s)
    app.state.boss, app.state.hub, app.state.reaper = boss, hub, reaper
    hub.start()
    reaper.start()
    try:
        async with managed_consumers(settings, url, app.state.agent) as manager:
            app.state.consumers = manager
            yield
    finally:
        await reaper.stop()
        await hub.stop()
        await app.state.upstreams.aclose()
        await boss.aclose()


class BodyCap:
    """Refuse a request whose ``Content-Length`` is over its route's cap: 413 ``payload_too_large``
    in JSON, before any of it is read. ``limit`` is the API's own; ``limit_of(scope)``, asked only
    beyond it, is the route's (the gated proxy's routes carry engines' bodies)."""

    def __init__(self, app: ASGIApp, limit: int, limit_of: Callable[[Scope], int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.limit_of = limit_of or (lambda scope: limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit and int(length) > (cap := self.limit_of(scope)):
                err = PayloadTooLarge(f"the request body is over {cap} bytes")
                await JSONResponse(err.to_dict(), status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_TOO_LARGE = {
    "description": f"error: payload_too_large (a body over {MAX_BODY_BYTES} bytes)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDoc"}}},
}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        # Validation problems are answered with 400 bad_request, never 422: drop FastAPI's 422 docs.
        # Without tokens nobody authenticates: the document says so rather than asking for one.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            auth = app.state.settings.auth
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
                    if "requestBody" in operation:
                        operation["responses"]["413"] = _TOO_LARGE
                    if not auth:
                        operation.pop("security", None)
                        operation.get("responses", {}).pop("401", None)
                        operation.get("responses", {}).pop("403", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            if not auth:
                schema.get("components", {}).pop("securitySchemes", None)
            # The longest wait is the service's setting, not a constant of the document.
            wait = schema["components"]["schemas"]["AcquireBody"]["properties"]["timeout_s"]
            wait["maximum"] = app.state.settings.max_wait_s
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def _body_cap(app: FastAPI, scope: Scope) -> int:
    """The body cap of the route a request goes to: a gated proxy route's own, else the API's."""
    for route in flat_routes(app.router.routes):
        if route.matches(scope)[0] == Match.FULL:
            if "proxy" in (getattr(route, "tags", None) or ()):
                return proxy_routes.body_cap(route.path)
            break
    return MAX_BODY_BYTES


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientGone):
        return await handle_gone(request, exc)
    if not isinstance(exc, GpubossError):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return await handle_error(request, exc)


async def _hot_acquire(request: Request, body: AcquireBody, params: dict[str, str]) -> dict[str, Any]:
    state = request.app.state
    who = await authenticate(request, await bearer(request))
    return await acquire(body, request, state.boss, state.settings, who)


async def _hot_release(request: Request, body: TokenBody, params: dict[str, str]) -> dict[str, Any]:
    who = await authenticate(request, await bearer(request))
    return await release(params["id"], body, request.app.state.boss, who)


#: what every holder calls per lease, answered by :class:`HotPath` with these very routes' handlers
HOT_ROUTES = (
    HotRoute("POST", re.compile("/v1/leases"), AcquireBody, TypeAdapter(GrantDoc), 201, _hot_acquire),
    HotRoute(
        "POST", re.compile("/v1/leases/(?P<id>[^/]+)/release"), TokenBody, TypeAdapter(ReleasedDoc), 200,
        _hot_release,
    ),
)  # fmt: skip


def create_app(settings: ServiceSettings, redis_url: str, agent: Agent | None = None) -> FastAPI:
    """The boss service for ``settings``, on the Redis at ``redis_url``; ``agent`` is the agent
    running beside it, whose measurements the managed consumers wait for."""
    app = FastAPI(
        title="gpuboss",
        version=__version__,
        summary="Share GPUs without running out of memory: VRAM leases coordinated through Redis.",
        description="Lease GPU memory over HTTP, watch devices, leases and the queue, and operate the "
        "pools. Errors are JSON `{error, message, retryable, ...}` with a stable `error` code. "
        "With tokens configured, send `Authorization: Bearer <secret>`.",
        lifespan=lifespan,
        # The backstop for bodies sent without a length (answered in plain text), per router:
        # the API's own routes take little, the proxy's engines' bodies. BodyCap answers the usual
        # case, a declared length over the cap, in JSON, before anything is read.
        max_body_size=proxy_routes.MAX_STREAMED_BODY,
        openapi_tags=[
            {"name": "leases", "description": "Acquire, heartbeat, release; a holder token acts on its own"},
            {"name": "status", "description": "Devices, leases, queue, dry runs; any token"},
            {"name": "events", "description": "The event log of every lease transition; any token"},
            {"name": "admin", "description": "Devices, pools, force-release, reap; operator tokens"},
            {"name": "consumers", "description": "Managed GPU services: list, ensure, release, reload"},
            {"name": "proxy", "description": "Requests forwarded to the consumers, which are loaded first"},
            {"name": "health", "description": "Liveness and readiness; no token"},
        ],
    )
    app.state.settings = settings
    app.state.redis_url = redis_url
    app.state.agent = agent
    app.state.upstreams = Upstreams()
    for exc_type in (GpubossError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_exception_handler(ClientGone, handle_gone)
    app.add_middleware(HotPath, routes=HOT_ROUTES, on_error=_on_error, max_body=MAX_BODY_BYTES)
    app.add_middleware(BodyCap, limit=MAX_BODY_BYTES, limit_of=lambda scope: _body_cap(app, scope))
    app.include_router(router, max_body_size=API_BODY_BACKSTOP)
    app.include_router(consumer_routes.router, max_body_size=API_BODY_BACKSTOP)
    app.include_router(proxy_routes.router)  # last: its catch-alls take only what nothing else does
    app.include_router(dashboard.router, max_body_size=API_BODY_BACKSTOP)
    app.include_router(metrics.router, max_body_size=API_BODY_BACKSTOP)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
