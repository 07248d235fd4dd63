"""The boss service over HTTP, for the CLI's commands.

:class:`HttpBoss` has the operator methods of :class:`gpuboss_client.Boss` that the CLI calls, with
the same arguments and the same results (the client's dataclasses, rebuilt with their
``from_dict``), but sends them to ``gpuboss serve``'s ``/v1`` API instead of Redis. Error replies
become the same errors of the one tree (:func:`gpuboss_client.errors.error_for`), so a command
fails with the same code and exit code over either path. A :class:`BackendUnavailable` says which
link is down: "cannot reach the boss at URL" (the service does not answer), or "the boss at URL
cannot reach Redis" (it answered so).

It also drives the boss's managed consumers (GPU services such as Ollama, vLLM or ComfyUI that the
boss loads and unloads, ``gpuboss serve --consumers FILE``), which live only in the service, not in
Redis. Python programs can use it for that too::

    from gpuboss_cli.http import HttpBoss

    with HttpBoss("http://127.0.0.1:8765", token=...) as boss:
        doc = boss.ensure("ollama", model="llama3:8b", timeout=120)  # loaded and healthy
        ...
        boss.release_consumer("ollama", model="llama3:8b")

The consumer methods return the service's documents as dicts (``name``, ``model``, ``state``,
``device``, ``vram_mib``, ``measured_mib``, ``lease``, ``error``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    DeviceInfo,
    Event,
    GpubossError,
    LeaseInfo,
    Plan,
    PoolStatus,
    ProtocolError,
    parse_mib,
    parse_priority,
)
from gpuboss_client.errors import error_for
from gpuboss_client.keys import valid_name, valid_pool
from gpuboss_client.ops import Findings

from .settings import redact

__all__ = ["HttpBoss", "is_http_url"]

DEFAULT_POOL = "default"
#: seconds an ensure's reply may take beyond its own wait for memory: the load and health check
ENSURE_GRACE_S = 300.0


def is_http_url(url: str) -> bool:
    """Whether ``url`` names a boss service (``http://`` or ``https://``) rather than Redis."""
    return url.lower().startswith(("http://", "https://"))


def _segment(what: str, name: str, *, pool: bool = False) -> str:
    """``name`` checked as the client checks it, then quoted as one URL path segment."""
    if pool:
        if not valid_pool(name):
            raise BadRequest(f"pool must be 1-64 of [A-Za-z0-9_.-], not {name!r}")
    elif not valid_name(name):
        raise BadRequest(f"{what} must be 1-64 of [A-Za-z0-9_.:-], not {name!r}")
    # "." and ".." are valid names, but URL dot segments: encode them so nothing collapses them.
    return "%2E" * len(name) if name in (".", "..") else quote(name, safe="")


def _key(doc: Any, key: str, kind: type) -> Any:
    """``doc[key]`` if ``doc`` is an object with a ``kind`` there, else ProtocolError."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"the boss answered without a valid {key!r}: {doc!r}")
    return value


def _event(doc: Any) -> Event:
    """The inverse of :meth:`Event.to_dict` (``{pool, id, time_ms, event, fields}``)."""
    try:
        fields = doc["fields"]
        if not isinstance(fields, dict):
            raise TypeError(fields)
        return Event(
            str(doc["pool"]), str(doc["id"]), str(doc["event"]), {str(k): str(v) for k, v in fields.items()}
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed event document: {doc!r}") from exc


class HttpBoss:
    """The operator's view of a boss service at ``url`` (``http://host:8765``).

    ``token`` is sent as ``Authorization: Bearer <token>``; a service without tokens needs none.
    Connection failures raise :class:`BackendUnavailable`; replies that are not the service's JSON
    raise :class:`ProtocolError`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not is_http_url(url):
            raise BadRequest(f"bad boss URL {redact(url)}: it must start with http:// or https://")
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            self._http = httpx.Client(
                base_url=self.url, headers=headers, timeout=timeout, transport=transport
            )
        except (httpx.InvalidURL, ValueError) as exc:
            raise BadRequest(f"bad boss URL {redact(url)}: {exc}") from exc
        self._timeout = timeout

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HttpBoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.HTTPError) -> BackendUnavailable:
        detail = str(exc) or type(exc).__name__
        return BackendUnavailable(
            f"cannot reach the boss at {redact(self.url)}: {type(exc).__name__}: {detail}"
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | None] | None = None,
        body: Mapping[str, Any] | None = None,
        read_timeout: float | None = None,
    ) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        # A call the boss answers only once it is done (an ensure) may read for longer.
        timeout = httpx.Timeout(self._timeout, read=read_timeout) if read_timeout is not None else None
        try:
            reply = self._http.request(
                method, path, params=query, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.UnsupportedProtocol as exc:
            raise BadRequest(f"bad boss URL {redact(self.url)}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._reply(method, path, reply)

    def _reply(self, method: str, path: str, reply: httpx.Response) -> Any:
        try:
            doc = reply.json()
        except ValueError:
            doc = None
        if reply.is_success and doc is not None:
            return doc
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise self._error(doc, self.url)
        raise ProtocolError(
            f"the boss at {redact(self.url)} answered {method} {path} with HTTP {reply.status_code} "
            f"and no gpuboss JSON (is that URL a gpuboss boss?)"
        )

    @staticmethod
    def _error(doc: dict[str, Any], url: str) -> GpubossError:
        code, message = doc["error"], str(doc.get("message", ""))
        details = {k: v for k, v in doc.items() if k not in ("error", "message", "retryable")}
        if code == BackendUnavailable.code:
            message = f"the boss at {redact(url)} cannot reach Redis: {message}"
        return error_for(code, message, **details)

    # --- reads --------------------------------------------------------------------------------

    def status(self, pool: str | None = None) -> list[PoolStatus]:
        """Per pool: devices with budgets and usage, granted and queued counts."""
        pools = _key(self._request("GET", "/v1/status", params={"pool": pool}), "pools", dict)
        return [PoolStatus.from_dict(doc) for doc in pools.values()]

    def leases(self, pool: str | None = None) -> list[LeaseInfo]:
        """Live leases and waiting requests of ``pool``, or of every pool."""
        docs = _key(self._request("GET", "/v1/leases", params={"pool": pool}), "leases", list)
        return [LeaseInfo.from_dict(doc) for doc in docs]

    def devices(self, pool: str | None = None) -> list[DeviceInfo]:
        """Devices of ``pool``, or of every pool."""
        docs = _key(self._request("GET", "/v1/devices", params={"pool": pool}), "devices", list)
        return [DeviceInfo.from_dict(doc) for doc in docs]

    def findings(self, pool: str | None = None) -> list[Findings]:
        """What the NVML agent measured in ``pool`` or in every pool."""
        docs = _key(self._request("GET", "/v1/findings", params={"pool": pool}), "findings", list)
        return [Findings.from_dict(doc) for doc in docs]

    def plan(
        self,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = DEFAULT_POOL,
        exclusive: bool = False,
        devices: int = 1,
    ) -> Plan:
        """Dry run: would a request be granted now, evict whom, wait behind how many, or never fit?"""
        body: dict[str, Any] = {"vram": parse_mib(vram, vram_gb), "priority": parse_priority(priority)}
        body |= {"device": device, "pool": pool, "exclusive": exclusive, "devices": devices}
        doc = self._request("POST", "/v1/plan", body=body)
        try:
            return Plan(
                outcome=_key(doc, "outcome", str),
                device=doc.get("device"),
                victims=tuple(str(v) for v in doc.get("victims") or ()),
                ahead=int(doc.get("ahead") or 0),
                largest_mib=int(doc.get("largest_mib") or 0),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed plan document: {doc!r}") from exc

    def events(self, pool: str | None = None, *, count: int = 100) -> list[Event]:
        """The last ``count`` events of ``pool`` or of every pool, oldest first."""
        docs = _key(self._request("GET", "/v1/events", params={"pool": pool, "count": count}), "events", list)
        return [_event(doc) for doc in docs]

    def stream(self, pool: str | None = None, *, last: int = 0) -> Iterator[Event]:
        """The last ``last`` events, then every new one as it happens (server-sent events), for ever.

        When a stream that delivered events ends or breaks (the service dropped a reader that fell
        behind, or is going away), this reconnects, resuming after the last event seen
        (``Last-Event-ID``). A service that cannot be reached, or that ends streams without
        delivering anything, ends it with :class:`BackendUnavailable`.
        """
        last_id: str | None = None
        fresh = True  # whether events came since the last (re)connection
        while fresh:
            fresh = False
            headers = {"Accept": "text/event-stream"}
            params: dict[str, str | int] = {"last": last if last_id is None else 0}
            if pool is not None:
                params["pool"] = pool
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            # No read timeout: a quiet pool may send nothing for a long time.
            timeout = httpx.Timeout(self._timeout, read=None)
            try:
                with self._http.stream(
                    "GET", "/v1/events/stream", params=params, headers=headers, timeout=timeout
                ) as reply:
                    if not reply.is_success:
                        reply.read()
                        self._reply("GET", "/v1/events/stream", reply)
                    for sse_id, data in _sse(reply.iter_lines()):
                        fresh = True
                        if sse_id:
                            last_id = sse_id
                        yield _event(data)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise self._unreachable(exc) from exc
            except httpx.HTTPError as exc:
                # Cut off mid-stream (the boss restarting): resume once if this connection
                # delivered anything, else give up.
                if not fresh:
                    raise self._unreachable(exc) from exc
        raise BackendUnavailable(f"the boss at {redact(self.url)} keeps closing the event stream")

    # --- operator actions ---------------------------------------------------------------------

    def add_device(
        self,
        name: str,
        vram: int | str,
        *,
        reserved: int | str = 0,
        pool: str = DEFAULT_POOL,
        host: str | None = None,
        cuda_index: int | None = None,
    ) -> bool:
        """Add a device of ``vram`` (``reserved`` of it never leased), or update it; True if new."""
        path = f"/v1/devices/{_segment('device name', name)}"
        body = {"vram": parse_mib(vram), "reserved": parse_mib(reserved, minimum=0), "pool": pool}
        body |= {"host": host, "cuda_index": cuda_index}
        return bool(_key(self._request("PUT", path, body=body), "created", bool))

    def remove_device(self, name: str, *, pool: str = DEFAULT_POOL, force: bool = False) -> None:
        """Remove a device; refused with :class:`DeviceBusy` while it has leases, unless forced."""
        path = f"/v1/devices/{_segment('device name', name)}"
        self._request("DELETE", path, params={"pool": pool, "force": "true" if force else "false"})

    def force_release(self, lease_id: str, pool: str | None = None) -> LeaseInfo:
        """Operator: end a lease or waiter without its token (searching every pool if needed)."""
        path = f"/v1/leases/{_segment('lease id', lease_id)}/force-release"
        return LeaseInfo.from_dict(self._request("POST", path, body={"pool": pool}))

    def reap(self, pool: str | None = None) -> int:
        """End expired leases and abandoned waiters now; returns how many."""
        return int(_key(self._request("POST", "/v1/reap", body={"pool": pool}), "reaped", int))

    def configure_pool(self, pool: str = DEFAULT_POOL, *, min_residency: float = 0, aging: float = 0) -> None:
        """Set ``pool``'s minimum residency and aging period (seconds; 0 turns either off)."""
        path = f"/v1/pools/{_segment('pool', pool, pool=True)}/config"
        self._request("PUT", path, body={"min_residency_s": min_residency, "aging_s": aging})

    # --- managed consumers --------------------------------------------------------------------

    def consumers(self) -> list[dict[str, Any]]:
        """Every managed consumer's document (one per model, for a consumer with a lease per model):
        name, model, state, device, vram_mib, measured_mib, priority, lease, error, ..."""
        return _docs(_key(self._request("GET", "/v1/consumers"), "consumers", list))

    def ensure(self, name: str, model: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Load consumer ``name`` (``model`` of it) and wait until it is healthy; its document.

        ``timeout`` is how long the boss waits for its memory (queued like any lease request); the
        load and the health check come on top, so the reply is awaited ``timeout`` plus
        :data:`ENSURE_GRACE_S` seconds. Raises :class:`ConsumerNotFound` for an unknown consumer,
        :class:`AcquireTimeout` when its memory was not free in time.
        """
        path = f"/v1/consumers/{_segment('consumer name', name)}/ensure"
        body = {"model": model, "timeout_s": timeout}
        doc = self._request("POST", path, body=body, read_timeout=timeout + ENSURE_GRACE_S)
        return _doc(doc)

    def release_consumer(self, name: str, model: str | None = None) -> list[dict[str, Any]]:
        """Give consumer ``name``'s memory back (only ``model``'s, if given); once the memory is
        measured free (or it is stuck), the documents of what it released."""
        path = f"/v1/consumers/{_segment('consumer name', name)}/release"
        doc = self._request("POST", path, body={"model": model}, read_timeout=self._timeout + ENSURE_GRACE_S)
        if not isinstance(doc, list):
            raise ProtocolError(f"the boss answered a release with no list of consumers: {doc!r}")
        return _docs(doc)

    def release_all_consumers(self) -> list[dict[str, Any]]:
        """Operator: unload every consumer that can be unloaded (self-managed ones cannot); the
        documents of those it released, once their memory is measured free (or they are stuck)."""
        doc = self._request("POST", "/v1/consumers/release-all", read_timeout=self._timeout + ENSURE_GRACE_S)
        return _docs(_key(doc, "consumers", list))

    def reload_consumers(self) -> list[str]:
        """Operator: have the boss read its registry file again; what changed, one line each (a file
        with errors is a :class:`BadRequest` naming the field, and changes nothing)."""
        changes = _key(self._request("POST", "/v1/consumers/reload"), "changes", list)
        return [str(c) for c in changes]


def _doc(doc: Any) -> dict[str, Any]:
    """A consumer document: an object with a name and a state, else ProtocolError."""
    _key(doc, "name", str)
    _key(doc, "state", str)
    result: dict[str, Any] = doc
    return result


def _docs(docs: list[Any]) -> list[dict[str, Any]]:
    return [_doc(doc) for doc in docs]


def _sse(lines: Iterator[str]) -> Iterator[tuple[str | None, Any]]:
    """(id, parsed data) of each server-sent event message; comments and keep-alives skipped."""
    sse_id: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                try:
                    yield sse_id, json.loads("\n".join(data))
                except ValueError as exc:
                    raise ProtocolError(f"the boss sent an event that is not JSON: {data!r}") from exc
            data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "id":
            sse_id = value
