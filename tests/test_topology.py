"""Smoke tests of the loopback deployments in ``topology``: a cluster that spreads keys and moves a
slot, and a Sentinel group that fails over on demand and after its primary dies."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.crc import key_slot
from topology import redis_cluster, sentinel_group

pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
def test_cluster_spreads_keys_and_migrates_a_slot(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with redis_cluster(tmp_path, masters=3) as cluster:
        assert len(cluster.masters) == 3
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert cluster.url.count(",") == 2
        client = cluster.client()
        owners = {}
        for tag in "abcdef":
            key = f"{{{tag}}}key"
            assert client.set(key, tag)
            assert client.get(key) == tag
            owners[tag] = cluster.node_for_slot(key_slot(key.encode()))
        assert len(set(owners.values())) >= 2

        slot = key_slot(b"{a}key")
        target = next(n for n in cluster.masters if n is not owners["a"])
        outcome: list[str] = []

        def between() -> None:
            # the slot is MIGRATING on its owner and IMPORTING on the target: a new key goes by ASK
            try:
                client.set("{a}new", "during")
                outcome.append("ok")
            except redis.RedisError as e:
                outcome.append(type(e).__name__)

        cluster.migrate_slot(slot, target, between=between)

        # which it was goes into the report (not the record_property fixture: it warns under xunit2)
        request.node.user_properties.append(("write_during_migration", outcome[0]))
        assert len(outcome) == 1
        assert client.get("{a}key") == "a"
        if outcome == ["ok"]:
            assert client.get("{a}new") == "during"
        for node in cluster.nodes:
            assert cluster.node_for_slot(slot, asked=node) is target
        assert cluster.node_client(target).cluster("COUNTKEYSINSLOT", slot) >= 1


@pytest.mark.timeout(60)
def test_sentinel_failover_keeps_acknowledged_data(tmp_path: Path) -> None:
    with sentinel_group(tmp_path, replicas=2, sentinels=3) as group:
        assert group.url == "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in group.sentinel_addrs) + (
            "/gpuboss"
        )
        old = group.primary()
        assert len(group.replicas()) == 2
        client = group.client()
        client.set("key", "value")
        assert client.wait(2, 5000) == 2  # both replicas have it before the failover

        new = group.failover()

        assert new is not old
        assert group.node_client(new).get("key") == "value"
        assert old.role == "replica"
        assert old in group.replicas()
        info = group.node_client(old).info("replication")
        assert (info["role"], info["master_port"], info["master_link_status"]) == ("slave", new.port, "up")


@pytest.mark.timeout(60)
def test_killed_primary_is_replaced_and_rejoins(tmp_path: Path) -> None:
    with sentinel_group(tmp_path, replicas=2, sentinels=3) as group:
        old = group.kill_primary()
        assert not old.alive

        new = group.wait_for_new_primary(old, timeout=30)

        assert new is not old
        assert group.node_client(new).role()[0] == "master"
        group.restart(old)
        assert old.alive
        assert old in group.replicas()
