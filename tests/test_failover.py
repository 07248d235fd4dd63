"""Sentinel from every entry point, and no double grant across a failover: a real primary with two
replicas and three sentinels on loopback (``tests/topology.py``).

A ``redis+sentinel://`` client waits for every replica to confirm each grant and renewal (``WAIT``),
so what a holder believes it holds is what a promoted replica knows. These tests fail the primary
over politely (``SENTINEL FAILOVER``), freeze it (the old primary then wakes up still taking
writes, as in a partition), and kill it, with holders and waiters running; they check from the
holders' own clocks that no two believed they held the same memory at once, and that waiters are
granted within their timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from support import CLEAN_ENV, serve_app, wait_for
from topology import Node, SentinelGroup, sentinel_group
from typer.testing import CliRunner

from gpuboss.api import create_app
from gpuboss.settings import ServiceSettings
from gpuboss_cli.main import app as cli
from gpuboss_client import BackendUnavailable, Boss, Lease, LeaseLost
from gpuboss_client.urls import CONFIRM_ALL

pytestmark = pytest.mark.slow

DEVICE_MIB = 6144
#: read timeout of every test client: a frozen primary must not hold a call for long, and a WAIT
#: (at most half of it) must leave a loaded machine's replicas time to answer
OPTIONS = "socket_timeout=1&socket_connect_timeout=0.5"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture
def url(group: SentinelGroup) -> str:
    return f"{group.url}?{OPTIONS}"


@pytest.fixture
def pool(group: SentinelGroup, url: str, request: pytest.FixtureRequest) -> str:
    """A pool of this test with one device of 6 GiB, on a group that has settled from the last test
    (every data node replicating the primary, every sentinel seeing them healthy)."""
    group.wait_healthy()
    name = request.node.name.removeprefix("test_")[:40]
    with Boss.from_url(url, holder="admin") as admin:
        admin.add_device("gpu0", DEVICE_MIB, pool=name)
    return name


class Belief:
    """When a holder believed it held its lease, on the machine's monotonic clock: from the moment
    its acquire returned until it released, or until its local deadline if it lost the lease."""

    def __init__(self, lease: Lease, start: float) -> None:
        self.lease = lease
        self.start = start
        self.released_at: float | None = None

    @property
    def end(self) -> float:
        if self.released_at is not None:
            return self.released_at
        assert self.lease.lost, "still held"
        return self.lease.deadline


def believe(boss: Boss, **options: Any) -> Belief:
    lease = boss.acquire(DEVICE_MIB, **options)
    return Belief(lease, time.monotonic())


def test_every_entry_point_takes_a_sentinel_url(group: SentinelGroup, url: str, pool: str) -> None:
    with Boss.from_url(url, holder="t") as boss:
        assert boss.confirm.replicas == CONFIRM_ALL
        boss.release(boss.acquire(1024, pool=pool, timeout=5))
    result = CliRunner().invoke(cli, ["--redis-url", url, "status", "--pool", pool], env=CLEAN_ENV)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "gpu0" in result.stdout
    settings = ServiceSettings(redis_url=url)
    with serve_app(create_app(settings, url)) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        got = http.post("/v1/leases", json={"vram": 1024, "pool": pool, "timeout_s": 5})
        assert got.status_code == 201, got.text


def test_a_failover_keeps_a_confirmed_lease_and_its_waiter_is_granted_after_it(
    group: SentinelGroup, url: str, pool: str
) -> None:
    with Boss.from_url(url, holder="h") as holder, Boss.from_url(url, holder="w") as waiter:
        held = believe(
            holder, pool=pool, ttl=30, timeout=5
        )  # behind Sentinel: longer than a failover settles
        got: list[Belief] = []
        thread = threading.Thread(target=lambda: got.append(believe(waiter, pool=pool, timeout=60)))
        thread.start()
        wait_for("the waiter to queue", lambda: holder.status(pool)[0].queued == 1, timeout=10)
        old = group.primary()
        new = group.failover()
        assert new is not old
        # The grant was confirmed on a replica before the holder heard of it: the new primary
        # has it, the holder renews it there, and the waiter is still waiting.
        _renewed_then_handed_over(group, holder, held, (thread, got, waiter))


def _renewed_then_handed_over(
    group: SentinelGroup, holder: Boss, held: Belief, waiting: tuple[threading.Thread, list[Belief], Boss]
) -> None:
    """The holder renews its lease on the new primary while the waiter still waits; once the holder
    gives it back, the waiter is granted, and only then believes it holds the memory."""
    thread, got, waiter = waiting
    since = _expiry(group, held.lease)
    wait_for("a renewal on the new primary", lambda: _expiry(group, held.lease) > since, timeout=40)
    assert not held.lease.lost, held.lease.lost_reason
    assert got == []
    held.released_at = time.monotonic()  # it stops using the memory, then gives it back
    # A recount that lowers the replica count closes every connection of the client, the one
    # this release is using too: the release tries again by itself.
    holder.release(held.lease)
    thread.join(60)
    assert len(got) == 1
    assert got[0].start >= held.end
    waiter.release(got[0].lease)


def _expiry(group: SentinelGroup, lease: Lease) -> int:
    """The lease's expiry (Redis ms) on the current primary."""
    expires = group.client().hget(f"gpuboss:{{{lease.pool}}}:v1:lease:{lease.id}", "expires_at")
    assert expires is not None, "the new primary does not know the lease"
    return int(expires)


def test_a_frozen_primary_grants_nothing_twice(group: SentinelGroup, url: str, pool: str) -> None:
    """The primary freezes under a holder; the sentinels promote a replica; a second client asks
    for the same memory during the election (and waits through it); the old primary wakes up still
    a primary for a while, taking the holder's renewals that no replica will ever see. The second
    client may hold the memory only after the holder stopped believing it does."""
    with Boss.from_url(url, holder="h") as holder, Boss.from_url(url, holder="x") as other:
        held = believe(holder, pool=pool, ttl=2.0, timeout=5)
        old = group.primary()
        group.freeze(old)
        try:
            # arrives during the election; its TTL outlasts the old primary's return as a replica
            got = believe(other, pool=pool, timeout=30, ttl=30)
        finally:
            group.thaw(old)
        assert held.lease.lost  # it could not renew on a node its replicas confirm
        assert got.start >= held.end, (got.start, held.end)
        assert group.primary() is not old
        # The sentinels demote the old primary (about 10 s after it wakes). Until it follows the
        # new one, they count it as a replica that cannot confirm: no write counts, not even this
        # release.
        wait_for("the old primary to follow the new one", lambda: _following(group, old), timeout=40)
        other.release(got.lease)


@pytest.mark.parametrize("count", ["fresh", "stale"])
def test_a_primary_a_planned_failover_left_behind_confirms_no_grant(
    group: SentinelGroup, url: str, pool: str, count: str
) -> None:
    """``SENTINEL FAILOVER`` promotes a replica, and for about a second the old primary still takes
    writes with the other replica attached, which would confirm them to ``WAIT 1`` and then drop
    them when it follows the new primary. A holder whose connection still reaches the old primary
    must not be granted there: every replica has to confirm, and the promoted one cannot.

    ``stale``: the holder counted the replicas while one was down, and has not written since it
    came back (so no ``ROLE`` told it); the old primary's one remaining replica meets that count,
    and only the sentinels' naming of another primary tells the write is on the wrong node."""
    old = group.primary()
    others = [n for n in group.data_nodes if n is not old and n.alive]
    wait_for(
        "both replicas to follow the primary", lambda: all(_following(group, n) for n in others), timeout=40
    )
    with Boss.from_url(url, holder="h") as holder:
        if count == "stale":
            group.kill(others[0])
            group.wait_seen_down(others[0])
            holder.release(holder.acquire(1024, pool=pool, timeout=5))  # counts one replica
            group.restart(others[0])
        else:
            holder.release(holder.acquire(1024, pool=pool, timeout=5))  # counts both replicas
        sentinel = group.node_client(group.sentinels[0], socket_timeout=2)
        sentinel.execute_command("SENTINEL", "FAILOVER", group.service)
        try:
            # polls other processes' state: nothing to block on
            wait_for(
                "a replica to be promoted", lambda: any(_is_master(group, n) for n in others), timeout=15
            )
            try:
                # Through the pooled connection to the old primary, usually; perhaps already to the
                # new one, where every replica left (the other one) confirms it.
                lease: Lease | None = holder.acquire(DEVICE_MIB, pool=pool, timeout=0)
            except BackendUnavailable:
                lease = None
            new = group.wait_for_new_primary(old)
            # A grant the holder believes in is one the new primary has; no other.
            granted = group.node_client(new).hkeys(f"gpuboss:{{{pool}}}:v1:leases")
            assert granted == ([lease.id] if lease else [])
            if lease is not None:
                holder.release(lease)
            with Boss.from_url(url, holder="x") as other:
                other.release(other.acquire(DEVICE_MIB, pool=pool, timeout=10))
        finally:
            # The sentinels demote the old primary (about 10 s after the promotion): the next test
            # starts from a primary with two replicas again.
            wait_for("the old primary to follow the new one", lambda: _following(group, old), timeout=40)


def test_a_replica_back_after_the_count_must_confirm_writes_too(
    group: SentinelGroup, url: str, pool: str
) -> None:
    """A replica that was down when the client counted them (a primary killed earlier, back as a
    replica) is one that the next failover may promote. Once a write finds it attached, every write
    waits for it too: one that only the other replica confirms does not count, since a failover
    that promotes this one would lose it."""
    replica = group.replicas()[0]
    group.kill(replica)
    try:
        group.wait_seen_down(replica)
        with Boss.from_url(url, holder="h") as holder:
            holder.release(holder.acquire(1024, pool=pool, timeout=5))  # one replica, counted
            group.restart(replica)
            holder.release(holder.acquire(1024, pool=pool, timeout=5))  # finds two attached
            group.freeze(replica)
            try:
                with pytest.raises(BackendUnavailable, match="1 of 2 replicas"):
                    holder.acquire(1024, pool=pool, timeout=0)
            finally:
                group.thaw(replica)
            lease = holder.acquire(1024, pool=pool, timeout=10)
            assert group.node_client(replica).hget(f"gpuboss:{{{pool}}}:v1:leases", lease.id) is not None
            holder.release(lease)
    finally:
        if not replica.alive:
            group.restart(replica)
        group.wait_healthy()


def test_a_grant_that_expired_unconfirmed_is_asked_for_again(
    group: SentinelGroup, url: str, pool: str
) -> None:
    """While a replica is frozen, no write is confirmed: the first grant of a short lease expires
    before its client could believe in it, and a retry finds it ended. Nobody believed in it, so
    the client asks again under a new id, within its timeout, rather than failing the acquire with
    ``LeaseLost``; a caller who chose the request id gets ``LeaseLost`` (its request did end)."""
    replica = group.replicas()[0]
    for chosen in (None, "mine"):
        with Boss.from_url(url, holder="h") as holder:
            holder.release(holder.acquire(1024, pool=pool, timeout=5))  # counts both replicas
            group.freeze(replica)
            try:
                if chosen is None:
                    # granted once the sentinels see the replica down (the count then drops)
                    lease = holder.acquire(1024, pool=pool, ttl=0.4, timeout=20)
                    assert lease.info.granted_at_ms is not None
                else:
                    with pytest.raises(LeaseLost, match="mine has ended: expired"):
                        holder.acquire(1024, pool=pool, ttl=0.4, timeout=20, request_id=chosen)
            finally:
                group.thaw(replica)
        group.wait_healthy()


def _is_master(group: SentinelGroup, node: Node) -> bool:
    try:
        return group.node_client(node, socket_timeout=1).execute_command("ROLE")[0] == "master"
    except redis.RedisError:
        return False


def _has_replica(group: SentinelGroup, node: Node) -> bool:
    info = group.node_client(node, socket_timeout=1).info("replication")
    return any(
        isinstance(v, dict) and v.get("state") == "online" for k, v in info.items() if k.startswith("slave")
    )


def _following(group: SentinelGroup, node: Node) -> bool:
    try:
        info = group.node_client(node, socket_timeout=1).info("replication")
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


def test_a_killed_primary_is_replaced_and_holders_and_waiters_carry_on(
    group: SentinelGroup, url: str, pool: str, record_property: Any
) -> None:
    with Boss.from_url(url, holder="h") as holder, Boss.from_url(url, holder="w") as waiter:
        # A TTL longer than an election (down-after 1 s, then the vote): the lease outlives it.
        held = believe(holder, pool=pool, ttl=15, timeout=5)
        got: list[Belief] = []
        old = group.kill_primary()
        killed = time.monotonic()
        try:
            # A waiter arrives during the election: it waits through it, within its timeout.
            thread = threading.Thread(target=lambda: got.append(believe(waiter, pool=pool, timeout=60)))
            thread.start()
            new = group.wait_for_new_primary(old)
            # The one replica left follows the new primary: writes can be confirmed again.
            wait_for("a replica of the new primary", lambda: _has_replica(group, new), timeout=30)
            # (confirmed on a replica: the new primary has the lease)
            _renewed_then_handed_over(group, holder, held, (thread, got, waiter))
            record_property("resumed_after_kill_s", round(time.monotonic() - killed, 2))
        finally:
            group.restart(old)
