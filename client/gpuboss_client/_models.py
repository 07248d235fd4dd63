"""The data the operations take and return, as plain values: leases and devices as Redis holds
them (:class:`LeaseInfo`, :class:`DeviceInfo`, :class:`PoolStatus`), a waiter's
:class:`WaitState`, a holder's :class:`LeaseRef` and :class:`Beat`, pool :class:`Event` entries
and a dry run's :class:`Plan`, with their JSON forms, and the defaults of a lease request.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._protocol import _from_doc, _ints, _opt_int, _pairs, _text
from .errors import ProtocolError

#: seconds a lease stays reserved after its holder stops renewing it: a holder killed outright has
#: its memory back within this time (its heartbeats run every third of it)
DEFAULT_TTL = 3.0
DEFAULT_GRACE = 10.0
DEFAULT_POOL = "default"


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease or a waiting request as Redis holds it (times in Redis ms)."""

    id: str
    pool: str
    state: str
    holder: str
    holder_host: str
    holder_pid: int
    mib: int
    priority: int
    device: str | None
    token: int | None
    cuda_indexes: tuple[int, ...]
    device_host: str | None
    ttl_ms: int
    expires_at_ms: int | None
    requested_at_ms: int | None
    granted_at_ms: int | None
    ended_at_ms: int | None
    reason: str | None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def cuda_index(self) -> int | None:
        """The CUDA index of the (first) device, if known."""
        return self.cuda_indexes[0] if self.cuda_indexes else None

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices held: one, or a gang's."""
        return tuple(self.device.split(",")) if self.device else ()

    def to_dict(self) -> dict[str, Any]:
        """The lease as JSON: every field, times in Redis ms, plus ``cuda_index`` and ``devices``.
        (Field by field: ``dataclasses.asdict`` deep-copies, a cost on the service's hot path.)"""
        doc = {name: getattr(self, name) for name in _LEASE_FIELDS}
        doc |= {"cuda_indexes": list(self.cuda_indexes), "labels": dict(self.labels)}
        return doc | {"cuda_index": self.cuda_index, "devices": list(self.devices)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LeaseInfo:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        return _from_doc(cls, doc, "lease", cuda_indexes=tuple)

    @classmethod
    def from_fields(cls, pool: str, f: Mapping[str, str]) -> LeaseInfo:
        try:
            labels = json.loads(f.get("labels") or "{}")
            return cls(
                id=f["id"],
                pool=pool,
                state=f["state"],
                holder=f["holder"],
                holder_host=f.get("holder_host", ""),
                holder_pid=int(f.get("holder_pid", 0)),
                mib=int(f["mib"]),
                priority=int(f["priority"]),
                device=f.get("device") or f.get("want") or None,
                token=_opt_int(f.get("token")),
                cuda_indexes=_ints(f.get("cuda_index")),
                device_host=f.get("device_host") or None,
                ttl_ms=int(f["ttl_ms"]),
                expires_at_ms=_opt_int(f.get("expires_at")),
                requested_at_ms=_opt_int(f.get("requested_at")),
                granted_at_ms=_opt_int(f.get("granted_at")),
                ended_at_ms=_opt_int(f.get("ended_at")),
                reason=f.get("reason") or None,
                labels=labels if isinstance(labels, dict) else {},
            )
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed lease record: {dict(f)!r}") from exc


_LEASE_FIELDS = tuple(f.name for f in dataclasses.fields(LeaseInfo))


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device and its memory accounting, in MiB."""

    name: str
    pool: str
    host: str
    cuda_index: int | None
    total_mib: int
    reserved_mib: int
    unmanaged_mib: int
    used_mib: int
    leases: int

    @property
    def budget_mib(self) -> int:
        """What may be leased: total - reserved - unmanaged."""
        return self.total_mib - self.reserved_mib - self.unmanaged_mib

    @property
    def free_mib(self) -> int:
        """Budget not leased now (negative when unmanaged use grew past it)."""
        return self.budget_mib - self.used_mib

    def to_dict(self) -> dict[str, Any]:
        """The device as JSON, sizes in MiB, budget and free included."""
        return {
            "pool": self.pool,
            "name": self.name,
            "host": self.host,
            "cuda_index": self.cuda_index,
            "total_mib": self.total_mib,
            "reserved_mib": self.reserved_mib,
            "unmanaged_mib": self.unmanaged_mib,
            "budget_mib": self.budget_mib,
            "used_mib": self.used_mib,
            "free_mib": self.free_mib,
            "leases": self.leases,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DeviceInfo:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        return _from_doc(cls, doc, "device")

    @classmethod
    def from_fields(cls, pool: str, f: Mapping[str, str]) -> DeviceInfo:
        try:
            return cls(
                name=f["name"],
                pool=pool,
                host=f.get("host", ""),
                cuda_index=_opt_int(f.get("cuda_index")),
                total_mib=int(f["total_mib"]),
                reserved_mib=int(f["reserved_mib"]),
                unmanaged_mib=int(f.get("unmanaged_mib", 0)),
                used_mib=int(f.get("used_mib", 0)),
                leases=int(f.get("leases", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed device record: {dict(f)!r}") from exc


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """One pool at one moment: its devices, and how many leases are granted and waiting."""

    pool: str
    now_ms: int
    devices: list[DeviceInfo]
    granted: int
    queued: int

    def to_dict(self) -> dict[str, Any]:
        """The pool as JSON: counts, Redis time and each device's :meth:`DeviceInfo.to_dict`."""
        return {
            "pool": self.pool,
            "now_ms": self.now_ms,
            "granted": self.granted,
            "queued": self.queued,
            "devices": [d.to_dict() for d in self.devices],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> PoolStatus:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        try:
            devices = [DeviceInfo.from_dict(d) for d in doc["devices"]]
            return cls(doc["pool"], doc["now_ms"], devices, doc["granted"], doc["queued"])
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed pool document: {dict(doc)!r}") from exc


def split_queue(leases: Iterable[LeaseInfo]) -> tuple[list[LeaseInfo], list[LeaseInfo]]:
    """Granted leases (in the order given) and waiters in queue order (priority, then arrival)."""
    granted: list[LeaseInfo] = []
    waiters: list[LeaseInfo] = []
    for x in leases:
        (waiters if x.state == "queued" else granted).append(x)
    waiters.sort(key=lambda x: (-x.priority, x.requested_at_ms or 0))
    return granted, waiters


def status_document(pools: Sequence[PoolStatus], leases: Sequence[LeaseInfo]) -> dict[str, Any]:
    """``{"pools": {name: {pool, now_ms, granted, queued, devices, leases, queue}}}``: the JSON of
    ``gpuboss status --json`` and the service's ``GET /v1/status``.

    ``granted``/``queued`` are counts; ``leases`` lists the granted leases and ``queue`` the
    waiters in queue order.
    """
    doc: dict[str, Any] = {}
    for s in pools:
        granted, waiters = split_queue(x for x in leases if x.pool == s.pool)
        doc[s.pool] = s.to_dict() | {
            "leases": [x.to_dict() for x in granted],
            "queue": [x.to_dict() for x in waiters],
        }
    return {"pools": doc}


@dataclass(frozen=True, slots=True)
class WaitState:
    """Where a waiting request stands (given to ``on_wait``).

    ``position``: how many wait ahead of it. ``reason``: ``evicting`` (its memory is promised;
    victims unload until ``until``), ``behind`` (earlier waiters go first) or ``no_room`` (nothing
    fits now). ``until``: local clock time (as ``time.monotonic``) of the estimate when one is
    knowable: the victims' deadline, or the soonest expiry in the pool; else None.
    ``evicting``: how many leases this request asked to give memory back.
    """

    request_id: str
    pool: str
    position: int
    reason: str
    until: float | None
    evicting: int = 0

    def __str__(self) -> str:
        why = {
            "evicting": "victims are giving memory back",
            "behind": f"behind {self.position} earlier waiter(s)",
            "no_room": "no device has room",
        }.get(self.reason, self.reason)
        return f"waiting in pool {self.pool}: {why}"

    def describe(self, now: float) -> str:
        """The state as a line, with the estimate as seconds from ``now``."""
        if self.until is None:
            return str(self)
        return f"{self} (about {max(0.0, self.until - now):.1f} s)"


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """What a holder needs to act on its lease: pool, id and fencing token (no local state).

    The boss service acts for HTTP holders with these; :class:`Lease` carries the same three.
    """

    pool: str
    id: str
    token: int


@dataclass(frozen=True, slots=True)
class Beat:
    """A held lease's state as a heartbeat, ``idle`` or ``busy`` found it (times in Redis ms).

    ``state`` is ``active``, ``idle`` or ``evicting``; when evicting, give the memory back (release)
    before ``evict_deadline_ms``.
    """

    id: str
    state: str
    now_ms: int
    expires_at_ms: int | None
    evict_deadline_ms: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a pool's event stream: ``name`` (granted, released, expired, evicting, ...)."""

    pool: str
    id: str  # the stream entry id, "<ms>-<n>": resume reading after it
    name: str
    fields: dict[str, str]

    @property
    def time_ms(self) -> int:
        """Redis time of the event, ms."""
        return int(self.id.split("-", 1)[0])

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "id": self.id, "time_ms": self.time_ms, "event": self.name} | {
            "fields": self.fields
        }

    @classmethod
    def from_entry(cls, pool: str, entry: Any) -> Event:
        entry_id, flat = entry
        fields = _pairs(flat)
        return cls(pool, _text(entry_id), fields.pop("event", "?"), fields)


#: the most entries one read returns
MAX_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class Plan:
    """What would happen to a request right now (see :meth:`Boss.plan`)."""

    outcome: str  # "grant", "evict", "wait" or "never"
    device: str | None = None
    victims: tuple[str, ...] = ()
    ahead: int = 0
    largest_mib: int = 0

    def __str__(self) -> str:
        if self.outcome == "grant":
            return f"granted on {self.device}"
        if self.outcome == "evict":
            return f"would evict {', '.join(self.victims)} on {self.device}"
        if self.outcome == "wait":
            return f"would wait behind {self.ahead}"
        return f"cannot ever fit (largest budget {self.largest_mib} MiB)"
