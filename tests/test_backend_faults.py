"""What a client sees when Redis cannot serve it, each fault on a real ``redis-server`` of its own:
full memory, a replica, too few replicas, a refused command, and an outage that a blocking
acquire waits through. Every one is a typed error; a retryable one when waiting helps; and none
half-writes anything."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import dump_all, in_thread, wait_for
from topology import Node, redis_server, restart

from gpuboss_client import AcquireTimeout, BackendForbidden, BackendUnavailable, Boss, Lease, LeaseLost

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Node]:
    config = ("maxmemory-policy noeviction", "appendonly yes", "appendfsync always")  # a restart keeps all
    with redis_server(tmp_path / "redis", *config) as node:
        yield node


def url_of(node: Node, user: str = "") -> str:
    return f"redis://{user}127.0.0.1:{node.port}/0?socket_timeout=2"


@pytest.fixture
def admin(server: Node) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port, decode_responses=True)
    yield client
    client.close()


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "scripts"])
def test_a_full_redis_refuses_an_acquire_cleanly_and_still_releases_and_renews(
    server: Node, admin: redis.Redis, functions: bool
) -> None:
    """Functions that must run when Redis is full carry allow-oom; scripts write first what cannot
    grow memory (``writes_even_when_full``)."""
    with Boss(redis.Redis(port=server.port, socket_timeout=2), holder="t", functions=functions) as boss:
        boss.add_device("gpu0", "24GiB")
        held = boss.acquire("8GiB", keepalive=False)
        before = dump_all(admin)
        admin.config_set("maxmemory", 1)  # below what it uses: every write that may grow is refused
        try:
            with pytest.raises(BackendUnavailable) as refused:
                boss.acquire("8GiB", timeout=0)
            assert refused.value.retryable
            assert refused.value.details["redis_error"] == "OOM"
            assert dump_all(admin) == before  # nothing half-written
            boss.heartbeat(held)  # keeping a lease alive works when full
            boss.release(held)  # and so does giving it back
        finally:
            admin.config_set("maxmemory", 0)
        assert boss.status()[0].devices[0].used_mib == 0


def test_a_replica_refuses_writes_as_retryable(server: Node, tmp_path: Path) -> None:
    with (
        redis_server(tmp_path / "replica", f"replicaof 127.0.0.1 {server.port}") as replica,
        Boss.from_url(url_of(replica), holder="t") as boss,
    ):
        with pytest.raises(BackendUnavailable) as refused:
            boss.add_device("gpu0", "24GiB")
        assert refused.value.details["redis_error"] == "READONLY"


def test_too_few_replicas_is_retryable_and_leaving_a_lease_block_says_lost(
    server: Node, admin: redis.Redis
) -> None:
    with Boss.from_url(url_of(server), holder="t") as boss:
        boss.add_device("gpu0", "24GiB")

        def hold_while_refused() -> None:
            with boss.lease("1GiB", timeout=0, ttl=0.6) as lease:
                admin.config_set("min-replicas-to-write", 1)  # no replica: every write is refused
                with pytest.raises(BackendUnavailable) as refused:
                    boss.acquire("1GiB", timeout=0)
                assert refused.value.details["redis_error"] == "NOREPLICAS"
                # Its renewals are refused too: it fences itself by its local deadline.
                wait_for("the lease to fence itself", lambda: lease.lost, timeout=5)

        with pytest.raises(LeaseLost):  # leaving the block says so (not a protocol error)
            hold_while_refused()
        admin.config_set("min-replicas-to-write", 0)


def test_a_refused_command_names_itself_and_changes_nothing(server: Node, admin: redis.Redis) -> None:
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~gpuboss:*", "&*", "+@read", "+ping")
    admin.execute_command("ACL", "SETUSER", "reader", "+evalsha", "+script|exists")
    with Boss.from_url(url_of(server), holder="admin") as owner:
        owner.add_device("gpu0", "24GiB")
    before = dump_all(admin)
    with (
        Boss.from_url(url_of(server, "reader:pw@"), holder="t") as boss,
        pytest.raises(BackendForbidden) as refused,
    ):
        boss.acquire("1GiB", timeout=0)
    assert "NOPERM" in refused.value.message or "permission" in refused.value.message
    assert dump_all(admin) == before


def test_a_blocking_acquire_waits_through_a_redis_restart(
    server: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with Boss.from_url(url_of(server), holder="t") as boss:
        boss.add_device("gpu0", "24GiB")
        server.process.kill()
        server.process.wait()
        with _heard("trying again") as retrying:
            caplog.set_level(logging.INFO, logger="gpuboss_client")
            worker, out = in_thread(lambda: boss.acquire("1GiB", timeout=30))
            assert retrying.wait(10), "the acquire did not wait for Redis"
            restart(server)  # appendonly: the device is still there
            worker.join(30)
        assert isinstance(out.get("value"), Lease), out
        assert boss.status()[0].devices[0].used_mib == 1024


@pytest.mark.parametrize("verb", ["release", "idle", "busy"])
def test_release_idle_and_busy_go_through_a_redis_restart(
    server: Node, admin: redis.Redis, verb: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each is idempotent for its lease and token, so the client tries it again while Redis is
    unavailable (a failover, a restart) instead of failing a holder that did nothing wrong."""
    with Boss.from_url(url_of(server), holder="t") as boss:
        boss.add_device("gpu0", "24GiB")
        lease = boss.acquire("1GiB", ttl=60, keepalive=False)
        if verb == "busy":
            boss.idle(lease)
        server.process.kill()
        server.process.wait()
        with _heard("trying again") as retrying:
            caplog.set_level(logging.INFO, logger="gpuboss_client")
            worker, out = in_thread(lambda: getattr(boss, verb)(lease))
            assert retrying.wait(10), f"{verb} did not wait for Redis"
            restart(server)  # appendonly: the lease is still there
            worker.join(30)
        assert "error" not in out, out
        state = admin.hget(f"gpuboss:{{default}}:v1:lease:{lease.id}", "state")
        assert state == {"release": "released", "idle": "idle", "busy": "active"}[verb]


def test_a_release_gives_up_after_a_while_and_keeps_the_lease(server: Node) -> None:
    with Boss.from_url(url_of(server), holder="t") as boss:
        boss.add_device("gpu0", "24GiB")
        lease = boss.acquire("1GiB", ttl=60, keepalive=False)
        server.process.kill()
        server.process.wait()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            boss.release(lease)
        assert 4 <= time.monotonic() - started < 10
        assert boss.held() == [lease]  # still held: the caller may try again
        restart(server)
        boss.release(lease)
        assert boss.held() == []


@contextlib.contextmanager
def _heard(words: str) -> Iterator[threading.Event]:
    """An event set once the client logs ``words``."""
    heard = threading.Event()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if words in record.getMessage():
                heard.set()

    handler = Heard()
    logging.getLogger("gpuboss_client").addHandler(handler)
    try:
        yield heard
    finally:
        logging.getLogger("gpuboss_client").removeHandler(handler)


def test_a_try_once_acquire_does_not_wait_for_redis(server: Node) -> None:
    with Boss.from_url(url_of(server), holder="t") as boss:
        boss.add_device("gpu0", "24GiB")
        server.process.kill()
        server.process.wait()
        with pytest.raises(BackendUnavailable):
            boss.acquire("1GiB", timeout=0)
        with pytest.raises((BackendUnavailable, AcquireTimeout)):
            boss.acquire("1GiB", timeout=0.3)


def test_a_waiter_cut_short_by_unblocked_waits_on(server: Node, admin: redis.Redis) -> None:
    """Redis answers a blocked ``BLPOP`` with ``UNBLOCKED`` when its primary becomes a replica (a
    failover), as ``CLIENT UNBLOCK ... ERROR`` does here: a retryable outage, so the waiter asks
    again with its request id and is granted once the memory is free."""
    with (
        Boss.from_url(url_of(server), holder="h") as holder,
        Boss.from_url(url_of(server), holder="w") as waiter,
    ):
        holder.add_device("gpu0", 4096)
        held = holder.acquire(4096, ttl=30)
        thread, out = in_thread(lambda: waiter.acquire(4096, ttl=30, timeout=20))

        def blocked() -> list[str]:
            return [c["id"] for c in admin.client_list() if c["cmd"] == "blpop"]

        wait_for("the waiter to block", lambda: bool(blocked()))
        assert admin.execute_command("CLIENT", "UNBLOCK", blocked()[0], "ERROR") == 1
        wait_for("the waiter to block again", lambda: bool(blocked()))
        holder.release(held)
        thread.join(20)
        assert "error" not in out, out
        waiter.release(out["value"])


def test_idle_and_busy_on_a_lease_redis_lost_say_lost(server: Node, admin: redis.Redis) -> None:
    """A lease that Redis no longer has (a failover that lost it, an operator's flush) is lost to
    ``idle()`` and ``busy()`` as to a heartbeat: LeaseLost, and ``lease.lost``."""
    with Boss.from_url(url_of(server), holder="h") as boss:
        boss.add_device("gpu0", 4096)
        for verb in ("idle", "busy"):
            lease = boss.acquire(1024, ttl=30)
            admin.delete(f"gpuboss:{{default}}:v1:lease:{lease.id}")
            with pytest.raises(LeaseLost):
                getattr(boss, verb)(lease)
            assert lease.lost
