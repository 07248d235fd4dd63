"""Holders and waiters that crash or freeze, as real processes against the real Redis.

Each test runs ``tests/holder.py`` in its own OS process, reads what it prints, and kills it
(SIGKILL), freezes it (SIGSTOP) or resumes it (SIGCONT). The claims:

- a holder killed with SIGKILL (sync ``Boss`` or ``AsyncBoss``) loses its leases after their TTL:
  a waiter in another process is granted the memory within TTL + 1 s of the kill, with a greater
  fencing token, and the old lease ends ``expired``;
- a holder frozen past its TTL loses its lease to a waiter; once resumed it finds out by itself
  (``lease.lost``), the heartbeat confirms ``expired``, and leaving ``with`` raises LeaseLost;
- a waiter killed while queued leaves the queue (``abandoned``) once its TTL passes and is never
  granted: the waiter behind it gets the memory as soon as it frees, not a dead waiter's TTL later.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TypeAlias, cast

import pytest
import redis
from support import LINE_WAIT_S, Child

from gpuboss_client import Boss, PoolKeys

pytestmark = pytest.mark.slow

HOLDER = Path(__file__).with_name("holder.py")
DEVICE_MIB = 10 * 1024
Entry: TypeAlias = tuple[str, dict[str, str]]  # one stream entry: id, fields


@pytest.fixture
def own(real_redis: redis.Redis) -> Boss:
    """The test's own client on the real Redis, with one device of 10 GiB in pool ``crash``."""
    b = Boss(real_redis, holder="test")
    b.add_device("gpu0", DEVICE_MIB, pool="crash")
    return b


def start(children: list[Child], redis_url: str, *args: str) -> Child:
    child = Child(HOLDER, redis_url, *args, "--pool", "crash")
    children.append(child)
    return child


def queued_event(r: redis.Redis, lease_id: str, timeout: float = LINE_WAIT_S) -> str:
    """Block on the pool's event stream until ``lease_id`` has queued; return the entry id."""
    events = PoolKeys("crash").events
    last, deadline = "0", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = cast(list[tuple[str, list[Entry]]], r.xread({events: last}, block=max(1, int(left * 1000))))
        for _, entries in got or []:
            for entry_id, f in entries:
                last = entry_id
                if f["event"] == "queued" and f["lease"] == lease_id:
                    return str(entry_id)
    raise AssertionError(f"{lease_id} never queued")


def events_of(r: redis.Redis, lease_id: str) -> list[Entry]:
    """The pool's events about ``lease_id``, oldest first."""
    entries = cast(list[Entry], r.xrange(PoolKeys("crash").events))
    return [(i, f) for i, f in entries if f.get("lease") == lease_id]


def lease_hash(r: redis.Redis, lease_id: str) -> dict[str, str]:
    """The lease's record in Redis (an ended lease lingers with its terminal state)."""
    return cast(dict[str, str], r.hgetall(PoolKeys("crash").lease(lease_id)))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_holder_loses_its_leases_within_ttl(
    mode: str, own: Boss, real_redis: redis.Redis, redis_url: str, children: list[Child]
) -> None:
    ttl = 1.0
    # The holder holds two leases at once (two `with` blocks): both must come back.
    args = ["hold", "--mib", str(DEVICE_MIB // 2), "--ttl", str(ttl), "--device", "gpu0", "--device", "gpu0"]
    holder = start(children, redis_url, *args, *(["--async"] if mode == "async" else []))
    held = [holder.expect("HOLDING")[1:] for _ in range(2)]
    assert own.devices("crash")[0].used_mib == DEVICE_MIB

    killed_at = time.monotonic()
    holder.signal(signal.SIGKILL)
    lease = own.acquire(DEVICE_MIB, pool="crash", timeout=ttl + 5, request_id="after-kill")
    waited = time.monotonic() - killed_at

    assert waited <= ttl + 1.0, f"memory came back {waited:.2f} s after the kill (ttl {ttl} s)"
    assert events_of(real_redis, "after-kill")[0][1]["event"] == "queued"  # it really waited
    granted_at = int(lease_hash(real_redis, lease.id)["granted_at"])
    for old_id, old_token in held:
        old = lease_hash(real_redis, old_id)
        assert old["state"] == "expired"
        assert granted_at >= int(old["expires_at"])
        assert lease.token > int(old_token)
    own.release(lease)


def test_frozen_holder_finds_out_it_lost_its_lease(
    own: Boss, real_redis: redis.Redis, redis_url: str, children: list[Child]
) -> None:
    ttl = 1.0
    holder = start(children, redis_url, "lost", "--mib", str(DEVICE_MIB), "--ttl", str(ttl))
    _, old_id, old_token = holder.expect("HOLDING")

    stopped_at = time.monotonic()
    holder.signal(signal.SIGSTOP)
    try:
        lease = own.acquire(DEVICE_MIB, pool="crash", timeout=ttl + 5, request_id="while-frozen")
        waited = time.monotonic() - stopped_at
        assert lease_hash(real_redis, old_id)["state"] == "expired"
    finally:
        holder.signal(signal.SIGCONT)

    assert waited <= ttl + 1.0, f"memory came back {waited:.2f} s after the holder froze (ttl {ttl} s)"
    assert events_of(real_redis, "while-frozen")[0][1]["event"] == "queued"  # it went to a waiter
    assert lease.token > int(old_token)
    granted_at = int(lease_hash(real_redis, lease.id)["granted_at"])
    assert granted_at >= int(lease_hash(real_redis, old_id)["expires_at"])  # once the TTL had passed

    lost = " ".join(holder.expect("LOST"))
    assert lost.endswith("/ heartbeat says expired"), lost
    exit_words = holder.expect("EXIT")
    assert exit_words[1:3] == ["LeaseLost", "lease_lost"], exit_words
    assert holder.proc.wait(LINE_WAIT_S) == 0
    # The resumed holder's release and heartbeats changed nothing: the waiter still holds it all.
    assert lease_hash(real_redis, old_id)["state"] == "expired"
    assert own.heartbeat(lease).state == "active"
    assert own.devices("crash")[0].used_mib == DEVICE_MIB
    own.release(lease)


def test_killed_waiter_is_abandoned_and_the_next_waiter_served(
    own: Boss, real_redis: redis.Redis, redis_url: str, children: list[Child]
) -> None:
    # Both the holder and the first waiter are killed. The holder beats every third of its TTL,
    # so its lease expires 2.67-4 s after the kill; the dead waiter's place, 1-1.5 s after (it
    # polls every 0.5 s). The dead waiter must leave the queue by then and never be granted: were
    # it granted, the live waiter behind it would get the memory only 1.5 s after it freed.
    hold_ttl, dead_ttl = 4.0, 1.5
    holder = start(children, redis_url, "hold", "--mib", str(DEVICE_MIB), "--ttl", str(hold_ttl))
    _, held_id, held_token = holder.expect("HOLDING")
    dead = start(children, redis_url, "wait", "--mib", str(DEVICE_MIB), "--ttl", str(dead_ttl),
                 "--request-id", "dead-waiter")  # fmt: skip
    dead.expect("WAITING")
    queued_event(real_redis, "dead-waiter")
    live = start(children, redis_url, "wait", "--mib", str(DEVICE_MIB), "--ttl", "1.0", "--timeout", "10",
                 "--request-id", "live-waiter")  # fmt: skip
    live.expect("WAITING")
    queued_event(real_redis, "live-waiter")

    seconds, micros = real_redis.time()
    killed_ms = int(seconds) * 1000 + int(micros) // 1000  # Redis's clock, as in stream ids
    killed_at = time.monotonic()
    dead.signal(signal.SIGKILL)
    holder.signal(signal.SIGKILL)
    _, lease_id, token = live.expect("GRANTED", timeout=hold_ttl + 5)
    waited = time.monotonic() - killed_at

    assert lease_id == "live-waiter"
    assert int(token) > int(held_token)
    held_hash = lease_hash(real_redis, held_id)
    assert held_hash["state"] == "expired"
    granted_at = int(lease_hash(real_redis, lease_id)["granted_at"])
    late_ms = granted_at - int(held_hash["expires_at"])
    assert late_ms <= 1000, f"granted {late_ms} ms after the memory freed, as if the dead waiter had it"
    dead_events = events_of(real_redis, "dead-waiter")
    assert [f["event"] for _, f in dead_events] == ["queued", "abandoned"]
    abandoned_ms = int(dead_events[-1][0].split("-")[0])
    assert abandoned_ms - killed_ms <= (dead_ttl + 1.0) * 1000, "the dead waiter was reaped late"
    assert lease_hash(real_redis, "dead-waiter")["state"] == "abandoned"
    assert real_redis.zrange(PoolKeys("crash").queue, 0, -1) == []
    assert waited <= hold_ttl + 1.0, f"the live waiter got the memory {waited:.2f} s after the kill"
