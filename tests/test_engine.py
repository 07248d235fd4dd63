"""Behaviour of the lease engine through the client, on real Redis and on fakeredis.

Waiters are queued in two ways: by driving the sans-IO core by hand (:class:`Stepper`), which
stops where a real client would block in ``BLPOP`` and so makes queue order deterministic; and by
threads or tasks that really block in ``acquire``, which prove the wake-up path end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from support import Tier, in_thread, other, redis_ms, snapshot, wait_for

from gpuboss_client import (
    AcquireTimeout,
    AsyncBoss,
    Boss,
    DeviceBusy,
    DeviceNotFound,
    GpubossError,
    Lease,
    LeaseLost,
    LeaseNotHeld,
    PoolKeys,
    RequestConflict,
)
from gpuboss_client import _core as core

GiB = 1024
POOL = PoolKeys("default")


# --- helpers ---------------------------------------------------------------------------------


def wait_past(r: redis.Redis, ms: int) -> None:
    """Wait until Redis's clock has passed ``ms``."""
    wait_for(f"Redis time past {ms}", lambda: redis_ms(r) > ms)


def state(r: redis.Redis, lease_id: str, pool: str = "default") -> str | None:
    value = r.hget(PoolKeys(pool).lease(lease_id), "state")
    return None if value is None else str(value)


def wake_len(r: redis.Redis, lease_id: str) -> int:
    return int(r.llen(POOL.wake(lease_id)))


class Events:
    """The pool's event stream; :meth:`new` returns the entries appended since the last call."""

    def __init__(self, r: redis.Redis, pool: str = "default") -> None:
        self.r, self.key, self.seen = r, PoolKeys(pool).events, 0
        self.new()

    def new(self) -> list[dict[str, str]]:
        entries: list[tuple[str, dict[str, str]]] = self.r.xrange(self.key)  # type: ignore[assignment]
        out = [dict(fields) for _id, fields in entries[self.seen :]]
        self.seen = len(entries)
        return out

    def names(self) -> list[str]:
        return [e["event"] for e in self.new()]


def used(boss: Boss, device: str = "gpu0") -> int:
    return next(d.used_mib for d in boss.devices() if d.name == device)


class Stepper:
    """Drives one core operation by hand against ``boss``'s scripts.

    It runs the operation's Redis calls until the operation would block in ``BLPOP`` on its wake
    list (``blocked``) or finishes (``value`` or ``error``). :meth:`resume` stands in for the
    BLPOP returning: it pops the wake list without blocking and runs on.
    """

    def __init__(self, boss: Boss, op: core.Op[Any]) -> None:
        self.boss, self.op = boss, op
        self.step: core.Step | None = None
        self.value: Any = None
        self.error: GpubossError | None = None
        self._send(None)

    @property
    def blocked(self) -> bool:
        return isinstance(self.step, core.Command)

    @property
    def done(self) -> bool:
        return self.step is None

    def _send(self, reply: Any) -> None:
        try:
            self.step = self.op.send(reply)
        except StopIteration as stop:
            self.step, self.value = None, stop.value
        except GpubossError as exc:
            self.step, self.error = None, exc

    def run_step(self) -> None:
        step = self.step
        if isinstance(step, core.Call):
            reply = self.boss.script(step.script, step.keys, step.args)
        else:
            assert step is not None
            assert step.args[0] == "BLPOP"
            reply = self.boss.redis.lpop(str(step.args[1]))
        self._send(reply)

    def run(self) -> Stepper:
        """Run until blocked or done."""
        while not self.done and not self.blocked:
            self.run_step()
        return self

    def resume(self) -> Stepper:
        assert self.blocked
        self.run_step()
        return self.run()

    @property
    def lease(self) -> Lease:
        assert self.done
        assert self.error is None, self.error
        assert isinstance(self.value, Lease)
        return self.value


def request(
    vram: int | str,
    rid: str,
    *,
    priority: int | str = "normal",
    device: str | None = None,
    pool: str = "default",
    ttl: float = 60.0,
    timeout: float | None = None,
) -> core.AcquireRequest:
    return core.AcquireRequest.build(
        vram=vram, vram_gb=None, priority=priority, device=device, pool=pool, ttl=ttl,
        timeout=timeout, labels=None, request_id=rid,
    )  # fmt: skip


def enqueue(boss: Boss, vram: int | str, rid: str, **kw: Any) -> Stepper:
    """Start an acquire that must queue; returns it stopped where it would block."""
    clock: Callable[[], float] = kw.pop("clock", time.monotonic)
    s = Stepper(boss, core.acquire(request(vram, rid, **kw), boss.holder, clock)).run()
    assert s.blocked, f"{rid} was expected to queue, got {s.value or s.error!r}"
    assert state(boss.redis, rid, kw.get("pool", "default")) == "queued"
    return s


# --- placement -------------------------------------------------------------------------------


def test_named_device_and_best_fit(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB, cuda_index=0)
    boss.add_device("gpu1", 16 * GiB, cuda_index=1)
    boss.add_device("gpu2", 12 * GiB, cuda_index=2)
    assert boss.acquire(10 * GiB, device="gpu0").device == "gpu0"  # named: not the best fit
    # Left over after 10 GiB: gpu0 4, gpu1 6, gpu2 2 -> gpu2.
    assert boss.acquire(10 * GiB).device == "gpu2"
    # Left over after 4 GiB: gpu0 10 (14 free), gpu1 12, gpu2 cannot -> gpu0 wins the smaller left.
    assert boss.acquire(4 * GiB).device == "gpu0"
    # Now gpu0 has 10 GiB free, gpu1 16: 10 GiB fits both; gpu0 leaves 0.
    assert boss.acquire(10 * GiB).device == "gpu0"
    assert [d.used_mib for d in boss.devices()] == [24 * GiB, 0, 10 * GiB]


def test_best_fit_ties_break_by_name(boss: Boss) -> None:
    for name in ("gpu-b", "gpu-a", "gpu-c"):
        boss.add_device(name, 8 * GiB)
    assert [boss.acquire(8 * GiB).device for _ in range(3)] == ["gpu-a", "gpu-b", "gpu-c"]


def test_reserved_memory_is_never_leased(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB, reserved=4 * GiB)
    boss.acquire(20 * GiB)
    with pytest.raises(AcquireTimeout):
        boss.acquire(1, timeout=0)


def test_lease_env_and_fields(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB, cuda_index=3, host="box1")
    lease = boss.acquire("8GiB", priority="high", labels={"model": "llama"})
    assert lease.env["CUDA_VISIBLE_DEVICES"] == "3" == str(lease.cuda_index)
    assert lease.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert lease.env["GPUBOSS_LEASE_ID"] == lease.id
    assert lease.env["GPUBOSS_LEASE_TOKEN"] == str(lease.token)
    assert lease.env["GPUBOSS_DEVICE"] == "gpu0"
    assert (lease.mib, lease.priority, lease.labels) == (8 * GiB, 90, {"model": "llama"})
    listed = boss.leases()[0]
    assert (listed.id, listed.device_host, listed.labels) == (lease.id, "box1", {"model": "llama"})


def test_env_without_cuda_index_has_no_cuda_visible_devices(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(1)
    assert lease.cuda_index is None
    assert "CUDA_VISIBLE_DEVICES" not in lease.env
    assert "CUDA_DEVICE_ORDER" not in lease.env


def test_env_of_a_mig_slice_names_its_uuid(boss: Boss) -> None:
    boss.add_device("MIG-GPU-5a1b:1:0", 10 * GiB)
    lease = boss.acquire(1)
    assert lease.env["CUDA_VISIBLE_DEVICES"] == "MIG-GPU-5a1b/1/0"
    assert lease.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# --- the queue -------------------------------------------------------------------------------


def test_priority_then_fifo_and_only_granted_waiters_wake(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    holder = boss.acquire(16 * GiB)
    a = enqueue(boss, 8 * GiB, "a", priority="normal")
    b = enqueue(boss, 8 * GiB, "b", priority="high")
    c = enqueue(boss, 8 * GiB, "c", priority="normal")
    d = enqueue(boss, 8 * GiB, "d", priority="low")
    assert [x.id for x in boss.leases() if x.state == "queued"] == ["a", "b", "c", "d"]  # by expiry
    log = Events(boss.redis)

    boss.release(holder)
    assert log.new() == [
        {"event": "released", "lease": holder.id, "holder": "test", "mib": "16384", "device": "gpu0"},
        {"event": "granted", "lease": "b", "holder": "test", "device": "gpu0", "mib": "8192",
         "priority": "90", "token": str(holder.token + 5)},
        {"event": "granted", "lease": "a", "holder": "test", "device": "gpu0", "mib": "8192",
         "priority": "50", "token": str(holder.token + 6)},
    ]  # fmt: skip
    assert [wake_len(boss.redis, x) for x in "abcd"] == [1, 1, 0, 0]
    assert [state(boss.redis, x) for x in "abcd"] == ["active", "active", "queued", "queued"]
    assert (a.resume().lease.token, b.resume().lease.token) == (holder.token + 6, holder.token + 5)

    boss.release(b.lease)
    assert log.names() == ["released", "granted"]
    assert [wake_len(boss.redis, x) for x in "cd"] == [1, 0]
    assert c.resume().lease.device == "gpu0"
    assert d.resume().blocked  # still waiting: it polled and went back to its wake list
    boss.release(a.lease)
    assert d.resume().lease.mib == 8 * GiB


def test_no_barging_after_release(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    h1 = boss.acquire(8 * GiB)
    boss.acquire(8 * GiB)
    w = enqueue(boss, 12 * GiB, "w")
    log = Events(boss.redis)
    boss.release(h1)  # 8 GiB free: not enough for the waiter, which keeps the device blocked
    assert log.names() == ["released"]
    with pytest.raises(AcquireTimeout):
        boss.acquire(8 * GiB, timeout=0)  # the releaser comes straight back: refused
    with pytest.raises(AcquireTimeout):
        other(boss, "rival").acquire(1, timeout=0, priority=50)
    assert log.names() == []
    assert used(boss) == 8 * GiB
    assert w.resume().blocked


def test_release_hands_memory_to_waiter_before_releaser_returns(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    h = boss.acquire(16 * GiB)
    w = enqueue(boss, 16 * GiB, "w")
    boss.release(h)
    assert state(boss.redis, "w") == "active"
    with pytest.raises(AcquireTimeout):
        boss.acquire(16 * GiB, timeout=0)
    assert w.resume().lease.device == "gpu0"


def test_big_waiter_is_not_starved_by_later_small_ones(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    h = boss.acquire(10 * GiB)
    big = enqueue(boss, 12 * GiB, "big", priority=50)
    for prio in (50, 10, 0):
        with pytest.raises(AcquireTimeout):
            boss.acquire(4 * GiB, priority=prio, timeout=0)  # 6 GiB are free, but the big one waits
    small = enqueue(boss, 4 * GiB, "small", priority=50)
    boss.release(h)
    assert [state(boss.redis, x) for x in ("big", "small")] == ["active", "active"]
    assert big.resume().lease.mib == 12 * GiB
    assert small.resume().lease.mib == 4 * GiB
    assert used(boss) == 16 * GiB


def test_higher_priority_goes_ahead_of_a_waiter(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    boss.acquire(10 * GiB)
    big = enqueue(boss, 12 * GiB, "big", priority=50)
    assert boss.acquire(4 * GiB, priority=51, timeout=0).device == "gpu0"
    assert big.resume().blocked


def test_lower_priority_granted_on_a_device_the_waiter_can_never_use(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.add_device("gpu1", 24 * GiB)
    boss.acquire(20 * GiB)  # best fit: gpu1, the only one it fits
    enqueue(boss, 16 * GiB, "big", priority="high")  # only gpu1 can ever hold it
    low = boss.acquire(4 * GiB, priority="low", timeout=0)
    assert low.device == "gpu0"
    with pytest.raises(AcquireTimeout):
        boss.acquire(1, priority="low", device="gpu1", timeout=0)  # gpu1 is the waiter's


def test_waiter_naming_a_device_blocks_only_that_device(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    boss.add_device("gpu1", 16 * GiB)
    boss.acquire(16 * GiB, device="gpu0")
    enqueue(boss, 8 * GiB, "w", device="gpu0")
    assert boss.acquire(8 * GiB, timeout=0).device == "gpu1"


def test_blocked_waiter_thread_is_woken_by_release(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    h = boss.acquire(16 * GiB, ttl=60)
    # ttl=30 -> it would poll only every 10 s on its own: finishing within 5 s proves the wake.
    waiter = other(boss, "waiter")
    t, out = in_thread(lambda: waiter.acquire(8 * GiB, request_id="w", ttl=30))
    wait_for("w to queue", lambda: state(boss.redis, "w") == "queued")
    boss.release(h)
    t.join(5)
    assert not t.is_alive()
    assert "error" not in out, out
    lease = out["value"]
    assert (lease.id, lease.device, lease.info.holder) == ("w", "gpu0", "waiter")
    assert boss.redis.exists(POOL.wake("w")) == 0  # the granted waiter cleaned its wake list


# --- idempotency and fencing -----------------------------------------------------------------


def test_same_request_id_grants_once(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    first = boss.acquire(8 * GiB, request_id="job-1")
    log = Events(boss.redis)
    again = boss.acquire(8 * GiB, request_id="job-1")
    assert (again.id, again.token, again.device) == (first.id, first.token, first.device)
    assert used(boss) == 8 * GiB
    assert len(boss.leases()) == 1
    assert log.names() == []


def test_same_request_id_for_a_different_request_conflicts(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    boss.acquire(8 * GiB, request_id="job-1")
    log = Events(boss.redis)
    with pytest.raises(RequestConflict):
        other(boss, "someone-else").acquire(8 * GiB, request_id="job-1")
    with pytest.raises(RequestConflict):
        boss.acquire(4 * GiB, request_id="job-1")
    assert used(boss) == 8 * GiB
    assert log.names() == []


def test_fencing_tokens_strictly_increase_per_device(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    tokens = []
    for _ in range(3):
        lease = boss.acquire(8 * GiB, device="gpu0")
        tokens.append(lease.token)
        boss.release(lease)
    boss.remove_device("gpu0")
    boss.add_device("gpu0", 8 * GiB)
    tokens.append(boss.acquire(8 * GiB, device="gpu0").token)
    assert tokens == sorted(set(tokens))


# --- heartbeat and release -------------------------------------------------------------------


def test_heartbeat_returns_state_and_extends_expiry(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(1, ttl=30)
    before = lease.info.expires_at_ms
    assert before is not None
    deadline = lease.deadline
    wait_past(boss.redis, before - 30_000)  # let Redis's clock move on from the grant
    log = Events(boss.redis)
    info = boss.heartbeat(lease)
    assert info.state == "active"
    assert info.expires_at_ms is not None
    assert info.expires_at_ms > before
    assert int(boss.redis.zscore(POOL.expiry, lease.id) or 0) == info.expires_at_ms
    assert boss.leases()[0].expires_at_ms == info.expires_at_ms
    assert lease.deadline > deadline
    assert log.names() == []  # a heartbeat is not a transition


def test_wrong_token_is_refused_and_changes_nothing(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(8 * GiB, ttl=60)
    forged = copy.copy(lease)
    forged.token = lease.token + 1
    before = snapshot(boss.redis)
    with pytest.raises(LeaseNotHeld):
        boss.heartbeat(forged)
    with pytest.raises(LeaseNotHeld):
        boss.release(forged)
    assert snapshot(boss.redis) == before
    assert not lease.lost
    boss.release(lease)  # the real holder still can


def test_release_is_idempotent_for_the_holder(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(8 * GiB)
    log = Events(boss.redis)
    boss.release(lease)
    boss.release(lease)
    assert log.names() == ["released"]
    assert used(boss) == 0
    assert lease.lost  # released: no longer to be used
    assert state(boss.redis, lease.id) == "released"
    assert 0 < int(boss.redis.pttl(POOL.lease(lease.id))) <= 120_000  # lingers, then goes


def test_release_of_an_expired_lease_raises_lease_lost(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(8 * GiB, ttl=0.05, keepalive=False)
    assert lease.info.expires_at_ms is not None
    wait_past(boss.redis, lease.info.expires_at_ms)
    log = Events(boss.redis)
    with pytest.raises(LeaseLost):
        boss.release(lease)
    assert lease.lost
    assert state(boss.redis, lease.id) == "expired"
    assert log.names() == ["expired"]
    assert used(boss) == 0
    with pytest.raises(LeaseLost):
        boss.heartbeat(lease)


# --- timeouts and cancelling -----------------------------------------------------------------


def test_timeout_zero_on_a_full_device_leaves_no_trace(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB)
    before = snapshot(boss.redis)
    with pytest.raises(AcquireTimeout):
        boss.acquire(1, timeout=0, request_id="try")
    assert snapshot(boss.redis) == before
    assert boss.redis.exists(POOL.lease("try")) == 0


def test_timeout_waits_then_leaves_the_queue(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB)
    log = Events(boss.redis)
    started = time.monotonic()
    with pytest.raises(AcquireTimeout):
        boss.acquire(1, timeout=0.3, request_id="w")
    waited = time.monotonic() - started
    assert 0.3 <= waited < 3.0
    assert state(boss.redis, "w") == "cancelled"
    assert boss.redis.zcard(POOL.queue) == 0
    assert boss.redis.zscore(POOL.expiry, "w") is None
    assert boss.redis.exists(POOL.wake("w")) == 0
    assert log.names() == ["queued", "cancelled"]
    assert boss.status()[0].queued == 0


def test_waiter_granted_while_it_cancels_gets_the_lease(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    h = boss.acquire(8 * GiB)
    now = [0.0]
    s = Stepper(boss, core.acquire(request(8 * GiB, "w", timeout=1.0), boss.holder, lambda: now[0]))
    assert isinstance(s.step, core.Call)
    s.run_step()  # acquire -> queued
    assert isinstance(s.step, core.Command)
    s.run_step()  # woke up (nothing there) and polls again -> still queued
    now[0] = 5.0  # past the timeout: its next move is to cancel
    s.run_step()
    assert isinstance(s.step, core.Call)
    assert s.step.script == "cancel"
    boss.release(h)  # granted in the same instant
    assert state(boss.redis, "w") == "active"
    s.run_step()
    assert s.lease.device == "gpu0"
    assert state(boss.redis, "w") == "active"
    assert boss.redis.exists(POOL.wake("w")) == 0
    boss.release(s.lease)


def test_a_waiter_that_gives_up_lets_the_one_behind_it_in(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(6 * GiB)
    big = Stepper(boss, core.acquire(request(4 * GiB, "big"), boss.holder, lambda: 0.0)).run()
    small = Stepper(boss, core.acquire(request(2 * GiB, "small"), boss.holder, lambda: 0.0)).run()
    assert big.blocked
    assert small.blocked  # 2 GiB would fit, but the 4 GiB waiter ahead holds the device back
    assert state(boss.redis, "small") == "queued"
    _cancel(boss, "big")
    assert state(boss.redis, "big") == "cancelled"
    assert state(boss.redis, "small") == "active"  # granted by the cancel itself
    assert small.resume().lease.device == "gpu0"  # and woken with its grant
    assert used(boss) == 8 * GiB


def _cancel(boss: Boss, lease_id: str) -> None:
    reply = boss.script("cancel", POOL.script_keys(), [lease_id, boss.holder.name])
    assert core.parse_reply(reply, frozenset({"cancelled"}))[0] == "cancelled"


# --- expiry and reaping ----------------------------------------------------------------------


def test_reap_ends_expired_leases_and_abandoned_waiters(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    dead = boss.acquire(8 * GiB, ttl=0.1, keepalive=False)
    enqueue(boss, 8 * GiB, "gone", ttl=0.1)  # stops polling: abandoned
    log = Events(boss.redis)
    expiry = boss.redis.zrange(POOL.expiry, -1, -1, withscores=True)[0][1]
    wait_past(boss.redis, int(expiry))
    assert boss.reap() == 2
    assert (state(boss.redis, dead.id), state(boss.redis, "gone")) == ("expired", "abandoned")
    assert sorted(log.names()) == ["abandoned", "expired"]
    assert used(boss) == 0
    assert boss.leases() == []
    assert boss.reap() == 0


def test_reap_grants_the_waiter_behind_an_expired_holder(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    dead = boss.acquire(8 * GiB, ttl=0.1, keepalive=False)
    w = enqueue(boss, 8 * GiB, "w", ttl=60)
    log = Events(boss.redis)
    assert dead.info.expires_at_ms is not None
    wait_past(boss.redis, dead.info.expires_at_ms)
    assert boss.reap() == 1
    assert log.names() == ["expired", "granted"]
    assert wake_len(boss.redis, "w") == 1
    assert w.resume().lease.device == "gpu0"


def test_every_script_reaps_in_passing(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    dead = boss.acquire(8 * GiB, ttl=0.1, keepalive=False)
    assert dead.info.expires_at_ms is not None
    wait_past(boss.redis, dead.info.expires_at_ms)
    log = Events(boss.redis)
    fresh = boss.acquire(8 * GiB, timeout=0)  # no reap() call
    assert log.names() == ["expired", "granted"]
    assert state(boss.redis, dead.id) == "expired"
    assert used(boss) == 8 * GiB
    # A read-only listing reaps too.
    boss.release(fresh)
    short = boss.acquire(1, ttl=0.05, keepalive=False)
    assert short.info.expires_at_ms is not None
    wait_past(boss.redis, short.info.expires_at_ms)
    assert boss.status()[0].granted == 0
    assert state(boss.redis, short.id) == "expired"


def test_memory_reaped_in_passing_is_not_granted_twice(boss: Boss) -> None:
    boss.add_device("gpu0", 16 * GiB)
    dead = boss.acquire(16 * GiB, ttl=0.1, keepalive=False)
    w = enqueue(boss, 16 * GiB, "w", ttl=60)
    assert dead.info.expires_at_ms is not None
    wait_past(boss.redis, dead.info.expires_at_ms)
    with contextlib.suppress(AcquireTimeout):
        boss.acquire(16 * GiB, timeout=0)  # reaps dead, grants w, and must find no room left
    assert state(boss.redis, "w") == "active"
    assert used(boss) == 16 * GiB
    assert w.resume().lease.device == "gpu0"


# --- operators -------------------------------------------------------------------------------


def test_force_release_searches_pools_and_grants_the_waiter(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)  # pool "default"
    boss.add_device("gpu9", 8 * GiB, pool="batch")
    stuck = boss.acquire(8 * GiB, pool="batch")
    w = enqueue(boss, 8 * GiB, "w", pool="batch")
    log = Events(boss.redis, "batch")
    info = other(boss, "operator").force_release(stuck.id)  # no pool given
    assert (info.state, info.pool, info.reason) == ("force_released", "batch", "operator")
    assert [(e["event"], e.get("reason")) for e in log.new()] == [
        ("force_released", "operator"),
        ("granted", None),
    ]
    assert w.resume().lease.pool == "batch"
    with pytest.raises(LeaseLost):
        boss.heartbeat(stuck)
    assert stuck.lost


def test_force_release_of_a_waiter_removes_and_wakes_it(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB)
    w = enqueue(boss, 8 * GiB, "w")
    assert boss.force_release("w", pool="default").state == "force_released"
    assert boss.redis.zcard(POOL.queue) == 0
    assert wake_len(boss.redis, "w") == 1
    w.resume()
    assert isinstance(w.error, LeaseLost)


def test_remove_device_refused_while_leased(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    lease = boss.acquire(1)
    before = snapshot(boss.redis)
    with pytest.raises(DeviceBusy):
        boss.remove_device("gpu0")
    assert snapshot(boss.redis) == before
    boss.release(lease)
    log = Events(boss.redis)
    boss.remove_device("gpu0")
    assert log.names() == ["device_removed"]
    assert boss.devices() == []
    assert boss.redis.exists(POOL.device("gpu0"), POOL.device_leases("gpu0")) == 0


def test_remove_device_with_force_releases_its_leases(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.add_device("gpu1", 8 * GiB)
    a = boss.acquire(4 * GiB, device="gpu1")
    b = boss.acquire(4 * GiB, device="gpu1")
    keep = boss.acquire(4 * GiB, device="gpu0")
    log = Events(boss.redis)
    boss.remove_device("gpu1", force=True)
    assert sorted((e["event"], e.get("lease"), e.get("reason")) for e in log.new()) == sorted(
        [
            ("force_released", a.id, "device_removed"),
            ("force_released", b.id, "device_removed"),
            ("device_removed", None, None),
        ]
    )
    assert [d.name for d in boss.devices()] == ["gpu0"]
    assert [x.id for x in boss.leases()] == [keep.id]
    with pytest.raises(LeaseLost):
        boss.heartbeat(a)


def test_waiter_on_a_removed_device_gets_device_not_found(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.add_device("gpu1", 8 * GiB)
    boss.acquire(8 * GiB, device="gpu1")
    w = enqueue(boss, 8 * GiB, "w", device="gpu1")
    boss.remove_device("gpu1", force=True)
    assert state(boss.redis, "w") == "cancelled"
    assert wake_len(boss.redis, "w") == 1
    w.resume()
    assert isinstance(w.error, DeviceNotFound)


def test_removing_the_last_device_wakes_its_waiters(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB)
    w = enqueue(boss, 8 * GiB, "w", device="gpu0")
    boss.remove_device("gpu0", force=True)
    assert state(boss.redis, "w") == "cancelled"
    assert wake_len(boss.redis, "w") == 1
    w.resume()
    assert isinstance(w.error, DeviceNotFound)


def test_add_device_updates_size_and_keeps_usage(boss: Boss) -> None:
    log = Events(boss.redis)
    assert boss.add_device("gpu0", 16 * GiB, cuda_index=0) is True
    lease = boss.acquire(8 * GiB)
    w = enqueue(boss, 16 * GiB, "w")
    assert log.names() == ["device_added", "granted", "queued"]
    assert boss.add_device("gpu0", 24 * GiB, reserved=0, cuda_index=0) is False
    assert log.names() == ["device_updated", "granted"]  # the bigger device fits the waiter now
    (dev,) = boss.devices()
    assert (dev.total_mib, dev.used_mib, dev.leases, dev.free_mib) == (24 * GiB, 24 * GiB, 2, 0)
    assert w.resume().lease.device == "gpu0"
    boss.release(lease)
    assert used(boss) == 16 * GiB


def test_status_devices_and_leases_numbers(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB, reserved=2 * GiB, cuda_index=0, host="h0")
    boss.add_device("gpu1", 12 * GiB, cuda_index=1, host="h1")
    boss.add_device("gpuX", 80 * GiB, pool="big")
    a = boss.acquire(20 * GiB)
    b = boss.acquire(10 * GiB)
    enqueue(boss, 12 * GiB, "w")
    (st,) = boss.status("default")
    assert (st.pool, st.granted, st.queued) == ("default", 2, 1)
    g0, g1 = st.devices
    assert (g0.name, g0.host, g0.cuda_index, g0.budget_mib, g0.used_mib, g0.free_mib, g0.leases) == (
        "gpu0", "h0", 0, 22 * GiB, 20 * GiB, 2 * GiB, 1,
    )  # fmt: skip
    assert (g1.name, g1.budget_mib, g1.used_mib, g1.free_mib, g1.leases) == (
        "gpu1", 12 * GiB, 10 * GiB, 2 * GiB, 1,
    )  # fmt: skip
    assert st.to_dict()["devices"][0]["budget_mib"] == 22 * GiB
    assert [s.pool for s in boss.status()] == ["big", "default"]
    assert [d.name for d in boss.devices()] == ["gpuX", "gpu0", "gpu1"]
    listed = {x.id: x for x in boss.leases("default")}
    assert set(listed) == {a.id, b.id, "w"}
    assert (listed[a.id].state, listed[a.id].device, listed[a.id].token) == ("active", a.device, a.token)
    assert (listed["w"].state, listed["w"].token, listed["w"].mib) == ("queued", None, 12 * GiB)
    assert boss.leases("big") == []
    assert len(boss.leases()) == 3


def test_full_life_cycle_event_stream(boss: Boss) -> None:
    log = Events(boss.redis)
    boss.add_device("gpu0", 8 * GiB)
    a = boss.acquire(8 * GiB, priority="high")
    enqueue(boss, 8 * GiB, "w")
    boss.heartbeat(a)
    boss.release(a)
    boss.force_release("w")
    boss.add_device("gpu0", 8 * GiB)
    boss.remove_device("gpu0")
    got = log.new()
    assert [e["event"] for e in got] == [
        "device_added", "granted", "queued", "released", "granted", "force_released",
        "device_updated", "device_removed",
    ]  # fmt: skip
    assert got[1] == {
        "event": "granted", "lease": a.id, "holder": "test", "device": "gpu0", "mib": "8192",
        "priority": "90", "token": str(a.token),
    }  # fmt: skip
    assert got[2] == {
        "event": "queued", "lease": "w", "holder": "test", "mib": "8192", "priority": "50", "want": "",
    }  # fmt: skip
    assert got[0]["device"] == got[6]["device"] == got[7]["device"] == "gpu0"


# --- the lease context -----------------------------------------------------------------------


def test_lease_context_releases_on_exit(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    with boss.lease(8 * GiB) as lease:
        assert state(boss.redis, lease.id) == "active"
        assert used(boss) == 8 * GiB
    assert state(boss.redis, lease.id) == "released"
    assert used(boss) == 0


def test_lease_context_releases_on_exception(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    with pytest.raises(ZeroDivisionError), boss.lease(8 * GiB) as lease:
        _ = 1 / 0
    assert state(boss.redis, lease.id) == "released"
    assert used(boss) == 0


def test_lease_context_reports_a_lease_taken_away(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    log = Events(boss.redis)
    ctx = boss.lease(8 * GiB, ttl=0.3)
    with pytest.raises(LeaseLost), ctx as lease:
        other(boss, "operator").force_release(lease.id)
    assert lease.lost
    assert state(boss.redis, lease.id) == "force_released"
    assert log.names() == ["granted", "force_released"]


def test_lease_context_error_in_flight_is_kept_and_loss_noted(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)

    def body() -> None:
        with boss.lease(8 * GiB) as lease:
            boss.force_release(lease.id)
            raise KeyError("boom")

    with pytest.raises(KeyError) as caught:
        body()
    assert any("lost" in note for note in getattr(caught.value, "__notes__", []))


def test_lease_lost_when_not_renewed_before_the_local_deadline(boss: Boss) -> None:
    # The client's clock is a parameter: jump it past the local deadline, as if the process had
    # been paused, and the lease must count as lost although Redis still holds it.
    boss.add_device("gpu0", 8 * GiB)
    now = [1000.0]
    paused = Boss(boss.redis, holder="paused", clock=lambda: now[0])
    ctx = paused.lease(8 * GiB, ttl=60)
    lease = ctx.__enter__()
    assert not lease.lost
    assert lease.deadline <= 1000.0 + 60 - core.fence_margin(60)
    now[0] = lease.deadline
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease.check()
    assert state(boss.redis, lease.id) == "active"  # Redis still has it: the client fences itself
    with pytest.raises(LeaseLost):
        ctx.__exit__(None, None, None)
    assert state(boss.redis, lease.id) == "released"  # the memory still goes back


def test_bytes_client_works(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)  # decode_responses=False
    client.flushdb()
    try:
        boss = Boss(client, holder="bytes")
        boss.add_device("gpu0", 8 * GiB, cuda_index=0)
        lease = boss.acquire(4 * GiB, labels={"k": "v"})
        assert lease.env["CUDA_VISIBLE_DEVICES"] == "0"
        assert boss.leases()[0].labels == {"k": "v"}
        assert boss.status()[0].devices[0].used_mib == 4 * GiB
        boss.heartbeat(lease)
        boss.release(lease)
        assert boss.force_release(lease.id).state == "released"
    finally:
        client.close()


# --- AsyncBoss -------------------------------------------------------------------------------


async def await_for(what: str, pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)  # polling Redis with a deadline: there is nothing to block on


def test_async_acquire_heartbeat_release(tier: Tier) -> None:
    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="aio") as boss:
            assert await boss.add_device("gpu0", 16 * GiB, cuda_index=2) is True
            lease = await boss.acquire("8GiB")
            assert (lease.device, lease.env["CUDA_VISIBLE_DEVICES"]) == ("gpu0", "2")
            assert (await boss.heartbeat(lease)).state == "active"
            assert [x.id for x in await boss.leases()] == [lease.id]
            assert (await boss.devices())[0].used_mib == 8 * GiB
            with pytest.raises(AcquireTimeout):
                await boss.acquire(16 * GiB, timeout=0)
            await boss.release(lease)
            await boss.release(lease)
            assert (await boss.status())[0].granted == 0
            assert await boss.reap() == 0
            await boss.remove_device("gpu0")
            assert await boss.devices() == []

    asyncio.run(main())
    assert tier.sync.smembers("gpuboss:pools") == set()


def test_async_lease_context(tier: Tier) -> None:
    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="aio") as boss:
            await boss.add_device("gpu0", 16 * GiB)
            async with boss.lease(8 * GiB) as lease:
                assert state(tier.sync, lease.id) == "active"
            assert state(tier.sync, lease.id) == "released"
            with pytest.raises(ValueError, match="boom"):
                async with boss.lease(8 * GiB) as failing:
                    raise ValueError("boom")
            assert state(tier.sync, failing.id) == "released"
            with pytest.raises(LeaseLost):
                async with boss.lease(8 * GiB, ttl=0.3) as lost:
                    await boss.force_release(lost.id)
            assert lost.lost
            assert state(tier.sync, lost.id) == "force_released"
            assert (await boss.devices())[0].used_mib == 0

    asyncio.run(main())


def test_async_waiter_woken_by_release(tier: Tier) -> None:
    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="aio") as boss:
            await boss.add_device("gpu0", 16 * GiB)
            h = await boss.acquire(16 * GiB, ttl=60)
            # ttl=30: left alone it would poll every 10 s, so done within 5 s means woken.
            task = asyncio.create_task(boss.acquire(8 * GiB, request_id="w", ttl=30))
            await await_for("w to queue", lambda: state(tier.sync, "w") == "queued")
            await boss.release(h)
            lease = await asyncio.wait_for(task, 5)
            assert (lease.id, lease.device) == ("w", "gpu0")

    asyncio.run(main())


def test_async_timeout_leaves_the_queue(tier: Tier) -> None:
    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="aio") as boss:
            await boss.add_device("gpu0", 8 * GiB)
            await boss.acquire(8 * GiB)
            started = time.monotonic()
            with pytest.raises(AcquireTimeout):
                await boss.acquire(1, timeout=0.3, request_id="w")
            assert time.monotonic() - started >= 0.3

    asyncio.run(main())
    assert state(tier.sync, "w") == "cancelled"
    assert tier.sync.zcard(POOL.queue) == 0


def test_add_device_zero_reserved_in_any_unit(boss: Boss) -> None:
    boss.add_device("gpu0", "24GiB", reserved="0GiB")
    assert boss.devices()[0].reserved_mib == 0
