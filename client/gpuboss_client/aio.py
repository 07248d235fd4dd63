"""The asyncio client: :class:`AsyncBoss`, the same API as :class:`~gpuboss_client.Boss`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from . import _core as core
from ._core import Call, Clock, DeviceInfo, Event, Holder, Lease, LeaseInfo, Op, Plan, PoolStatus
from .errors import BackendUnavailable, BadRequest, GpubossError, LeaseLost, ProtocolError
from .scripts import NAMES, source

__all__ = ["AsyncBoss", "AsyncLeaseContext"]

log = logging.getLogger("gpuboss_client")
T = TypeVar("T")
#: called (and awaited, if it returns an awaitable) when gpuboss asks for the lease's memory back
AsyncEvictCallback = Callable[[Lease], "Awaitable[object] | object"]


class AsyncBoss:
    """The asyncio twin of :class:`~gpuboss_client.Boss`: the same API, awaited.

    ``holder`` names the service; host and pid are filled in. Every state change runs as one
    atomic Lua script in Redis; this client only sends them and waits.
    """

    def __init__(
        self,
        client: aioredis.Redis,
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
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, holder: str, **redis_kwargs: Any) -> AsyncBoss:
        """Connect to ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``)."""
        try:
            client = aioredis.Redis.from_url(url, decode_responses=True, **redis_kwargs)
        except ValueError as exc:
            raise BadRequest(f"bad Redis URL {url!r}: {exc}") from exc
        return cls(client, holder=holder)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait([self._listener])
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncBoss:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, op: Op[T]) -> T:
        """Drive one operation of :mod:`gpuboss_client.ops` (what every method here does)."""
        reply: Any = None
        try:
            while True:
                step = op.send(reply)
                try:
                    if isinstance(step, Call):
                        reply = await self._scripts[step.script](keys=step.keys, args=step.args)
                    else:
                        reply = await self.redis.execute_command(*step.args)  # type: ignore[no-untyped-call]
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    raise BackendUnavailable(f"Redis unreachable: {exc}") from exc
                except redis.ResponseError as exc:
                    raise ProtocolError(f"Redis refused a command: {exc}") from exc
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def acquire(
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
        on_evict: AsyncEvictCallback | None = None,
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
        await self._ensure_listener()
        return self._held_lease(await self.run(core.acquire(req, self.holder, self._clock)), on_evict)

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
        on_evict: AsyncEvictCallback | None = None,
    ) -> AsyncLeaseContext:
        """``async with boss.lease(...) as lease:`` acquires, heartbeats in a background task, and
        releases on exit, exceptions included. If the lease is lost meanwhile, ``lease.lost``
        turns true and :class:`LeaseLost` is raised on exit at the latest."""
        req = core.AcquireRequest.build(
            vram=vram, vram_gb=vram_gb, priority=priority, device=device, pool=pool, ttl=ttl,
            timeout=timeout, labels=labels, request_id=request_id, preemptible=preemptible, grace=grace,
            exclusive=exclusive, devices=devices,
        )  # fmt: skip
        return AsyncLeaseContext(self, req, on_evict)

    async def release(self, lease: Lease) -> None:
        """Release a lease; raises :class:`LeaseLost` if it had already ended otherwise."""
        await self.run(core.release(lease))

    async def heartbeat(self, lease: Lease) -> LeaseInfo:
        """Renew a lease for another TTL and return its state; raises LeaseLost if it ended."""
        try:
            return await self.run(core.heartbeat(lease, self._clock))
        finally:
            self._dispatch(lease)

    async def idle(self, lease: Lease) -> None:
        """Keep ``lease`` warm: resident but not in use, evictable least recently used first."""
        try:
            await self.run(core.mark(lease, "idle"))
        finally:
            self._dispatch(lease)

    async def busy(self, lease: Lease) -> None:
        """Take a warm lease back into use; raises :class:`LeaseEvicted` if it was evicted."""
        try:
            await self.run(core.mark(lease, "busy"))
        finally:
            self._dispatch(lease)

    async def plan(
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
        return await self.run(core.plan(vram, vram_gb, priority, device, pool, exclusive, devices))

    async def configure_pool(
        self, pool: str = core.DEFAULT_POOL, *, min_residency: float = 0, aging: float = 0
    ) -> None:
        """Set ``pool``'s minimum residency and aging period (see :meth:`Boss.configure_pool`)."""
        await self.run(core.configure_pool(pool, min_residency, aging))

    async def add_device(
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
        return await self.run(
            core.add_device(name, vram, reserved=reserved, pool=pool, host=host, cuda_index=cuda_index)
        )

    async def remove_device(self, name: str, *, pool: str = core.DEFAULT_POOL, force: bool = False) -> None:
        """Remove a device; refused with :class:`DeviceBusy` while it has leases, unless forced."""
        await self.run(core.remove_device(name, pool=pool, force=force))

    async def devices(self, pool: str | None = None) -> list[DeviceInfo]:
        """Devices of ``pool``, or of every pool."""
        return [d for s in await self.status(pool) for d in s.devices]

    async def leases(self, pool: str | None = None) -> list[LeaseInfo]:
        """Live leases and waiting requests of ``pool``, or of every pool."""
        return await self.run(core.leases(pool))

    async def status(self, pool: str | None = None) -> list[PoolStatus]:
        """Per pool: devices with budgets and usage, granted and queued counts."""
        return await self.run(core.status(pool))

    async def force_release(self, lease_id: str, pool: str | None = None) -> LeaseInfo:
        """Operator: end a lease or waiter without its token (searching every pool if needed)."""
        return await self.run(core.force_release(lease_id, pool))

    async def reap(self, pool: str | None = None) -> int:
        """End expired leases and abandoned waiters now; returns how many."""
        return await self.run(core.reap(pool))

    async def findings(self, pool: str | None = None) -> list[core.Findings]:
        """What the NVML agent measured in ``pool`` or in every pool: device health, leases'
        real use and findings, peaks per label."""
        return await self.run(core.findings(pool))

    async def events(self, pool: str | None = None, *, count: int = 100) -> list[Event]:
        """The last ``count`` events of ``pool`` or of every pool, oldest first."""
        return await self.run(core.recent_events(pool, count))

    async def tail_events(
        self, cursors: Mapping[str, str], *, count: int = 100, block: float | None = None
    ) -> list[Event]:
        """Events after each pool's cursor (an event id, or ``"$"`` for only new ones).

        With ``block`` seconds, waits that long for the first one; continue from the last id seen
        per pool.
        """
        block_ms = None if block is None else int(block * 1000)
        return await self.run(core.read_events(cursors, count, block_ms))

    def _held_lease(self, lease: Lease, on_evict: AsyncEvictCallback | None) -> Lease:
        lease._boss = self
        lease.on_evict = on_evict
        self._notices.register(lease)
        self._dispatch(lease)
        return lease

    async def _ensure_listener(self) -> None:
        """Subscribe to this client's notice channel, before acquiring, so no notice is missed."""
        if self._listener is not None and not self._listener.done():
            return
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.holder.notify)
            await pubsub.get_message(timeout=5.0)  # the confirmation: from now on notices reach us
        except (redis.RedisError, OSError) as exc:
            log.debug("no eviction notices over pub/sub (heartbeats carry them): %r", exc)
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            return
        if self._listener is not None and not self._listener.done():  # another task won the race
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            return
        self._listener = asyncio.create_task(self._listen(pubsub), name="gpuboss-notices")

    def _dispatch(self, lease: Lease) -> None:
        """Run ``on_evict`` (sync or async) once the first notice arrived, then give the memory back."""
        if lease._take_notice() and lease.on_evict is not None:
            task = asyncio.create_task(self._evict(lease), name=f"gpuboss-evict-{lease.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _evict(self, lease: Lease) -> None:
        try:
            assert lease.on_evict is not None
            result = lease.on_evict(lease)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_evict of lease %s failed; releasing it anyway", lease.id)
        try:
            await self.release(lease)
        except GpubossError as exc:
            log.warning("could not release evicted lease %s: %s", lease.id, exc)

    async def _listen(self, pubsub: Any) -> None:
        # The fast path for eviction notices; heartbeat replies carry them too if this is down.
        try:
            while not self._notices.idle():
                try:
                    message = await pubsub.get_message(timeout=0.25)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    await asyncio.sleep(0.1)  # Redis away: redis-py reconnects and resubscribes
                    continue
                except Exception as exc:  # e.g. the Redis client was closed under us
                    log.debug("eviction notices stop (heartbeats still carry them): %r", exc)
                    return
                lease = self._notices.on_message(message)
                if lease is not None:
                    self._dispatch(lease)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class AsyncLeaseContext:
    """The async context manager :meth:`AsyncBoss.lease` returns."""

    def __init__(
        self, boss: AsyncBoss, req: core.AcquireRequest, on_evict: AsyncEvictCallback | None
    ) -> None:
        self._boss = boss
        self._req = req
        self._on_evict = on_evict
        self._task: asyncio.Task[None] | None = None
        self.lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        await self._boss._ensure_listener()
        lease = await self._boss.run(core.acquire(self._req, self._boss.holder, self._boss._clock))
        self.lease = self._boss._held_lease(lease, self._on_evict)
        self._task = asyncio.create_task(self._beat(lease), name=f"gpuboss-heartbeat-{lease.id}")
        return lease

    async def _beat(self, lease: Lease) -> None:
        wait = core.next_beat(lease, failed=False)
        while wait is not None:
            await asyncio.sleep(wait)
            failed = False
            try:
                await self._boss.heartbeat(lease)
            except LeaseLost as exc:
                log.warning("%s", exc)
                return
            except GpubossError as exc:
                log.warning("heartbeat of lease %s failed: %s", lease.id, exc)
                failed = True
            wait = core.next_beat(lease, failed)
        log.warning("lease %s is lost: %s", lease.id, lease.lost_reason)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.lease is not None
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])  # a cancellation of the caller still propagates
        try:
            reason = await self._boss.run(core.close(self.lease))
        except BackendUnavailable as err:
            log.warning("could not release lease %s (it expires by itself): %s", self.lease.id, err)
            reason = self.lease.lost_reason
        core.raise_if_lost(self.lease, reason, exc)
