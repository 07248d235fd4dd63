"""A Redis Cluster from every entry point: a real 3-master cluster on loopback (``tests/topology.py``).

Each pool's keys share its hash tag, so a pool lives on one node and its scripts touch one slot;
pools are spread over the masters. The client, the async client, the CLI and the service lease in
pools on different nodes; events of many pools are read per slot; and a pool's slot moves to
another node while holders renew and others acquire, without a lost lease or a double grant.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
from support import CLEAN_ENV, serve_app, wait_for
from topology import Cluster, redis_cluster
from typer.testing import CliRunner

from gpuboss.api import create_app
from gpuboss.settings import ServiceSettings
from gpuboss_cli.main import app as cli
from gpuboss_client import AcquireTimeout, AsyncBoss, BackendUnavailable, Boss, Lease, PoolKeys, ops
from gpuboss_client.keys import hash_slot

pytestmark = pytest.mark.slow

DEVICE_MIB = 8192


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def slot_of(pool: str) -> int:
    return hash_slot(PoolKeys(pool).prefix)


def pools_on_every_master(cluster: Cluster, prefix: str) -> list[str]:
    """One pool name per master, each living on that master."""
    found: dict[int, str] = {}
    for i in range(1000):
        pool = f"{prefix}{i}"
        found.setdefault(cluster.node_for_slot(slot_of(pool)).port, pool)
        if len(found) == len(cluster.masters):
            return sorted(found.values())
    raise AssertionError("no pool names for every master")


@pytest.fixture
def pools(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Pools on every master, each with one device of 8 GiB, removed afterwards."""
    names = pools_on_every_master(cluster, request.node.name.removeprefix("test_")[:20] + "-")
    with Boss.from_url(cluster.url, holder="admin") as admin:
        for pool in names:
            admin.add_device("gpu0", DEVICE_MIB, pool=pool)
        yield names
        for pool in names:
            admin.remove_device("gpu0", pool=pool, force=True)


def test_pools_on_different_nodes_lease_from_the_client(cluster: Cluster, pools: list[str]) -> None:
    with Boss.from_url(cluster.url, holder="t") as boss:
        leases = [boss.acquire(DEVICE_MIB, pool=pool, timeout=5) for pool in pools]
        assert [lease.pool for lease in leases] == pools
        statuses = {s.pool: s for s in boss.status()}
        assert all(statuses[p].devices[0].used_mib == DEVICE_MIB for p in pools)
        with pytest.raises(AcquireTimeout):  # each pool is full on its own node
            boss.acquire(1, pool=pools[0], timeout=0)
        for lease in leases:
            boss.release(lease)
        assert all(s.devices[0].used_mib == 0 for s in boss.status() if s.pool in pools)


def test_the_async_client_leases_on_a_cluster(cluster: Cluster, pools: list[str]) -> None:
    async def main() -> list[str]:
        async with AsyncBoss.from_url(cluster.url, holder="a") as boss:
            got = []
            for pool in pools:
                async with boss.lease(1024, pool=pool, timeout=5) as lease:
                    got.append(lease.pool)
            return got

    assert asyncio.run(main()) == pools


def test_events_of_pools_on_different_nodes_are_followed(cluster: Cluster, pools: list[str]) -> None:
    with Boss.from_url(cluster.url, holder="t") as boss:
        start = boss.event_cursors()
        for pool in pools:
            boss.release(boss.acquire(1024, pool=pool, timeout=5))
        seen: list[tuple[str, str]] = []
        for event in boss.follow(after=start, block=None):
            if event.pool in pools:
                seen.append((event.pool, event.name))
        assert sorted(seen) == sorted((p, name) for p in pools for name in ("granted", "released"))
        assert {e.pool for e in boss.events(count=1000)} >= set(pools)


def test_the_cli_reaches_a_cluster(cluster: Cluster, pools: list[str]) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--redis-url", cluster.url, "status", "--json"], env=CLEAN_ENV)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert set(pools) <= set(result.stdout.split('"'))
    added = runner.invoke(
        cli, ["--redis-url", cluster.url, "devices", "add", "gpu1", "--vram", "1GiB", "--pool", pools[1]],
        env=CLEAN_ENV,
    )  # fmt: skip
    assert added.exit_code == 0, (added.stdout, added.stderr)
    with Boss.from_url(cluster.url, holder="t") as boss:
        assert {d.name for d in boss.devices(pools[1])} == {"gpu0", "gpu1"}


def test_the_service_serves_pools_on_a_cluster(cluster: Cluster, pools: list[str]) -> None:
    settings = ServiceSettings(redis_url=cluster.url, reap_interval_s=0.2)
    with (
        serve_app(create_app(settings, cluster.url)) as base,
        httpx.Client(base_url=base, timeout=10) as http,
    ):
        assert http.get("/readyz").status_code == 200
        for pool in pools:
            got = http.post("/v1/leases", json={"vram": 1024, "pool": pool, "timeout_s": 5})
            assert got.status_code == 201, got.text
            lease = got.json()
            done = http.post(
                f"/v1/leases/{lease['id']}/release", json={"pool": pool, "token": lease["token"]}
            )
            assert done.status_code == 200, done.text
        # The event hub tails every pool, one read per slot: its counters saw each pool's events.
        wait_for(
            "the hub to count every pool's grant",
            lambda: all(f'pool="{p}"' in line for p in pools for line in _granted_lines(http, p)),
            timeout=10,
        )


def _granted_lines(http: httpx.Client, pool: str) -> list[str]:
    lines = [
        line
        for line in http.get("/metrics").text.splitlines()
        if line.startswith("gpuboss_events_total") and f'pool="{pool}"' in line and 'event="granted"' in line
    ]
    return lines or [""]


def test_moving_a_live_pools_slot_loses_no_lease_and_grants_nothing_twice(
    cluster: Cluster, pools: list[str]
) -> None:
    pool = pools[0]
    slot = slot_of(pool)
    source = cluster.node_for_slot(slot)
    target = next(n for n in cluster.masters if n is not source)
    held_by_others: list[Lease] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn() -> None:
        """Acquire and release half the device, again and again, while the slot moves."""
        with Boss.from_url(cluster.url, holder="churn") as boss:
            while not stop.is_set():
                try:
                    boss.release(boss.acquire(DEVICE_MIB // 2, pool=pool, timeout=10))
                except BaseException as exc:
                    errors.append(exc)
                    return

    refused: list[str] = []
    with (
        Boss.from_url(cluster.url, holder="holder") as holder,
        Boss.from_url(cluster.url, holder="o") as other,
    ):
        kept = holder.acquire(DEVICE_MIB // 2, pool=pool, timeout=5)  # renewed every second
        worker = threading.Thread(target=churn)
        worker.start()

        def meanwhile() -> None:
            # IMPORTING on the target, MIGRATING on the source, no key moved yet: a script whose
            # keys are partly missing on the source gets TRYAGAIN (retryable) until the keys move.
            try:
                held_by_others.append(other.acquire(DEVICE_MIB, pool=pool, timeout=0))
            except (AcquireTimeout, BackendUnavailable) as exc:  # full, or try again: not granted
                refused.append(exc.code)

        try:
            cluster.migrate_slot(slot, target, between=meanwhile)
            # The pool's keys now live on the target; renewals and grants carry on there.
            assert cluster.node_for_slot(slot) is target
            after = _expiry(holder, kept)
            wait_for("a renewal on the new node", lambda: _expiry(holder, kept) > after, timeout=10)
        finally:
            stop.set()
            worker.join(30)
        assert not errors, errors
        assert not kept.lost, kept.lost_reason
        assert held_by_others == []
        assert len(refused) == 1
        status = next(s for s in holder.status() if s.pool == pool)
        assert status.devices[0].used_mib == DEVICE_MIB // 2  # the kept lease alone
        holder.release(kept)


def _expiry(boss: Boss, lease: Lease) -> int:
    """Where the lease's expiry stands on Redis now (each heartbeat moves it on)."""
    expires = boss.run(ops.lease_info(lease.pool, lease.id)).expires_at_ms
    assert expires is not None
    return expires
