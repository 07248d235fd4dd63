"""Exclusive leases (``exclusive=True``) and gang leases (``devices=N``), on real Redis and fakeredis.

An exclusive lease takes a device with nothing leased and nothing promised on it, keeps everyone
else off it while held (the device hash names it in ``exclusive``), and may evict only when every
lease on the device could go. A gang lease takes the same MiB on N devices of one host, all or
nothing, under one id and one token; it never evicts, waits in the queue like anyone, and is
freed on every device at once. After each scenario :func:`check_books` recomputes every device's
``used_mib``, leases set and ``exclusive`` field from the live leases.

Waiters are started either by driving the core's acquire by hand (:class:`Stepper`, stopped where
a client would block in ``BLPOP``), or by a real blocking ``acquire`` in a thread or task that a
release wakes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from support import (
    Events,
    Stepper,
    Tier,
    claimed,
    dump_all,
    field,
    in_thread,
    join_evict_thread,
    other,
    redis_ms,
    snapshot,
    state,
    used,
    wait_for,
)

from gpuboss_client import (
    AcquireTimeout,
    AsyncBoss,
    BadRequest,
    Boss,
    InsufficientVram,
    Lease,
    LeaseLost,
    Plan,
    PoolKeys,
)
from gpuboss_client import _core as core
from gpuboss_client._core import parse_reply

GiB = 1024
POOL = PoolKeys("default")


# --- helpers ---------------------------------------------------------------------------------


def exclusive_of(r: redis.Redis, device: str = "gpu0") -> str | None:
    """The lease holding ``device`` exclusively, if any."""
    value = r.hget(POOL.device(device), "exclusive")
    return None if value is None else str(value)


def check_books(r: redis.Redis) -> None:
    """Every device's used_mib, leases set and exclusive field agree with the live leases."""
    devices = sorted(str(d) for d in r.smembers(POOL.devices))
    held: dict[str, set[str]] = {d: set() for d in devices}
    mib = dict.fromkeys(devices, 0)
    excl: dict[str, str | None] = dict.fromkeys(devices)
    for lease_id in r.zrange(POOL.expiry, 0, -1):
        lease: dict[str, str] = r.hgetall(POOL.lease(str(lease_id)))  # type: ignore[assignment]
        if lease["state"] == "queued":
            continue
        for name in lease["device"].split(","):
            held[name].add(str(lease_id))
            mib[name] += int(lease["mib"])
            if lease.get("exclusive") == "1":
                excl[name] = str(lease_id)
    for name in devices:
        assert r.smembers(POOL.device_leases(name)) == held[name], name
        assert used(r, name) == mib[name], name
        assert exclusive_of(r, name) == excl[name], name
        if excl[name] is not None:
            assert held[name] == {excl[name]}, f"{name} is shared while held exclusively"


@contextmanager
def unchanged(r: redis.Redis) -> Iterator[None]:
    before = dump_all(r)
    assert before, "the scenario should have written keys"
    yield
    assert dump_all(r) == before


def host(boss: Boss, name: str, *sizes: int | str, first: int = 0) -> list[str]:
    """Add devices ``gpu<first>``... of the given sizes on host ``name``, CUDA index = position."""
    names = []
    for i, size in enumerate(sizes):
        dev = f"gpu{first + i}"
        boss.add_device(dev, size, host=name, cuda_index=i)
        names.append(dev)
    return names


def request(
    vram: int | str,
    rid: str,
    *,
    priority: int | str = "normal",
    device: str | None = None,
    exclusive: bool = False,
    devices: int = 1,
) -> core.AcquireRequest:
    return core.AcquireRequest.build(
        vram=vram, vram_gb=None, priority=priority, device=device, pool="default", ttl=60.0,
        timeout=None, labels=None, request_id=rid, exclusive=exclusive, devices=devices,
    )  # fmt: skip


def queue(boss: Boss, vram: int | str, rid: str, **kw: Any) -> Stepper:
    """Start an acquire that must wait; returns it stopped where it would block."""
    s = Stepper(boss, request(vram, rid, **kw))
    assert s.blocked, f"{rid} was expected to wait, got {s.value!r}"
    assert state(boss.redis, rid) == "queued"
    return s


def load(boss: Boss, rid: str, vram: int | str, priority: int | str, **kw: Any) -> Lease:
    """A lease kept warm (idle) between uses."""
    lease = boss.acquire(vram, priority=priority, ttl=60, request_id=rid, **kw)
    lease.idle()
    return lease


def joined(t: threading.Thread, out: dict[str, Any]) -> Any:
    t.join(5)
    assert not t.is_alive(), "the waiter was not woken"
    assert "error" not in out, out
    return out["value"]


def end(boss: Boss, lease: Lease, how: str) -> str:
    """End ``lease`` by release, by expiry (it was granted with a short ttl) or by force;
    returns the terminal state."""
    r = boss.redis
    if how == "release":
        boss.release(lease)
        return "released"
    if how == "force":
        assert boss.force_release(lease.id).state == "force_released"
        return "force_released"
    wait_for("the lease's expiry", lambda: redis_ms(r) > int(field(r, lease.id, "expires_at") or 0))
    assert boss.reap() == 1
    return "expired"


# --- exclusive leases ------------------------------------------------------------------------


def test_exclusive_goes_to_an_empty_device_and_keeps_everyone_else_off_it(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    boss.add_device("gpu1", "24GiB")
    small = boss.acquire("1GiB", device="gpu0", ttl=60)
    # Best fit alone would pick gpu0 (7 GiB free); an exclusive request needs an empty device.
    assert boss.plan("4GiB") == Plan("grant", "gpu0")
    assert boss.plan("4GiB", exclusive=True) == Plan("grant", "gpu1")
    log = Events(r)

    excl = boss.acquire("4GiB", exclusive=True, ttl=60, timeout=0, request_id="excl")

    assert excl.device == "gpu1"
    assert exclusive_of(r, "gpu1") == "excl"
    assert exclusive_of(r, "gpu0") is None
    assert field(r, "excl", "exclusive") == "1"
    assert log.pairs() == [("granted", "excl")]
    # 20 GiB of gpu1 are free, yet nothing else is granted there: the rest goes to gpu0 or waits.
    assert boss.acquire("2GiB", timeout=0).device == "gpu0"
    assert boss.plan("6GiB") == Plan("wait", ahead=0)
    assert boss.plan("1GiB", device="gpu1", priority=100) == Plan("wait", ahead=0)
    with pytest.raises(AcquireTimeout):
        boss.acquire("6GiB", priority=100, timeout=0)
    for exclusive in (False, True):
        with pytest.raises(AcquireTimeout):
            boss.acquire("1GiB", device="gpu1", priority=100, exclusive=exclusive, timeout=0)
    # No second exclusive lease: gpu0 is not empty and gpu1 is held.
    assert boss.plan("1GiB", exclusive=True) == Plan("wait", ahead=0)
    with pytest.raises(AcquireTimeout):
        boss.acquire("1GiB", exclusive=True, timeout=0)
    assert [d.leases for d in boss.devices()] == [2, 1]
    check_books(r)

    boss.release(excl)
    assert exclusive_of(r, "gpu1") is None
    assert boss.acquire("6GiB", timeout=0).device == "gpu1"
    boss.release(small)
    check_books(r)


@pytest.mark.parametrize("how", ["release", "expire", "force"])
def test_exclusive_field_goes_when_the_lease_ends(boss: Boss, how: str) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    excl = boss.acquire(
        "2GiB", exclusive=True, ttl=0.05 if how == "expire" else 60, keepalive=False, request_id="x"
    )
    assert exclusive_of(r) == "x"
    if how != "expire":  # (with a short ttl, this could already find it expired)
        with pytest.raises(AcquireTimeout):
            boss.acquire("1GiB", timeout=0)

    assert end(boss, excl, how) == state(r, "x")

    assert exclusive_of(r) is None
    assert (used(r), r.scard(POOL.device_leases("gpu0"))) == (0, 0)
    check_books(r)
    again = boss.acquire("8GiB", exclusive=True, timeout=0, request_id="again")
    assert exclusive_of(r) == "again"
    boss.release(again)
    check_books(r)


def test_exclusive_waiter_is_woken_when_its_device_empties(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    a = boss.acquire("2GiB", ttl=60)
    b = boss.acquire("2GiB", ttl=60)
    # ttl=30: it would poll only every 10 s on its own; returning within 5 s proves the wake-up.
    t, out = in_thread(lambda: other(boss, "x").acquire("4GiB", exclusive=True, ttl=30, request_id="x"))
    wait_for("x to queue", lambda: state(r, "x") == "queued")
    boss.release(a)
    assert state(r, "x") == "queued"  # 14 GiB free, but the device is not empty yet
    boss.release(b)
    lease = joined(t, out)
    assert (lease.id, lease.device, exclusive_of(r)) == ("x", "gpu0", "x")
    check_books(r)


def test_exclusive_evicts_when_every_lease_on_the_device_is_a_victim(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    warm = load(boss, "warm", "4GiB", "low")
    batch = boss.acquire("4GiB", priority="low", preemptible=True, ttl=60, request_id="batch")
    # 8 GiB are free and a plain request fits beside them; an exclusive one must clear the device.
    assert boss.plan("1GiB", priority="normal") == Plan("grant", "gpu0")
    assert boss.plan("1GiB", priority="normal", exclusive=True) == Plan("evict", "gpu0", ("warm", "batch"))
    log = Events(r)

    excl = queue(boss, "1GiB", "excl", exclusive=True)

    assert log.pairs() == [("queued", "excl"), ("evicting", "warm"), ("evicting", "batch")]
    assert claimed(r) > 0
    with pytest.raises(AcquireTimeout):  # promised to excl: nobody else is granted there
        boss.acquire("1GiB", priority="low", timeout=0)
    boss.release(warm)
    assert state(r, "excl") == "queued"
    boss.release(batch)
    lease = excl.woken()
    assert (lease.device, exclusive_of(r), claimed(r)) == ("gpu0", "excl", 0)
    check_books(r)


@pytest.mark.parametrize(
    "blocker",
    [
        "active",  # in use and not preemptible: never a victim
        "preemptible-equal",  # preemptible, but not of lower priority
    ],
)
def test_exclusive_evicts_nobody_while_one_lease_cannot_go(boss: Boss, blocker: str) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    warm = load(boss, "warm", "4GiB", "low")
    keeper = boss.acquire(
        "1GiB", priority="normal", preemptible=blocker != "active", ttl=60, request_id="keeper"
    )
    assert boss.plan("1GiB", priority="normal", exclusive=True) == Plan("wait", ahead=0)
    log = Events(r)
    queue(boss, "1GiB", "excl", exclusive=True)
    assert log.pairs() == [("queued", "excl")]
    assert [state(r, x) for x in ("warm", "keeper")] == ["idle", "active"]
    assert claimed(r) == 0
    # Once the keeper is gone, the warm lease is the only one left: now it is evicted.
    boss.release(keeper)
    assert state(r, "warm") == "evicting"
    boss.release(warm)
    assert state(r, "excl") == "active"
    check_books(r)


@pytest.mark.parametrize(("count", "evicts"), [(32, True), (33, False)])
def test_exclusive_eviction_looks_at_32_evictable_leases(boss: Boss, count: int, evicts: bool) -> None:
    r = boss.redis
    boss.add_device("gpu0", "64GiB")
    warm_ids = [f"w{i:02d}" for i in range(count)]
    for rid in warm_ids:
        load(boss, rid, 64, "low")
    plan = boss.plan("1GiB", exclusive=True)
    if evicts:
        assert plan.outcome == "evict"
        assert sorted(plan.victims) == warm_ids
    else:  # the 33rd is beyond what one plan looks at: the device cannot be cleared
        assert plan == Plan("wait", ahead=0)
    queue(boss, "1GiB", "excl", exclusive=True)
    assert sum(state(r, x) == "evicting" for x in warm_ids) == (count if evicts else 0)


def test_exclusive_does_not_evict_where_memory_is_promised_to_another_request(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    warm = load(boss, "warm", "8GiB", "low")
    first = queue(boss, "16GiB", "first", priority="normal")  # evicts warm, claims the device
    assert state(r, "warm") == "evicting"
    assert claimed(r) == 16 * GiB
    before = snapshot(r)
    assert boss.plan("1GiB", priority="high", exclusive=True) == Plan("wait", ahead=0)
    with pytest.raises(AcquireTimeout):
        boss.acquire("1GiB", priority="high", exclusive=True, timeout=0)
    assert snapshot(r) == before
    boss.release(warm)
    assert first.woken().device == "gpu0"
    check_books(r)


def test_exclusive_claim_keeps_the_device_from_a_higher_priority_request(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    warm = load(boss, "warm", "4GiB", "low")
    excl = queue(boss, "4GiB", "excl", priority="normal", exclusive=True)
    assert state(r, "warm") == "evicting"
    # The device is being cleared for excl: nobody else may be granted on it meanwhile.
    with pytest.raises(AcquireTimeout):
        boss.acquire("4GiB", priority="high", timeout=0, request_id="urgent")
    boss.release(warm)
    assert excl.woken().device == "gpu0"


@pytest.mark.parametrize(("vram", "exclusive"), [("1GiB", False), ("16GiB", False), ("1GiB", True)])
def test_an_idle_exclusive_lease_is_evicted_for_a_higher_priority_request(
    boss: Boss, vram: str, exclusive: bool
) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    load(boss, "warm", "16GiB", "low", exclusive=True)
    assert boss.plan(vram, priority="high", exclusive=exclusive) == Plan("evict", "gpu0", ("warm",))
    waiter = queue(boss, vram, "next", priority="high", exclusive=exclusive)
    assert state(r, "warm") == "evicting"
    boss.force_release("warm")
    assert waiter.woken().device == "gpu0"
    assert exclusive_of(r) == ("next" if exclusive else None)
    check_books(r)


# --- gang leases -----------------------------------------------------------------------------


def test_gang_lease_holds_the_same_mib_on_n_devices_under_one_id_and_token(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "16GiB")
    log = Events(r)

    lease = boss.acquire("6GiB", devices=2, ttl=60, request_id="gang")

    assert lease.devices == ("gpu0", "gpu1")
    assert lease.device == "gpu0"
    assert lease.cuda_indexes == (0, 1)
    assert lease.cuda_index == 0
    assert lease.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert lease.env["GPUBOSS_DEVICE"] == "gpu0,gpu1"
    assert lease.env["GPUBOSS_LEASE_TOKEN"] == str(lease.token)
    assert (field(r, "gang", "device"), field(r, "gang", "cuda_index")) == ("gpu0,gpu1", "0,1")
    assert (field(r, "gang", "gang"), field(r, "gang", "device_host")) == ("2", "node-a")
    assert [(e["event"], e["device"], e["mib"], e["token"]) for e in log.new()] == [
        ("granted", "gpu0,gpu1", str(6 * GiB), str(lease.token))
    ]
    assert [(d.name, d.used_mib, d.leases) for d in boss.devices()] == [
        ("gpu0", 6 * GiB, 1), ("gpu1", 6 * GiB, 1),
    ]  # fmt: skip
    (info,) = boss.leases()
    assert (info.id, info.devices, info.cuda_indexes, info.token) == (
        "gang",
        ("gpu0", "gpu1"),
        (0, 1),
        lease.token,
    )
    check_books(r)
    assert boss.heartbeat(lease).state == "active"

    boss.release(lease)  # one release frees both
    assert [(d.used_mib, d.leases) for d in boss.devices()] == [(0, 0), (0, 0)]
    assert [(e["event"], e["device"]) for e in log.new()] == [("released", "gpu0,gpu1")]
    check_books(r)


def test_gang_of_one_is_a_plain_lease(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB")
    lease = boss.acquire("4GiB", devices=1, request_id="one")
    assert (lease.devices, field(r, "one", "device"), field(r, "one", "gang")) == (("gpu0",), "gpu0", None)
    check_books(r)


def test_gang_goes_to_the_host_whose_best_devices_leave_least_over(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "24GiB", "12GiB")  # gpu0 gpu1 gpu2
    host(boss, "node-b", "10GiB", "11GiB", first=3)  # gpu3 gpu4
    host(boss, "node-c", "8GiB", first=5)  # gpu5: fits best, but alone on its host
    # 8 GiB on 2 devices: node-a's best two (12, 16) leave 4 + 8 = 12 GiB; node-b leaves 2 + 3 = 5.
    assert boss.plan("8GiB", devices=2) == Plan("grant", "gpu3,gpu4")
    first = boss.acquire("8GiB", devices=2, timeout=0)
    assert (first.devices, first.info.device_host, first.cuda_indexes) == (("gpu3", "gpu4"), "node-b", (0, 1))
    # node-b is full now: on node-a the two that fit best, never the 24 GiB one.
    assert boss.plan("8GiB", devices=2) == Plan("grant", "gpu2,gpu0")
    second = boss.acquire("8GiB", devices=2, timeout=0)
    assert (second.devices, second.cuda_indexes, second.env["CUDA_VISIBLE_DEVICES"]) == (
        ("gpu2", "gpu0"), (2, 0), "2,0",
    )  # fmt: skip
    # Three on one host: only node-a has three devices; two of them are 8 GiB short now.
    assert boss.plan("4GiB", devices=3) == Plan("grant", "gpu2,gpu0,gpu1")
    assert boss.plan("5GiB", devices=3) == Plan("wait", ahead=0)
    assert [used(r, d) for d in ("gpu0", "gpu1", "gpu2", "gpu3", "gpu4", "gpu5")] == [
        8 * GiB,
        0,
        8 * GiB,
        8 * GiB,
        8 * GiB,
        0,
    ]
    check_books(r)


@pytest.mark.parametrize(
    ("n", "vram"),
    [
        (3, "4GiB"),  # no host has three devices
        (2, "12GiB"),  # node-a has two, but one of them is too small
        (2, "20GiB"),  # bigger than any device
    ],
)
def test_gang_that_can_never_fit_fails_at_once(boss: Boss, n: int, vram: str) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "8GiB")
    host(boss, "node-b", "16GiB", first=2)  # with node-a's gpu0, two of 16 GiB, but not on one host
    before = snapshot(r)
    plan = boss.plan(vram, devices=n)
    assert (plan.outcome, plan.largest_mib) == ("never", 16 * GiB)
    with pytest.raises(InsufficientVram):
        boss.acquire(vram, devices=n)  # no timeout: it would wait forever otherwise
    assert snapshot(r) == before


def test_gang_waits_blocks_its_devices_and_is_woken_all_or_nothing(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "16GiB")
    a = boss.acquire("12GiB", device="gpu0", priority="low", ttl=60)
    assert boss.plan("8GiB", devices=2) == Plan("wait", ahead=0)
    # ttl=30: it would poll only every 10 s on its own; returning within 5 s proves the wake-up.
    t, out = in_thread(lambda: other(boss, "trainer").acquire("8GiB", devices=2, ttl=30, request_id="g"))
    wait_for("the gang to queue", lambda: state(r, "g") == "queued")
    assert [used(r, "gpu0"), used(r, "gpu1")] == [12 * GiB, 0]  # nothing taken on gpu1 meanwhile
    # gpu1 is free, but the gang waits for it: nobody of its priority or lower takes it.
    assert boss.plan("4GiB", priority="normal") == Plan("wait", ahead=1)
    with pytest.raises(AcquireTimeout):
        boss.acquire("4GiB", priority="normal", timeout=0)
    with pytest.raises(AcquireTimeout):
        boss.acquire("1GiB", device="gpu1", priority="low", timeout=0)
    log = Events(r)

    boss.release(a)

    lease = joined(t, out)
    assert (lease.id, lease.devices, lease.cuda_indexes) == ("g", ("gpu0", "gpu1"), (0, 1))
    assert lease.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert [(e["event"], e.get("device")) for e in log.new()] == [
        ("released", "gpu0"), ("granted", "gpu0,gpu1"),
    ]  # fmt: skip
    assert r.exists(POOL.wake("g")) == 0
    check_books(r)
    other(boss, "trainer").release(lease)
    check_books(r)


def test_gang_never_evicts(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "8GiB", "8GiB")
    warm = load(boss, "warm", "8GiB", "low", device="gpu0")
    batch = boss.acquire("8GiB", device="gpu1", priority="low", preemptible=True, ttl=60, request_id="batch")
    # A single request of the same priority would evict either; a gang of two evicts nobody.
    assert boss.plan("8GiB", priority=100).outcome == "evict"
    assert boss.plan("8GiB", priority=100, devices=2) == Plan("wait", ahead=0)
    log = Events(r)
    gang = queue(boss, "8GiB", "gang", priority=100, devices=2)
    assert log.pairs() == [("queued", "gang")]
    assert [state(r, "warm"), state(r, "batch")] == ["idle", "active"]
    assert claimed(r, "gpu0") + claimed(r, "gpu1") == 0
    boss.release(warm)
    assert state(r, "gang") == "queued"  # one device free is not enough: all or nothing
    boss.release(batch)
    assert gang.woken().devices == ("gpu0", "gpu1")
    check_books(r)


@pytest.mark.parametrize("how", ["release", "expire", "force"])
def test_ending_a_gang_frees_every_device(boss: Boss, how: str) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "16GiB", "16GiB")
    single = boss.acquire("2GiB", device="gpu1", ttl=60)
    gang = boss.acquire(
        "4GiB", devices=3, ttl=0.05 if how == "expire" else 60, keepalive=False, request_id="g"
    )
    assert gang.devices == ("gpu1", "gpu0", "gpu2")  # best fit first: gpu1 has the least room
    assert [used(r, d) for d in ("gpu0", "gpu1", "gpu2")] == [4 * GiB, 6 * GiB, 4 * GiB]
    assert all(r.sismember(POOL.device_leases(d), "g") for d in gang.devices)
    check_books(r)
    log = Events(r)

    terminal = end(boss, gang, how)

    assert state(r, "g") == terminal
    assert [(e["event"], e["device"], e["mib"]) for e in log.new()] == [
        (terminal, "gpu1,gpu0,gpu2", str(4 * GiB))
    ]
    assert [used(r, d) for d in ("gpu0", "gpu1", "gpu2")] == [0, 2 * GiB, 0]
    assert [r.smembers(POOL.device_leases(d)) for d in ("gpu0", "gpu1", "gpu2")] == [
        set(),
        {single.id},
        set(),
    ]
    check_books(r)
    if how != "release":
        with pytest.raises(LeaseLost):
            boss.release(gang)


def test_idle_gang_is_evicted_by_a_higher_priority_single_request(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "8GiB", "8GiB")
    unloaded: list[str] = []
    trainer = other(boss, "trainer")
    gang = trainer.acquire(
        "6GiB", devices=2, priority="low", ttl=60, request_id="gang", on_evict=lambda x: unloaded.append(x.id)
    )
    log = Events(r)
    gang.idle()
    assert log.new() == [
        {"event": "idle", "lease": "gang", "holder": "trainer", "device": "gpu0,gpu1", "mib": str(6 * GiB)}
    ]
    assert [r.zrange(POOL.evictable(d), 0, -1) for d in ("gpu0", "gpu1")] == [["gang"], ["gang"]]
    assert boss.plan("4GiB", priority="high") == Plan("evict", "gpu0", ("gang",))

    lease = boss.acquire("4GiB", priority="high", ttl=60, timeout=5, request_id="urgent")

    join_evict_thread(gang)
    assert unloaded == ["gang"]
    assert log.pairs() == [
        ("queued", "urgent"),
        ("evicting", "gang"),
        ("released", "gang"),
        ("granted", "urgent"),
    ]
    assert lease.device == "gpu0"
    assert [used(r, "gpu0"), used(r, "gpu1")] == [4 * GiB, 0]  # the gang's MiB left both devices
    check_books(r)


def test_an_evicted_gang_leaves_no_eviction_index_entry_behind(boss: Boss) -> None:
    r = boss.redis
    host(boss, "node-a", "8GiB", "8GiB")
    gang = load(boss, "gang", "6GiB", "low", devices=2)
    waiter = queue(boss, "4GiB", "urgent", priority="high")
    assert state(r, "gang") == "evicting"
    boss.release(gang)
    assert waiter.woken().device == "gpu0"
    assert [r.zrange(POOL.evictable(d), 0, -1) for d in ("gpu0", "gpu1")] == [[], []]


# --- plan ------------------------------------------------------------------------------------


def test_plan_for_gangs_and_exclusive_requests_says_what_acquire_does_and_changes_nothing(
    boss: Boss,
) -> None:
    r = boss.redis
    host(boss, "node-a", "16GiB", "16GiB")
    host(boss, "node-b", "16GiB", first=2)
    boss.acquire("4GiB", device="gpu2", ttl=60)
    warm = load(boss, "warm", "2GiB", "low", device="gpu1")
    before = snapshot(r)
    plans = {
        "gang": boss.plan("8GiB", devices=2),
        "gang3": boss.plan("8GiB", devices=3),
        "excl": boss.plan("8GiB", exclusive=True),
        "excl-high": boss.plan("8GiB", priority="high", exclusive=True, device="gpu1"),
        "excl-busy": boss.plan("8GiB", exclusive=True, device="gpu2"),
    }
    assert snapshot(r) == before
    assert plans == {
        "gang": Plan("grant", "gpu1,gpu0"),  # gpu1 (14 GiB free) fits best
        "gang3": Plan("never", largest_mib=16 * GiB),
        "excl": Plan("grant", "gpu0"),
        "excl-high": Plan("evict", "gpu1", ("warm",)),
        "excl-busy": Plan("wait", ahead=0),  # an active lease is on it
    }
    assert str(plans["gang"]) == "granted on gpu1,gpu0"
    gang = boss.acquire("8GiB", devices=2, timeout=0)
    assert gang.devices == ("gpu1", "gpu0")
    assert boss.plan("8GiB", exclusive=True) == Plan("wait", ahead=0)  # every device is in use now
    assert state(r, warm.id) == "idle"
    check_books(r)


# --- bad input -------------------------------------------------------------------------------


def acquire_args(rid: str, mib: int, want: str, gang: object) -> list[Any]:
    return [rid, "w", "h", 1, mib, 50, want, 3600000, "{}", 1, 0, 10000, "", 0, gang]


def test_bad_gang_and_exclusive_input_changes_nothing(real_redis: redis.Redis) -> None:
    r = real_redis
    boss = Boss(r, holder="test")
    host(boss, "node-a", "16GiB", "16GiB")
    boss.add_device("gpu2", "16GiB", host="node-b", cuda_index=0)
    boss.acquire("8GiB", devices=2, ttl=3600, request_id="gang")
    boss.acquire("4GiB", device="gpu2", exclusive=True, ttl=3600, request_id="excl")
    # A gang waiter, queued without blocking: the acquire script with wait=1.
    reply = boss.script("acquire", POOL.script_keys(), acquire_args("waiter", 12 * GiB, "", 2))
    assert parse_reply(reply, frozenset({"queued"}))[0] == "queued"
    check_books(r)
    keys = POOL.script_keys()

    bad: list[Callable[[], object]] = []
    for devices in (0, 17, -1, True, 2.0, "2", None):
        bad.append(lambda d=devices: boss.acquire("1GiB", devices=d, timeout=0))  # type: ignore[misc]
        bad.append(lambda d=devices: boss.plan("1GiB", devices=d))  # type: ignore[misc]
        bad.append(lambda d=devices: boss.lease("1GiB", devices=d))  # type: ignore[misc]
    bad.append(lambda: boss.acquire("1GiB", devices=2, device="gpu0", timeout=0))
    bad.append(lambda: boss.plan("1GiB", devices=2, device="gpu0"))
    with unchanged(r):
        for call in bad:
            with pytest.raises(BadRequest):
                call()
        # Straight to the scripts: they refuse it too, without writing.
        for gang, want in (("0", ""), ("17", ""), ("x", ""), ("1.5", ""), ("2", "gpu0")):
            reply = boss.script("acquire", keys, acquire_args("new", GiB, want, gang))
            with pytest.raises(BadRequest):
                parse_reply(reply, frozenset({"granted", "queued", "busy"}))
            if want == "":
                reply = boss.script("plan", keys, [GiB, 50, want, 0, gang])
                with pytest.raises(BadRequest):
                    parse_reply(reply, frozenset({"grant", "wait", "evict", "never"}))
        # Well-formed, but it can never fit, or would have to wait: nothing is written either.
        with pytest.raises(InsufficientVram):
            boss.acquire("1GiB", devices=3)
        for exclusive in (False, True):
            with pytest.raises(AcquireTimeout):
                boss.acquire("1GiB", device="gpu2", exclusive=exclusive, timeout=0)
        with pytest.raises(AcquireTimeout):
            boss.acquire("9GiB", devices=2, priority=100, timeout=0)


# --- AsyncBoss -------------------------------------------------------------------------------


async def until(what: str, pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)  # polling Redis with a deadline: there is nothing to block on


def test_async_gang_waits_and_is_woken_by_a_release(tier: Tier) -> None:
    r = tier.sync

    async def main() -> None:
        async with (
            AsyncBoss(tier.make_async(), holder="a") as a,
            AsyncBoss(tier.make_async(), holder="b") as b,
        ):
            await a.add_device("gpu0", "16GiB", host="node-a", cuda_index=0)
            await a.add_device("gpu1", "16GiB", host="node-a", cuda_index=1)
            assert await a.plan("8GiB", devices=2) == Plan("grant", "gpu0,gpu1")
            holder = await a.acquire("12GiB", device="gpu1", ttl=60)
            # ttl=30: it would poll only every 10 s on its own.
            task = asyncio.create_task(b.acquire("8GiB", devices=2, ttl=30, request_id="g"))
            await until("the gang to queue", lambda: state(r, "g") == "queued")
            with pytest.raises(AcquireTimeout):
                await a.acquire("1GiB", device="gpu0", timeout=0)
            await a.release(holder)
            lease = await asyncio.wait_for(task, 5)
            assert (lease.devices, lease.cuda_indexes, lease.env["CUDA_VISIBLE_DEVICES"]) == (
                ("gpu0", "gpu1"), (0, 1), "0,1",
            )  # fmt: skip
            check_books(r)
            await b.release(lease)
            assert [used(r, "gpu0"), used(r, "gpu1")] == [0, 0]
            with pytest.raises(BadRequest):
                await b.acquire("1GiB", devices=17)

    asyncio.run(main())
    check_books(r)


def test_async_exclusive_lease_context_keeps_others_off_and_frees_the_device(tier: Tier) -> None:
    r = tier.sync

    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="a") as boss:
            await boss.add_device("gpu0", "16GiB")
            async with boss.lease("2GiB", exclusive=True, ttl=60, request_id="x") as lease:
                assert (lease.device, exclusive_of(r)) == ("gpu0", "x")
                assert await boss.plan("1GiB", priority=100) == Plan("wait", ahead=0)
                with pytest.raises(AcquireTimeout):
                    await boss.acquire("1GiB", device="gpu0", priority=100, timeout=0)
                check_books(r)
            assert (state(r, "x"), exclusive_of(r), used(r)) == ("released", None, 0)
            assert await boss.plan("16GiB", exclusive=True) == Plan("grant", "gpu0")

    asyncio.run(main())
