"""The NVML agent's part: what it records of each device (:class:`Measurement`, :func:`measure`)
and what it found, per pool (:class:`Findings`: :class:`DeviceHealth` and :class:`LeaseUsage`,
read by :func:`findings`). Operations like those of :mod:`._ops`, free of I/O.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._models import LeaseInfo
from ._ops import _LIST_PAGE, _check_int, _check_name, _check_pool, _pools
from ._protocol import _OK, Call, Command, Op, _from_doc, _opt_int, _pairs, _text, parse_reply
from .errors import BadRequest, ProtocolError

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


_NOTE_NAME = re.compile(r"consumer_[a-z_]+")
_NOTE_FIELD = re.compile(r"[a-z_]{1,32}")


def note(pool: str, event: str, fields: Mapping[str, str]) -> Op[None]:
    """Append ``event`` (``consumer_`` + ``[a-z_]``, at most 32 characters) with up to 16
    ``fields`` (names of ``[a-z_]``, values of at most 512 bytes) to the pool's event stream:
    what the boss does to a managed consumer, beside the lease transitions (see ``lua/note.lua``)."""
    keys = _check_pool(pool)
    if len(event) > 32 or not _NOTE_NAME.fullmatch(event):
        raise BadRequest(f"event must be consumer_ followed by [a-z_], at most 32 characters, not {event!r}")
    if len(fields) > 16:
        raise BadRequest("at most 16 fields")
    args: list[str | int] = [event]
    for k, v in fields.items():
        if k == "event" or not _NOTE_FIELD.fullmatch(k) or len(v.encode()) > 512:
            raise BadRequest(f"field {k!r}: names are 1-32 of [a-z_] (not event), values at most 512 bytes")
        args += [k, v]
    parse_reply((yield Call("note", keys.script_keys(), args)), _OK)


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
