"""gpuboss's own policy: the real Lua scripts on a private Redis, on a virtual clock.

:func:`private_redis` starts a ``redis-server`` child in a fresh temporary directory (the embedded
server's own functions, with persistence turned off), or an in-process fakeredis server where
``redis-server`` is missing. :class:`ScriptPool` drives the client's operations by hand: before
each step it sets the pool's ``clock_ms`` (the scripts' only clock, see ``now_ms`` in
``lua/_common.lua``), and a waiter's blocking pop on its wake list never blocks: the waiter is
parked, and resumed either when the scripts grant it (a ``granted`` event names it) or when its
poll is due (then its acquire asks again, which is when aging acts).

It learns of evictions from the pool's event stream, which it reads after every call (event ids
are Redis's real time: only their order counts here). Leases are held with a TTL of a day and
renewed every few virtual hours, so nothing expires by accident; a victim's eviction deadline is
therefore its expiry, and the replay itself revokes (force-releases) a victim that would miss its
grace period (see :mod:`.replay`).
"""

from __future__ import annotations

import contextlib
import heapq
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuboss.embedded import find_redis_server, start_fakeredis, start_redis_server
from gpuboss_client import Boss, InsufficientVram, LeaseLost, PoolKeys, ops
from gpuboss_client._core import Call, Command, Op

from .policy import Ask, Notice
from .trace import Trace

__all__ = ["BASE_MS", "ScriptPool", "private_redis"]

#: virtual time 0 in the scripts' milliseconds (anything well above 0 and below 2^41)
BASE_MS = 1_000_000
#: every lease and waiter lives a day between renewals (the longest TTL the scripts accept)
TTL_S = 86_400.0
#: leases are renewed when their last renewal is this old
RENEW_S = 6 * 3600.0


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """The URL of a private Redis for one simulation, stopped (and its directory removed) on exit."""
    with tempfile.TemporaryDirectory(prefix="gpuboss-simulate-") as tmp:
        binary = find_redis_server()
        if binary is None:
            fake = start_fakeredis()
            try:
                yield fake.url
            finally:
                fake.stop()
            return
        child = start_redis_server(Path(tmp), binary=binary)
        try:
            yield child.url
        finally:
            child.stop()


def connect(url: str) -> Boss:
    """A client of the private Redis at ``url``, with persistence turned off (nothing to keep)."""
    boss = Boss.from_url(url, holder="simulate")
    with contextlib.suppress(Exception):  # fakeredis has no CONFIG SET; nothing persists there anyway
        command(boss, "CONFIG", "SET", "appendonly", "no")
    return boss


def command(boss: Boss, *args: str | int | float) -> Any:
    """One plain Redis command on ``boss``'s connection (redis-py's call is untyped)."""
    return boss.redis.execute_command(*args)  # type: ignore[no-untyped-call]


@dataclass(slots=True)
class _Parked:
    op: Op[Any]
    wake_key: str
    seq: int


class ScriptPool:
    """The :class:`~.policy.Allocator` that asks gpuboss's Lua scripts, in pool ``pool``."""

    def __init__(self, boss: Boss, pool: str, trace: Trace, name: str = "gpuboss") -> None:
        self.name = name
        self.boss = boss
        self.pool = pool
        self.keys = PoolKeys(pool)
        self.poll_s = trace.settings.poll_s
        #: how many events of each kind the scripts wrote (a check that nothing expired by accident)
        self.events: Counter[str] = Counter()
        self._now = 0.0
        self._clock_ms: int | None = None
        self._tokens: dict[str, int] = {}
        self._renewed: dict[str, float] = {}
        self._parked: dict[str, _Parked] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._seq = 0
        self._out: list[Notice] = []
        self._cursor = "0-0"
        self._set_clock(0.0)
        for device in trace.devices:
            boss.add_device(device.name, device.mib, pool=pool, host=device.host)
        boss.configure_pool(pool, min_residency=trace.settings.min_residency_s, aging=trace.settings.aging_s)
        self._read_events()

    # -- the protocol

    def acquire(self, ask: Ask, now: float) -> None:
        """Run the client's acquire until it is granted, refused or parked on its wake list."""
        self._set_clock(now)
        req = ops.AcquireRequest.build(
            ask.mib,
            priority=ask.priority,
            pool=self.pool,
            ttl=TTL_S,
            timeout=None,
            request_id=ask.lease,
            preemptible=ask.preemptible,
            grace=ask.grace_s,
            labels={"service": ask.holder},
        )
        holder = ops.Holder(ask.holder, "simulate", 0, "gpuboss:notify:simulate")
        self._advance(ask.lease, ops.acquire(req, holder, self._clock, max_block=self.poll_s), None)
        self._read_events()

    def release(self, lease: str, now: float) -> None:
        """The release script, with the lease's token."""
        self._set_clock(now)
        with contextlib.suppress(LeaseLost):  # it ended otherwise meanwhile (not expected)
            self.boss.run(ops.release_ref(self._forget(lease)))
        self._read_events()

    def revoke(self, lease: str, now: float) -> None:
        """An operator's force-release: what the scripts' revocation at the deadline does."""
        self._set_clock(now)
        self._forget(lease)
        self.boss.force_release(lease, self.pool)
        self._read_events()

    def loaded(self, lease: str, now: float) -> None:
        """Nothing to tell the scripts: a lease is evictable while it loads (the pool's minimum
        residency protects young leases)."""

    def idle(self, lease: str, now: float) -> None:
        """The idle script: kept warm, evictable."""
        self._set_clock(now)
        self.boss.run(ops.mark_ref(self._ref(lease), "idle"))
        self._read_events()

    def busy(self, lease: str, now: float) -> bool:
        """The busy script; False when the lease is being evicted."""
        self._set_clock(now)
        beat = self.boss.run(ops.mark_ref(self._ref(lease), "busy"))
        self._read_events()
        return beat.state != "evicting"

    def due(self) -> float | None:
        """The next parked waiter's poll, or the next renewal."""
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        due = self._timers[0][0] if self._timers else None
        if self._renewed:
            renew = min(self._renewed.values()) + RENEW_S
            due = renew if due is None else min(due, renew)
        return due

    def tick(self, now: float) -> None:
        """Resume the waiters whose poll is due (their acquire asks again), and renew old leases."""
        self._set_clock(now)
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if not self._stale(entry):
                self._resume(entry[2])
                self._read_events()
        for lease, renewed in sorted(self._renewed.items()):
            if renewed + RENEW_S <= now:
                self.boss.run(ops.heartbeat_ref(self._ref(lease), int(TTL_S * 1000)))
                self._renewed[lease] = now
        self._read_events()

    def notices(self) -> list[Notice]:
        """The notices since the last call."""
        out, self._out = self._out, []
        return out

    # -- driving the operations

    def _clock(self) -> float:
        return self._now

    def _set_clock(self, now: float) -> None:
        self._now = now
        ms = BASE_MS + round(now * 1000)
        if ms != self._clock_ms:
            command(self.boss, "HSET", self.keys.config, "clock_ms", ms)
            self._clock_ms = ms

    def _ref(self, lease: str) -> ops.LeaseRef:
        return ops.LeaseRef(self.pool, lease, self._tokens[lease])

    def _forget(self, lease: str) -> ops.LeaseRef:
        ref = self._ref(lease)
        del self._tokens[lease], self._renewed[lease]
        return ref

    def _stale(self, entry: tuple[float, int, str]) -> bool:
        parked = self._parked.get(entry[2])
        return parked is None or parked.seq != entry[1]

    def _execute(self, step: Call | Command) -> Any:
        if isinstance(step, Call):
            return self.boss.script(step.script, step.keys, step.args)
        return command(self.boss, *step.args)

    def _advance(self, lease: str, op: Op[Any], reply: Any) -> None:
        """Run ``op`` from ``reply`` on until it ends or blocks on its wake list (then park it)."""
        try:
            step = op.send(reply)
            while isinstance(step, Call) or step.args[0] != "BLPOP":
                step = op.send(self._execute(step))
        except StopIteration as done:
            granted = done.value
            self._tokens[lease], self._renewed[lease] = granted.token, self._now
            self._out.append(Notice("granted", lease, granted.device))
            return
        except InsufficientVram:
            self._out.append(Notice("never", lease))
            return
        self._seq += 1
        self._parked[lease] = _Parked(op, str(step.args[1]), self._seq)
        heapq.heappush(self._timers, (self._now + float(step.args[2]), self._seq, lease))

    def _resume(self, lease: str) -> None:
        """Answer a parked waiter's blocking pop with what its wake list holds now (or nothing)."""
        parked = self._parked.pop(lease)
        popped = command(self.boss, "LPOP", parked.wake_key)
        self._advance(lease, parked.op, None if popped is None else [parked.wake_key, popped])

    def _read_events(self) -> None:
        """Read the pool's new events: wake the waiters granted, pass evictions on."""
        more = True
        while more:
            batch = self.boss.run(ops.read_events({self.pool: self._cursor}, ops.MAX_EVENTS, None))
            # Read again only if there may be more: a full batch, or a waiter resumed (it polls).
            more = len(batch) == ops.MAX_EVENTS
            for event in batch:
                self._cursor = event.id
                self.events[event.name] += 1
                lease = event.fields.get("lease", "")
                if event.name == "granted" and lease in self._parked:
                    self._resume(lease)
                    more = True
                elif event.name == "evicting":
                    self._out.append(Notice("evict", lease))
