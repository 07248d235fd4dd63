"""The blocking client: :class:`Boss`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import redis

from . import _core as core
from ._core import Call, Clock, DeviceInfo, Event, Holder, Lease, LeaseInfo, Op, Plan, PoolStatus
from .errors import BackendUnavailable, BadRequest, GpubossError, LeaseLost, ProtocolError
from .scripts import NAMES, source

__all__ = ["Boss", "LeaseContext"]

log = logging.getLogger("gpuboss_client")
T = TypeVar("T")
#: called with the lease when gpuboss asks for its memory back; unload, then return
EvictCallback = Callable[[Lease], object]


class Boss:
    """Leases VRAM through Redis, from any process.

    ``holder`` names the service; host and pid are filled in. Every state change runs as one
    atomic Lua script in Redis; this client only sends them and waits.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        holder: str,
        host: str | None = None,
        pid: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.redis = client
        self.holder = Holder.of(holder, host, pid)
        self._clock = clock
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}
        self._notices = core.Notices(clock)
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._closed = threading.Event()

    @classmethod
    def from_url(cls, url: str, *, holder: str, **redis_kwargs: Any) -> Boss:
        """Connect to ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``)."""
        try:
            client = redis.Redis.from_url(url, decode_responses=True, **redis_kwargs)
        except ValueError as exc:
            raise BadRequest(f"bad Redis URL {url!r}: {exc}") from exc
        return cls(client, holder=holder)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join()
        self.redis.close()

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
                    if isinstance(step, Call):
                        reply = self._scripts[step.script](keys=step.keys, args=step.args)
                    else:
                        reply = self.redis.execute_command(*step.args)  # type: ignore[no-untyped-call]
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    raise BackendUnavailable(f"Redis unreachable: {exc}") from exc
                except redis.ResponseError as exc:
                    raise ProtocolError(f"Redis refused a command: {exc}") from exc
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def acquire(
        self,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = core.DEFAULT_POOL,
        ttl: float = core.DEFAULT_TTL,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        preemptible: bool = False,
        grace: float = core.DEFAULT_GRACE,
        exclusive: bool = False,
        devices: int = 1,
        on_evict: EvictCallback | None = None,
    ) -> Lease:
        """Lease ``vram`` (MiB, or "8GiB") on ``device`` or the best fit in ``pool``.

        Blocks until granted, or raises :class:`AcquireTimeout` after ``timeout`` seconds
        (``0`` tries once, ``None`` waits for ever). The lease expires ``ttl`` seconds after the
        last heartbeat: call :meth:`heartbeat`, or use :meth:`lease`, which beats for you.
        Retrying with the same ``request_id`` never grants twice.
        """
        req = core.AcquireRequest.build(
            vram=vram, vram_gb=vram_gb, priority=priority, device=device, pool=pool, ttl=ttl,
            timeout=timeout, labels=labels, request_id=request_id, preemptible=preemptible, grace=grace,
            exclusive=exclusive, devices=devices,
        )  # fmt: skip
        self._ensure_listener()
        return self._held_lease(self.run(core.acquire(req, self.holder, self._clock)), on_evict)

    def lease(
        self,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = core.DEFAULT_POOL,
        ttl: float = core.DEFAULT_TTL,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        preemptible: bool = False,
        grace: float = core.DEFAULT_GRACE,
        exclusive: bool = False,
        devices: int = 1,
        on_evict: EvictCallback | None = None,
    ) -> LeaseContext:
        """``with boss.lease(...) as lease:`` acquires, heartbeats in a background thread, and
        releases on exit, exceptions included. If the lease is lost meanwhile, ``lease.lost``
        turns true and :class:`LeaseLost` is raised on exit at the latest."""
        req = core.AcquireRequest.build(
            vram=vram, vram_gb=vram_gb, priority=priority, device=device, pool=pool, ttl=ttl,
            timeout=timeout, labels=labels, request_id=request_id, preemptible=preemptible, grace=grace,
            exclusive=exclusive, devices=devices,
        )  # fmt: skip
        return LeaseContext(self, req, on_evict)

    def release(self, lease: Lease) -> None:
        """Release a lease; raises :class:`LeaseLost` if it had already ended otherwise."""
        self.run(core.release(lease))

    def heartbeat(self, lease: Lease) -> LeaseInfo:
        """Renew a lease for another TTL and return its state; raises LeaseLost if it ended."""
        try:
            return self.run(core.heartbeat(lease, self._clock))
        finally:
            self._dispatch(lease)

    def idle(self, lease: Lease) -> None:
        """Keep ``lease`` warm: resident but not in use, evictable least recently used first."""
        try:
            self.run(core.mark(lease, "idle"))
        finally:
            self._dispatch(lease)

    def busy(self, lease: Lease) -> None:
        """Take a warm lease back into use; raises :class:`LeaseEvicted` if it was evicted."""
        try:
            self.run(core.mark(lease, "busy"))
        finally:
            self._dispatch(lease)

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

        With ``block`` seconds, waits that long for the first one; continue from the last id seen
        per pool.
        """
        block_ms = None if block is None else int(block * 1000)
        return self.run(core.read_events(cursors, count, block_ms))

    def _held_lease(self, lease: Lease, on_evict: EvictCallback | None) -> Lease:
        lease._boss = self
        lease.on_evict = on_evict
        with self._listener_lock:
            self._notices.register(lease)
        self._ensure_listener()
        self._dispatch(lease)
        return lease

    def _ensure_listener(self) -> None:
        """Subscribe to this client's notice channel, before acquiring, so no notice is missed."""
        with self._listener_lock:
            if self._listener is not None and self._listener.is_alive():
                return
            pubsub = self.redis.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.holder.notify)
                pubsub.get_message(timeout=5.0)  # the confirmation: from now on notices reach us
            except (redis.RedisError, OSError) as exc:
                log.debug("no eviction notices over pub/sub (heartbeats carry them): %r", exc)
                pubsub.close()
                return
            self._listener = threading.Thread(
                target=self._listen, args=(pubsub,), name="gpuboss-notices", daemon=True
            )
            self._listener.start()

    def _dispatch(self, lease: Lease) -> None:
        """Run ``on_evict`` once the first eviction notice arrived, then give the memory back."""
        if lease._take_notice() and lease.on_evict is not None:
            threading.Thread(target=self._evict, args=(lease,), name=f"gpuboss-evict-{lease.id}").start()

    def _evict(self, lease: Lease) -> None:
        try:
            assert lease.on_evict is not None
            lease.on_evict(lease)
        except Exception:
            log.exception("on_evict of lease %s failed; releasing it anyway", lease.id)
        try:
            self.release(lease)
        except GpubossError as exc:
            log.warning("could not release evicted lease %s: %s", lease.id, exc)

    def _listen(self, pubsub: Any) -> None:
        # The fast path for eviction notices; heartbeat replies carry them too if this is down.
        try:
            while not self._closed.is_set():
                with self._listener_lock:
                    if self._notices.idle():
                        self._listener = None
                        return
                try:
                    message = pubsub.get_message(timeout=0.25)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    self._closed.wait(0.1)  # Redis away: redis-py reconnects and resubscribes
                    continue
                except Exception as exc:  # e.g. the Redis client was closed under us
                    log.debug("eviction notices stop (heartbeats still carry them): %r", exc)
                    return
                with self._listener_lock:
                    lease = self._notices.on_message(message)
                if lease is not None:
                    self._dispatch(lease)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


class LeaseContext:
    """The context manager :meth:`Boss.lease` returns."""

    def __init__(self, boss: Boss, req: core.AcquireRequest, on_evict: EvictCallback | None) -> None:
        self._boss = boss
        self._req = req
        self._on_evict = on_evict
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease: Lease | None = None

    def __enter__(self) -> Lease:
        self._boss._ensure_listener()
        lease = self._boss.run(core.acquire(self._req, self._boss.holder, self._boss._clock))
        self.lease = self._boss._held_lease(lease, self._on_evict)
        self._thread = threading.Thread(
            target=self._beat, args=(lease,), name=f"gpuboss-heartbeat-{lease.id}", daemon=True
        )
        self._thread.start()
        return lease

    def _beat(self, lease: Lease) -> None:
        wait = core.next_beat(lease, failed=False)
        while wait is not None and not self._stop.wait(wait):
            failed = False
            try:
                self._boss.heartbeat(lease)
            except LeaseLost as exc:
                log.warning("%s", exc)
                return
            except GpubossError as exc:
                log.warning("heartbeat of lease %s failed: %s", lease.id, exc)
                failed = True
            wait = core.next_beat(lease, failed)
        if wait is None:
            log.warning("lease %s is lost: %s", lease.id, lease.lost_reason)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.lease is not None
        assert self._thread is not None
        self._stop.set()
        self._thread.join()
        try:
            reason = self._boss.run(core.close(self.lease))
        except BackendUnavailable as err:
            log.warning("could not release lease %s (it expires by itself): %s", self.lease.id, err)
            reason = self.lease.lost_reason
        core.raise_if_lost(self.lease, reason, exc)
