"""The queue walk's bound: one call examines at most 64 waiters (WALK_LIMIT in ``lua/_common.lua``).

Beyond them the queue's census (``gpuboss:{pool}:v1:wants``) says which devices some waiter names:
a request behind a long queue for one device is still granted on a device no waiter wants, and
never on one that a waiter it did not reach may be waiting for; a waiter the walk does not reach
takes, at its own poll, a device nobody else names. Both tiers."""

from __future__ import annotations

import pytest
import redis

from gpuboss_client import AcquireTimeout, Boss
from gpuboss_client.keys import PoolKeys

POOL = PoolKeys("walk")
WALK_LIMIT = 64
WAITERS = WALK_LIMIT + 6  # past the walk's bound


def queue(boss: Boss, n: int, *, device: str, mib: int = 1024, first: int = 0) -> None:
    """``n`` waiters (priority normal, long TTL) for ``device`` ("" for any), straight through the
    acquire verb: they stay queued without a process polling for them."""
    for i in range(first, first + n):
        args = [f"w{i}", "waiter", "h", 1, mib, 50, device, 3_600_000, "{}", 1]
        assert boss.script("acquire", POOL.script_keys(), args)[0] == "queued"


@pytest.fixture
def pool(boss: Boss) -> Boss:
    """Device ``full`` held whole; device ``free`` half held (2 of 4 GiB)."""
    boss.add_device("full", 1024, pool=POOL.pool)
    boss.add_device("free", 4096, pool=POOL.pool)
    boss.acquire(1024, pool=POOL.pool, device="full", ttl=3600, keepalive=False)
    boss.acquire(2048, pool=POOL.pool, device="free", ttl=3600, keepalive=False)
    return boss


def census(rclient: redis.Redis) -> dict[str, str]:
    return rclient.hgetall(POOL.wants)  # type: ignore[return-value]


def test_a_request_behind_a_long_queue_for_another_device_is_granted(
    pool: Boss, rclient: redis.Redis
) -> None:
    queue(pool, WAITERS, device="full")
    assert census(rclient) == {"full": str(WAITERS), "#": str(WAITERS)}
    lease = pool.acquire(1024, pool=POOL.pool, timeout=0, keepalive=False)  # best fit: only `free` fits
    assert lease.device == "free"
    pool.release(lease)


def test_nobody_behind_takes_a_device_a_waiter_beyond_the_walk_waits_for(pool: Boss) -> None:
    queue(pool, WAITERS, device="full")
    queue(pool, 1, device="free", mib=4096, first=WAITERS)  # waits for all of free; the walk stops short
    with pytest.raises(AcquireTimeout):
        pool.acquire(1024, pool=POOL.pool, device="free", timeout=0)


def poll(boss: Boss, i: int, *, device: str, mib: int) -> str:
    """What waiter ``w<i>``'s next poll (the acquire verb with its request again) answers."""
    args = [f"w{i}", "waiter", "h", 1, mib, 50, device, 3_600_000, "{}", 1]
    return str(boss.script("acquire", POOL.script_keys(), args)[0])


def test_a_waiter_beyond_the_walk_takes_a_device_nobody_else_waits_for(
    pool: Boss, rclient: redis.Redis
) -> None:
    """The release of free cannot reach it (64 waiters for full ahead), its own next poll can."""
    queue(pool, WAITERS, device="full")
    queue(pool, 1, device="free", mib=4096, first=WAITERS)
    on_free = pool.held()[1]
    pool.release(on_free)
    assert rclient.hget(POOL.lease(f"w{WAITERS}"), "state") == "queued"
    assert poll(pool, WAITERS, device="free", mib=4096) == "granted"


def test_a_waiter_beyond_the_walk_leaves_a_device_another_waiter_names(pool: Boss) -> None:
    queue(pool, WAITERS, device="full")
    queue(pool, 1, device="free", mib=4096, first=WAITERS)
    queue(pool, 1, device="free", mib=4096, first=WAITERS + 1)  # behind it: the census cannot tell
    pool.release(pool.held()[1])
    assert poll(pool, WAITERS, device="free", mib=4096) == "queued"


def test_a_waiter_for_any_device_beyond_the_walk_holds_back_every_device(pool: Boss) -> None:
    queue(pool, WAITERS, device="full")
    queue(pool, 1, device="", mib=4096, first=WAITERS)
    with pytest.raises(AcquireTimeout):
        pool.acquire(1024, pool=POOL.pool, device="free", timeout=0)


def test_a_census_that_does_not_account_for_the_queue_is_not_trusted(
    pool: Boss, rclient: redis.Redis
) -> None:
    """As after an upgrade from a version without it: every device is held, as before it existed."""
    queue(pool, WAITERS, device="full")
    rclient.delete(POOL.wants)
    with pytest.raises(AcquireTimeout):
        pool.acquire(1024, pool=POOL.pool, device="free", timeout=0)


def test_the_census_follows_every_exit_and_is_gone_with_the_queue(pool: Boss, rclient: redis.Redis) -> None:
    queue(pool, 3, device="full")
    queue(pool, 1, device="", mib=4096, first=3)  # any device: only free is big enough
    assert census(rclient) == {"full": "3", "*": "1", "#": "4"}
    assert pool.force_release("w0", pool=POOL.pool).state == "force_released"  # an operator's cancel
    assert census(rclient) == {"full": "2", "*": "1", "#": "3"}
    on_full, on_free = pool.held()
    pool.release(on_full)  # w1 is granted, w2 waits behind it
    assert census(rclient) == {"full": "1", "*": "1", "#": "2"}
    pool.release(on_free)  # w3 is granted
    assert census(rclient) == {"full": "1", "#": "1"}
    assert {lease.id for lease in pool.leases(POOL.pool) if lease.state == "active"} == {"w1", "w3"}
    pool.force_release("w2", pool=POOL.pool)
    assert not rclient.exists(POOL.wants)
