"""The consumer manager: the boss holds each managed consumer's lease and drives it through its states.

Every consumer (for a multi-model engine like Ollama: every model of it, a *unit*) has one lease,
held by a client of its own whose holder is the consumer's name on the boss's host, and a state:

``unloaded`` → ``loading`` (queued for its lease, then the load action and the health check) →
``idle`` (resident, not in use: evictable by anyone who needs the room, least recently used
first, and given back by itself after ``keep_warm`` seconds) or ``ready`` (resident and in use:
never evicted, except when preemptible by a higher priority) → ``unloading`` → ``unloaded``.
``unhealthy``: loaded but failing its health check. ``stuck``: it did not free its memory in time:
its lease is gone, and the agent counts its memory as unmanaged, so nothing is loaded on top.

**Measured release.** Giving memory back runs the engine's own release (sleep, ``keep_alive: 0``,
``/free``, an unload call, stopping the process), then waits until the agent *measures* the
consumer's processes down to its ``residual`` plus what its other loaded models hold, bounded by
the grace (an eviction's deadline). Only then does the lease end. Memory the consumer keeps is
first handed to the agent as unmanaged (one measured pass), so the budget never counts it twice
free. Without an agent in the boss, or for a consumer whose processes are not on this host, the
engine's word is taken.

**At start** a consumer's lease left by a boss that restarted within its TTL is adopted: no
reload, no double count. Otherwise what is resident is measured where the agent can, read from
``/api/ps`` for Ollama, and else decided by the registry's rule (see
:attr:`~gpuboss.consumers.registry.Consumer.resident_at_start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gpuboss.agent import Agent, Owner, PassReport
from gpuboss_client import (
    AsyncBoss,
    BackendUnavailable,
    BadRequest,
    ConsumerNotFound,
    ConsumerUnhealthy,
    ConsumerUnreachable,
    GpubossError,
    Lease,
    NotFound,
    WaitState,
    ops,
)

from .actions import Actions
from .pids import consumer_pids, locatable
from .registry import Consumer, Registry, load_registry

__all__ = ["CONSUMER_TTL", "STATES", "ConsumerManager", "Timings", "Unit"]

log = logging.getLogger("gpuboss.consumers")

STATES = ("unloaded", "loading", "ready", "idle", "unloading", "stuck", "unhealthy")
#: seconds a consumer's lease outlives a boss that stopped renewing it (a restart within it adopts)
CONSUMER_TTL = 15.0
#: seconds between the manager's looks at keep-warm times, lost leases, health and processes
TICK_S = 0.2
#: seconds between looks for a consumer's processes (pids) while it is loaded
PIDS_EVERY_S = 10.0
#: how much earlier than the eviction fence a consumer that has not freed its memory gives up
STUCK_MARGIN_S = 0.5
LIVE = ("active", "idle", "evicting")
#: upper bounds of the load and unload time histograms, seconds
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclasses.dataclass
class Timings:
    """A histogram of durations (seconds), as Prometheus buckets it."""

    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1


class Unit:
    """One lease's worth of a consumer: the consumer, or one model of a multi-model one."""

    def __init__(self, runtime: Runtime, model: str) -> None:
        self.runtime = runtime
        self.model = model
        self.state = "unloaded"
        self.since = time.monotonic()
        self.lease: Lease | None = None
        self.error: str | None = None
        self.wait: WaitState | None = None
        self.users = 0
        self.idle_since = time.monotonic()
        self.detached = False  # its memory is handed to the agent as unmanaged, ahead of the release
        self.lock = asyncio.Lock()
        self._changed = asyncio.Event()
        limit = runtime.consumer.max_concurrent
        #: the proxy's concurrent requests to it (None: no limit)
        self.slots = asyncio.Semaphore(limit) if limit is not None else None
        self.loading: asyncio.Task[None] | None = None
        self.waiting = 0  # ensures waiting for that load
        self.marked: tuple[str, bool] | None = None  # (lease id, in use) as last marked in Redis
        self.health_at = 0.0
        self.loads = self.unloads = self.evictions = 0

    @property
    def consumer(self) -> Consumer:
        return self.runtime.consumer

    @property
    def key(self) -> str:
        return f"{self.consumer.name}/{self.model}" if self.model else self.consumer.name

    @property
    def mib(self) -> int:
        return self.consumer.sizes[self.model]

    @property
    def resident(self) -> bool:
        return self.state in ("ready", "idle", "unhealthy") and self.lease is not None

    def set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            log.info("consumer %s: %s -> %s%s", self.key, self.state, state, f" ({error})" if error else "")
            self.state, self.since = state, time.monotonic()
        self.error = error
        self.touched()

    def touched(self) -> None:
        """Wake whoever follows the unit's progress (:meth:`changed`)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Return at the unit's next change of state or of its wait."""
        await self._changed.wait()

    def _waiting(self) -> dict[str, Any] | None:
        w = self.wait
        if w is None or self.state != "loading":
            return None
        eta = None if w.until is None else round(max(0.0, w.until - time.monotonic()), 3)
        return {"position": w.position, "reason": w.reason, "eta_s": eta}

    def to_dict(self) -> dict[str, Any]:
        """The unit as ``/v1/consumers`` shows it."""
        c, lease = self.consumer, self.lease
        return {
            "name": c.name,
            "model": self.model or None,
            "kinds": list(c.kinds),
            "state": self.state,
            "since_s": round(time.monotonic() - self.since, 3),
            "url": c.url,
            "pool": c.pool,
            "device": lease.device if lease is not None else c.device,
            "vram_mib": self.mib,
            "measured_mib": self.runtime.measured_mib,
            "priority": c.priority,
            "preemptible": c.preemptible,
            "keep_warm": c.keep_warm,
            "lease": lease.id if lease is not None else None,
            "users": self.users,
            "loads": self.loads,
            "unloads": self.unloads,
            "evictions": self.evictions,
            "waiting": self._waiting(),
            "error": self.error,
        }


class Runtime:
    """A consumer as the boss runs it: its actions, its lease client, its processes, its units."""

    def __init__(self, consumer: Consumer, redis_url: str, redis_kwargs: Mapping[str, Any]) -> None:
        self.consumer = consumer
        self.actions = Actions(consumer)
        self.boss = AsyncBoss.from_url(redis_url, holder=consumer.name, **redis_kwargs)
        self.units = {model: Unit(self, model) for model in consumer.sizes}
        self.pids: set[int] = set()
        self.pids_at = 0.0
        #: MiB the agent measured its processes use, as of its last pass; None: not measured
        self.measured_mib: int | None = None
        #: a changed definition from a reload, applied once nothing of it is loaded
        self.pending: Consumer | None = None

    @property
    def can_unload(self) -> bool:
        c = self.consumer
        return not c.self_managed and any(x is not None for x in (c.unload, c.command, c.docker, c.systemd))

    async def aclose(self, release: bool) -> None:
        await self.boss.aclose(release=release)
        await self.actions.aclose()


class ConsumerManager:
    """Holds the leases of the consumers of a :class:`Registry` and loads, unloads and measures them.

    ``agent`` is the agent running in this process (None: no measurement, the engines' word is
    taken). ``path`` is the registry file that :meth:`reload` reads again.
    """

    def __init__(
        self,
        registry: Registry,
        redis_url: str,
        *,
        agent: Agent | None = None,
        path: Path | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.registry = registry
        self.path = path
        self.agent = agent
        self._url, self._redis_kwargs = redis_url, redis_kwargs
        self._runtimes: dict[str, Runtime] = {}
        self._owners: dict[int, Owner] = {}
        self._last_pass: PassReport | None = None
        self._passed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self.load_seconds = Timings()
        self.unload_seconds = Timings()

    # --- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take over or decide each consumer's residency, then keep watching them."""
        self._loop = asyncio.get_running_loop()
        if self.agent is not None:
            self.agent.owners = lambda: self._owners
            self.agent.listeners.append(self._on_pass)
        for consumer in self.registry.consumers:
            self._runtimes[consumer.name] = self._runtime(consumer)
        await asyncio.gather(*(self._start(rt) for rt in self._runtimes.values()))
        self._tick = asyncio.create_task(self._watch(), name="gpuboss-consumers")

    async def aclose(self) -> None:
        """Stop watching. Processes gpuboss started are stopped and their leases released; the
        leases of other resident consumers are left to a restarted boss to adopt (or to expire)."""
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        started = [u for rt in self._runtimes.values() if rt.consumer.command for u in rt.units.values()]
        await asyncio.gather(*(self._release(u, "shutdown") for u in started), return_exceptions=True)
        for rt in self._runtimes.values():
            await rt.aclose(release=False)
        if self.agent is not None:
            self.agent.owners = None
            with contextlib.suppress(ValueError):
                self.agent.listeners.remove(self._on_pass)

    def _runtime(self, consumer: Consumer) -> Runtime:
        return Runtime(consumer, self._url, self._redis_kwargs)

    async def _start(self, rt: Runtime) -> None:
        c = rt.consumer
        try:
            mine = [
                x
                for x in await rt.boss.leases(c.pool)
                if x.holder == c.name and x.holder_host == rt.boss.holder.host and x.state in LIVE
            ]
        except GpubossError as exc:
            log.warning("consumer %s: cannot read its leases: %s", c.name, exc.message)
            mine = []
        for info in mine:
            unit = rt.units.get(info.labels.get("model", ""))
            if unit is None or unit.lease is not None:
                continue
            try:
                unit.lease = await rt.boss.adopt(info, on_evict=self._on_evict(unit), grace=c.grace)
            except GpubossError as exc:
                log.warning("consumer %s: cannot take over lease %s: %s", unit.key, info.id, exc.message)
                continue
            unit.marked = (info.id, info.state == "active")
            log.info("consumer %s: took over its lease %s (no reload)", unit.key, info.id)
            await self._settle(unit)
        await self._find_pids(rt)
        todo = [u for u in rt.units.values() if u.lease is None]
        if not todo:
            return
        loaded = await rt.actions.loaded_models()
        measured = await self._measure(rt)
        for unit in todo:
            if loaded is not None:
                resident = any(name in (unit.model, f"{unit.model}:latest") for name in loaded)
            elif measured is not None:
                resident = measured > c.residual
            elif locatable(c) and not rt.pids:  # it would be found on this host: it does not run
                resident = False
            else:
                resident = c.resident_at_start
            if resident:
                await self._adopt_resident(unit)

    async def _adopt_resident(self, unit: Unit) -> None:
        """Lease a consumer found resident at start, at once or not at all. Where the agent
        measured it, its memory moves from unmanaged to its lease (``take_over``)."""
        where = self._last_pass.where.get(unit.consumer.name) if self._last_pass is not None else None
        try:
            await self._acquire(unit, timeout=0, take_over=where)
        except GpubossError as exc:
            unit.set_state(
                "stuck",
                f"resident at start, but it cannot be leased ({exc.message}): its memory is unmanaged",
            )
            await self._note(unit, "consumer_stuck", why=unit.error or "")
            return
        await self._settle(unit)
        await self._measure(unit.runtime)  # its memory moves from unmanaged to its lease at once
        await self._note(unit, "consumer_resident")

    # --- what callers do --------------------------------------------------------------------

    def units(self) -> list[Unit]:
        """Every unit, in registry order."""
        return [u for rt in self._runtimes.values() for u in rt.units.values()]

    def units_of(self, name: str) -> list[Unit]:
        """The units of consumer ``name``; raises :class:`ConsumerNotFound`."""
        return list(self._runtime_of(name).units.values())

    def unit(self, name: str, model: str | None = None) -> Unit:
        """The unit of consumer ``name`` (and ``model``, for a multi-model consumer with more than one)."""
        rt = self._runtimes.get(name)
        if rt is None:
            raise ConsumerNotFound(f"no consumer {name!r}", consumer=name)
        if model is None:
            if len(rt.units) != 1:
                raise BadRequest(f"consumer {name} serves several models: say which ({', '.join(rt.units)})")
            return next(iter(rt.units.values()))
        unit = rt.units.get(model)
        if unit is None:
            raise ConsumerNotFound(f"consumer {name} has no model {model!r}", consumer=name)
        return unit

    async def ensure(self, name: str, model: str | None = None, timeout: float | None = 60.0) -> Unit:
        """Make the consumer resident and healthy: lease its memory (queueing or evicting as any
        request would), run its load action and wait for its health check. Concurrent ensures
        of one consumer share one load. Raises the acquire's errors (``AcquireTimeout``, ...) or
        :class:`BackendUnavailable` if it does not load or never turns healthy."""
        unit = self.unit(name, model)
        if self._usable(unit):
            return unit
        task = unit.loading
        if task is None or task.done():
            task = unit.loading = asyncio.create_task(self._load(unit, timeout), name=f"load-{unit.key}")
        # Once loaded it is returned even if someone who needed the room asked for it back
        # meanwhile: looping to load it again would have two ensures evict each other for ever.
        unit.waiting += 1
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if unit.waiting == 1 and not task.done() and unit.state == "loading" and unit.lease is None:
                task.cancel()  # nobody waits for it any more: its lease request leaves the queue
            raise
        finally:
            unit.waiting -= 1
        return unit

    @contextlib.asynccontextmanager
    async def using(
        self, name: str, model: str | None = None, timeout: float | None = 60.0
    ) -> AsyncIterator[Unit]:
        """Ensure the consumer and keep it ``ready`` (in use: never evicted unless preemptible) until
        the block ends; then it is ``idle`` again once its last user is done."""
        unit = await self.begin_use(name, model, timeout)
        try:
            yield unit
        finally:
            await self.end_use(unit)

    async def begin_use(self, name: str, model: str | None = None, timeout: float | None = 60.0) -> Unit:
        """Ensure the consumer, wait for a free slot (``max_concurrent``) and mark it in use
        (``ready``); pair with :meth:`end_use`. A user that comes while it is resident takes no
        lease round trip but the ``busy`` mark of the first user."""
        unit = self.unit(name, model)
        if unit.slots is not None:
            await unit.slots.acquire()
        try:
            await self.ensure(name, model, timeout)
            unit.users += 1
        except BaseException:
            if unit.slots is not None:
                unit.slots.release()
            raise
        if unit.users == 1:
            await self._settle(unit)
        return unit

    async def end_use(self, unit: Unit) -> None:
        """One user of ``unit`` is done; the last one leaves it ``idle`` (its keep-warm time starts)."""
        unit.users -= 1
        if unit.slots is not None:
            unit.slots.release()
        unit.idle_since = time.monotonic()
        if unit.lease is not None and unit.users == 0:
            await self._settle(unit)

    async def release(self, name: str, model: str | None = None) -> list[Unit]:
        """Give the consumer's memory back (every model of it, or ``model``'s): unload it the
        engine's way and end its lease once the memory is measured free."""
        units = [self.unit(name, model)] if model is not None else list(self._runtime_of(name).units.values())
        if not self._runtime_of(name).can_unload:
            raise BadRequest(f"consumer {name} cannot be unloaded: gpuboss has no way to (self-managed)")
        await asyncio.gather(*(self._release(u, "released") for u in units))
        return units

    async def release_all(self) -> list[Unit]:
        """Give back the memory of every consumer that can be unloaded; returns the units released."""
        units = [u for rt in self._runtimes.values() if rt.can_unload for u in rt.units.values() if u.lease]
        await asyncio.gather(*(self._release(u, "released") for u in units))
        return units

    async def reload(self, path: Path | None = None) -> list[str]:
        """Read the registry file again and apply it without dropping a lease: new consumers start,
        removed ones are given back, changed ones take their new definition once unloaded. A file
        with errors raises :class:`BadRequest` and changes nothing. Returns what changed."""
        path = path or self.path
        if path is None:
            raise NotFound("this boss was started without a consumer registry (--consumers FILE)")
        registry = load_registry(path)
        async with self._reload_lock:
            changes: list[str] = []
            new = {c.name: c for c in registry.consumers}
            for name in [n for n in self._runtimes if n not in new]:
                rt = self._runtimes[name]
                await asyncio.gather(*(self._release(u, "removed") for u in rt.units.values()))
                del self._runtimes[name]
                await rt.aclose(release=True)
                changes.append(f"removed {name}")
            for consumer in registry.consumers:
                known = self._runtimes.get(consumer.name)
                if known is None:
                    fresh = self._runtimes[consumer.name] = self._runtime(consumer)
                    await self._start(fresh)
                    changes.append(f"added {consumer.name}")
                elif known.consumer != consumer:
                    known.pending = consumer
                    changes.append(f"changed {consumer.name}")
            self._runtimes = {c.name: self._runtimes[c.name] for c in registry.consumers}
            self.registry, self.path = registry, path
            await self._apply_pending()
            self._publish_owners()
            return changes

    # --- loading ----------------------------------------------------------------------------

    def _runtime_of(self, name: str) -> Runtime:
        rt = self._runtimes.get(name)
        if rt is None:
            raise ConsumerNotFound(f"no consumer {name!r}", consumer=name)
        return rt

    @staticmethod
    def _usable(unit: Unit) -> bool:
        lease = unit.lease
        return unit.state in ("ready", "idle") and lease is not None and not lease.lost and not lease.evicting

    async def _acquire(self, unit: Unit, timeout: float | None, take_over: str | None = None) -> None:
        """Lease the unit's memory; ``take_over`` names the device where its processes already use
        it (measured, counted as unmanaged)."""
        c = unit.consumer

        def waiting(state: WaitState) -> None:
            unit.wait = state
            unit.touched()

        unit.lease = await unit.runtime.boss.acquire(
            unit.mib, device=take_over or c.device, pool=c.pool, priority=c.priority,
            preemptible=c.preemptible, grace=c.grace, ttl=CONSUMER_TTL, timeout=timeout,
            on_evict=self._on_evict(unit), on_wait=waiting, labels=self._labels(unit),
            take_over=take_over is not None,
        )  # fmt: skip
        unit.wait = None
        unit.detached = False
        unit.marked = (unit.lease.id, True)  # granted active
        self._publish_owners()

    @staticmethod
    def _labels(unit: Unit) -> dict[str, str]:
        return {"consumer": unit.consumer.name} | ({"model": unit.model} if unit.model else {})

    async def _load(self, unit: Unit, timeout: float | None) -> None:
        async with unit.lock:
            if self._usable(unit):
                return
            rt, c = unit.runtime, unit.consumer
            previous = unit.state
            unit.set_state("loading")
            if unit.lease is None or unit.lease.lost:
                try:
                    await self._acquire(unit, timeout)
                except BaseException:
                    unit.wait = None
                    unit.set_state(previous if previous != "loading" else "unloaded", unit.error)
                    raise
            assert unit.lease is not None
            started = time.monotonic()
            try:
                await rt.actions.load(unit.model or None, env=unit.lease.env)
                await self._until_healthy(unit)
            except GpubossError as exc:
                sick = bool(exc.details.get("unhealthy"))
                await self._give_back(
                    unit, time.monotonic() + c.grace, "load_failed", after="unhealthy" if sick else "unloaded"
                )
                unit.error = exc.message
                await self._note(unit, "consumer_load_failed", why=exc.message)
                error = ConsumerUnhealthy if sick else ConsumerUnreachable
                raise error(f"consumer {unit.key} did not load: {exc.message}", consumer=c.name) from None
            unit.loads += 1
            self.load_seconds.observe(time.monotonic() - started)
            await self._find_pids(rt, force=True)
            await self._settle(unit)
            await self._note(unit, "consumer_loaded", seconds=f"{time.monotonic() - started:.3f}")

    async def _until_healthy(self, unit: Unit) -> None:
        health = unit.consumer.health
        if health is None:
            return
        give_up = time.monotonic() + health.start
        pause = 0.05
        while not await unit.runtime.actions.healthy():
            if time.monotonic() + pause > give_up:
                what = f"GET {unit.consumer.url}{health.path}"
                raise BackendUnavailable(
                    f"{what} did not answer {health.status} within {health.start:g} s", unhealthy=True
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        unit.health_at = time.monotonic()

    async def _settle(self, unit: Unit) -> None:
        """Mark the lease as it is used: in use (``ready``) while it has users or cannot be
        unloaded at all, else kept warm (``idle``)."""
        lease = unit.lease
        if lease is None:
            return
        in_use = unit.users > 0 or not unit.runtime.can_unload
        mark = (lease.id, in_use)
        try:
            if unit.marked != mark:  # a lease already marked so costs no round trip
                await (lease.busy() if in_use else lease.idle())
                unit.marked = mark
            if not in_use:
                unit.idle_since = time.monotonic()
        except GpubossError as exc:  # being evicted, or lost: the eviction or the watcher takes over
            log.info(
                "consumer %s: cannot mark it %s: %s", unit.key, "busy" if in_use else "idle", exc.message
            )
            return
        if unit.state not in ("unhealthy",):
            unit.set_state("ready" if in_use else "idle")

    # --- giving memory back -----------------------------------------------------------------

    def _on_evict(self, unit: Unit) -> Callable[[Lease], Awaitable[None]]:
        async def evicted(lease: Lease) -> None:
            async with unit.lock:
                if unit.lease is not lease:
                    return
                unit.evictions += 1
                fence = lease.evict_deadline or (time.monotonic() + unit.consumer.grace)
                await self._note(unit, "consumer_evicting")
                # The client releases the lease once this returns.
                await self._give_back(unit, fence - STUCK_MARGIN_S, "evicted", release=False)

        return evicted

    async def _release(self, unit: Unit, why: str) -> None:
        async with unit.lock:
            if unit.lease is None:
                return
            await self._give_back(unit, time.monotonic() + unit.consumer.grace, why)

    async def _give_back(
        self, unit: Unit, deadline: float, why: str, *, release: bool = True, after: str | None = None
    ) -> None:
        """Unload, wait until measured free (by ``deadline``), hand what it keeps to the agent as
        unmanaged, and end the lease (unless the caller's client does: ``release=False``). The
        unit ends ``unloaded`` (or ``after``), or ``stuck``. Called with the unit's lock held."""
        rt, lease = unit.runtime, unit.lease
        unit.set_state("unloading")
        started = time.monotonic()
        failure: str | None = None
        try:
            await asyncio.wait_for(rt.actions.unload(unit.model or None), max(0.05, deadline - started))
        except TimeoutError:
            failure = f"the unload did not finish within {deadline - started:.1f} s"
        except GpubossError as exc:
            failure = exc.message
        freed = await self._wait_free(unit, deadline)
        if freed is None:
            await self._find_pids(rt, force=True)
            # Not measured: nothing runs where it would be found, or else the engine's word.
            freed = (locatable(rt.consumer) and not rt.pids) or failure is None
        if rt.measured_mib is not None and (not freed or rt.measured_mib > 0):
            unit.detached = True  # what it still holds becomes unmanaged before the lease ends
            self._publish_owners()
            await self._measure(rt)
        if release and lease is not None:
            try:
                await rt.boss.release(lease)
            except GpubossError as exc:
                log.warning("consumer %s: releasing lease %s: %s", unit.key, lease.id, exc.message)
        unit.lease = None
        unit.unloads += 1
        self.unload_seconds.observe(time.monotonic() - started)
        if freed:
            unit.set_state(after or "unloaded", failure)
            await self._note(unit, "consumer_unloaded", why=why, seconds=f"{time.monotonic() - started:.3f}")
        else:
            measured = rt.measured_mib
            unit.set_state(
                "stuck",
                failure or f"still uses {measured} MiB: counted as unmanaged until it frees it",
            )
            await self._note(unit, "consumer_stuck", why=unit.error or "", measured_mib=str(measured))
        self._publish_owners()
        await self._apply_pending()

    async def _wait_free(self, unit: Unit, deadline: float) -> bool | None:
        """Whether the agent measured the unit's memory free by ``deadline`` (None: not measured)."""
        rt = unit.runtime
        if self.agent is None or not rt.pids:
            return None
        while True:
            measured = await self._measure(rt)
            if measured is None:
                return None
            if measured <= self._allowance(unit):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _allowance(unit: Unit) -> int:
        """MiB the consumer may still use once ``unit`` is unloaded: its residual and its other
        loaded models."""
        rt = unit.runtime
        return rt.consumer.residual + sum(u.mib for u in rt.units.values() if u is not unit and u.lease)

    # --- measuring --------------------------------------------------------------------------

    def _on_pass(self, report: PassReport) -> None:
        """From the agent's thread: hand the report to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._passed_now, report)

    def _passed_now(self, report: PassReport) -> None:
        self._last_pass = report
        for rt in self._runtimes.values():
            rt.measured_mib = report.owned.get(rt.consumer.name) if rt.pids else None
        self._passed.set()
        self._passed = asyncio.Event()

    async def _measure(self, rt: Runtime) -> int | None:
        """The MiB of ``rt``'s processes from an agent pass that began after now (None: not measured)."""
        if self.agent is None or not rt.pids:
            return None
        asked = time.monotonic()
        while self._last_pass is None or self._last_pass.started < asked:
            passed = self._passed
            self.agent.kick()
            try:
                await asyncio.wait_for(passed.wait(), self.agent.interval_s + 5.0)
            except TimeoutError:
                log.warning("consumer %s: no agent pass came: not measured", rt.consumer.name)
                return None
        return rt.measured_mib

    async def _find_pids(self, rt: Runtime, force: bool = False) -> None:
        if not force and rt.pids and time.monotonic() - rt.pids_at < PIDS_EVERY_S:
            return
        pids = await asyncio.to_thread(consumer_pids, rt.consumer, rt.actions.child_pid)
        rt.pids_at = time.monotonic()
        if pids != rt.pids:
            rt.pids = pids
            self._publish_owners()

    def _publish_owners(self) -> None:
        """What the agent reads on its next pass (replaced whole: it reads it from its thread)."""
        owners: dict[int, Owner] = {}
        for rt in self._runtimes.values():
            leases = tuple(u.lease.id for u in rt.units.values() if u.lease is not None and not u.detached)
            for pid in rt.pids:
                owners[pid] = Owner(rt.consumer.name, leases)
        self._owners = owners

    # --- watching ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._look()
            except Exception:  # a surprise must not end the watching
                log.exception("consumers: watching failed")

    async def _look(self) -> None:
        now = time.monotonic()
        for rt in list(self._runtimes.values()):
            if any(u.lease for u in rt.units.values()):
                await self._find_pids(rt)
            for unit in rt.units.values():
                if unit.lock.locked():
                    continue
                lease = unit.lease
                if lease is not None and lease.lost and not lease.evicting:
                    self._spawn(self._release(unit, f"lease lost: {lease.lost_reason}"))
                elif (
                    unit.state == "idle"
                    and rt.can_unload
                    and 0 <= rt.consumer.keep_warm <= now - unit.idle_since
                ):
                    self._spawn(self._release(unit, "keep_warm"))
                elif (
                    unit.resident
                    and rt.consumer.health
                    and now - unit.health_at >= rt.consumer.health.interval
                ):
                    unit.health_at = now
                    self._spawn(self._check_health(unit))
                elif (
                    unit.state == "stuck"
                    and rt.measured_mib is not None
                    and rt.measured_mib <= self._allowance(unit)
                ):
                    unit.set_state("unloaded", "its memory was measured free")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_health(self, unit: Unit) -> None:
        healthy = await unit.runtime.actions.healthy()
        if not healthy and unit.state != "unhealthy":
            unit.set_state("unhealthy", "its health check fails")
            await self._note(unit, "consumer_unhealthy")
        elif healthy and unit.state == "unhealthy":
            unit.error = None
            unit.state = "loading"  # so _settle sets ready or idle again
            await self._settle(unit)

    async def _apply_pending(self) -> None:
        for rt in self._runtimes.values():
            if rt.pending is not None and not any(u.lease or u.lock.locked() for u in rt.units.values()):
                pending, rt.pending = rt.pending, None
                log.info("consumer %s: its new definition applies", pending.name)
                fresh = self._runtime(pending)
                await rt.aclose(release=False)
                self._runtimes[pending.name] = fresh

    async def _note(self, unit: Unit, event: str, **fields: str) -> None:
        """Log ``event`` to the pool's event stream (best effort)."""
        doc = self._labels(unit) | {"mib": str(unit.mib), "state": unit.state}
        try:
            await unit.runtime.boss.run(ops.note(unit.consumer.pool, event, doc | fields))
        except GpubossError as exc:
            log.warning("consumer %s: cannot log %s: %s", unit.key, event, exc.message)
