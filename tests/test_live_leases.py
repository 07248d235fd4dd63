"""The per-pool hash of live leases that operators read with ``redis-cli hgetall``.

``gpuboss:{pool}:v1:leases`` maps each granted lease's id to one line,
``<holder> <host>:<pid> <mib>MiB <device[,device...]> <state> granted=<ms>``; the scripts keep it
in step atomically: grant adds the line, idle, busy and the start of an eviction rewrite it, and
every way a lease ends removes it. Waiters are not in it. Runs on real Redis and on fakeredis;
the ``redis-cli`` check needs the real server.
"""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import redis
from support import Stepper, field, redis_ms, state, wait_for

from gpuboss_client import Boss, PoolKeys
from gpuboss_client import _core as core

GiB = 1024
POOL = PoolKeys("default")


def live(r: redis.Redis) -> dict[str, str]:
    """The pool's hash of live leases."""
    return dict(r.hgetall(POOL.leases))  # type: ignore[arg-type]


def expected(r: redis.Redis, lease_id: str) -> str:
    """The line a granted lease should have, built from its lease hash."""
    h: dict[str, str] = r.hgetall(POOL.lease(lease_id))  # type: ignore[assignment]
    return (
        f"{h['holder']} {h['holder_host']}:{h['holder_pid']} {h['mib']}MiB {h['device']} {h['state']}"
        f" granted={h['granted_at']}"
    )


def holder(boss: Boss, name: str, host: str, pid: int) -> Boss:
    """Another client over the same Redis, as holder ``name`` on ``host`` with ``pid``."""
    return Boss(boss.redis, holder=name, host=host, pid=pid)


def waiter(boss: Boss, vram: int | str, rid: str, priority: int | str = "normal") -> Stepper:
    """An acquire that must wait, stopped where it would block, for holder ``w`` on ``host-w``:77."""
    req = core.AcquireRequest.build(
        vram=vram, vram_gb=None, priority=priority, device=None, pool="default", ttl=60.0,
        timeout=None, labels=None, request_id=rid,
    )  # fmt: skip
    s = Stepper(boss, req, holder=core.Holder.of("w", "host-w", 77))
    assert s.blocked
    assert state(boss.redis, rid) == "queued"
    return s


def test_acquire_writes_one_line_per_granted_lease(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    tts = holder(boss, "tts", "host1", 4242)
    lease = tts.acquire(8 * GiB, ttl=60, request_id="tts-1")
    granted = field(r, "tts-1", "granted_at")
    assert live(r) == {"tts-1": f"tts host1:4242 8192MiB gpu0 active granted={granted}"}
    other = holder(boss, "asr", "host2", 7).acquire(2 * GiB, ttl=60, request_id="asr-1")
    assert live(r) == {"tts-1": expected(r, "tts-1"), "asr-1": expected(r, "asr-1")}
    assert live(r)["asr-1"].startswith("asr host2:7 2048MiB gpu0 active granted=")
    tts.release(lease)
    assert live(r) == {"asr-1": expected(r, "asr-1")}
    boss.release(other)
    assert r.exists(POOL.leases) == 0  # the last one gone, so is the hash


def test_idle_and_busy_rewrite_the_state(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(4 * GiB, ttl=60, request_id="warm")
    lease.idle()
    assert live(r)["warm"] == expected(r, "warm")
    assert live(r)["warm"].split()[-2] == "idle"
    lease.busy()
    assert live(r)["warm"] == expected(r, "warm")
    assert live(r)["warm"].split()[-2] == "active"
    boss.release(lease)
    assert live(r) == {}


def test_an_eviction_marks_the_victim_evicting_and_the_waiter_appears_once_granted(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    victim = boss.acquire(8 * GiB, priority="low", ttl=60, request_id="victim")
    victim.idle()
    s = waiter(boss, 8 * GiB, "big", priority="high")  # evicts the idle victim
    assert state(r, "victim") == "evicting"
    assert live(r) == {"victim": expected(r, "victim")}
    assert live(r)["victim"].split()[-2] == "evicting"
    boss.release(victim)  # gives the memory back: the waiter is granted
    got = s.woken()
    assert live(r) == {"big": expected(r, "big")}
    assert live(r)["big"].startswith("w host-w:77 8192MiB gpu0 active granted=")
    boss.release(got)
    assert live(r) == {}


def test_a_revoked_victim_leaves_the_hash(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    stuck = boss.acquire(
        8 * GiB, priority="low", ttl=0.3, grace=0.05, request_id="stuck"
    )  # revoked at its expiry
    stuck.idle()
    waiter(boss, 8 * GiB, "big", priority="high")
    assert live(r)["stuck"].split()[-2] == "evicting"
    deadline = int(field(r, "stuck", "evict_deadline") or 0)
    wait_for("the eviction deadline", lambda: redis_ms(r) > deadline)
    assert boss.reap() <= 1  # the waiter's own poll may have reaped it first, in passing
    assert state(r, "stuck") == "revoked"
    assert live(r) == {"big": expected(r, "big")}  # granted once the victim was revoked


@pytest.mark.parametrize("how", ["release", "expire", "force", "remove_device"])
def test_every_end_of_a_lease_removes_its_line(boss: Boss, how: str) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    boss.acquire(GiB, ttl=60, request_id="keep", device="gpu0")
    boss.add_device("gpu1", 24 * GiB)
    lease = boss.acquire(
        2 * GiB, ttl=0.2 if how == "expire" else 60, keepalive=False, request_id="goes", device="gpu1"
    )
    assert "goes" in live(r)
    if how == "release":
        boss.release(lease)
    elif how == "force":
        assert boss.force_release("goes").state == "force_released"
    elif how == "remove_device":
        boss.remove_device("gpu1", force=True)
    else:
        expires = int(field(r, "goes", "expires_at") or 0)
        wait_for("the lease's expiry", lambda: redis_ms(r) > expires)
        assert boss.reap() == 1
    assert "goes" not in live(r)
    assert live(r) == {"keep": expected(r, "keep")}


def test_a_queued_waiter_is_absent_until_it_is_granted(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    first = boss.acquire(8 * GiB, ttl=60, request_id="first")
    s = waiter(boss, 8 * GiB, "second")
    assert list(live(r)) == ["first"]
    s.repoll()  # still waiting: still absent
    assert list(live(r)) == ["first"]
    boss.release(first)
    s.woken()
    assert live(r) == {
        "second": f"w host-w:77 8192MiB gpu0 active granted={field(r, 'second', 'granted_at')}"
    }


def test_a_cancelled_waiter_never_appears(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB, ttl=60, request_id="first")
    boss.force_release(waiter(boss, 8 * GiB, "second").id)  # an operator removes the waiter
    assert state(r, "second") == "force_released"
    assert list(live(r)) == ["first"]


def test_a_gang_lease_lists_its_devices(boss: Boss) -> None:
    r = boss.redis
    for i in range(2):
        boss.add_device(f"gpu{i}", 16 * GiB, host="node-a", cuda_index=i)
    lease = holder(boss, "train", "node-a", 99).acquire("6GiB", devices=2, ttl=60, request_id="gang")
    granted = field(r, "gang", "granted_at")
    assert live(r) == {"gang": f"train node-a:99 6144MiB gpu0,gpu1 active granted={granted}"}
    boss.release(lease)
    assert live(r) == {}


def test_redis_cli_hgetall_prints_the_lines(real_redis: redis.Redis, redis_url: str) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed")
    boss = Boss(real_redis, holder="tts", host="host1", pid=4242)
    boss.add_device("gpu0", 24 * GiB)
    boss.acquire(8 * GiB, ttl=60, request_id="tts-1")
    url = urlparse(redis_url)
    args = [
        cli,
        "-h",
        url.hostname or "127.0.0.1",
        "-p",
        str(url.port or 6379),
        "-n",
        url.path.strip("/") or "0",
    ]
    if url.password:
        args += ["-a", url.password, "--no-auth-warning"]
    out = subprocess.run(
        [*args, "hgetall", "gpuboss:{default}:v1:leases"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    granted = field(real_redis, "tts-1", "granted_at")
    assert out.stdout.splitlines() == ["tts-1", f"tts host1:4242 8192MiB gpu0 active granted={granted}"]
