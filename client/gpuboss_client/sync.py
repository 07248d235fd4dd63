"""The blocking client: :class:`Boss`.

Written by ``client/unasync.py`` from ``aio.py``, the source of both clients: edit that file,
then run ``python client/unasync.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

import redis

from . import _backend_sync as backend
from . import _core as core
from ._connect import Replicas, replicas_of, unconfirmed
from ._core import (
    AcquireOptions,
    Call,
    Clock,
    Command,
    DeviceInfo,
    Event,
    Holder,
    Lease,
    LeaseInfo,
    Op,
    Plan,
    PoolStatus,
)
from ._failures import backend_error
from .errors import BackendUnavailable, BadRequest, GpubossError, LeaseLost, LeaseNotHeld
from .scripts import LIBRARY, NAMES, function_name, library, script_shas, source
from .urls import CONFIRM_ALL, Confirm, Deployment, parse_url, redact

__all__ = ["Boss", "LeaseContext"]

log = logging.getLogger("gpuboss_client")
T = TypeVar("T")


def _lacks_verb(exc: redis.ResponseError) -> bool:
    """Whether Redis refused a verb for want of its function or script (lost in a restart, flushed,
    or not loaded yet)."""
    return isinstance(exc, redis.exceptions.NoScriptError) or "Function not found" in str(exc)


def _refuses_functions(exc: redis.ResponseError) -> bool:
    """Whether Redis refused ``FCALL`` itself: a server without functions, or a user who may not
    call them."""
    return "'fcall'" in str(exc)


#: how often a client with ``confirm_replicas=all`` counts the replicas again (seconds)
RECOUNT_REPLICAS_S = 60.0

#: clients with leases to give back when the interpreter exits
_clients: weakref.WeakSet[Boss] = weakref.WeakSet()


class Boss:
    """Leases VRAM through Redis, from any process.

    ``holder`` names the service; host and pid are filled in. Every state change runs as one
    atomic Lua script in Redis; this client only sends them and waits. Leases it acquires renew
    themselves in one background worker until released; :meth:`close` (and the interpreter's
    exit) releases whatever it still holds.

    The scripts run as one Redis function library (loaded on first use) where the server has
    functions and this user may load or call them, else as ``EVALSHA`` scripts; ``functions=False``
    always runs scripts. Clients of a Redis Cluster run scripts (see :mod:`gpuboss_client.scripts`).
    """

    def __init__(
        self,
        client: backend.Redis,
        *,
        holder: str,
        host: str | None = None,
        pid: int | None = None,
        clock: Clock = time.monotonic,
        confirm: Confirm | None = None,
        deployment: Deployment | None = None,
        functions: bool = True,
    ) -> None:
        self.redis = client
        self.confirm = confirm if confirm is not None else Confirm()
        self._deployment = deployment
        self._by_slot = backend.is_cluster(client)  # one command reads one slot
        self.holder = Holder.of(holder, host, pid)
        self._clock = clock
        # verbs run as functions but on a cluster, whose clients route EVALSHA by its keys without
        # asking the server (FCALL would cost them a COMMAND GETKEYS round trip per call)
        self._functions = functions and not self._by_slot
        self._shas = script_shas()
        self._replicas = Replicas(0, 0)  # for confirm_replicas=all: the last count, taken when
        self._replicas_counted_at: float | None = None
        self._held = core.Held(clock)
        self._max_block = core.max_block_of(client)
        self._listener: backend.Worker | None = None
        self._keeper: backend.Worker | None = None
        self._wake: backend.Signal | None = None
        self._keeper_due: float | None = None  # when the heartbeat worker wakes next by itself
        self._lock = threading.Lock()  # starting workers; never held across I/O
        self._closed = False
        _clients.add(self)

    @property
    def max_block(self) -> float | None:
        """The longest one blocking Redis command of this client waits (half the connection's read
        timeout; None: no read timeout). Give it to :func:`ops.acquire` when driving it by hand."""
        return self._max_block

    @classmethod
    def from_url(cls, url: str, *, holder: str, **redis_kwargs: Any) -> Boss:
        """Connect to the deployment ``url`` names: ``redis://host:port/db``, ``rediss://`` (TLS),
        ``unix://``, ``redis+sentinel://host:port[,host:port...]/service[/db]`` (the primary the
        sentinels name, followed across failovers) or ``redis+cluster://host:port[,...]`` (see
        :mod:`gpuboss_client.urls`). ``redis_kwargs`` go to redis-py's client."""
        deployment = parse_url(url)
        try:
            client = backend.connect(deployment, **redis_kwargs)
        except ValueError as exc:
            raise BadRequest(f"bad Redis URL {redact(url)!r}: {exc}") from exc
        return cls(client, holder=holder, confirm=deployment.confirm, deployment=deployment)

    def close(self, *, release: bool = True) -> None:
        """Release every lease this client holds, stop its workers and close the connection.

        Leases that cannot be released (Redis unreachable) expire by themselves after their TTL.
        With ``release=False`` the leases are left to expire after their TTL, or to be taken over
        by :meth:`adopt` in a process that follows this one (a restarted service).
        """
        try:
            if release:
                self.release_all()
            else:
                for lease in self._held.leases():
                    self._held.discard(lease)
        except BackendUnavailable as exc:
            log.warning("could not release leases on closing (they expire by themselves): %s", exc)
        finally:
            self._stop()
            for worker in (self._listener, self._keeper):
                if worker is not None:
                    worker.join()
            backend.close_redis(self.redis)

    def __enter__(self) -> Boss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, op: Op[T]) -> T:
        """Drive one operation of :mod:`gpuboss_client.ops` (what every method here does)."""
        reply: Any = None
        try:
            while True:
                step = op.send(reply)
                try:
                    reply = self._execute(step)
                except redis.RedisError as exc:
                    raise backend_error(exc) from exc
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run Lua verb ``name`` with raw ``KEYS`` and ``ARGV`` and return Redis's reply, as the
        operations do (for tests and tools that drive the scripts by hand)."""
        return self._execute(Call(name, keys, args))

    def _execute(self, step: Call | Command) -> Any:
        """Run one step. A verb runs as ``FCALL`` of the function library, or as ``EVALSHA`` once
        Redis refused ``FCALL`` (see :mod:`gpuboss_client.scripts`); one that Redis lacks (after a
        restart, a flush, or on first use) is loaded and run again."""
        for attempt in (1, 2, 3):
            command = self._command(step)
            try:
                if self.confirm.replicas and core.confirms(step):
                    return self._confirmed(command)
                return self.redis.execute_command(*command)  # type: ignore[no-untyped-call]
            except redis.ResponseError as exc:
                if attempt == 3 or not isinstance(step, Call):
                    raise
                if self._functions and _refuses_functions(exc):
                    log.info("running the Lua verbs as scripts: Redis refused FCALL (%s)", exc)
                    self._functions = False
                elif _lacks_verb(exc):
                    self._load_verb(step.script)
                else:
                    raise
        raise AssertionError("unreachable")

    def _command(self, step: Call | Command) -> tuple[Any, ...]:
        if not isinstance(step, Call):
            return step.args
        if self._functions:
            return ("FCALL", function_name(step.script), len(step.keys), *step.keys, *step.args)
        return ("EVALSHA", self._shas[step.script], len(step.keys), *step.keys, *step.args)

    def _load_verb(self, name: str) -> None:
        """Load the function library, or verb ``name``'s script where Redis has no functions, this
        user may not load them, or after loading it the call still finds none."""
        if self._functions:
            try:
                self.redis.execute_command("FUNCTION LOAD", library())  # type: ignore[no-untyped-call]
                return
            except redis.ResponseError as exc:
                if "already exists" in str(exc):
                    return  # another client loaded it meanwhile
                log.info("running the Lua verbs as scripts: Redis refused FUNCTION LOAD (%s)", exc)
                self._functions = False
        self.redis.execute_command("SCRIPT LOAD", source(name))  # type: ignore[no-untyped-call]

    def _replicas_needed(self) -> int:
        """How many replicas must confirm a write: :attr:`confirm`'s number, or for
        :data:`~gpuboss_client.urls.CONFIRM_ALL` every replica that is not down, counted again
        every minute, after a write they did not all confirm, and whenever a write finds more."""
        if self.confirm.replicas != CONFIRM_ALL:
            return self.confirm.replicas
        now = self._clock()
        if self._replicas_counted_at is None:
            self._replicas = backend.count_replicas(self.redis, 0)
            self._replicas_counted_at = now
        elif now - self._replicas_counted_at >= RECOUNT_REPLICAS_S:
            self._recount(self._replicas.count)
        return self._replicas.count

    def _confirmed(self, command: tuple[Any, ...]) -> Any:
        """Run ``command`` and ``WAIT`` for :attr:`confirm` replicas on the same connection; raise
        :class:`BackendUnavailable` if fewer acknowledge it in time (it may be lost in a failover).

        With ``confirm_replicas=all``, the primary's ``ROLE`` comes back with it: a replica that
        came (back) since the count may be the one a failover promotes, so the write, and every
        later one, waits for it too. While the sentinels list a replica that did not confirm (one
        down, or back and not counted yet), a write counts only once a fresh count finds that it
        went to the primary they all name (:meth:`_recount`)."""
        need = self._replicas_needed()
        # WAIT blocks the connection: never as long as its read timeout
        wait_ms = (
            self.confirm.ms if self._max_block is None else min(self.confirm.ms, int(self._max_block * 1000))
        )
        every = self.confirm.replicas == CONFIRM_ALL
        with backend.held_connection(self.redis) as conn:
            replies = conn.run(command, ("WAIT", need, wait_ms), *([("ROLE",)] if every else []))
            # the first error reply: the script's, or a refused WAIT or ROLE (an older ACL file)
            error = next((r for r in replies if isinstance(r, redis.ResponseError)), None)
            reply, acked, *role = replies
            if error is None and every and (attached := replicas_of(role[0])) > need:
                self._replicas, need = self._replicas.attached(attached), attached
                if acked < need:
                    [acked] = conn.run(("WAIT", need, wait_ms))
            written_to = conn.address
        if error is not None:
            raise error
        if acked >= need and (not every or acked >= self._replicas.listed):
            return reply
        fresh = self._recount(need) if every else None
        if fresh is not None and fresh.confirm(acked, written_to):
            return reply
        # Perhaps a primary that a failover left behind: the next call connects afresh (to the
        # primary the sentinels name now).
        backend.drop_idle_connections(self.redis)
        why = unconfirmed(acked, need, fresh, written_to, wait_ms)
        raise BackendUnavailable(f"{why}: it would not survive a failover", replicas=acked)

    def _recount(self, need: int) -> Replicas:
        """Count the replicas again (from ``need``), after a write that not every replica listed
        confirmed (one may be down for good, or the write went to a primary that a failover is
        leaving behind, where the promoted replica no longer confirms), or a minute after the last
        count; whether that write counts is the count's :meth:`~gpuboss_client._connect.Replicas.confirm`.
        A lower count is taken only after every connection is closed: no later write reaches a
        deposed primary, whose remaining replicas would meet the lower bar; the next calls connect
        to the primary the sentinels name."""
        fresh = backend.count_replicas(self.redis, need)
        self._replicas_counted_at = self._clock()
        if fresh.count < need:
            backend.drop_connections(self.redis)
        self._replicas = fresh
        return fresh

    def acquire(self, vram: int | str | None = None, **options: Unpack[AcquireOptions]) -> Lease:
        """Lease ``vram`` (MiB, or "8GiB") on ``device`` or the best fit in ``pool``.

        Waits until granted, or raises :class:`AcquireTimeout` after ``timeout`` seconds (``0``
        tries once, ``None`` waits for ever). The lease renews itself in the background until
        :meth:`release` (unless ``keepalive=False``); if it cannot be renewed, ``lease.lost``
        turns true. Retrying with the same ``request_id`` never grants twice, and returns the
        lease object already held. The options are those of :class:`~gpuboss_client.ops.AcquireOptions`.
        """
        return self._acquire(core.Ask.of(vram, options))

    def lease(self, vram: int | str | None = None, **options: Unpack[AcquireOptions]) -> LeaseContext:
        """``with boss.lease(...) as lease:`` acquires (as :meth:`acquire`), and releases on
        exit, exceptions included. If the lease is lost meanwhile, ``lease.lost`` turns true and
        :class:`LeaseLost` (:class:`LeaseEvicted` after an eviction) is raised on exit at the latest.
        ``str(lease)`` is the device string frameworks take (``"cuda:0"``)."""
        return LeaseContext(self, core.Ask.of(vram, options))

    def adopt(
        self,
        info: LeaseInfo,
        *,
        on_evict: Callable[[Lease], Any] | None = None,
        grace: float = core.DEFAULT_GRACE,
    ) -> Lease:
        """Take over a live lease granted to this client's holder (same name and host) by an earlier
        process, e.g. a service that restarted within the lease's TTL: it is renewed at once, and
        from then on as if acquired here. ``grace`` is what the lease was granted with (the
        eviction fence needs it). Its eviction notices reach this client through heartbeat
        replies (the earlier process's channel is gone). Raises :class:`LeaseLost` if it has
        ended, :class:`BadRequest` for another holder's lease or a waiter."""
        if (info.holder, info.holder_host) != (self.holder.name, self.holder.host) or info.state not in (
            "active",
            "idle",
            "evicting",
        ):
            raise BadRequest(
                f"lease {info.id} is {info.state}, held by {info.holder} on {info.holder_host}: "
                f"not a live lease of {self.holder.name} on {self.holder.host}"
            )
        lease = self._held.add(
            core.Lease(info, deadline=0.0, clock=self._clock, grace_ms=round(grace * 1000))
        )
        lease._boss = self
        try:
            self.heartbeat(lease)
        except BaseException:
            self._held.discard(lease)
            raise
        if on_evict is not None:
            lease.on_evict = on_evict
        self._keep(lease)
        self._dispatch(lease)
        return lease

    def release(self, lease: Lease | str) -> None:
        """Release a lease (or the id of one this client holds); raises :class:`LeaseLost` if it
        had already ended otherwise, and :class:`LeaseNotHeld` for an id this client does not hold.
        While Redis is unavailable (a failover, a restart) it tries again for up to 5 s, and not
        past the lease's local deadline, as :meth:`idle` and :meth:`busy` do; then it raises
        :class:`BackendUnavailable` with the lease still held."""
        lease = self._lease(lease)
        try:
            self._run_retrying(lambda: core.release(lease), lease, "release")
        except BackendUnavailable:
            raise  # still held: the caller may try again
        except GpubossError:
            self._held.discard(lease)
            raise
        self._held.discard(lease)

    def release_all(self) -> list[str]:
        """Release every lease this client holds; returns their ids. One that had ended already is
        forgotten with a warning; :class:`BackendUnavailable` stops at the first that cannot."""
        released: list[str] = []
        for lease in self._held.leases():
            try:
                self.release(lease)
                released.append(lease.id)
            except LeaseLost as exc:
                log.warning("%s", exc)
        return released

    def heartbeat(self, lease: Lease | str) -> LeaseInfo:
        """Renew a lease for another TTL and return its state; raises LeaseLost if it ended."""
        lease = self._lease(lease)
        try:
            return self.run(core.heartbeat(lease, self._clock))
        finally:
            self._dispatch(lease)

    def idle(self, lease: Lease | str) -> None:
        """Keep a lease warm: resident but not in use, evictable least recently used first. Tries
        again while Redis is unavailable, as :meth:`release` does."""
        lease = self._lease(lease)
        try:
            self._run_retrying(lambda: core.mark(lease, "idle"), lease, "idle")
        finally:
            self._dispatch(lease)

    def busy(self, lease: Lease | str) -> None:
        """Take a warm lease back into use; raises :class:`LeaseEvicted` if it is being evicted,
        and :class:`LeaseLost` if it is lost."""
        lease = self._lease(lease)
        try:
            self._run_retrying(lambda: core.mark(lease, "busy"), lease, "busy")
        finally:
            self._dispatch(lease)

    def held(self) -> list[Lease]:
        """The leases this client holds, oldest first."""
        return self._held.leases()

    def plan(
        self,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = core.DEFAULT_POOL,
        exclusive: bool = False,
        devices: int = 1,
    ) -> Plan:
        """Dry run: would a request be granted now, evict whom, wait behind how many, or never fit?"""
        return self.run(core.plan(vram, vram_gb, priority, device, pool, exclusive, devices))

    def configure_pool(
        self, pool: str = core.DEFAULT_POOL, *, min_residency: float = 0, aging: float = 0
    ) -> None:
        """Set ``pool``'s minimum residency (a younger lease is evicted only if nothing else fits)
        and aging period (a waiter rises one priority level, 10, per period; 0 = strict priority)."""
        self.run(core.configure_pool(pool, min_residency, aging))

    def add_device(
        self,
        name: str,
        vram: int | str,
        *,
        reserved: int | str = 0,
        pool: str = core.DEFAULT_POOL,
        host: str | None = None,
        cuda_index: int | None = None,
    ) -> bool:
        """Add a device of ``vram`` (``reserved`` of it never leased), or update it; True if new."""
        return self.run(
            core.add_device(name, vram, reserved=reserved, pool=pool, host=host, cuda_index=cuda_index)
        )

    def remove_device(self, name: str, *, pool: str = core.DEFAULT_POOL, force: bool = False) -> None:
        """Remove a device; refused with :class:`DeviceBusy` while it has leases, unless forced."""
        self.run(core.remove_device(name, pool=pool, force=force))

    def devices(self, pool: str | None = None) -> list[DeviceInfo]:
        """Devices of ``pool``, or of every pool."""
        return [d for s in self.status(pool) for d in s.devices]

    def leases(self, pool: str | None = None) -> list[LeaseInfo]:
        """Live leases and waiting requests of ``pool``, or of every pool."""
        return self.run(core.leases(pool))

    def status(self, pool: str | None = None) -> list[PoolStatus]:
        """Per pool: devices with budgets and usage, granted and queued counts."""
        return self.run(core.status(pool))

    def force_release(self, lease_id: str, pool: str | None = None) -> LeaseInfo:
        """Operator: end a lease or waiter without its token (searching every pool if needed)."""
        return self.run(core.force_release(lease_id, pool))

    def reap(self, pool: str | None = None) -> int:
        """End expired leases and abandoned waiters now; returns how many."""
        return self.run(core.reap(pool))

    def repair_pools(self) -> list[str]:
        """Operator: put pools that have devices back in the pool registry; returns them. (It
        scans the keyspace; the boss's reaper runs it now and then.)"""
        return self.run(core.repair_pools())

    def findings(self, pool: str | None = None) -> list[core.Findings]:
        """What the NVML agent measured in ``pool`` or in every pool: device health, leases'
        real use and findings, peaks per label."""
        return self.run(core.findings(pool))

    def events(self, pool: str | None = None, *, count: int = 100) -> list[Event]:
        """The last ``count`` events of ``pool`` or of every pool, oldest first."""
        return self.run(core.recent_events(pool, count))

    def tail_events(
        self, cursors: Mapping[str, str], *, count: int = 100, block: float | None = None
    ) -> list[Event]:
        """Events after each pool's cursor (an event id, or ``"$"`` for only new ones).

        With ``block`` seconds, waits up to that long for the first one (less if the connection's
        read timeout is shorter); continue from the last id seen per pool.
        """
        if block is not None and self._max_block is not None:
            block = min(block, self._max_block)
        block_ms = None if block is None else int(block * 1000)
        return self.run(core.read_events(cursors, count, block_ms, by_slot=self._by_slot))

    def load_scripts(self) -> dict[str, str]:
        """Ping Redis and make sure it has every Lua script cached, and the function library
        where this client uses it; the scripts' SHAs by name (what the service's ``/readyz``
        reports)."""
        shas = self.run(core.load_scripts())
        if self._functions:
            try:
                self._load_verb(NAMES[0])
            except redis.RedisError as exc:
                raise backend_error(exc) from exc
        return shas

    @property
    def library(self) -> str | None:
        """The function library this client calls, or None while it runs the verbs as scripts."""
        return LIBRARY if self._functions else None

    def event_cursors(self, pool: str | None = None) -> dict[str, str]:
        """Where the event streams of ``pool`` (or of every pool) end now, for :meth:`follow`: each
        pool's last event id, and under ``"*"`` the cursor for pools that appear later."""
        return self.run(core.event_cursors(pool))

    def follow(
        self,
        pool: str | None = None,
        *,
        after: str | Mapping[str, str] | None = None,
        block: float | None = 1.0,
        pace: float = 0.0,
    ) -> Iterator[Event]:
        """Events of ``pool``, or of every pool (pools that appear later included), each once,
        oldest first: those after ``after``, an event id for every pool or a cursor per pool (as
        :meth:`event_cursors` gives; None: from now).

        It waits up to ``block`` seconds at a time for new ones, for ever (until the client is
        closed); with ``block=None`` it ends once it has caught up. Redis errors are raised.
        ``pace``: after each read that found events, wait this long before the next, so that busy
        streams are read in fewer, larger batches (events arrive up to ``pace`` seconds later).
        """
        start = after if after is not None else self.event_cursors(pool)
        wait = block if block is not None else self._max_block or 1.0
        follow = core.Follow(pool, start, clock=self._clock, look_every=wait, by_slot=self._by_slot)
        if block is not None and self._max_block is not None:
            block = min(block, self._max_block)
        while not self._closed:
            events = self.run(follow.step(core.MAX_EVENTS, None if block is None else int(block * 1000)))
            for event in events:
                yield event
            if block is None and not events:
                return
            if events and pace > 0:
                backend.sleep(pace)
            if not follow.cursors:
                backend.sleep(wait)  # no pool yet: nothing to block on until one appears

    # --- leases held -------------------------------------------------------------------------

    def _lease(self, lease: Lease | str) -> Lease:
        if isinstance(lease, Lease):
            return lease
        held = self._held.get(lease) if isinstance(lease, str) else None
        if held is None:
            raise LeaseNotHeld(f"this client holds no lease {lease!r}", lease=str(lease))
        return held

    def _acquire(self, ask: core.Ask) -> Lease:
        self._ensure_listener()
        self._held.acquiring(+1)
        try:
            lease = self._held.add(self._acquire_retrying(ask))
        finally:
            self._held.acquiring(-1)
        lease._boss = self
        if ask.on_evict is not None:
            lease.on_evict = ask.on_evict
        if ask.keepalive:
            self._keep(lease)
        self._dispatch(lease)
        return lease

    def _acquire_retrying(self, ask: core.Ask) -> Lease:
        """The acquire operation, tried again while Redis is unavailable (restarting, failing over,
        migrating the pool's slot, full) until the request's own timeout: the same request id
        each time, so a grant whose reply was lost is returned, never granted twice.

        A grant this client never heard of (its reply lost, or not confirmed by the replicas) may
        end before a retry finds it, say expired while a failover kept it unconfirmed: nobody
        believed in it, so the client asks again under a new id (not one the caller chose). On
        failure or cancellation the request leaves the queue (it may be queued, or granted
        unconfirmed)."""
        req = ask.request
        deadline = None if req.timeout is None else self._clock() + req.timeout
        pause = core.RETRY_FIRST_S
        unheard = False  # a try's reply did not count: the request may be granted unknown to us
        try:
            while True:
                op = core.acquire(
                    req, self.holder, self._clock, max_block=self._max_block, on_wait=ask.on_wait
                )
                try:
                    return self.run(op)
                except BackendUnavailable as exc:
                    pause = self._back_off(exc, deadline, pause, f"acquire {req.id}")
                    unheard = True
                except LeaseLost as exc:
                    if not unheard or req.id_chosen:
                        raise
                    log.info(
                        "acquire %s: %s before this client heard of it; asking again", req.id, exc.message
                    )
                    req, unheard = req.anew(), False
                if deadline is not None:
                    req = dataclasses.replace(req, timeout=max(0.0, deadline - self._clock()))
        except BaseException as err:
            if isinstance(err, BackendUnavailable) or not isinstance(err, GpubossError):
                with contextlib.suppress(Exception):
                    self.run(core.withdraw(req, self.holder))
            raise

    def _run_retrying(self, make: Callable[[], Op[T]], lease: Lease, verb: str) -> T:
        """Run the operation ``make`` builds for ``lease``, built and run again while Redis is
        unavailable (a failover, a restart, a recount that closed the connection under it) for up
        to ``RETRY_VERB_S``, and not past the lease's local deadline (it is lost by then anyway).
        Only for release, idle and busy: each is idempotent for its lease and token, so a try that
        went through although its reply was lost changes nothing."""
        deadline = min(self._clock() + core.RETRY_VERB_S, lease.deadline)
        pause = core.RETRY_FIRST_S
        while True:
            try:
                return self.run(make())
            except BackendUnavailable as exc:
                pause = self._back_off(exc, deadline, pause, f"{verb} {lease.id}")

    def _back_off(self, exc: BackendUnavailable, deadline: float | None, pause: float, what: str) -> float:
        """After ``exc``: raise it if ``deadline`` comes before the next try would; else wait
        ``pause`` and return the next one (twice as long, up to ``RETRY_MAX_S``)."""
        if deadline is not None and deadline - self._clock() <= pause:
            raise exc
        log.info("%s: %s; trying again in %.2f s", what, exc.message, pause)
        backend.sleep(pause)
        return min(2 * pause, core.RETRY_MAX_S)

    def _give_back(self, lease: Lease) -> str | None:
        """Release on leaving a lease's context; returns why it was lost, or None."""
        try:
            reason = self._run_retrying(lambda: core.close(lease), lease, "release")
        except BackendUnavailable as err:
            log.warning("could not release lease %s (it expires by itself): %s", lease.id, err)
            reason = lease.lost_reason
        self._held.discard(lease)
        return reason

    # --- the heartbeat worker ----------------------------------------------------------------

    def _keep(self, lease: Lease) -> None:
        """Have the heartbeat worker renew ``lease``: one worker renews every lease of the client.

        The worker is woken only when the lease is due before the worker's next wake-up anyway:
        a hand-off (release, acquire, release...) costs it no thread switch per lease.
        """
        wait = core.next_beat(lease, failed=False)
        with self._lock:
            lease._next_beat = self._clock() + (wait or 0.0)
            lease.keepalive = True
            if self._keeper is None or not self._keeper.alive():
                self._wake, self._keeper_due = backend.Signal(), None
                self._keeper = backend.Worker(self._keep_alive, self._wake, name="gpuboss-heartbeats")
            wake = self._wake if self._keeper_due is None or lease._next_beat < self._keeper_due else None
        if wake is not None:
            wake.set()

    def _keep_alive(self, wake: backend.Signal) -> None:
        while not self._closed:
            wake.clear()  # before looking: a lease kept from now on sets it again
            for lease in self._held.leases():
                if lease.keepalive and lease._next_beat <= self._clock():
                    self._beat(lease)
            with self._lock:  # the soonest beat, and when this worker wakes, agree for _keep
                due = [x._next_beat for x in self._held.leases() if x.keepalive]
                self._keeper_due = min(due) if due else None
            wake.wait(None if self._keeper_due is None else self._keeper_due - self._clock())

    def _beat(self, lease: Lease) -> None:
        failed = False
        try:
            self.heartbeat(lease)
        except LeaseLost as exc:
            if exc.details.get("state") != "released":  # else a release of ours was under way
                log.warning("%s", exc)
            lease.keepalive = False
            self._held.discard(lease)
            return
        except Exception as exc:  # Redis away, or the client closed under us: try again sooner
            log.warning("heartbeat of lease %s failed: %s", lease.id, exc)
            failed = True
        wait = core.next_beat(lease, failed)
        if wait is None:  # lost here (not renewed in time, or past its eviction deadline)
            if not lease._released:
                log.warning("lease %s is lost: %s", lease.id, lease.lost_reason)
            lease.keepalive = False
        else:
            lease._next_beat = self._clock() + wait

    def _stop(self) -> None:
        """Tell the workers to stop (they end within a poll)."""
        self._closed = True
        if self._wake is not None:
            with contextlib.suppress(RuntimeError):  # an event loop that is gone already
                self._wake.set()

    def _release_at_exit(self) -> None:
        """Give back what is still held when the interpreter exits (over a blocking connection)."""
        leases = [x for x in self._held.leases() if not x._released]
        if not leases:
            return
        self._stop()
        client = backend.sync_twin(self.redis, self._deployment)
        release = client.register_script(source("release"))
        for lease in leases:
            with contextlib.suppress(Exception):
                core.drive(
                    core.release(lease),
                    lambda step: (
                        release(keys=step.keys, args=step.args)
                        if isinstance(step, Call)
                        else client.execute_command(*step.args)
                    ),
                )

    # --- eviction notices --------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        """Subscribe to this client's notice channel, before acquiring, so no notice is missed."""
        with self._lock:
            if self._listener is not None and self._listener.alive():
                return
        try:
            pubsub = backend.pubsub(self.redis)
        except (redis.RedisError, OSError) as exc:
            log.debug("no eviction notices over pub/sub (heartbeats carry them): %r", exc)
            return
        try:
            pubsub.subscribe(self.holder.notify)
            pubsub.get_message(timeout=5.0)  # the confirmation: from now on notices reach us
        except (redis.RedisError, OSError) as exc:
            if isinstance(exc, redis.exceptions.NoPermissionError):
                log.warning(
                    "Redis refuses SUBSCRIBE %s to this client's user (%s): eviction notices come "
                    "with heartbeats only, and evicting its leases waits for their expiry; allow "
                    "the channel (&gpuboss:*) in its ACL", self.holder.notify, exc,
                )  # fmt: skip
            else:
                log.debug("no eviction notices over pub/sub (heartbeats carry them): %r", exc)
            backend.close_pubsub(pubsub)
            return
        with self._lock:
            started = self._listener is None or not self._listener.alive()
            if started:
                self._listener = backend.Worker(self._listen, pubsub, name="gpuboss-notices")
        if not started:  # another caller won the race
            backend.close_pubsub(pubsub)

    def _dispatch(self, lease: Lease) -> None:
        """Run ``on_evict`` once the first eviction notice arrived, then give the memory back."""
        if lease._take_notice() and lease.on_evict is not None:
            backend.Worker(self._evict, lease, name=f"gpuboss-evict-{lease.id}")

    def _evict(self, lease: Lease) -> None:
        try:
            assert lease.on_evict is not None
            backend.resolve(lease.on_evict(lease))
        except Exception:
            log.exception("on_evict of lease %s failed; releasing it anyway", lease.id)
        try:
            self.release(lease)
        except Exception as exc:  # it expires, or is revoked, by itself
            log.warning("could not release evicted lease %s: %s", lease.id, exc)

    def _listen(self, pubsub: Any) -> None:
        # The fast path for eviction notices; heartbeat replies carry them too if this is down.
        try:
            while not self._closed:
                with self._lock:
                    if self._held.idle():
                        self._listener = None
                        return
                try:
                    message = pubsub.get_message(timeout=0.25)
                except (redis.RedisError, OSError):
                    backend.sleep(0.1)  # Redis away: redis-py reconnects and resubscribes
                    continue
                except Exception as exc:  # e.g. the Redis client was closed under us
                    log.debug("eviction notices stop (heartbeats still carry them): %r", exc)
                    return
                lease = self._held.on_message(message)
                if lease is not None:
                    self._dispatch(lease)
        finally:
            with contextlib.suppress(Exception):
                backend.close_pubsub(pubsub)


class LeaseContext:
    """The context manager :meth:`Boss.lease` returns; ``lease`` is the lease once entered."""

    def __init__(self, boss: Boss, ask: core.Ask) -> None:
        self._boss = boss
        self._ask = ask
        self.lease: Lease | None = None

    def __enter__(self) -> Lease:
        self.lease = self._boss._acquire(self._ask)
        return self.lease

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.lease is not None
        reason = self._boss._give_back(self.lease)
        core.raise_if_lost(self.lease, reason, exc)


@atexit.register
def _release_at_exit() -> None:
    for client in list(_clients):
        with contextlib.suppress(Exception):
            client._release_at_exit()
