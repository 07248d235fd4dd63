"""Eviction across real processes, over real pub/sub, against the real redis-server.

Each test runs ``tests/evict_holder.py`` in its own OS process: it holds a low-priority lease that
is idle (kept warm) or active but preemptible, and the test process asks for the whole device at
high priority. The claims:

- a holder with ``on_evict`` hears the notice over pub/sub, its callback runs exactly once and
  unloads, and the client releases the lease by itself: it ends ``released``, never ``revoked``,
  and the requester holds all the memory within milliseconds of asking (sync ``Boss`` and
  ``AsyncBoss`` with a coroutine ``on_evict``; idle and preemptible active leases);
- a holder that ignores the notice is revoked at its grace deadline: the blocked requester is
  granted within 250 ms of that deadline, as Redis's clock (stream ids) tells; the holder's own
  heartbeat then raises LeaseEvicted, and its old token releases nothing;
- a holder whose pub/sub connection was killed (``CLIENT KILL TYPE pubsub``) still learns of the
  eviction from its next heartbeat reply, runs ``on_evict`` and hands the memory over before the
  deadline.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from support import Child

from gpuboss_client import Boss, PoolKeys

pytestmark = pytest.mark.slow

HOLDER = Path(__file__).with_name("evict_holder.py")
POOL = "evict"
DEVICE_MIB = 8 * 1024
Entry: TypeAlias = tuple[str, dict[str, str]]  # one stream entry: id, fields


def mono_ns() -> int:
    """System-wide monotonic time: comparable with the holder's timestamps."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def start(children: list[Child], redis_url: str, *args: str) -> Child:
    child = Child(HOLDER, redis_url, "--pool", POOL, *args)
    children.append(child)
    return child


@pytest.fixture
def own(real_redis: redis.Redis) -> Iterator[Boss]:
    """The requester: the test's own client, with one device of 8 GiB in pool ``evict``."""
    b = Boss(real_redis, holder="requester")
    b.add_device("gpu0", DEVICE_MIB, pool=POOL)
    yield b
    b.close()


def events(r: redis.Redis) -> list[Entry]:
    return cast(list[Entry], r.xrange(PoolKeys(POOL).events))


def events_of(r: redis.Redis, lease_id: str) -> list[Entry]:
    """The pool's events about ``lease_id``, oldest first."""
    return [(i, f) for i, f in events(r) if f.get("lease") == lease_id]


def event_ms(entry_id: str) -> int:
    """When an event was written, in Redis ms: stream ids start with Redis's clock."""
    return int(entry_id.split("-")[0])


def lease_hash(r: redis.Redis, lease_id: str) -> dict[str, str]:
    """The lease's record in Redis (an ended lease lingers with its terminal state)."""
    return cast(dict[str, str], r.hgetall(PoolKeys(POOL).lease(lease_id)))


def subscribers(r: redis.Redis, channel: str) -> int:
    return int(dict(r.pubsub_numsub(channel))[channel])


def assert_handed_over(own: Boss, r: redis.Redis, lease_id: str, old_token: int) -> None:
    """The requester holds the whole device, with a greater fencing token than the victim's."""
    held = lease_hash(r, lease_id)
    assert held["state"] == "active"
    assert held["device"] == "gpu0"
    assert int(held["token"]) > old_token
    assert own.devices(POOL)[0].used_mib == DEVICE_MIB
    assert [x.id for x in own.leases(POOL)] == [lease_id]


@pytest.mark.parametrize("state", ["idle", "preemptible"])
@pytest.mark.parametrize("client", ["sync", "async"])
def test_on_evict_unloads_and_the_client_releases(
    client: str, state: str, own: Boss, real_redis: redis.Redis, redis_url: str, children: list[Child]
) -> None:
    # ttl 10 s: no heartbeat falls in the test's window, so the notice travels over pub/sub.
    args = ["--mib", str(DEVICE_MIB), "--priority", "low", "--state", state, "--ttl", "10"]
    holder = start(children, redis_url, *args, *(["--async"] if client == "async" else []))
    _, victim, old_token, channel = holder.expect("HOLDING")
    assert subscribers(real_redis, channel) == 1
    assert lease_hash(real_redis, victim)["state"] == ("idle" if state == "idle" else "active")

    asked = mono_ns()
    lease = own.acquire(DEVICE_MIB, priority="high", pool=POOL, timeout=10, request_id="requester")
    holding = mono_ns()
    _, evicted_id, callback_ns, deadline_ms = holder.expect("EVICT")
    assert holder.expect("UNLOADED")[1] == "0"  # the model's memory was freed
    assert holder.expect("RELEASED")[1:] == ["released"]  # by the client, after on_evict returned
    assert holder.expect("EXIT")[1:] == ["LeaseEvicted", "lease_evicted"]
    output = holder.finish()

    to_callback_ms = (int(callback_ns) - asked) / 1e6
    to_holding_ms = (holding - asked) / 1e6
    print(f"\n{client} {state}: to on_evict {to_callback_ms:.1f} ms, to holding {to_holding_ms:.1f} ms")
    assert 0 < to_callback_ms < to_holding_ms < 1000
    assert evicted_id == victim
    assert sum(line.startswith("EVICT") for line in output) == 1
    assert "CALLS 1" in output

    assert lease_hash(real_redis, victim)["state"] == "released"
    kinds = [f["event"] for _, f in events_of(real_redis, victim)]
    assert kinds == ["granted", *(["idle"] if state == "idle" else []), "evicting", "released"]
    evicting = events_of(real_redis, victim)[-2]
    assert evicting[1]["for"] == "requester"
    assert evicting[1]["deadline"] == deadline_ms
    asked_events = [f["event"] for _, f in events_of(real_redis, "requester")]
    assert asked_events == ["queued", "granted"]  # it waited for the victim, and got the memory
    assert event_ms(events_of(real_redis, "requester")[-1][0]) < int(deadline_ms)  # before any revoke
    assert_handed_over(own, real_redis, lease.id, int(old_token))
    own.release(lease)


def test_holder_that_ignores_the_notice_is_revoked_at_the_deadline(
    own: Boss, real_redis: redis.Redis, redis_url: str, children: list[Child]
) -> None:
    grace = 1.5  # beyond the TTL, so the deadline is the grace's (else it would be the expiry)
    args = ["--mib", str(DEVICE_MIB), "--priority", "low", "--ttl", "1.0", "--grace", str(grace), "--ignore"]
    holder = start(children, redis_url, *args)
    _, victim, old_token, _ = holder.expect("HOLDING")

    lease = own.acquire(DEVICE_MIB, priority="high", pool=POOL, timeout=10, request_id="requester")
    (evicting_id, evicting), *_ = [e for e in events_of(real_redis, victim) if e[1]["event"] == "evicting"]
    deadline_ms = int(evicting["deadline"])
    # The deadline is the script's TIME plus the grace; the event id is written a moment later.
    assert grace * 1000 - 5 <= deadline_ms - event_ms(evicting_id) <= grace * 1000
    granted_id, granted = events_of(real_redis, "requester")[-1]
    assert granted["event"] == "granted"
    late_ms = event_ms(granted_id) - deadline_ms
    print(f"\ngranted {late_ms:+d} ms from the eviction deadline (Redis clock)")
    # Not before the deadline (the victim never gave the memory back), and at most 250 ms after.
    assert 0 <= late_ms <= 250
    # The holder gave the lease up by itself before the deadline (its fence), not after.
    _, lost_ms, *reason = holder.expect("LOST")
    assert int(lost_ms) <= deadline_ms
    assert " ".join(reason) == "not given back before the eviction deadline"

    revoked = lease_hash(real_redis, victim)
    assert revoked["state"] == "revoked"
    assert [f["event"] for _, f in events_of(real_redis, victim)][-2:] == ["evicting", "revoked"]

    # The holder learns by itself: its heartbeat raises LeaseEvicted, its old token frees nothing.
    assert holder.expect("BEAT")[1:] == ["LeaseEvicted", "lease_evicted", "revoked"]
    assert holder.expect("RELEASE")[1:] == ["LeaseEvicted", "lease_evicted", "revoked"]
    assert holder.expect("EXIT")[1:] == ["LeaseEvicted", "lease_evicted"]
    holder.finish()
    assert "CALLS 0" in holder.seen
    assert lease_hash(real_redis, victim)["state"] == "revoked"
    assert own.heartbeat(lease).state == "active"
    assert_handed_over(own, real_redis, lease.id, int(old_token))
    own.release(lease)


@pytest.fixture
def holder_user(real_redis: redis.Redis, redis_url: str) -> Iterator[tuple[str, str]]:
    """A Redis user of its own for the holder (name, URL), removed afterwards."""
    name, password = f"holder-{secrets.token_hex(4)}", secrets.token_hex(16)
    real_redis.acl_setuser(
        name, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port}"))
    yield name, url
    real_redis.acl_deluser(name)


def test_holder_without_pubsub_learns_from_its_heartbeat(
    own: Boss,
    real_redis: redis.Redis,
    holder_user: tuple[str, str],
    children: list[Child],
) -> None:
    user, url = holder_user
    ttl, grace = 0.9, 5.0  # heartbeats every 0.3 s; the deadline is far past them
    args = ["--mib", str(DEVICE_MIB), "--priority", "low", "--ttl", str(ttl), "--grace", str(grace)]
    holder = start(children, url, *args)
    _, victim, old_token, channel = holder.expect("HOLDING")
    assert subscribers(real_redis, channel) == 1

    # redis-py reconnects and subscribes again at once after a kill, so the holder's user may not
    # subscribe any more: its notices over pub/sub stay lost, and only heartbeats can tell it.
    real_redis.acl_setuser(user, enabled=True, commands=["-subscribe"])
    assert real_redis.client_kill_filter(_type="pubsub") >= 1
    assert subscribers(real_redis, channel) == 0

    asked = mono_ns()
    lease = own.acquire(DEVICE_MIB, priority="high", pool=POOL, timeout=grace + 5, request_id="requester")
    holding = mono_ns()
    assert subscribers(real_redis, channel) == 0  # nobody heard the PUBLISH
    _, evicted_id, callback_ns, deadline_ms = holder.expect("EVICT")
    assert holder.expect("UNLOADED")[1] == "0"
    assert holder.expect("RELEASED")[1:] == ["released"]
    assert holder.expect("EXIT")[1:] == ["LeaseEvicted", "lease_evicted"]
    output = holder.finish()
    to_callback_ms = (int(callback_ns) - asked) / 1e6
    to_holding_ms = (holding - asked) / 1e6
    print(f"\nno pub/sub: to on_evict {to_callback_ms:.1f} ms, to holding {to_holding_ms:.1f} ms")

    assert evicted_id == victim
    assert sum(line.startswith("EVICT") for line in output) == 1
    assert "CALLS 1" in output
    assert lease_hash(real_redis, victim)["state"] == "released"
    granted_id, granted = events_of(real_redis, "requester")[-1]
    assert granted["event"] == "granted"
    # Handed over by the holder, well before the deadline would have revoked it.
    assert event_ms(granted_id) < int(deadline_ms) - 1000
    assert to_holding_ms < (grace - 1) * 1000
    assert_handed_over(own, real_redis, lease.id, int(old_token))
    own.release(lease)
