"""The policies gpuboss is compared with, as small pure-Python allocators over the same devices.

- :class:`GlobalLock` (mGPUmanager): one lease per device at a time, a first-come first-served
  queue. A model may stay loaded after its request (warm) until a waiter needs the device; then
  it is unloaded first. On one card this serialises everything behind one lock.
- :class:`PriorityTiers` (llmux): no queue. A request that does not fit evicts loaded models,
  idle or in use, of its own tier and lower first (lowest priority, least recently used), and of
  higher tiers as a last resort; one that finds nothing to evict retries every ``poll_s``. (llmux
  loads under its lock, so a model is never evicted while it loads.)
- :class:`FirstCome` (first-come first-served without eviction): a strict queue, best fit; a warm
  model keeps its memory until its keep-warm time ends.

Every allocator keeps its own accounting of device memory and of the memory victims are giving
back to the request that evicted them (a claim), so that nobody else takes it meanwhile.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .policy import Ask, Notice
from .trace import DeviceSpec, Settings

__all__ = ["BASELINES", "FirstCome", "GlobalLock", "PriorityTiers"]


@dataclass(eq=False, slots=True)
class _Lease:
    ask: Ask
    device: str
    state: str  # active | idle | evicting
    used_at: float
    loaded: bool = False


class _Pool:
    """Devices, leases, waiters and claims; the policies decide in :meth:`_settle`."""

    name = "?"

    def __init__(self, devices: Sequence[DeviceSpec], settings: Settings) -> None:
        self.budget = {d.name: d.mib for d in devices}
        self.used = dict.fromkeys(self.budget, 0)
        self.claimed = dict.fromkeys(self.budget, 0)
        self.leases: dict[str, _Lease] = {}
        self.by_device: dict[str, dict[str, _Lease]] = {d: {} for d in self.budget}
        self.waiting: dict[str, Ask] = {}  # in arrival order
        self.claims: dict[str, str] = {}  # waiter -> device its victims are freeing
        self.settings = settings
        self._out: list[Notice] = []
        self.version = 0  # bumped by every change of leases or claims (see PriorityTiers)

    # -- the protocol

    def acquire(self, ask: Ask, now: float) -> None:
        """Queue the request (or refuse it if no device could ever hold it) and settle."""
        if ask.mib > max(self.budget.values()):
            self._out.append(Notice("never", ask.lease))
            return
        self.waiting[ask.lease] = ask
        self._settle(now)

    def release(self, lease: str, now: float) -> None:
        """Free the lease's memory and settle."""
        self.version += 1
        held = self.leases.pop(lease)
        del self.by_device[held.device][lease]
        self.used[held.device] -= held.ask.mib
        self._settle(now)

    def revoke(self, lease: str, now: float) -> None:
        """As :meth:`release`: the memory counts as free from now."""
        self.release(lease, now)

    def loaded(self, lease: str, now: float) -> None:
        """Note that the holder has loaded (llmux evicts no model while it loads)."""
        self.version += 1
        self.leases[lease].loaded = True

    def idle(self, lease: str, now: float) -> None:
        """Mark the lease warm and settle (a waiter may evict it)."""
        self.version += 1
        held = self.leases[lease]
        if held.state == "active":
            held.state, held.used_at = "idle", now
        self._settle(now)

    def busy(self, lease: str, now: float) -> bool:
        """Use a warm lease again, unless it is being evicted."""
        held = self.leases[lease]
        if held.state == "evicting":
            return False
        self.version += 1
        held.state, held.used_at = "active", now
        return True

    def due(self) -> float | None:
        """No timers by default."""
        return None

    def tick(self, now: float) -> None:
        """Nothing is due by default."""

    def notices(self) -> list[Notice]:
        """The notices since the last call."""
        out, self._out = self._out, []
        return out

    # -- helpers for the policies

    def _settle(self, now: float) -> None:
        raise NotImplementedError

    def _free(self, device: str, ask: Ask | None = None) -> int:
        own = ask.mib if ask is not None and self.claims.get(ask.lease) == device else 0
        return self.budget[device] - self.used[device] - self.claimed[device] + own

    def _on(self, device: str) -> list[_Lease]:
        return list(self.by_device[device].values())

    def _best_fit(self, ask: Ask) -> str | None:
        best: tuple[int, str] | None = None
        for device in self.budget:
            left = self._free(device, ask) - ask.mib
            if left >= 0 and (best is None or (left, device) < best):
                best = (left, device)
        return None if best is None else best[1]

    def _grant(self, ask: Ask, device: str, now: float) -> None:
        self.version += 1
        del self.waiting[ask.lease]
        if self.claims.pop(ask.lease, None) is not None:
            self.claimed[device] -= ask.mib
        self.leases[ask.lease] = self.by_device[device][ask.lease] = _Lease(ask, device, "active", now)
        self.used[device] += ask.mib
        self._out.append(Notice("granted", ask.lease, device))

    def _evict(self, ask: Ask, device: str, victims: Iterable[_Lease]) -> None:
        self.version += 1
        for victim in victims:
            victim.state = "evicting"
            self._out.append(Notice("evict", victim.ask.lease))
        self.claims[ask.lease] = device
        self.claimed[device] += ask.mib

    def _grant_claimants(self, now: float) -> None:
        """Grant the waiters whose victims have given back enough."""
        for lease, device in list(self.claims.items()):
            ask = self.waiting[lease]
            if self._free(device, ask) >= ask.mib and self._exclusive_ok(device, ask):
                self._grant(ask, device, now)

    def _exclusive_ok(self, device: str, ask: Ask) -> bool:
        return True


class FirstCome(_Pool):
    """First come, first served, best fit, no eviction: the head of the queue blocks the rest."""

    name = "fcfs"

    def _settle(self, now: float) -> None:
        for ask in list(self.waiting.values()):
            device = self._best_fit(ask)
            if device is None:
                return
            self._grant(ask, device, now)


class GlobalLock(_Pool):
    """One lease per device (a global lock on one card), first come first served; warm models are
    unloaded when the head of the queue needs their device."""

    name = "lock"

    def _exclusive_ok(self, device: str, ask: Ask) -> bool:
        return not self._on(device)

    def _settle(self, now: float) -> None:
        self._grant_claimants(now)
        for ask in list(self.waiting.values()):
            if ask.lease in self.claims:
                continue  # its device is being cleared
            taken = set(self.claims.values())
            empty = [d for d in self.budget if d not in taken and not self._on(d)]
            if empty:
                self._grant(ask, empty[0], now)
                continue
            warm = [d for d in self.budget if d not in taken and all(h.state == "idle" for h in self._on(d))]
            if not warm:
                return  # every device is in use: the head waits, and so does everyone behind it
            device = min(warm, key=lambda d: (sum(h.ask.mib for h in self._on(d)), d))
            self._evict(ask, device, self._on(device))


class PriorityTiers(_Pool):
    """llmux's rule without a queue: evict by priority tier (two passes), else retry later."""

    name = "tiers"

    def __init__(self, devices: Sequence[DeviceSpec], settings: Settings) -> None:
        super().__init__(devices, settings)
        self._retries: list[tuple[float, int, str]] = []
        self._seq = 0
        self._failed: dict[str, int] = {}  # request -> the version at which it last failed
        self._room_at: tuple[int, dict[str, int]] = (-1, {})

    def acquire(self, ask: Ask, now: float) -> None:
        """Try now; a request that neither fits nor can evict retries after ``poll_s``."""
        if ask.mib > max(self.budget.values()):
            self._out.append(Notice("never", ask.lease))
            return
        self.waiting[ask.lease] = ask
        self._try(ask, now)

    def due(self) -> float | None:
        """The next retry."""
        return self._retries[0][0] if self._retries else None

    def tick(self, now: float) -> None:
        """Retry every request whose time has come, in the order they are due."""
        while self._retries and self._retries[0][0] <= now:
            _, _, lease = heapq.heappop(self._retries)
            ask = self.waiting.get(lease)
            if ask is not None and lease not in self.claims:
                self._try(ask, now)

    def _settle(self, now: float) -> None:
        self._grant_claimants(now)  # nobody else: without a queue, the rest retry by themselves

    def _try(self, ask: Ask, now: float) -> None:
        if self._failed.get(ask.lease) == self.version:
            self._retry(ask, now)  # nothing changed since it last failed: it would fail again
            return
        device = self._best_fit(ask)
        if device is not None:
            self._grant(ask, device, now)
            return
        room = self._room()
        plans = [
            (len(v), sum(h.ask.mib for h in v), d, v)
            for d in self.budget
            if room[d] >= ask.mib and (v := self._victims(d, ask))
        ]
        if plans:
            _, _, device, victims = min(plans, key=lambda p: p[:3])
            self._evict(ask, device, victims)
            self._grant_claimants(now)
            return
        self._failed[ask.lease] = self.version
        self._retry(ask, now)

    def _retry(self, ask: Ask, now: float) -> None:
        self._seq += 1
        heapq.heappush(self._retries, (now + self.settings.poll_s, self._seq, ask.lease))

    def _room(self) -> dict[str, int]:
        """Per device, what is free plus what evicting every loaded lease would free (cached until
        the next change): a device with less can be skipped at once."""
        if self._room_at[0] != self.version:
            room = {
                d: self._free(d) + sum(h.ask.mib for h in on.values() if h.state != "evicting" and h.loaded)
                for d, on in self.by_device.items()
            }
            self._room_at = (self.version, room)
        return self._room_at[1]

    def _victims(self, device: str, ask: Ask) -> list[_Lease]:
        """Lowest tier first, least recently used first; own tier and lower, then the rest."""
        free = self._free(device, ask)
        movable = [h for h in self.by_device[device].values() if h.state != "evicting" and h.loaded]
        if free + sum(h.ask.mib for h in movable) < ask.mib:
            return []  # not even evicting everything would do
        order = sorted(movable, key=lambda h: (h.ask.priority, h.used_at, h.ask.lease))
        passes = [h for h in order if h.ask.priority <= ask.priority]
        passes += [h for h in order if h.ask.priority > ask.priority]
        chosen: list[_Lease] = []
        for held in passes:
            if free >= ask.mib:
                break
            chosen.append(held)
            free += held.ask.mib
        return chosen if free >= ask.mib else []


#: the baselines by name, in the order of tables
BASELINES: dict[str, type[_Pool]] = {"lock": GlobalLock, "tiers": PriorityTiers, "fcfs": FirstCome}
