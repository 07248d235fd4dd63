"""``acquire(take_over=True)``: a holder whose own process already uses memory that the agent counts
as unmanaged takes it over atomically, and only when nobody else could be granted that room."""

from __future__ import annotations

import pytest
import redis
from support import in_thread, snapshot, wait_for

from gpuboss_client import AcquireTimeout, BadRequest, Boss, InsufficientVram, ops


def unmanaged(boss: Boss, mib: int, device: str = "gpu0") -> None:
    """What the agent would record: ``mib`` used on the device by processes of no lease."""
    boss.run(ops.measure("default", ops.Measurement(device=device, host="h", unmanaged_mib=mib)))


def device(boss: Boss, name: str = "gpu0") -> tuple[int, int]:
    d = next(d for d in boss.devices() if d.name == name)
    return d.unmanaged_mib, d.free_mib


@pytest.fixture
def gpu0(boss: Boss) -> Boss:
    boss.add_device("gpu0", "16GiB")
    return boss


def test_resident_memory_moves_from_unmanaged_to_the_lease(gpu0: Boss) -> None:
    unmanaged(gpu0, 12 * 1024)
    # Without take_over the resident 12 GiB cannot be leased: they are counted already.
    with pytest.raises(InsufficientVram):
        gpu0.acquire("12GiB", device="gpu0", timeout=0, keepalive=False)
    lease = gpu0.acquire("12GiB", device="gpu0", timeout=0, take_over=True, keepalive=False)
    assert lease.mib == 12 * 1024
    assert device(gpu0) == (0, 4 * 1024)  # counted once, as the lease
    gpu0.release(lease)


def test_the_credit_is_only_what_is_unmanaged(gpu0: Boss) -> None:
    unmanaged(gpu0, 2 * 1024)
    other = Boss(gpu0.redis, holder="other")
    held = other.acquire("10GiB", device="gpu0", timeout=0, keepalive=False)
    # 2 GiB unmanaged + 10 GiB leased: a take-over is credited the 2 and needs the rest free (4).
    with pytest.raises(AcquireTimeout):
        gpu0.acquire("7GiB", device="gpu0", timeout=0, take_over=True, keepalive=False)
    assert device(gpu0) == (2 * 1024, 4 * 1024)  # the credit was given back
    lease = gpu0.acquire("6GiB", device="gpu0", timeout=0, take_over=True, keepalive=False)
    assert device(gpu0) == (0, 0)
    gpu0.release(lease)
    other.release(held)


def test_no_take_over_while_anyone_waits(gpu0: Boss) -> None:
    """The credit must never reach a waiter: it is memory in use. A waiter of higher priority that
    the take-over's room would fit stays queued, and the credit is given back."""
    unmanaged(gpu0, 8 * 1024)
    other = Boss(gpu0.redis, holder="other")
    held = other.acquire("8GiB", device="gpu0", timeout=0, keepalive=False)  # the budget is full
    waiter = Boss(gpu0.redis, holder="waiter")
    thread, out = in_thread(
        lambda: waiter.acquire("8GiB", device="gpu0", priority="high", timeout=10, keepalive=False)
    )
    wait_for("the waiter to queue", lambda: gpu0.status()[0].queued == 1)
    with pytest.raises(AcquireTimeout):
        gpu0.acquire("8GiB", device="gpu0", priority="low", timeout=0, take_over=True, keepalive=False)
    assert gpu0.status()[0].queued == 1  # not granted the credited room
    assert device(gpu0) == (8 * 1024, 0)
    other.release(held)
    thread.join(10)
    waiter.release(out["value"])


def test_take_over_needs_a_device_and_no_waiting(gpu0: Boss, rclient: redis.Redis) -> None:
    before = snapshot(rclient)
    with pytest.raises(BadRequest, match="take_over"):
        gpu0.acquire("1GiB", timeout=0, take_over=True)
    with pytest.raises(BadRequest, match="take_over"):
        gpu0.acquire("1GiB", device="gpu0", timeout=5, take_over=True)
    assert snapshot(rclient) == before
