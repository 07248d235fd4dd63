"""The state a holder keeps of its leases, free of I/O: :class:`Lease` (the fencing token and the
local deadlines after which a lease counts as lost), when to renew it (:func:`beat_interval`,
:func:`next_beat`), and :class:`Held`, the leases a client holds, which eviction notices from
pub/sub (:func:`parse_notice`) reach.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from ._models import DEFAULT_GRACE, LeaseInfo
from ._protocol import Clock, _text
from .errors import LeaseEvicted, LeaseLost, ProtocolError


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
        self._renewals = 0  # the grant's own deadline counts as the first
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
        if self._renewals and (reason := self.lost_reason) is not None:
            # A renewal whose reply came after the fence: the holder may have stopped using the
            # memory already, and "lost" never turns back into "held".
            self._mark_lost(reason)
            return
        self._renewals += 1
        # Redis ran the script after we sent it, so the Redis time it read is at `sent_at` or later
        # on our clock; and that time lies below `now_ms + 1` (the scripts round TIME down to the
        # ms). So `offset` is below the true difference, and every deadline derived from it
        # (expiry, eviction) falls on the safe side. Give up a margin before the expiry.
        self._offset = sent_at - (now_ms + 1) / 1000
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
