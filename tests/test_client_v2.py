"""The client's promises: fencing on every deadline, leases that keep themselves alive, release by
id and of everything, the lease as a device string, waiting you can see, and the GPUBoss usage.

Each of the four faults found from outside has a test here that failed before its fix: a holder
past its eviction deadline still believed it held the lease; a retried acquire made the first
lease object deaf to eviction notices; a wait longer than the connection's read timeout failed
with BackendUnavailable; (the stale hold-back in the queue walk is in ``test_eviction.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from support import (
    POOL,
    Child,
    Tier,
    in_thread,
    join_evict_thread,
    other,
    redis_ms,
    snapshot,
    state,
    wait_for,
)

from gpuboss_client import (
    AsyncBoss,
    BadRequest,
    Boss,
    Lease,
    LeaseEvicted,
    LeaseLost,
    LeaseNotHeld,
    QueueFull,
    WaitState,
)
from gpuboss_client import _core as core

GiB = 1024
HOLDER = Path(__file__).with_name("holder.py")
ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A clock the test steps by hand (the client's ``clock`` parameter)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- fault 1: the eviction deadline fences ------------------------------------------------------


def test_a_lease_is_lost_at_its_eviction_deadline_less_the_margin(rclient: redis.Redis) -> None:
    """The client turns the deadline it was told into its own clock's time (on the safe side, like
    the TTL) and gives the lease up that margin before it: ``lost``, ``check()`` and ``busy()``."""
    clock = Clock()
    boss = Boss(rclient, holder="tts", clock=clock)
    boss.add_device("gpu0", 8 * GiB)
    lease = boss.acquire(4 * GiB, ttl=60, grace=1, keepalive=False)
    now_ms = redis_ms(rclient)
    lease._evict_notice(now_ms + 1000)  # as if told: give it back within 1 s of Redis time
    fence = lease.evict_deadline
    assert fence is not None
    # The grant's Redis time (rounded down to the ms, so up to 1 ms more) maps to the local time
    # it was sent at (the safe side); the fence is the deadline on that scale, less the margin for
    # a 1 s grace (0.2 s).
    assert lease.info.expires_at_ms is not None
    granted_ms = lease.info.expires_at_ms - 60_000
    expected = clock.now + (now_ms + 1000 - granted_ms - 1) / 1000 - core.fence_margin(1.0)
    assert fence == pytest.approx(expected, abs=1e-6)  # float arithmetic; the rounding is 1 ms

    clock.now = fence - 0.001
    assert not lease.lost
    lease.check()
    clock.now = fence
    assert lease.lost
    assert lease.lost_reason == "not given back before the eviction deadline"
    with pytest.raises(LeaseEvicted):
        lease.check()
    before = snapshot(rclient)
    with pytest.raises(LeaseEvicted):
        boss.busy(lease)
    assert snapshot(rclient) == before  # busy() on a lost lease asks nothing of Redis


def test_a_holder_still_unloading_at_the_deadline_knows_before_the_server_revokes(
    real_redis: redis.Redis,
) -> None:
    """The fault as found: ``on_evict`` runs past a 1 s grace. By the time the server revokes the
    lease and grants its memory to the requester, the holder's lease says lost."""
    boss = Boss(real_redis, holder="test")
    boss.add_device("gpu0", 8 * GiB)
    seen: dict[str, Any] = {}

    def unload(lease: Lease) -> None:
        # Far too slow: still "unloading" when the server revokes the lease (bounded: 10 s).
        deadline = time.monotonic() + 10
        while state(real_redis, lease.id) != "revoked" and time.monotonic() < deadline:
            time.sleep(0.002)  # watching Redis from inside on_evict: nothing to block on
        seen["lost"], seen["reason"] = lease.lost, lease.lost_reason
        try:
            lease.check()
        except LeaseEvicted as exc:
            seen["check"] = exc.code

    holder = other(boss, "tts")
    victim = holder.acquire(6 * GiB, priority="low", preemptible=True, grace=1, ttl=0.9, on_evict=unload)
    requester = other(boss, "llm").acquire(6 * GiB, priority="high", timeout=10)

    assert requester.device == "gpu0"
    wait_for("on_evict to look", lambda: "lost" in seen)
    assert seen["lost"] is True
    assert seen["reason"] == "not given back before the eviction deadline"
    assert seen["check"] == "lease_evicted"
    assert victim.lost


def test_leaving_a_with_block_after_the_eviction_deadline_raises_lease_evicted(boss: Boss) -> None:
    clock = Clock()
    holder = Boss(boss.redis, holder="tts", clock=clock)
    boss.add_device("gpu0", 8 * GiB)

    def hold() -> None:
        with holder.lease(4 * GiB, ttl=60, grace=1) as lease:
            lease._evict_notice(redis_ms(boss.redis) + 1000)
            assert lease.evict_deadline is not None
            clock.now = lease.evict_deadline
            assert lease.lost

    with pytest.raises(LeaseEvicted):
        hold()


# --- fault 3: a retried acquire keeps the holder listening ---------------------------------------


def test_a_retried_acquire_returns_the_lease_held_and_it_still_hears_eviction(boss: Boss) -> None:
    boss.add_device("gpu0", 8 * GiB)
    heard: list[str] = []
    holder = other(boss, "tts")
    first = holder.acquire(
        6 * GiB,
        request_id="tts-1",
        priority="low",
        preemptible=True,
        ttl=60,
        on_evict=lambda x: heard.append(x.id),
    )
    again = holder.acquire(6 * GiB, request_id="tts-1", priority="low", preemptible=True, ttl=60)
    assert again is first

    requester = other(boss, "llm").acquire(6 * GiB, priority="high", timeout=10)

    assert requester.device == "gpu0"
    join_evict_thread(first)  # it ran on_evict, then released
    assert heard == ["tts-1"]
    assert holder.held() == []


# --- fault 4: waits longer than the read timeout ---------------------------------------------------


def test_a_wait_longer_than_the_read_timeout_keeps_waiting(redis_url: str, real_redis: redis.Redis) -> None:
    """redis-py's clients time reads out (5 s by default); a waiter whose poll period is longer
    (TTL over 15 s) blocks for less than that, and waits on instead of failing."""
    real_redis.flushdb()
    holder = Boss.from_url(redis_url, holder="tts")
    holder.add_device("gpu0", 8 * GiB)
    lease = holder.acquire(8 * GiB, ttl=60)
    waiter = Boss.from_url(redis_url, holder="llm", socket_timeout=0.4)
    t, out = in_thread(lambda: waiter.acquire(8 * GiB, ttl=60, timeout=10, request_id="w"))
    wait_for("the waiter to queue", lambda: state(real_redis, "w") == "queued")
    # Let more than two read timeouts pass, in Redis time, while it waits.
    start = redis_ms(real_redis)
    wait_for("a second", lambda: redis_ms(real_redis) > start + 1000)
    holder.release(lease)
    t.join(10)
    assert isinstance(out.get("value"), Lease), out
    assert Boss.from_url(redis_url, holder="x").max_block == 2.5  # half redis-py's default 5 s


# --- leases keep themselves alive -------------------------------------------------------------------


def test_acquire_renews_until_release_and_release_works_after_a_long_job(boss: Boss) -> None:
    """The seed's manual pattern, with GPU work longer than the TTL: the lease is still held."""
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(vram_gb=8, ttl=1.0)
    first_expiry = lease.info.expires_at_ms
    assert first_expiry is not None
    wait_for("one and a half TTLs of Redis time", lambda: redis_ms(r) > first_expiry + 500, timeout=10)

    assert state(r, lease.id) == "active"
    assert not lease.lost
    boss.release(lease)
    assert state(r, lease.id) == "released"


def test_keepalive_false_leaves_the_beating_to_the_caller(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(vram_gb=8, ttl=0.2, keepalive=False)
    expiry = lease.info.expires_at_ms
    assert expiry is not None
    wait_for("the expiry", lambda: redis_ms(r) > expiry + 50)
    with pytest.raises(LeaseLost):
        boss.release(lease)


def test_max_hold_ends_a_lease_that_is_renewed(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(vram_gb=8, ttl=0.2, max_hold=0.5)
    hold_until = int(str(r.hget(POOL.lease(lease.id), "hold_until")))
    wait_for("the hard cap", lambda: redis_ms(r) > hold_until + 50, timeout=5)
    boss.reap()
    assert state(r, lease.id) == "expired"
    assert r.hget(POOL.lease(lease.id), "reason") == "max_hold"
    assert lease.lost


# --- release by id, release everything -----------------------------------------------------------


def test_release_by_id_and_an_id_not_held_is_a_typed_error(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    lease = boss.acquire(vram_gb=8)
    stranger = other(boss, "stranger")
    before = snapshot(r)
    for bad in (lease.id, "no-such-lease", 42):
        with pytest.raises(LeaseNotHeld):
            stranger.release(bad)  # type: ignore[arg-type]
    assert snapshot(r) == before
    boss.heartbeat(lease.id)
    boss.idle(lease.id)
    boss.busy(lease.id)
    boss.release(lease.id)
    assert state(r, lease.id) == "released"
    assert boss.held() == []


def test_release_all_and_close_give_back_every_lease(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 24 * GiB)
    phase1 = [boss.acquire(vram_gb=4) for _ in range(3)]
    assert sorted(boss.release_all()) == sorted(x.id for x in phase1)
    assert [state(r, x.id) for x in phase1] == ["released"] * 3

    closing = Boss(r, holder="closing")
    held = [closing.acquire(vram_gb=4), closing.acquire(vram_gb=4, keepalive=False)]
    closing.close()
    assert [state(r, x.id) for x in held] == ["released"] * 2


def test_aclose_gives_back_every_lease(tier: Tier) -> None:
    async def main() -> list[str]:
        boss = AsyncBoss(tier.make_async(), holder="a")
        await boss.add_device("gpu0", 24 * GiB)
        leases = [await boss.acquire(vram_gb=4) for _ in range(2)]
        await boss.aclose()
        return [x.id for x in leases]

    ids = asyncio.run(main())
    assert [state(tier.sync, i) for i in ids] == ["released"] * 2


@pytest.mark.parametrize("client", ["sync", "async"])
def test_interpreter_exit_releases_what_is_held(client: str, redis_url: str, real_redis: redis.Redis) -> None:
    real_redis.flushdb()
    Boss(real_redis, holder="t").add_device("gpu0", 24 * GiB)
    code = {
        "sync": "b = Boss.from_url(url, holder='exit'); print(b.acquire(vram_gb=4).id)",
        "async": "import asyncio\n"
        "async def main():\n"
        "    b = AsyncBoss.from_url(url, holder='exit')\n"
        "    print((await b.acquire(vram_gb=4)).id)\n"
        "asyncio.run(main())",
    }[client]
    out = subprocess.run(
        [sys.executable, "-c", f"from gpuboss_client import Boss, AsyncBoss\nurl = {redis_url!r}\n{code}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    lease_id = out.stdout.strip()
    assert state(real_redis, lease_id) == "released", out.stderr


# --- a killed or terminated holder's memory comes back within 5 s ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_dead_holder_frees_its_memory_within_5_s_with_default_settings(
    sig: signal.Signals, redis_url: str, real_redis: redis.Redis, children: list[Child]
) -> None:
    """``lease = boss.acquire(...)`` with every setting at its default, then the process is killed
    (or terminated under Python's default SIGTERM handler, which runs no cleanup): a waiter gets
    the memory within 5 s."""
    real_redis.flushdb()
    own = Boss(real_redis, holder="test")
    own.add_device("gpu0", 8 * GiB, pool="crash")
    holder = Child(HOLDER, redis_url, "manual", "--pool", "crash", "--mib", str(8 * GiB))
    children.append(holder)
    holder.expect("HOLDING")

    killed_at = time.monotonic()
    holder.signal(sig)
    lease = own.acquire(8 * GiB, pool="crash", timeout=10)
    waited = time.monotonic() - killed_at

    print(f"\nmemory back {waited:.2f} s after {sig.name}")
    assert waited < 5.0, f"memory came back {waited:.2f} s after {sig.name}"
    own.release(lease)


# --- the lease as a device string --------------------------------------------------------------------


def test_str_of_a_lease_is_the_device_string(boss: Boss, monkeypatch: pytest.MonkeyPatch) -> None:
    boss.add_device("gpu0", 24 * GiB, cuda_index=0)
    boss.add_device("gpu3", 24 * GiB, cuda_index=3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lease = boss.acquire(vram_gb=8, device="gpu3")
    assert str(lease) == "cuda:3"  # env not applied: the CUDA index
    assert repr(lease).startswith("<Lease ")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", lease.env["CUDA_VISIBLE_DEVICES"])
    assert str(lease) == "cuda:0"  # env applied: the only visible device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert str(lease) == "cuda:1"
    boss.add_device("gpu9", 24 * GiB)  # no CUDA index known
    assert str(boss.acquire(vram_gb=8, device="gpu9")) == "cuda"


def test_the_seed_async_lease_used_as_a_device(tier: Tier, monkeypatch: pytest.MonkeyPatch) -> None:
    """``async with gpu_boss.lease(vram_gb=8, priority="normal") as device: load_model(device)``."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    loaded: list[str] = []

    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="imajin-diffusion") as gpu_boss:
            await gpu_boss.add_device("gpu0", 24 * GiB, cuda_index=0)
            async with gpu_boss.lease(vram_gb=8, priority="normal") as device:
                loaded.append(f"{device}")
            lease_id = await gpu_boss.acquire(vram_gb=8)
            try:
                loaded.append(str(lease_id))
            finally:
                await gpu_boss.release(lease_id)
            kept = await gpu_boss.acquire(vram_gb=8)
            await gpu_boss.release(kept.id)

    asyncio.run(main())
    assert loaded == ["cuda:0", "cuda:0"]


# --- waiting you can see -------------------------------------------------------------------------------


def test_on_wait_reports_position_reason_and_estimate(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    # (its grace outlasts its TTL: the deadline is the grace's, not the expiry's)
    warm = other(boss, "tts").acquire(6 * GiB, priority="low", ttl=20, grace=30)
    warm.idle()  # kept warm: evictable, but it will not hear (nobody unloads in this test)
    states: list[WaitState] = []
    t, out = in_thread(
        lambda: other(boss, "llm").acquire(
            6 * GiB, priority="high", timeout=10, request_id="llm", on_wait=states.append
        )
    )
    wait_for("the eviction", lambda: state(r, warm.id) == "evicting")
    wait_for("the report", lambda: bool(states))
    first = states[0]
    assert (first.request_id, first.position, first.reason, first.evicting) == ("llm", 0, "evicting", 1)
    assert first.until is not None
    assert 25 < first.until - time.monotonic() <= 30
    assert "victims are giving memory back" in first.describe(time.monotonic())

    behind: list[WaitState] = []
    t2, out2 = in_thread(
        lambda: other(boss, "stt").acquire(4 * GiB, timeout=10, request_id="stt", on_wait=behind.append)
    )
    wait_for("the second report", lambda: bool(behind))
    assert (behind[0].position, behind[0].reason, behind[0].until) == (1, "behind", None)
    boss.force_release(warm.id)
    t.join(10)
    assert isinstance(out.get("value"), Lease), out
    boss.force_release("llm")
    t2.join(10)
    assert isinstance(out2.get("value"), Lease), out2


def test_max_queue_refuses_to_queue_and_changes_nothing(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", 8 * GiB)
    boss.acquire(8 * GiB, ttl=60)
    t, _ = in_thread(lambda: other(boss, "w").acquire(GiB, timeout=3, request_id="w1"))
    wait_for("the first waiter", lambda: state(r, "w1") == "queued")
    before = snapshot(r)
    with pytest.raises(QueueFull):
        other(boss, "w").acquire(GiB, timeout=3, max_queue=1)
    assert snapshot(r) == before
    with pytest.raises(BadRequest):
        boss.acquire(GiB, max_queue=0)
    boss.force_release("w1")
    t.join(5)


def test_an_unknown_option_is_a_typed_error(boss: Boss) -> None:
    with pytest.raises(BadRequest, match="unknown acquire option"):
        boss.acquire(GiB, vram_mb=3)  # type: ignore[call-arg]
    with pytest.raises(BadRequest, match="on_wait must be callable"):
        boss.acquire(GiB, on_wait=3)  # type: ignore[arg-type]


# --- one surface ----------------------------------------------------------------------------------------


def test_the_sync_client_is_generated_from_the_async_one() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "client" / "unasync.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_one_heartbeat_worker_renews_every_lease_of_a_client(boss: Boss) -> None:
    boss.add_device("gpu0", 24 * GiB)
    leases = [boss.acquire(GiB, ttl=0.3) for _ in range(5)]
    first = [x.info.expires_at_ms or 0 for x in leases]
    wait_for(
        "a renewal of each",
        lambda: all((x.info.expires_at_ms or 0) > f for x, f in zip(leases, first, strict=True)),
    )
    names = [t.name for t in threading.enumerate()]
    assert names.count("gpuboss-heartbeats") == 1
    assert not any(n.startswith("gpuboss-heartbeat-") for n in names)
    boss.release_all()


def test_a_short_lease_wakes_the_worker_that_sleeps_for_a_long_one(boss: Boss) -> None:
    """The worker sleeps until its soonest beat; a lease due sooner wakes it."""
    boss.add_device("gpu0", 24 * GiB)
    long = boss.acquire(GiB, ttl=60)  # its first beat is 20 s away: the worker sleeps that long
    wait_for(
        "the worker to sleep",
        lambda: boss._keeper_due is not None and boss._keeper_due > time.monotonic() + 10,
    )
    short = boss.acquire(GiB, ttl=1.0)
    first = short.info.expires_at_ms or 0
    wait_for("the short lease's renewal", lambda: (short.info.expires_at_ms or 0) > first, timeout=3)
    assert not short.lost
    boss.release_all()
    assert long.lost  # released


def test_a_cancelled_wait_leaves_the_queue_at_once(real_redis: redis.Redis, redis_url: str) -> None:
    """An ``AsyncBoss.acquire`` task cancelled while it waits withdraws its request (a waiter that
    nobody waits for would hold back those behind it until its TTL)."""

    async def main() -> None:
        boss = AsyncBoss.from_url(redis_url, holder="a")
        await boss.add_device("gpu0", "8GiB")
        await boss.acquire("8GiB", ttl=60)
        waiting = asyncio.create_task(boss.acquire("4GiB", request_id="w", ttl=60, timeout=30))
        while real_redis.zcard(POOL.queue) == 0:
            await asyncio.sleep(0.005)  # the task runs meanwhile: it queues
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert real_redis.zcard(POOL.queue) == 0
        assert state(real_redis, "w") == "cancelled"
        await boss.aclose()

    asyncio.run(main())
