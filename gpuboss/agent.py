"""The agent: registers this host's GPUs and keeps their budgets honest with live readings.

Each pass (:meth:`Agent.run_once`) reads the devices and their processes from a
:class:`~gpuboss.probe.DeviceProbe`, registers devices that are new or changed, attributes each
process's memory to the leases of this host by the holder's pid (the process itself or its
nearest ancestor that holds a lease on that device: ``gpuboss run`` holds the lease, its child
uses the GPU), and records one :class:`~gpuboss_client.ops.Measurement` per device with one
atomic script call (``lua/measure.lua``).

**Unmanaged memory** of a device is what nobody can lease: the memory of processes that hold no
lease on it, plus memory in use that no process explains (the driver's own reservation,
processes NVML cannot see), plus what a holder uses beyond its lease. A holder's CUDA context
belongs to the holder: declare it in the lease. Where NVML reports a process's usage as unknown
and the process holds a lease, the lease's size is assumed. The value rises at once (so budgets
shrink before anyone else can take the memory) and falls by an exponential moving average with
weight ``smoothing`` per pass, never below 0 (a managed consumer's memory outside its leases
counts as measured, without smoothing). Counting is conservative: a lease held from
another host, or from another pid namespace (a container), cannot be matched to its processes,
so their memory counts as unmanaged too.

**Managed consumers** (:mod:`gpuboss.consumers`) are measured through their processes, not by
holder pid: the boss sets :attr:`Agent.owners` to map each consumer's process (the child it
started, the container's, the one listening on its port) to an :class:`Owner`. A process is
attributed to the nearest of itself and its ancestors that is an owner or a holder. An owner's
memory counts for its leases; an owner with no lease on the device (a consumer given back, or
stuck) is unmanaged memory, but not a leak. Each pass reports the MiB measured per owner
(:attr:`PassReport.owned`) to :attr:`Agent.listeners`, and :meth:`Agent.kick` asks for a pass now.

**Findings** (events, once each when they appear): ``over_use`` and ``under_use`` per lease,
``leak`` (a process using memory with no lease on the device for ``confirm_passes`` passes in a
row), ``device_lost`` (a device vanished or fails: its budget drops to 0) and ``device_back``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gpuboss.probe import DeviceProbe, ProbedDevice, ProbeError, ProcUse
from gpuboss_client import BadRequest, Boss, DeviceInfo, DeviceNotFound, GpubossError, LeaseInfo, ops
from gpuboss_client.keys import valid_name, valid_pool
from gpuboss_client.units import MAX_MIB

__all__ = ["Agent", "DeviceReading", "Owner", "PassReport", "background_agent", "proc_parent"]

log = logging.getLogger("gpuboss.agent")

LIVE = frozenset({"active", "idle", "evicting"})
#: ancestors of a process looked at to find the lease holder it works for
MAX_ANCESTORS = 32
#: pids named per device in a leak finding (the largest users)
MAX_LEAK_PIDS = 256


def proc_parent(pid: int) -> int | None:
    """The parent pid of ``pid`` from ``/proc`` (Linux), or None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        return int(text.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """What one pass found on one device (MiB).

    ``raw_unmanaged_mib`` is this pass's reading, ``unmanaged_mib`` the smoothed value recorded.
    ``readings`` maps the leases measured to what their holders use.
    """

    device: str
    state: str
    seen_mib: int
    raw_unmanaged_mib: int
    unmanaged_mib: int
    leak_pids: tuple[int, ...] = ()
    leak_mib: int = 0
    readings: Mapping[str, int] = field(default_factory=dict)


@dataclass
class _Attribution:
    """Who uses what on this host's devices, in one pass (MiB).

    ``usage``: per (lease, device), what its holder's processes use; ``unknown``: leases whose
    usage NVML could not tell; ``unleased``: per device, each process of no lease; ``quiet``: per
    device, managed consumers' processes with no lease there; ``accounted``: per device, the
    processes counted for a lease or a consumer.
    """

    usage: dict[tuple[str, str], int] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    unleased: dict[str, dict[int, int]] = field(default_factory=dict)
    quiet: dict[str, int] = field(default_factory=dict)
    accounted: dict[str, set[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a managed consumer's processes work for: ``key`` names the consumer, ``leases`` are the
    ids of its live leases (none: its memory is unmanaged, but not a leak)."""

    key: str
    leases: tuple[str, ...] = ()


@dataclass
class PassReport:
    """One pass: the devices read, those registered now, findings logged, and a probe error.

    ``started`` is the monotonic time the pass began reading; ``owned`` the MiB each owner's
    processes use, summed over devices (0 for an owner none of whose processes use any).
    """

    devices: list[DeviceReading] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    events: int = 0
    error: str | None = None
    started: float = 0.0
    owned: dict[str, int] = field(default_factory=dict)
    #: the device on which each owner's processes use the most
    where: dict[str, str] = field(default_factory=dict)


def _positive(what: str, value: float, top: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= top:
        raise BadRequest(f"{what} must be a number above 0 and at most {top}, not {value!r}")
    return float(value)


def _int(what: str, value: int, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise BadRequest(f"{what} must be an int from 0 to {top}, not {value!r}")
    return value


class Agent:
    """Registers this host's devices in ``pool`` and measures them every ``interval_s`` seconds.

    ``smoothing`` (0 < s <= 1) is the weight of a new, lower reading of unmanaged memory (1: no
    smoothing); higher readings count at once. ``reserved_mib`` is the headroom given to devices
    it adds (an existing device keeps its own). Over-use: a holder using more than its lease by
    over ``over_pct`` percent; under-use: a lease whose peak stays below ``under_pct`` percent
    of its size once held ``under_after_s`` seconds. ``parent_of`` finds a process's parent pid
    (default: ``/proc``).
    """

    def __init__(
        self,
        boss: Boss,
        probe: DeviceProbe,
        pool: str = "default",
        host: str | None = None,
        interval_s: float = 2.0,
        smoothing: float = 0.3,
        *,
        reserved_mib: int = 0,
        over_pct: int = 10,
        under_pct: int = 50,
        under_after_s: float = 60.0,
        confirm_passes: int = 2,
        parent_of: Callable[[int], int | None] = proc_parent,
    ) -> None:
        if not valid_pool(pool):
            raise BadRequest(f"pool must be 1-64 of [A-Za-z0-9_.-], not {pool!r}")
        self.boss = boss
        self.probe = probe
        self.pool = pool
        self.host = socket.gethostname() if host is None else host
        self.interval_s = _positive("interval_s", interval_s, 3600)
        self.smoothing = _positive("smoothing", smoothing, 1)
        self.reserved_mib = _int("reserved_mib", reserved_mib, MAX_MIB)
        self.over_pct = _int("over_pct", over_pct, 10_000)
        self.under_pct = _int("under_pct", under_pct, 100)
        self.under_after_ms = _int("under_after_s", round(under_after_s * 1000), 86_400_000)
        self.confirm_passes = max(1, _int("confirm_passes", confirm_passes, 100))
        self.parent_of = parent_of
        self._registered: dict[str, tuple[int, int | None]] = {}
        self._known: set[str] | None = None  # devices this host's agent measures
        self._smoothed: dict[str, int] = {}
        self._last_unleased: dict[str, dict[int, int]] = {}
        self._unleased_passes: dict[tuple[str, int], int] = {}
        #: the processes of managed consumers, by pid (read once per pass; see the module docstring)
        self.owners: Callable[[], Mapping[int, Owner]] | None = None
        #: called with every pass's report, from the agent's thread
        self.listeners: list[Callable[[PassReport], None]] = []
        self._wake = threading.Event()

    def kick(self) -> None:
        """Run the next pass now rather than after ``interval_s`` (from any thread)."""
        self._wake.set()

    # --- one pass ---------------------------------------------------------------------------

    def run_once(self) -> PassReport:
        """Read the devices once, register what is new, and record one measurement per device.

        A probe that fails as a whole (NVML down) marks every device this agent measures lost
        and is reported in ``error``; Redis errors raise.
        """
        report = PassReport(started=time.monotonic())
        if self._known is None:
            self._known = self._load()
        try:
            probed = self.probe.devices()
            procs = self.probe.processes()
        except ProbeError as err:
            log.error("cannot read the devices: %s", err.message)
            report.error = err.message
            probed, procs = [], []
        healthy = {d.device_id: d for d in probed if d.healthy and self._nameable(d)}
        report.registered = self._register(healthy.values())
        self._known |= set(healthy)
        leases = [x for x in self.boss.leases(self.pool) if x.state in LIVE and x.device]
        owners = dict(self.owners()) if self.owners is not None else {}
        report.owned = {o.key: 0 for o in owners.values()}
        seen = self._attribute(healthy.values(), procs, leases, owners, report)
        for name in sorted(self._known):
            dev = healthy.get(name)
            reading = self._lost(name) if dev is None else self._reading(dev, leases, seen)
            try:
                report.events += self.boss.run(ops.measure(self.pool, self._measurement(reading)))
            except DeviceNotFound:
                # Removed by an operator: forget it; it is added again while it is here.
                log.warning("device %s is not in pool %s any more", name, self.pool)
                self._known.discard(name)
                self._registered.pop(name, None)
                continue
            report.devices.append(reading)
        for listener in self.listeners:
            listener(report)
        return report

    def run(
        self, stop: threading.Event | None = None, on_pass: Callable[[PassReport], None] | None = None
    ) -> None:
        """Pass after pass, every ``interval_s``, until ``stop`` is set. A failed pass (Redis
        unreachable) is logged and the next one tries again."""
        stop = threading.Event() if stop is None else stop
        while not stop.is_set():
            try:
                report = self.run_once()
            except GpubossError as err:
                log.warning("agent pass failed: %s", err.message)
            except Exception:  # a driver or binding surprise must not stop the measuring
                log.exception("agent pass failed")
            else:
                if on_pass is not None:
                    on_pass(report)
            if stop.is_set():
                break
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def stop(self, stop: threading.Event) -> None:
        """End :meth:`run` (with its ``stop`` event) without waiting out the interval."""
        stop.set()
        self._wake.set()

    # --- parts ------------------------------------------------------------------------------

    def _nameable(self, dev: ProbedDevice) -> bool:
        if valid_name(dev.device_id) and 1 <= dev.total_mib <= MAX_MIB:
            return True
        log.warning("device %s (%d MiB) cannot be registered: not a valid device name or size",
                    dev.uuid, dev.total_mib)  # fmt: skip
        return False

    def _load(self) -> set[str]:
        """The devices this host's agent measured before (one that vanished meanwhile is lost)."""
        health = self.boss.run(ops.findings(self.pool))
        return {d.name for f in health for d in f.devices if d.agent_host == self.host}

    def _register(self, devices: Iterable[ProbedDevice]) -> list[str]:
        """Add the devices that are new or whose size or CUDA index changed (an existing device
        keeps its headroom); Redis is read only when there is something to compare."""
        todo = [d for d in devices if self._registered.get(d.device_id) != (d.total_mib, d.index)]
        if not todo:
            return []
        existing: dict[str, DeviceInfo] = {d.name: d for d in self.boss.devices(self.pool)}
        added = []
        for dev in todo:
            old = existing.get(dev.device_id)
            self._registered[dev.device_id] = (dev.total_mib, dev.index)
            if old is not None and (old.total_mib, old.cuda_index, old.host) == (
                dev.total_mib,
                dev.index,
                self.host,
            ):
                continue
            reserved = old.reserved_mib if old is not None else self.reserved_mib
            self.boss.add_device(
                dev.device_id, dev.total_mib, reserved=min(reserved, dev.total_mib), pool=self.pool,
                host=self.host, cuda_index=dev.index,
            )  # fmt: skip
            log.info("registered %s (%s, %d MiB, cuda %s) in pool %s", dev.device_id, dev.name,
                     dev.total_mib, dev.visible_id, self.pool)  # fmt: skip
            added.append(dev.device_id)
        return added

    def _holder_leases(
        self,
        pid: int,
        device: str,
        by_pid: Mapping[int, list[LeaseInfo]],
        owners: Mapping[int, Owner],
        parents: dict[int, int | None],
    ) -> tuple[Owner | None, list[LeaseInfo]]:
        """Who ``pid`` works for on ``device``: the nearest of it and its ancestors that is an owner
        (a managed consumer's process: that owner, and its leases there) or holds a lease there."""
        p: int | None = pid
        for _ in range(MAX_ANCESTORS):
            if p is None or p <= 1:
                break
            owner = owners.get(p)
            if owner is not None:
                return owner, [x for x in by_pid.get(-1, ()) if x.id in owner.leases and device in x.devices]
            on = [x for x in by_pid.get(p, ()) if device in x.devices]
            if on:
                return None, on
            if p not in parents:
                parents[p] = self.parent_of(p)
            p = parents[p]
        return None, []

    def _attribute(
        self,
        devices: Iterable[ProbedDevice],
        procs: list[ProcUse],
        leases: list[LeaseInfo],
        owners: Mapping[int, Owner],
        report: PassReport,
    ) -> _Attribution:
        """Who uses what (see :class:`_Attribution`); reports each owner's MiB and device."""
        owned_ids = {i for o in owners.values() for i in o.leases}
        by_pid: dict[int, list[LeaseInfo]] = {}
        for x in leases:
            if x.id in owned_ids:  # a managed consumer's: matched through its owner, pid -1 here
                by_pid.setdefault(-1, []).append(x)
            elif x.holder_host == self.host:
                by_pid.setdefault(x.holder_pid, []).append(x)
        names = {d.uuid: d.device_id for d in devices if d.processes_visible}
        parents: dict[int, int | None] = {}
        out = _Attribution()
        per_owner: dict[str, dict[str, int]] = {}
        for p in procs:
            name = names.get(p.device)
            if name is None:
                continue
            owner, owners_here = self._holder_leases(p.pid, name, by_pid, owners, parents)
            if owner is not None or owners_here:
                out.accounted.setdefault(name, set()).add(p.pid)
            if owner is not None:
                report.owned[owner.key] += p.used_mib or 0
                on = per_owner.setdefault(owner.key, {})
                on[name] = on.get(name, 0) + (p.used_mib or 0)
                if not owners_here:
                    out.quiet[name] = out.quiet.get(name, 0) + (p.used_mib or 0)
                    continue
            if p.used_mib is None:
                out.unknown.update(x.id for x in owners_here)
            elif owners_here:
                # One process holding several leases on the device: its usage is shared out
                # in proportion to their sizes.
                total = sum(x.mib for x in owners_here)
                for x in owners_here:
                    key = (x.id, name)
                    out.usage[key] = out.usage.get(key, 0) + p.used_mib * x.mib // total
            elif p.used_mib > 0:
                per = out.unleased.setdefault(name, {})
                per[p.pid] = per.get(p.pid, 0) + p.used_mib
        report.where = {key: max(on, key=lambda d: on[d]) for key, on in per_owner.items()}
        return out

    def _reading(
        self,
        dev: ProbedDevice,
        leases: list[LeaseInfo],
        seen: _Attribution,
    ) -> DeviceReading:
        name = dev.device_id
        usage, unknown = seen.usage, seen.unknown
        quiet = seen.quiet.get(name, 0)
        here = [x for x in leases if name in x.devices]
        mine = seen.unleased.get(name, {})
        if dev.processes_visible:
            explained = sum(mib for (_, d), mib in usage.items() if d == name) + sum(mine.values()) + quiet
            explained += sum(x.mib for x in here if x.id in unknown)
            # Memory a holder uses beyond its lease is as unavailable as anyone else's.
            excess = sum(max(0, usage.get((x.id, name), 0) - x.mib) for x in here)
            raw = sum(mine.values()) + quiet + excess + max(0, dev.used_mib - explained)
            # A gang lease is measured on each of its devices; its reading is the largest.
            readings = {
                x.id: max(usage.get((x.id, d), 0) for d in x.devices)
                for x in here
                if x.holder_host == self.host and x.id not in unknown
            }
        else:
            raw = max(0, dev.used_mib - sum(x.mib for x in here))
            readings = {}
        # Managed consumers' memory outside their leases (quiet) counts exactly: the boss knows
        # those processes, and it is measured; only the rest is smoothed.
        rest = max(0, raw - quiet)
        prev = self._smoothed.get(name)
        # Memory of processes that had no lease last pass and are counted for one now moved,
        # it was not freed: it leaves the smoothed value at once.
        before = self._last_unleased.get(name, {})
        moved = sum(before.get(pid, 0) for pid in seen.accounted.get(name, ()))
        if prev is not None:
            prev = max(0, prev - moved)
        self._last_unleased[name] = dict(mine)
        smoothed = rest if prev is None or rest >= prev else rest + int((prev - rest) * (1 - self.smoothing))
        self._smoothed[name] = smoothed
        smoothed += raw - rest
        # A process counts as leaking once seen without a lease for confirm_passes passes in a
        # row: a holder that just released, or is about to acquire, is not reported.
        for key in [k for k in self._unleased_passes if k[0] == name and k[1] not in mine]:
            del self._unleased_passes[key]
        confirmed = []
        for pid in mine:
            n = self._unleased_passes[(name, pid)] = self._unleased_passes.get((name, pid), 0) + 1
            if n >= self.confirm_passes:
                confirmed.append(pid)
        confirmed = sorted(sorted(confirmed, key=lambda pid: -mine[pid])[:MAX_LEAK_PIDS])
        return DeviceReading(
            name,
            "ok",
            dev.used_mib,
            raw,
            smoothed,
            tuple(confirmed),
            sum(mine[p] for p in confirmed),
            readings,
        )

    def _lost(self, name: str) -> DeviceReading:
        self._smoothed.pop(name, None)
        for key in [k for k in self._unleased_passes if k[0] == name]:
            del self._unleased_passes[key]
        return DeviceReading(name, "lost", 0, 0, 0)

    def _measurement(self, r: DeviceReading) -> ops.Measurement:
        return ops.Measurement(
            device=r.device,
            host=self.host,
            state=r.state,
            unmanaged_mib=min(r.unmanaged_mib, MAX_MIB),
            seen_mib=min(r.seen_mib, MAX_MIB),
            leak_mib=min(r.leak_mib, MAX_MIB),
            leak_pids=r.leak_pids,
            readings=tuple(sorted((i, min(m, MAX_MIB)) for i, m in r.readings.items()))[: ops.MAX_READINGS],
            over_pct=self.over_pct,
            under_pct=self.under_pct,
            under_after_ms=self.under_after_ms,
        )


@contextmanager
def background_agent(
    mode: str,
    redis_url: str,
    *,
    pool: str,
    interval_s: float,
    probe_factory: Callable[[], DeviceProbe] | None = None,
) -> Iterator[Agent | None]:
    """The agent in a thread beside the service, for ``gpuboss serve``.

    ``mode`` ``"auto"`` runs it when NVML works here and says why not otherwise; ``"on"`` raises
    :class:`GpubossError` when it cannot run; ``"off"`` never runs it. Yields the agent or None;
    stops it on leaving.
    """
    if mode == "off":
        yield None
        return
    try:
        if probe_factory is not None:
            probe = probe_factory()
        else:
            from gpuboss.probe import NvmlProbe  # NVML only where the agent runs

            probe = NvmlProbe()
    except ProbeError as err:
        if mode == "on":
            raise GpubossError(f"the agent cannot run: {err.message}") from None
        log.info("no NVML agent: %s", err.message)
        yield None
        return
    boss = Boss.from_url(redis_url, holder="gpuboss-agent")
    agent = Agent(boss, probe, pool=pool, interval_s=interval_s)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), name="gpuboss-agent", daemon=True)
    thread.start()
    log.info("NVML agent measures this host's devices every %g s in pool %s", interval_s, pool)
    try:
        yield agent
    finally:
        agent.stop(stop)
        thread.join(10)
        probe.close()
        boss.close()
