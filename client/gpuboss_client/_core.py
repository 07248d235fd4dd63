"""The logic of every operation, once, free of I/O.

Each operation is a generator that yields :class:`Call` (run a script) or :class:`Command` (one
plain Redis command), receives the reply, and finally returns its result. The sync and async
clients are small loops that drive these generators with blocking or awaited I/O, so acquire's
wait loop, the reply parsing and the self-fencing deadlines exist once.

Time is a parameter (``clock``, monotonic seconds) so tests can step it; inside the scripts time
is Redis ``TIME``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypedDict, TypeVar

from .errors import (
    AcquireTimeout,
    BadRequest,
    LeaseEvicted,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    ProtocolError,
    error_for,
)
from .keys import POOLS, PoolKeys, valid_name, valid_pool
from .scripts import script_shas, source
from .units import parse_mib, parse_priority, parse_ttl_ms

__all__ = [
    "Beat",
    "Call",
    "Command",
    "DeviceInfo",
    "Event",
    "Lease",
    "LeaseInfo",
    "LeaseRef",
    "PoolStatus",
]

T = TypeVar("T")
Clock: TypeAlias = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Call:
    """Run the Lua script ``script`` with the pool's keys and ``args``."""

    script: str
    keys: list[str]
    args: list[str | int]


@dataclass(frozen=True, slots=True)
class Command:
    """Run one plain Redis command (e.g. ``BLPOP`` on a wake list)."""

    args: tuple[str | int | float, ...]


Step: TypeAlias = Call | Command
Op: TypeAlias = Generator[Step, Any, T]

#: seconds a lease stays reserved after its holder stops renewing it: a holder killed outright has
#: its memory back within this time (its heartbeats run every third of it)
DEFAULT_TTL = 4.0
DEFAULT_GRACE = 10.0
DEFAULT_POOL = "default"
_LIST_PAGE = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_reply(reply: Any, expected: frozenset[str]) -> tuple[str, dict[str, Any]]:
    """Split ``{code, field, value, ...}``; raise the error a code names, or ProtocolError."""
    if not isinstance(reply, list) or len(reply) % 2 != 1:
        raise ProtocolError(f"malformed script reply: {reply!r}")
    code = _text(reply[0])
    fields = {
        _text(k): v if isinstance(v, list | int) else _text(v)
        for k, v in zip(reply[1::2], reply[2::2], strict=False)
    }
    if code in expected:
        return code, fields
    raise error_for(code, _text(fields.get("message", f"unexpected reply {code!r}")))


def _pairs(flat: Sequence[Any] | Mapping[Any, Any]) -> dict[str, str]:
    if isinstance(flat, Mapping):  # redis-py parses some replies (XRANGE entries) into dicts
        return {_text(k): _text(v) for k, v in flat.items()}
    return {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=False)}


def _opt_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _ints(value: str | None) -> tuple[int, ...]:
    """CUDA indexes of a lease: one, or a gang's joined by commas (unknown ones left out)."""
    return tuple(int(x) for x in (value or "").split(",") if x != "")


def _from_doc(cls: type[T], doc: Mapping[str, Any], what: str, **convert: Callable[[Any], Any]) -> T:
    """A dataclass from its JSON (every field by name; ``convert`` turns lists back into tuples...)."""
    try:
        fields = {f.name: doc[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**(fields | {name: fn(fields[name]) for name, fn in convert.items()}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {what} document: {dict(doc)!r}") from exc


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
        """The lease as JSON: every field, times in Redis ms, plus ``cuda_index`` and ``devices``."""
        doc = dataclasses.asdict(self)
        doc["cuda_indexes"] = list(self.cuda_indexes)
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


def fence_margin(ttl_s: float) -> float:
    """How long before the server-side expiry a holder gives its lease up as lost."""
    return min(0.2 * ttl_s, 2.0)


def beat_interval(ttl_s: float) -> float:
    """Seconds between heartbeats: three chances to renew before the local deadline."""
    return ttl_s / 3


class Lease:
    """A lease this process holds.

    ``token`` is the fencing token: it strictly increases per device, so a resource that can
    check it can refuse a holder whose lease was taken over. ``lost`` turns true as soon as the
    lease could not be renewed before its local deadline (shorter than the TTL), or Redis said it
    ended; from then on, stop using the memory. :meth:`check` raises :class:`LeaseLost`.
    """

    def __init__(
        self, info: LeaseInfo, *, deadline: float, clock: Clock, grace_ms: int = int(DEFAULT_GRACE * 1000)
    ) -> None:
        if info.device is None or info.token is None:
            raise ProtocolError(f"lease {info.id} was granted without a device or token")
        self.info = info
        self.id = info.id
        self.pool = info.pool
        #: the devices held: one, or for a gang lease all of them
        self.devices = info.devices
        self.device: str = self.devices[0]
        self.mib = info.mib
        self.token: int = info.token
        self.cuda_indexes = info.cuda_indexes
        self.cuda_index = info.cuda_index
        self.priority = info.priority
        self.labels = info.labels
        self.ttl_ms = info.ttl_ms
        self._clock = clock
        self._deadline = deadline
        # Local clock minus Redis's, at least (see _renewed): turns Redis times into local ones.
        self._offset = deadline - (info.expires_at_ms or 0) / 1000
        self._grace_s = grace_ms / 1000
        self._lost_reason: str | None = None
        self._released = False
        #: Redis ms by which an evicting lease must be given back; None while not asked to
        self.evict_deadline_ms: int | None = None
        self._notice_pending = False
        self.on_evict: Callable[[Lease], Any] | None = None
        self._boss: Any = None  # the client that holds it, for idle() and busy()
        #: whether the client's heartbeat worker renews it
        self.keepalive = False
        self._next_beat = 0.0

    def __repr__(self) -> str:
        return f"<Lease {self.id} {self.mib} MiB on {self.pool}/{','.join(self.devices)} token={self.token}>"

    def __str__(self) -> str:
        """The device as frameworks name it, e.g. ``"cuda:0"`` (see :attr:`device_string`)."""
        return self.device_string

    @property
    def device_string(self) -> str:
        """The (first) device as this process's CUDA sees it: ``"cuda:N"``.

        With ``CUDA_VISIBLE_DEVICES`` set (for example from :attr:`env`), N is the device's
        position in that list, so ``"cuda:0"`` after ``os.environ.update(lease.env)``; without it,
        N is the device's CUDA index. Indexes are in PCI bus order, as ``lease.env`` sets
        ``CUDA_DEVICE_ORDER``; a device missing from ``CUDA_VISIBLE_DEVICES`` is not reachable
        from this process at all, and its CUDA index is given. ``"cuda"`` where the index is
        unknown.
        """
        mine = self.env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if mine and visible is not None:
            names = [v.strip() for v in visible.split(",")]
            if mine in names:
                return f"cuda:{names.index(mine)}"
        return "cuda" if self.cuda_index is None else f"cuda:{self.cuda_index}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process using this lease: ``CUDA_VISIBLE_DEVICES`` (CUDA indexes in
        PCI bus order, or MIG slice UUIDs), ``CUDA_DEVICE_ORDER`` and the lease's id and token."""
        env = {"GPUBOSS_LEASE_ID": self.id, "GPUBOSS_LEASE_TOKEN": str(self.token)}
        env["GPUBOSS_DEVICE"] = ",".join(self.devices)
        if self.cuda_indexes and len(self.cuda_indexes) == len(self.devices):  # all of them known
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.cuda_indexes))
        elif all(d.startswith("MIG-") for d in self.devices):  # MIG slices go by their UUIDs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(d.replace(":", "/") for d in self.devices)
        if "CUDA_VISIBLE_DEVICES" in env:
            # CUDA indexes as the agent registers them (NVML's): PCI bus order, not fastest first.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    @property
    def evicting(self) -> bool:
        """Whether gpuboss asked for this lease's memory back (release before the deadline)."""
        return self.evict_deadline_ms is not None

    def idle(self) -> Any:
        """Keep the lease warm: still resident, but evictable. With ``AsyncBoss``, await it."""
        return self._boss.idle(self)

    def busy(self) -> Any:
        """Take a warm lease back into use; raises :class:`LeaseEvicted` if it was evicted.
        With ``AsyncBoss``, await it."""
        return self._boss.busy(self)

    @property
    def deadline(self) -> float:
        """Local (clock) time after which the lease counts as lost unless renewed."""
        return self._deadline

    @property
    def evict_deadline(self) -> float | None:
        """Local (clock) time after which an evicting lease counts as lost: the server's eviction
        deadline, less the same safety margin as the TTL's (see :func:`fence_margin`)."""
        if self.evict_deadline_ms is None:
            return None
        return self._offset + self.evict_deadline_ms / 1000 - fence_margin(self._grace_s)

    @property
    def lost(self) -> bool:
        """Whether the lease is lost (or may be): stop using its memory."""
        return self.lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        """Why the lease counts as lost, or None while it is held."""
        if self._lost_reason is not None:
            return self._lost_reason
        now = self._clock()
        fence = self.evict_deadline
        if fence is not None and now >= fence:
            return "not given back before the eviction deadline"
        if now >= self._deadline:
            return "not renewed before the local deadline"
        return None

    def check(self) -> None:
        """Raise :class:`LeaseLost` (:class:`LeaseEvicted` once asked to give it back) if lost."""
        reason = self.lost_reason
        if reason is not None:
            raise (LeaseEvicted if self.evicting else LeaseLost)(
                f"lease {self.id} is lost: {reason}", lease=self.id
            )

    def _renewed(self, sent_at: float, info: LeaseInfo, now_ms: int) -> None:
        # Redis ran the script after we sent it, so Redis time `now_ms` is at `sent_at` or later on
        # our clock: `offset` is at most the true difference, and every deadline derived from it
        # (expiry, eviction) falls on the safe side. Give up a margin before the expiry.
        self._offset = sent_at - now_ms / 1000
        expires_at = info.expires_at_ms or now_ms
        self._deadline = self._offset + expires_at / 1000 - fence_margin(info.ttl_ms / 1000)
        self.info = info

    def _mark_lost(self, reason: str) -> None:
        if self._lost_reason is None:
            self._lost_reason = reason

    def _evict_notice(self, deadline_ms: int) -> None:
        if self.evict_deadline_ms is None and not self._released:
            self.evict_deadline_ms = deadline_ms
            self._notice_pending = True

    def _take_notice(self) -> bool:
        """True once, after the first eviction notice: time to run ``on_evict``."""
        pending, self._notice_pending = self._notice_pending, False
        return pending


def _granted(req: AcquireRequest, holder: Holder, f: Mapping[str, Any], sent: float, clock: Clock) -> Lease:
    # The reply carries what the grant decided; the rest is the request, which the script
    # checked is identical for a retried id.
    try:
        info = LeaseInfo(
            id=req.id,
            pool=req.keys.pool,
            state=f["state"],
            holder=holder.name,
            holder_host=holder.host,
            holder_pid=holder.pid,
            mib=req.mib,
            priority=req.priority,
            device=f["device"],
            token=int(f["token"]),
            cuda_indexes=_ints(f["cuda_index"]),
            device_host=f["device_host"] or None,
            ttl_ms=req.ttl_ms,
            expires_at_ms=int(f["expires_at"]),
            requested_at_ms=None,
            granted_at_ms=None,
            ended_at_ms=None,
            reason=None,
            labels=json.loads(req.labels),
        )
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed grant reply: {dict(f)!r}") from exc
    lease = Lease(info, deadline=0.0, clock=clock, grace_ms=req.grace_ms)
    lease._renewed(sent, info, int(f["now"]))
    if f.get("evict_deadline"):
        lease._evict_notice(int(f["evict_deadline"]))
    return lease


def _wake_grant(popped: Any) -> dict[str, str] | None:
    """The grant in a wake message (see ``wake_message`` in ``lua/_common.lua``), if it is one.

    Anything else (a timeout, or "ended ...") sends the waiter back to ask acquire, which then
    raises the right error.
    """
    if not popped:
        return None
    parts = _text(popped[1]).split(" ", 6)
    if parts[0] != "granted" or len(parts) != 7:
        return None
    names = ("now", "device", "token", "expires_at", "cuda_index", "device_host")
    return {"state": "active"} | dict(zip(names, parts[1:], strict=True))


def _lost(lease_id: str, f: Mapping[str, Any]) -> LeaseLost:
    why = f.get("state", "?") + (f" ({f['reason']})" if f.get("reason") else "")
    cls = LeaseEvicted if f.get("state") == "revoked" else LeaseLost
    return cls(f"lease {lease_id} has ended: {why}", lease=lease_id, state=f.get("state"))


def _check_pool(pool: str) -> PoolKeys:
    if not valid_pool(pool):
        raise BadRequest(f"pool must be 1-64 of [A-Za-z0-9_.-], not {pool!r}")
    return PoolKeys(pool)


def _check_gang(devices: int, device: str | None) -> int:
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= 16:
        raise BadRequest(f"devices must be an int from 1 to 16, not {devices!r}")
    if devices > 1 and device is not None:
        raise BadRequest("a gang of devices cannot name one device")
    return devices


def _check_name(what: str, name: str) -> str:
    if not valid_name(name):
        raise BadRequest(f"{what} must be 1-64 of [A-Za-z0-9_.:-], not {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds leases: a service name, plus host and pid."""

    name: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    #: pub/sub channel on which this client hears eviction notices for its leases
    notify: str = field(default_factory=lambda: f"gpuboss:notify:{secrets.token_hex(8)}")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name.encode()) <= 128:
            raise BadRequest(f"holder must be a name of 1-128 bytes, not {self.name!r}")

    @classmethod
    def of(cls, name: str, host: str | None, pid: int | None) -> Holder:
        """A holder, with this process's host and pid where not given."""
        return cls(name, socket.gethostname() if host is None else host, os.getpid() if pid is None else pid)


class AcquireOptions(TypedDict, total=False):
    """The options of :meth:`Boss.acquire` and :meth:`Boss.lease` (and their async twins), spelled
    once; :meth:`AcquireRequest.build` checks them.

    ``vram_gb``: size in GB instead of ``vram``. ``priority``: 0-100 or low/normal/high.
    ``device``: a device name, else the best fit in ``pool``. ``ttl``: seconds the memory stays
    reserved after the holder stops renewing (dies, hangs). ``timeout``: seconds to wait (``0``
    tries once, ``None`` waits for ever). ``labels``: str to str, e.g. the model. ``request_id``:
    retrying the same id never grants twice. ``preemptible``: a request of strictly higher
    priority may evict it while active. ``grace``: seconds to give the memory back once asked.
    ``exclusive``: nobody else on the device. ``devices``: a gang of that many devices of one
    host. ``max_hold``: a hard cap in seconds that ends the lease even while it is renewed.
    ``max_queue``: refuse to queue (``QueueFull``) while this many wait. ``on_evict``: called with
    the lease when gpuboss asks for its memory back; unload, return, and the client releases it.
    ``on_wait``: called with a :class:`WaitState` whenever a waiting request's state changes.
    ``keepalive``: renew the lease in the client's background worker until released (default);
    ``False`` for callers who call ``heartbeat`` themselves.
    """

    vram_gb: float | None
    priority: int | str
    device: str | None
    pool: str
    ttl: float
    timeout: float | None
    labels: Mapping[str, str] | None
    request_id: str | None
    preemptible: bool
    grace: float
    exclusive: bool
    devices: int
    max_hold: float | None
    max_queue: int | None
    on_evict: Callable[[Lease], object] | None
    on_wait: Callable[[WaitState], object] | None
    keepalive: bool


#: the options that stay with the client (callbacks, the heartbeat worker), not in the request
CLIENT_OPTIONS = ("on_evict", "on_wait", "keepalive")


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """A validated lease request: what :meth:`Boss.acquire`, ``gpuboss run`` and the service's
    ``POST /v1/leases`` send to the acquire script."""

    keys: PoolKeys
    id: str
    mib: int
    priority: int
    device: str
    ttl_ms: int
    timeout: float | None
    labels: str
    preemptible: bool
    grace_ms: int
    exclusive: bool
    gang: int
    max_hold_ms: int = 0
    max_queue: int = 0

    @classmethod
    def build(
        cls,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = DEFAULT_POOL,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        preemptible: bool = False,
        grace: float = DEFAULT_GRACE,
        exclusive: bool = False,
        devices: int = 1,
        max_hold: float | None = None,
        max_queue: int | None = None,
    ) -> AcquireRequest:
        """Check every option (see :class:`AcquireOptions`); raises :class:`BadRequest`."""
        if max_queue is not None and (
            isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 1 <= max_queue <= 1_000_000
        ):
            raise BadRequest(f"max_queue must be None or an int from 1 to 1000000, not {max_queue!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
        ):
            raise BadRequest(f"timeout must be None or seconds >= 0, not {timeout!r}")
        if labels is not None and not (
            isinstance(labels, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise BadRequest(f"labels must map str to str, not {labels!r}")
        text = json.dumps(dict(labels), separators=(",", ":"), sort_keys=True) if labels else "{}"
        if len(text.encode()) > 4096:
            raise BadRequest("labels must be at most 4096 bytes as JSON")
        return cls(
            keys=_check_pool(pool),
            id=_check_name("request_id", request_id) if request_id is not None else secrets.token_hex(8),
            mib=parse_mib(vram, vram_gb),
            priority=parse_priority(priority),
            device=_check_name("device", device) if device is not None else "",
            ttl_ms=parse_ttl_ms(ttl),
            timeout=timeout,
            labels=text,
            preemptible=bool(preemptible),
            grace_ms=parse_ttl_ms(grace, "grace"),
            exclusive=bool(exclusive),
            gang=_check_gang(devices, device),
            max_hold_ms=0 if max_hold is None else parse_ttl_ms(max_hold, "max_hold"),
            max_queue=max_queue or 0,
        )


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


_ACQUIRE = frozenset({"granted", "queued", "busy", "ended"})
_CANCEL = frozenset({"cancelled", "granted", "ended"})
_RELEASE = frozenset({"released", "ended"})
_BEAT = frozenset({"ok", "ended"})
_OK = frozenset({"ok"})
_MARK = frozenset({"ok", "evicting", "ended"})


def acquire(
    req: AcquireRequest,
    holder: Holder,
    clock: Clock,
    *,
    max_block: float | None = None,
    on_wait: Callable[[WaitState], object] | None = None,
) -> Op[Lease]:
    """Grant now, or wait in the queue until granted or ``req.timeout`` passes.

    While queued, the waiter blocks on its own wake list, which the release that grants it pushes
    to; it polls again at least every third of its TTL to stay in the queue, and at least every
    ``max_block`` seconds (less than the connection's read timeout, so a long wait never looks
    like a dead connection). ``on_wait`` hears every change of the waiter's :class:`WaitState`.
    """
    pool = req.keys.pool
    keys = req.keys.script_keys()
    args: list[str | int] = [req.id, holder.name, holder.host, holder.pid, req.mib, req.priority]
    args += [req.device, req.ttl_ms, req.labels, 0 if req.timeout == 0 else 1]
    args += [int(req.preemptible), req.grace_ms, holder.notify, int(req.exclusive), req.gang]
    args += [req.max_hold_ms, req.max_queue]
    deadline = None if req.timeout is None else clock() + req.timeout
    poll = beat_interval(req.ttl_ms / 1000)
    if max_block is not None:
        poll = min(poll, max_block)
    told: tuple[int, str, int | None] | None = None
    while True:
        sent = clock()
        code, f = parse_reply((yield Call("acquire", keys, args)), _ACQUIRE)
        if code == "granted":
            return _granted(req, holder, f, sent, clock)
        if code == "ended":
            raise _lost(req.id, f)
        if code == "busy":
            raise AcquireTimeout(f"{req.mib} MiB not free now in pool {pool}", lease=req.id)
        if on_wait is not None:
            now_ms, until_ms = int(f["now"]), _opt_int(f.get("until"))
            state = (int(f["position"]), f.get("reason", "no_room"), until_ms)
            if state != told:
                told = state
                until = None if until_ms is None else sent + max(0, until_ms - now_ms) / 1000
                on_wait(WaitState(req.id, pool, state[0], state[1], until, int(f.get("evicting", 0))))
        wait = poll
        if deadline is not None:
            wait = min(wait, deadline - clock())
        if f["position"] == 0 and f["next_expiry"] != "":
            # The head of the queue wakes when the next lease expires, to reap it at once.
            wait = min(wait, max(0.0, (int(f["next_expiry"]) - int(f["now"])) / 1000) + 0.002)
        if wait <= 0:
            sent = clock()
            code, f = parse_reply((yield Call("cancel", keys, [req.id, holder.name])), _CANCEL)
            if code == "granted":
                return _granted(req, holder, f, sent, clock)
            raise AcquireTimeout(
                f"{req.mib} MiB not granted in pool {pool} within {req.timeout} s", lease=req.id
            )
        sent = clock()
        popped = yield Command(("BLPOP", req.keys.wake(req.id), max(wait, 0.001)))
        granted = _wake_grant(popped)
        if granted is not None:
            # The release that granted it sent the grant along: no further round trip. The grant
            # happened after `sent`, so the local deadline stays on the safe side.
            return _granted(req, holder, granted, sent, clock)


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


def _ref(ref: LeaseRef) -> PoolKeys:
    _check_name("lease id", ref.id)
    if isinstance(ref.token, bool) or not isinstance(ref.token, int) or ref.token < 0:
        raise BadRequest(f"token must be an int >= 0, not {ref.token!r}")
    return _check_pool(ref.pool)


def release_ref(ref: LeaseRef) -> Op[None]:
    """Release with the lease's token; raises LeaseLost (or LeaseEvicted) if it had ended otherwise."""
    keys = _ref(ref)
    code, f = parse_reply((yield Call("release", keys.script_keys(), [ref.id, ref.token, 0])), _RELEASE)
    if code == "ended":
        raise _lost(ref.id, f)


def heartbeat_ref(ref: LeaseRef, ttl_ms: int) -> Op[Beat]:
    """Renew a lease for ``ttl_ms`` from now and learn its state; raises LeaseLost if it ended."""
    keys = _ref(ref)
    reply = yield Call("heartbeat", keys.script_keys(), [ref.id, ref.token, ttl_ms])
    code, f = parse_reply(reply, _BEAT)
    if code == "ended":
        raise _lost(ref.id, f)
    deadline = _opt_int(f.get("evict_deadline")) if f["state"] == "evicting" else None
    return Beat(ref.id, f["state"], int(f["now"]), int(f["expires_at"]), deadline)


def mark_ref(ref: LeaseRef, verb: str) -> Op[Beat]:
    """``idle`` or ``busy``: move a held lease between kept-warm and in-use.

    Returns the lease's state; ``evicting`` means it is being evicted and must be given back (a
    caller of ``busy`` should treat that as an error). Raises LeaseLost if the lease had ended.
    """
    if verb not in ("idle", "busy"):
        raise BadRequest(f"verb must be idle or busy, not {verb!r}")
    keys = _ref(ref)
    code, f = parse_reply((yield Call(verb, keys.script_keys(), [ref.id, ref.token])), _MARK)
    if code == "ended":
        raise _lost(ref.id, f)
    if code == "evicting":
        return Beat(ref.id, "evicting", int(f["now"]), None, int(f["evict_deadline"]))
    return Beat(ref.id, f["state"], int(f["now"]), None, None)


def lease_info(pool: str, lease_id: str) -> Op[LeaseInfo]:
    """One lease or waiter as Redis holds it (ended ones linger a while); LeaseNotFound if gone."""
    keys = _check_pool(pool)
    _check_name("lease id", lease_id)
    fields = _pairs((yield Command(("HGETALL", keys.lease(lease_id)))) or [])
    if not fields:
        raise error_for("lease_not_found", f"no lease {lease_id} in pool {pool}")
    return LeaseInfo.from_fields(pool, {"id": lease_id} | fields)


def release(lease: Lease) -> Op[None]:
    """Release with the lease's token; raises LeaseLost if it had ended otherwise."""
    try:
        yield from release_ref(LeaseRef(lease.pool, lease.id, lease.token))
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    lease._released = True
    lease._mark_lost("released")


def heartbeat(lease: Lease, clock: Clock) -> Op[LeaseInfo]:
    """Renew the lease and learn its state; marks it lost (and raises) if it has ended."""
    sent = clock()
    try:
        beat = yield from heartbeat_ref(LeaseRef(lease.pool, lease.id, lease.token), lease.ttl_ms)
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    except (LeaseNotFound, LeaseNotHeld) as exc:
        lease._mark_lost(exc.message)
        raise LeaseLost(f"lease {lease.id} is lost: {exc.message}", lease=lease.id) from exc
    if beat.evict_deadline_ms is not None:
        lease._evict_notice(beat.evict_deadline_ms)
    info = dataclasses.replace(lease.info, state=beat.state, expires_at_ms=beat.expires_at_ms)
    lease._renewed(sent, info, beat.now_ms)
    return info


def force_release(lease_id: str, pool: str | None) -> Op[LeaseInfo]:
    """Operator: end a lease (or waiter) without its token, whatever pool it is in."""
    _check_name("lease id", lease_id)
    pools = [pool] if pool is not None else sorted(_text(p) for p in (yield Command(("SMEMBERS", POOLS))))
    for name in pools:
        keys = _check_pool(name)
        if pool is None and not (yield Command(("EXISTS", keys.lease(lease_id)))):
            continue
        _code, f = parse_reply((yield Call("release", keys.script_keys(), [lease_id, 0, 1])), _RELEASE)
        return LeaseInfo.from_fields(name, f)
    raise error_for("lease_not_found", f"no lease {lease_id} in any pool")


def add_device(
    name: str,
    vram: int | str,
    *,
    reserved: int | str,
    pool: str,
    host: str | None,
    cuda_index: int | None,
) -> Op[bool]:
    """Add or update a device; returns whether it was new."""
    keys = _check_pool(pool)
    _check_name("device name", name)
    total = parse_mib(vram)
    spare = parse_mib(reserved, minimum=0)
    if cuda_index is not None and (
        isinstance(cuda_index, bool) or not isinstance(cuda_index, int) or cuda_index < 0
    ):
        raise BadRequest(f"cuda_index must be an int >= 0, not {cuda_index!r}")
    host = socket.gethostname() if host is None else host
    args: list[str | int] = [name, total, spare, host, -1 if cuda_index is None else cuda_index]
    _code, f = parse_reply((yield Call("add_device", keys.script_keys(), args)), _OK)
    yield Command(("SADD", POOLS, pool))
    return bool(f["created"])


def remove_device(name: str, *, pool: str, force: bool) -> Op[None]:
    """Remove a device; with ``force``, its leases are force-released first."""
    keys = _check_pool(pool)
    _check_name("device name", name)
    while True:
        code, f = parse_reply(
            (yield Call("remove_device", keys.script_keys(), [name, int(force)])),
            frozenset({"ok", "partial"}),
        )
        if code == "ok":
            break
    if f["devices"] == 0:
        # The registry lives outside the pool's slot, so no script can keep it in step. A device
        # added between the script and this SREM (its own SADD came first) must not lose the pool:
        # look again after removing it, and put it back if the pool has a device by then.
        yield Command(("SREM", POOLS, pool))
        if (yield Command(("SCARD", keys.devices))):
            yield Command(("SADD", POOLS, pool))


def repair_pools() -> Op[list[str]]:
    """Register every pool that has devices but is missing from the pool registry (after a client
    died between a device's script and its registration); returns the pools put back. It scans the
    keyspace, so the reaper runs it now and then, never the hot path."""
    pattern = PoolKeys("*").devices  # "gpuboss:{*}:v1:devices": { } are plain characters to SCAN
    known = {_text(p) for p in (yield Command(("SMEMBERS", POOLS)))}
    found: list[str] = []
    cursor = "0"
    while True:
        cursor, keys = yield Command(("SCAN", cursor, "MATCH", pattern, "COUNT", 1000, "TYPE", "set"))
        for key in keys:
            pool = _text(key).split("{", 1)[1].rsplit("}", 1)[0]
            if pool not in known and valid_pool(pool) and (yield Command(("SCARD", _text(key)))):
                yield Command(("SADD", POOLS, pool))
                known.add(pool)
                found.append(pool)
        cursor = _text(cursor)
        if cursor == "0":
            return found


def _pools(pool: str | None) -> Op[list[PoolKeys]]:
    if pool is not None:
        return [_check_pool(pool)]
    return [PoolKeys(_text(p)) for p in sorted((yield Command(("SMEMBERS", POOLS))))]


def status(pool: str | None) -> Op[list[PoolStatus]]:
    """Devices, budgets and counts of one pool, or of every pool."""
    out = []
    for keys in (yield from _pools(pool)):
        _, f = parse_reply((yield Call("devices", keys.script_keys(), [])), _OK)
        devices = [DeviceInfo.from_fields(keys.pool, _pairs(d)) for d in f["devices"]]
        queued = int(f["queued"])
        out.append(PoolStatus(keys.pool, int(f["now"]), devices, int(f["live"]) - queued, queued))
    return out


def leases(pool: str | None) -> Op[list[LeaseInfo]]:
    """Every live lease and waiter of one pool or all pools, soonest expiry first per pool."""
    out: list[LeaseInfo] = []
    for keys in (yield from _pools(pool)):
        offset = 0
        while True:
            _, f = parse_reply((yield Call("leases", keys.script_keys(), [offset, _LIST_PAGE])), _OK)
            page = [LeaseInfo.from_fields(keys.pool, _pairs(x)) for x in f["leases"] if x]
            out += page
            offset += _LIST_PAGE
            if offset >= int(f["total"]):
                break
    return out


def reap(pool: str | None) -> Op[int]:
    """End expired leases and abandoned waiters now; returns how many went."""
    total = 0
    for keys in (yield from _pools(pool)):
        while True:
            _, f = parse_reply((yield Call("reap", keys.script_keys(), [1000])), _OK)
            total += int(f["reaped"])
            if not int(f["more"]):
                break
    return total


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


def _count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EVENTS:
        raise BadRequest(f"count must be an int from 1 to {MAX_EVENTS}, not {count!r}")
    return count


def recent_events(pool: str | None, count: int) -> Op[list[Event]]:
    """The last ``count`` events of one pool or all pools, oldest first."""
    _count(count)
    out: list[Event] = []
    for keys in (yield from _pools(pool)):
        entries = yield Command(("XREVRANGE", keys.events, "+", "-", "COUNT", count))
        out += [Event.from_entry(keys.pool, e) for e in entries or []]
    out.sort(key=lambda e: tuple(map(int, e.id.split("-"))))
    return out[-count:]


def read_events(cursors: Mapping[str, str], count: int, block_ms: int | None) -> Op[list[Event]]:
    """Events after each pool's cursor (an entry id, or ``"$"`` for only new ones), oldest first.

    With ``block_ms``, waits up to that long for the first one (``XREAD BLOCK``).
    """
    _count(count)
    if not cursors:
        return []
    pools = {_check_pool(p).events: p for p in cursors}
    args: list[str | int] = ["XREAD", "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", max(1, int(block_ms))]
    args += ["STREAMS", *pools, *cursors.values()]
    reply = yield Command(tuple(args))
    streams = reply.items() if isinstance(reply, dict) else (reply or [])
    out = [Event.from_entry(pools[_text(key)], e) for key, entries in streams for e in entries]
    out.sort(key=lambda e: tuple(map(int, e.id.split("-"))))
    return out


#: the largest sequence number of a stream entry id
MAX_SEQ = 2**64 - 1


def load_scripts() -> Op[dict[str, str]]:
    """Make sure Redis has every Lua script cached (loading the missing ones, after a restart or a
    SCRIPT FLUSH); returns their SHAs by name. A PING first: it answers even with no script."""
    yield Command(("PING",))
    shas = script_shas()
    loaded = yield Command(("SCRIPT", "EXISTS", *shas.values()))
    for (name, sha), present in zip(shas.items(), loaded, strict=True):
        if not present:
            got = _text((yield Command(("SCRIPT", "LOAD", source(name)))))
            if got != sha:
                raise ProtocolError(f"Redis loaded script {name} as {got}, expected {sha}")
    return shas


#: the key of :func:`event_cursors` for pools that appear later (no pool has this name)
LATER = "*"


def event_cursors(pool: str | None) -> Op[dict[str, str]]:
    """Where the event streams of ``pool`` (or every pool) end now: each pool's last event id, and
    under :data:`LATER` the cursor for pools that appear later. Following from there misses
    nothing and repeats nothing that a read of recent events cut at these cursors showed."""
    pools = yield from _pools(pool)
    sec, usec = yield Command(("TIME",))
    ms = int(_text(sec)) * 1000 + int(_text(usec)) // 1000
    # A pool that appears later has had its entries since this millisecond at the most.
    out = {LATER: f"{ms - 1}-{MAX_SEQ}" if ms else "0-0"}
    for keys in pools:
        last = yield Command(("XREVRANGE", keys.events, "+", "-", "COUNT", 1))
        out[keys.pool] = _text(last[0][0]) if last else "0-0"
    return out


class Follow:
    """Where a reader of events stands in each pool (:meth:`AsyncBoss.follow`), free of I/O.

    It follows ``pool``, or every pool: then the pool registry is read again at most every
    ``look_every`` seconds. ``after`` is one event id for every pool, or a cursor per pool (as
    :func:`event_cursors` gives, or as a reader left them), where :data:`LATER` is for pools that
    appear later (so a pool that comes back does not replay its history).
    """

    def __init__(
        self, pool: str | None, after: str | Mapping[str, str], *, clock: Clock, look_every: float
    ) -> None:
        self.pool = pool
        if isinstance(after, str):
            self.after, self.cursors = after, {}
        else:
            self.after = after.get(LATER, "0-0")
            self.cursors = {p: c for p, c in after.items() if p != LATER and (pool is None or p == pool)}
        if pool is not None:
            _check_pool(pool)
            self.cursors.setdefault(pool, self.after)
        self._clock = clock
        self._look_every = look_every
        self._looked: float | None = None

    def step(self, count: int, block_ms: int | None) -> Op[list[Event]]:
        """The next events (waiting up to ``block_ms`` for one), oldest first; cursors move on."""
        now = self._clock()
        if self.pool is None and (self._looked is None or now - self._looked >= self._look_every):
            for keys in (yield from _pools(None)):
                self.cursors.setdefault(keys.pool, self.after)
            self._looked = now
        events = (yield from read_events(self.cursors, count, block_ms)) if self.cursors else []
        for event in events:
            self.cursors[event.pool] = event.id
        return events


def close(lease: Lease) -> Op[str | None]:
    """Release a lease on leaving its context; returns why it was lost, or None if it was not."""
    if lease._released:  # given back already (by on_evict's handling, or by hand)
        return "evicted" if lease.evicting else None
    reason = lease.lost_reason
    try:
        yield from release(lease)
    except (LeaseNotFound, LeaseNotHeld) as exc:
        reason = reason or exc.message
    return reason


def next_beat(lease: Lease, failed: bool) -> float | None:
    """Seconds until the next heartbeat, or None when the lease is lost and beating stops.

    After a failed beat (Redis unreachable) it tries again sooner, until the local deadline.
    """
    if lease.lost:
        return None
    ttl = lease.ttl_ms / 1000
    return min(beat_interval(ttl), 0.1 * ttl) if failed else beat_interval(ttl)


def raise_if_lost(lease: Lease, reason: str | None, exc: BaseException | None) -> None:
    """On leaving a lease's context: raise LeaseLost, or note the loss on the error in flight."""
    if reason is None:
        return
    message = f"lease {lease.id} was lost while held: {reason}"
    if exc is None:
        raise (LeaseEvicted if lease.evicting else LeaseLost)(message, lease=lease.id)
    exc.add_note(f"gpuboss: {message}")


def mark(lease: Lease, verb: str) -> Op[None]:
    """``idle`` or ``busy`` on a held lease; ``busy`` raises LeaseEvicted if it is being evicted,
    and LeaseLost (changing nothing) if the lease is lost here already."""
    if verb == "busy":
        lease.check()
    try:
        beat = yield from mark_ref(LeaseRef(lease.pool, lease.id, lease.token), verb)
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    if beat.evict_deadline_ms is not None:
        lease._evict_notice(beat.evict_deadline_ms)
        if verb == "busy":
            raise LeaseEvicted(f"lease {lease.id} is being evicted: give it back", lease=lease.id)


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


def plan(
    vram: int | str | None,
    vram_gb: float | None,
    priority: int | str,
    device: str | None,
    pool: str,
    exclusive: bool = False,
    devices: int = 1,
) -> Op[Plan]:
    """Dry run: what would happen to this request now. Changes nothing."""
    keys = _check_pool(pool)
    args: list[str | int] = [parse_mib(vram, vram_gb), parse_priority(priority)]
    args.append(_check_name("device", device) if device is not None else "")
    args += [int(bool(exclusive)), _check_gang(devices, device)]
    code, f = parse_reply(
        (yield Call("plan", keys.script_keys(), args)), frozenset({"grant", "evict", "wait", "never"})
    )
    return Plan(
        outcome=code,
        device=f.get("device"),
        victims=tuple(_text(v) for v in f.get("victims", [])),
        ahead=int(f.get("ahead", 0)),
        largest_mib=int(f.get("largest", 0)),
    )


def configure_pool(pool: str, min_residency: float, aging: float) -> Op[None]:
    """Set a pool's minimum residency and aging period (seconds; 0 turns either off)."""
    keys = _check_pool(pool)
    args = [0 if min_residency == 0 else parse_ttl_ms(min_residency, "min_residency")]
    args.append(0 if aging == 0 else parse_ttl_ms(aging, "aging"))
    parse_reply((yield Call("configure_pool", keys.script_keys(), list(args))), _OK)


def parse_notice(message: Any) -> tuple[str, int] | None:
    """(lease id, deadline ms) from a pub/sub eviction notice ``evict <id> <deadline>``."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    parts = _text(message.get("data", "")).split(" ")
    if len(parts) != 3 or parts[0] != "evict" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


class Held:
    """The leases a client holds, by id: for eviction notices arriving over pub/sub, for the
    heartbeat worker, and for :meth:`Boss.release` by id and :meth:`Boss.release_all`.

    Holding the same id twice (a retried acquire) keeps the first :class:`Lease` object, so
    whoever holds it goes on hearing its notices. A notice can arrive before the acquire that
    granted the lease has returned; it is kept and applied when the lease is added. The notice
    listener may stop once no lease has been held for ``linger`` seconds.
    """

    linger = 2.0

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._early: dict[str, int] = {}
        self._empty_since = clock()
        self._acquiring = 0
        # Taken briefly by the caller's thread, the listener and the worker (never across I/O).
        self._lock = threading.Lock()

    def add(self, lease: Lease) -> Lease:
        """Hold ``lease``; returns the lease object to use (the one held already for its id)."""
        with self._lock:
            held = self._leases.get(lease.id)
            if held is not None and held.token == lease.token and not held._released:
                held._deadline = max(held._deadline, lease._deadline)
                held._offset = max(held._offset, lease._offset)
                lease = held
            self._leases[lease.id] = lease
            deadline = self._early.pop(lease.id, None)
        if deadline is not None:
            lease._evict_notice(deadline)
        return lease

    def discard(self, lease: Lease) -> None:
        """Forget ``lease`` (released, or found ended)."""
        with self._lock:
            if self._leases.get(lease.id) is lease:
                del self._leases[lease.id]
            if not self._leases:
                self._empty_since = self._clock()

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def leases(self) -> list[Lease]:
        """Every lease held, oldest first."""
        with self._lock:
            return list(self._leases.values())

    def on_message(self, message: Any) -> Lease | None:
        """The lease a notice is for, with the notice applied (None if unknown yet or not one)."""
        notice = parse_notice(message)
        if notice is None:
            return None
        with self._lock:
            lease = self._leases.get(notice[0])
            if lease is None:
                self._early[notice[0]] = notice[1]
                while len(self._early) > 256:
                    del self._early[next(iter(self._early))]
                return None
        lease._evict_notice(notice[1])
        return lease

    def acquiring(self, delta: int) -> None:
        """Count acquires in flight (+1, -1): their notices may arrive before their leases."""
        with self._lock:
            self._acquiring += delta
            self._empty_since = self._clock()

    def idle(self) -> bool:
        """Whether no lease has been held (nor acquired) for ``linger`` seconds (the listener may
        stop)."""
        with self._lock:
            if self._leases or self._acquiring:
                return False
            return self._clock() - self._empty_since > self.linger


@dataclass(frozen=True, slots=True)
class Ask:
    """An acquire as a client method received it: the request, and what stays with the client."""

    request: AcquireRequest
    on_evict: Callable[[Lease], object] | None = None
    on_wait: Callable[[WaitState], object] | None = None
    keepalive: bool = True

    @classmethod
    def of(cls, vram: int | str | None, options: AcquireOptions) -> Ask:
        """Check ``vram`` and the options (:class:`AcquireOptions`); raises BadRequest."""
        opts: dict[str, Any] = dict(options)
        unknown = sorted(set(opts) - AcquireOptions.__optional_keys__)
        if unknown:
            raise BadRequest(f"unknown acquire option(s): {', '.join(unknown)}")
        client = {name: opts.pop(name) for name in CLIENT_OPTIONS if name in opts}
        for name in ("on_evict", "on_wait"):
            if client.get(name) is not None and not callable(client[name]):
                raise BadRequest(f"{name} must be callable, not {client[name]!r}")
        return cls(AcquireRequest.build(vram, **opts), **client)


def max_block_of(client: Any) -> float | None:
    """The longest a blocking command (BLPOP, XREAD BLOCK) may wait on ``client``'s connections:
    half their read timeout, so that a long wait is never taken for a dead connection."""
    try:
        pool = client.connection_pool
        timeout = pool.connection_class(**pool.connection_kwargs).socket_timeout
    except Exception:  # a client without a plain connection pool: block briefly
        return 1.0
    return None if timeout is None else max(0.05, float(timeout) / 2)


def drive(op: Op[T], step: Callable[[Step], Any]) -> T:
    """Run ``op`` to its end, answering each step with ``step(step)`` (blocking I/O)."""
    reply: Any = None
    try:
        while True:
            reply = step(op.send(reply))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


# --- measurements (the NVML agent) ---------------------------------------------------------

#: the most lease readings one ``measure`` call takes (as lua/measure.lua checks)
MAX_READINGS = 1024


@dataclass(frozen=True, slots=True)
class Measurement:
    """The agent's reading of one device, for :func:`measure` (sizes in MiB).

    ``state`` is ``ok`` or ``lost``. ``unmanaged_mib`` is memory used outside leases, as the
    agent smoothed it; ``seen_mib`` what the driver reports in use; ``leak_pids`` the processes
    that use memory while holding no lease, and ``leak_mib`` how much. ``readings`` pairs a lease
    on the device with the MiB its holder's processes use there. Over-use: a reading above the
    lease's size by more than ``over_pct`` percent; under-use: a peak below ``under_pct`` percent
    of the size once the lease has been held ``under_after_ms``.
    """

    device: str
    host: str
    state: str = "ok"
    unmanaged_mib: int = 0
    seen_mib: int = 0
    leak_mib: int = 0
    leak_pids: tuple[int, ...] = ()
    readings: tuple[tuple[str, int], ...] = ()
    over_pct: int = 10
    under_pct: int = 50
    under_after_ms: int = 60_000

    def args(self) -> list[str | int]:
        """The ``measure`` script's ARGV; raises BadRequest for values it would refuse."""
        _check_name("device name", self.device)
        if not isinstance(self.host, str) or len(self.host.encode()) > 255:
            raise BadRequest(f"host must be a string of at most 255 bytes, not {self.host!r}")
        if self.state not in ("ok", "lost"):
            raise BadRequest(f"state must be ok or lost, not {self.state!r}")
        for what, value, top in (
            ("unmanaged_mib", self.unmanaged_mib, 1 << 24),
            ("seen_mib", self.seen_mib, 1 << 24),
            ("leak_mib", self.leak_mib, 1 << 24),
            ("over_pct", self.over_pct, 10_000),
            ("under_pct", self.under_pct, 100),
            ("under_after_ms", self.under_after_ms, 86_400_000),
        ):
            _check_int(what, value, top)
        for pid in self.leak_pids:
            _check_int("a leak pid", pid, 4294967295)
        pids = " ".join(str(p) for p in self.leak_pids)
        if len(pids) > 4096:
            raise BadRequest("leak_pids must fit in 4096 bytes")
        if len(self.readings) > MAX_READINGS:
            raise BadRequest(f"at most {MAX_READINGS} lease readings per device, not {len(self.readings)}")
        args: list[str | int] = [self.device, self.host, self.state, self.unmanaged_mib, self.seen_mib]
        args += [self.leak_mib, pids, self.over_pct, self.under_pct, self.under_after_ms, len(self.readings)]
        for lease_id, mib in self.readings:
            _check_name("lease id", lease_id)
            _check_int("a lease reading", mib, 1 << 24)
            args += [lease_id, mib]
        return args


def _check_int(what: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise BadRequest(f"{what} must be an int from 0 to {top}, not {value!r}")
    return value


def measure(pool: str, m: Measurement) -> Op[int]:
    """Record the agent's reading of a device (see ``lua/measure.lua``); returns how many
    findings it logged as events. Raises DeviceNotFound for a device not in the pool."""
    keys = _check_pool(pool)
    _code, f = parse_reply((yield Call("measure", keys.script_keys(), m.args())), _OK)
    return int(f["events"])


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """A device as the agent last read it: ``state`` is ``ok``, ``lost`` or ``unmeasured`` (no
    agent reads it). Sizes in MiB, times in Redis ms."""

    name: str
    pool: str
    state: str
    agent_host: str | None
    total_mib: int
    unmanaged_mib: int
    seen_mib: int | None
    leak_mib: int
    leak_pids: tuple[int, ...]
    measured_at_ms: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"leak_pids": list(self.leak_pids)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DeviceHealth:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        return _from_doc(cls, doc, "device health", leak_pids=tuple)

    @classmethod
    def from_fields(cls, pool: str, f: Mapping[str, str]) -> DeviceHealth:
        try:
            return cls(
                name=f["name"],
                pool=pool,
                state=f.get("state") or "unmeasured",
                agent_host=f.get("agent_host") or None,
                total_mib=int(f["total_mib"]),
                unmanaged_mib=int(f.get("unmanaged_mib") or 0),
                seen_mib=_opt_int(f.get("seen_mib")),
                leak_mib=int(f.get("leak_mib") or 0),
                leak_pids=tuple(int(p) for p in (f.get("leak_pids") or "").split()),
                measured_at_ms=_opt_int(f.get("measured_at")),
            )
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed device record: {dict(f)!r}") from exc


@dataclass(frozen=True, slots=True)
class LeaseUsage:
    """What the holder of a live lease really uses, as the agent measured it (MiB, Redis ms).

    ``finding`` is ``over_use``, ``under_use`` or None.
    """

    id: str
    pool: str
    holder: str
    holder_host: str
    holder_pid: int
    device: str
    mib: int
    measured_mib: int
    peak_mib: int
    finding: str | None
    measured_at_ms: int
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LeaseUsage:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        return _from_doc(cls, doc, "lease usage", labels=dict)


@dataclass(frozen=True, slots=True)
class Findings:
    """One pool's measurements: device health, measured leases, and the peak per label."""

    pool: str
    now_ms: int
    devices: list[DeviceHealth]
    leases: list[LeaseUsage]
    label_peaks: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``{pool, now_ms, devices: [...], leases: [...], label_peaks: {"k=v": mib}}``."""
        return {
            "pool": self.pool,
            "now_ms": self.now_ms,
            "devices": [d.to_dict() for d in self.devices],
            "leases": [x.to_dict() for x in self.leases],
            "label_peaks": dict(self.label_peaks),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Findings:
        """The inverse of :meth:`to_dict` (for JSON from the boss service)."""
        try:
            return cls(
                pool=doc["pool"],
                now_ms=doc["now_ms"],
                devices=[DeviceHealth.from_dict(d) for d in doc["devices"]],
                leases=[LeaseUsage.from_dict(x) for x in doc["leases"]],
                label_peaks=dict(doc["label_peaks"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed findings document: {dict(doc)!r}") from exc


def findings(pool: str | None) -> Op[list[Findings]]:
    """The agent's findings of one pool or every pool (leases it never measured are left out)."""
    out: list[Findings] = []
    for keys in (yield from _pools(pool)):
        _, f = parse_reply((yield Call("devices", keys.script_keys(), [])), _OK)
        devices = [DeviceHealth.from_fields(keys.pool, _pairs(d)) for d in f["devices"]]
        usage: list[LeaseUsage] = []
        offset = 0
        while True:
            _, page = parse_reply((yield Call("leases", keys.script_keys(), [offset, _LIST_PAGE])), _OK)
            for flat in page["leases"]:
                x = _pairs(flat)
                if x.get("measured_mib") is None or x.get("state") == "queued":
                    continue
                info = LeaseInfo.from_fields(keys.pool, x)
                try:
                    usage.append(
                        LeaseUsage(
                            id=info.id,
                            pool=keys.pool,
                            holder=info.holder,
                            holder_host=info.holder_host,
                            holder_pid=info.holder_pid,
                            device=info.device or "",
                            mib=info.mib,
                            measured_mib=int(x["measured_mib"]),
                            peak_mib=int(x.get("peak_mib") or x["measured_mib"]),
                            finding=x.get("finding") or None,
                            measured_at_ms=int(x.get("measured_at") or 0),
                            labels=info.labels,
                        )
                    )
                except ValueError as exc:
                    raise ProtocolError(f"malformed lease measurement: {x!r}") from exc
            offset += _LIST_PAGE
            if offset >= int(page["total"]):
                break
        flat_peaks = yield Command(("HGETALL", keys.peaks))
        peaks = flat_peaks if isinstance(flat_peaks, dict) else _pairs(flat_peaks or [])
        label_peaks = {_text(k): int(_text(v)) for k, v in sorted(peaks.items())}
        out.append(Findings(keys.pool, int(f["now"]), devices, usage, label_peaks))
    return out
