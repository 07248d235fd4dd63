"""Operations for holders that keep no Lease object (pool, id, token), event reads, JSON round trips."""

from __future__ import annotations

import asyncio

import pytest
import redis
from support import Tier, in_thread, other, snapshot, state, wait_for

from gpuboss_client import (
    AsyncBoss,
    BadRequest,
    Boss,
    DeviceInfo,
    LeaseEvicted,
    LeaseInfo,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    LeaseRef,
    PoolStatus,
    ops,
    status_document,
)
from gpuboss_client import _core as core
from gpuboss_client.keys import POOLS


@pytest.fixture
def pool_boss(boss: Boss) -> Boss:
    boss.add_device("gpu0", "10GiB", cuda_index=0)
    return boss


def test_ref_operations_act_with_pool_id_and_token_alone(pool_boss: Boss) -> None:
    lease = pool_boss.acquire(1024, ttl=30, preemptible=True)
    ref = LeaseRef(lease.pool, lease.id, lease.token)
    beat = pool_boss.run(ops.heartbeat_ref(ref, 60_000))
    assert (beat.id, beat.state, beat.evict_deadline_ms) == (lease.id, "active", None)
    assert beat.expires_at_ms == beat.now_ms + 60_000
    assert pool_boss.run(ops.mark_ref(ref, "idle")).state == "idle"
    assert pool_boss.run(ops.mark_ref(ref, "busy")).state == "active"
    pool_boss.run(ops.release_ref(ref))
    assert pool_boss.run(ops.lease_info("default", lease.id)).state == "released"
    pool_boss.run(ops.release_ref(ref))  # a retry of the same release is not an error
    with pytest.raises(LeaseLost):
        pool_boss.run(ops.heartbeat_ref(ref, 1000))


def test_ref_operations_refuse_a_wrong_token_and_bad_input(pool_boss: Boss, rclient: redis.Redis) -> None:
    lease = pool_boss.acquire(1024, ttl=30)
    before = snapshot(rclient)
    with pytest.raises(LeaseNotHeld):
        pool_boss.run(ops.release_ref(LeaseRef("default", lease.id, lease.token + 1)))
    with pytest.raises(LeaseNotFound):
        pool_boss.run(ops.heartbeat_ref(LeaseRef("default", "nope", 1), 1000))
    for bad in (
        LeaseRef("default", "bad id", 1),
        LeaseRef("no pool", lease.id, 1),
        LeaseRef("default", lease.id, -1),
    ):
        with pytest.raises(BadRequest):
            pool_boss.run(ops.release_ref(bad))
    with pytest.raises(BadRequest, match="idle or busy"):
        pool_boss.run(ops.mark_ref(LeaseRef("default", lease.id, lease.token), "evict"))
    with pytest.raises(LeaseNotFound):
        pool_boss.run(ops.lease_info("default", "nope"))
    assert snapshot(rclient) == before


def test_an_evicting_lease_is_reported_by_ref_operations(pool_boss: Boss, rclient: redis.Redis) -> None:
    victim = pool_boss.acquire("8GiB", priority="low", preemptible=True, ttl=30, grace=20)
    ref = LeaseRef("default", victim.id, victim.token)
    t, result = in_thread(lambda: other(pool_boss, "big").acquire("8GiB", priority="high", timeout=10))
    wait_for("the victim is evicting", lambda: state(rclient, victim.id) == "evicting")
    beat = pool_boss.run(ops.heartbeat_ref(ref, 30_000))
    assert beat.state == "evicting"
    assert beat.evict_deadline_ms is not None
    assert beat.evict_deadline_ms > beat.now_ms
    marked = pool_boss.run(ops.mark_ref(ref, "busy"))
    assert (marked.state, marked.evict_deadline_ms) == ("evicting", beat.evict_deadline_ms)
    with pytest.raises(LeaseEvicted):
        pool_boss.busy(victim)
    pool_boss.run(ops.release_ref(ref))
    t.join(10)
    assert result["value"].mib == 8192


def test_events_recent_and_tail(tier: Tier) -> None:
    boss = Boss(tier.sync, holder="ev")
    boss.add_device("gpu0", "10GiB")
    boss.add_device("gpu9", "10GiB", pool="other")
    lease = boss.acquire(1024)
    boss.release(lease)
    recent = boss.events(count=100)
    names = [(e.pool, e.name) for e in recent]
    assert names == [
        ("default", "device_added"),
        ("other", "device_added"),
        ("default", "granted"),
        ("default", "released"),
    ]
    assert recent[2].fields["lease"] == lease.id
    assert recent[2].fields["mib"] == "1024"
    assert [e.name for e in boss.events("default", count=2)] == ["granted", "released"]
    assert recent[-1].to_dict()["event"] == "released"
    assert recent[-1].time_ms > 0
    cursors = {e.pool: e.id for e in recent}
    assert boss.tail_events(cursors) == []
    lease2 = boss.acquire(2048, pool="default")
    got = boss.tail_events(cursors, block=5)
    assert [(e.name, e.fields["lease"]) for e in got] == [("granted", lease2.id)]
    with pytest.raises(BadRequest):
        boss.events(count=0)
    with pytest.raises(BadRequest):
        boss.tail_events({"bad pool": "$"})
    assert boss.tail_events({}) == []


def test_tail_events_blocks_until_an_event_arrives(redis_url: str, real_redis: redis.Redis) -> None:
    async def scenario() -> None:
        async with AsyncBoss.from_url(redis_url, holder="tail") as boss:
            await boss.add_device("gpu0", "10GiB")
            waiting = asyncio.create_task(boss.tail_events({"default": "$"}, block=10))
            await asyncio.sleep(0)  # let the XREAD go out first
            while not any(c.get("cmd") == "xread" for c in real_redis.client_list()):
                await asyncio.sleep(0.005)
            async with AsyncBoss.from_url(redis_url, holder="other") as other:
                lease = await other.acquire(512)
            got = await asyncio.wait_for(waiting, 10)
            assert [(e.name, e.fields["lease"]) for e in got] == [("granted", lease.id)]

    asyncio.run(scenario())


def test_json_round_trips(pool_boss: Boss) -> None:
    lease = pool_boss.acquire(1024, labels={"model": "llama"})
    pools = pool_boss.status()
    leases = pool_boss.leases()
    assert [PoolStatus.from_dict(p.to_dict()) for p in pools] == pools
    assert [LeaseInfo.from_dict(x.to_dict()) for x in leases] == leases
    assert [DeviceInfo.from_dict(d.to_dict()) for d in pool_boss.devices()] == pool_boss.devices()
    doc = status_document(pools, leases)["pools"]["default"]
    assert doc["granted"] == 1
    assert doc["leases"][0]["id"] == lease.id
    assert doc["leases"][0]["labels"] == {"model": "llama"}
    assert doc["leases"][0]["cuda_index"] == 0
    assert doc["devices"][0]["free_mib"] == 10 * 1024 - 1024
    with pytest.raises(Exception, match="malformed"):
        LeaseInfo.from_dict({"id": "x"})


# --- the pool registry ----------------------------------------------------------------------------


def _step(boss: Boss, step: core.Step) -> object:
    if isinstance(step, core.Call):
        return boss.script(step.script, step.keys, step.args)
    return boss.redis.execute_command(*step.args)


def _finish(boss: Boss, op: core.Op[None], step: core.Step) -> None:
    """Run the rest of ``op``, from its pending ``step``."""
    try:
        while True:
            step = op.send(_step(boss, step))
    except StopIteration:
        return


def test_a_device_added_while_the_last_one_goes_keeps_its_pool_registered(boss: Boss) -> None:
    """Removing a pool's last device and adding one race: the removal's script runs, then the whole
    addition (script and registration), then the removal drops the pool from the registry. The
    pool has a device, so it must stay registered (it did not: the pool vanished from status)."""
    r = boss.redis
    boss.add_device("gpu0", "8GiB", pool="p")
    removal = core.remove_device("gpu0", pool="p", force=False)
    step = removal.send(None)
    step = removal.send(_step(boss, step))  # the script ran: the pool has no device now
    assert step == core.Command(("SREM", POOLS, "p"))
    boss.add_device("gpu1", "8GiB", pool="p")  # script, then SADD: all of it in between
    _finish(boss, removal, step)

    assert r.smembers(POOLS) == {"p"}
    assert [d.name for d in boss.devices()] == ["gpu1"]


def test_repair_pools_puts_back_a_pool_with_devices(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB", pool="a")
    boss.add_device("gpu0", "8GiB", pool="b")
    r.srem(POOLS, "b")  # as if its client died between the script and the registration
    assert [s.pool for s in boss.status()] == ["a"]

    assert boss.repair_pools() == ["b"]

    assert [s.pool for s in boss.status()] == ["a", "b"]
    assert boss.repair_pools() == []


# --- following events ----------------------------------------------------------------------------


def test_follow_reads_each_event_of_every_pool_once_new_pools_included(boss: Boss) -> None:
    boss.add_device("gpu0", "8GiB", pool="a")
    start = boss.event_cursors()
    assert set(start) == {"a", "*"}
    boss.add_device("gpu1", "8GiB", pool="a")
    boss.add_device("gpu0", "8GiB", pool="b")  # a pool that appears after the start

    got = [(e.pool, e.name, e.fields["device"]) for e in boss.follow(after=start, block=None)]

    # (sorted: across pools, events of one millisecond come in either order)
    assert sorted(got) == [("a", "device_added", "gpu1"), ("b", "device_added", "gpu0")]
    every = [(e.pool, e.fields["device"]) for e in boss.follow("a", after="0-0", block=None)]
    assert every == [("a", "gpu0"), ("a", "gpu1")]
    assert [e.pool for e in boss.follow("b", after=start, block=None)] == ["b"]


def test_follow_blocks_until_the_next_event(real_redis: redis.Redis) -> None:
    boss = Boss(real_redis, holder="reader")
    boss.add_device("gpu0", "8GiB")
    events = boss.follow(block=5.0)
    t, out = in_thread(lambda: next(events))
    wait_for("the reader to block", lambda: any(c.get("cmd") == "xread" for c in real_redis.client_list()))
    boss.add_device("gpu1", "8GiB")
    t.join(5)
    assert out["value"].fields["device"] == "gpu1"
