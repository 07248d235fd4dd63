"""Naming a deployment: every URL form :func:`gpuboss_client.parse_url` takes, what it makes of
each, and the typed error (password masked) for each malformed one."""

from __future__ import annotations

import pytest
import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpuboss_client import BadRequest, Boss, Confirm, Deployment, _backend_sync, parse_url
from gpuboss_client._connect import Replicas, address, address_of, replicas_of
from gpuboss_client.urls import CONFIRM_ALL, DEFAULT_CONFIRM_MS, redact


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://u:pw@host:6380/2", "unix:///run/redis.sock?db=3", "redis://h"],
)
def test_a_single_redis_url_goes_to_redis_py_unchanged(url: str) -> None:
    d = parse_url(url)
    assert (d.kind, d.url, d.confirm) == ("single", url, Confirm())
    assert d.tls == url.startswith("rediss")


def test_confirm_parameters_are_gpubosss_own_and_left_out_for_redis_py() -> None:
    d = parse_url("unix:///run/redis.sock?db=3&confirm_replicas=2&confirm_ms=250")
    assert d.url == "unix:///run/redis.sock?db=3"
    assert d.confirm == Confirm(2, 250)
    assert parse_url("redis://h:1/0?confirm_replicas=1").url == "redis://h:1/0"


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    d = parse_url("redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380/gpuboss/4?socket_timeout=2.5")
    assert d == Deployment(
        "sentinel", d.url, (("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="gpuboss", db=4,
        options={"username": "app", "password": "s3cret", "socket_timeout": 2.5},
        confirm=Confirm(CONFIRM_ALL),
    )  # fmt: skip


def test_a_sentinel_url_confirms_on_every_replica_unless_told_otherwise() -> None:
    assert parse_url("redis+sentinel://h:1/s").confirm == Confirm(CONFIRM_ALL, DEFAULT_CONFIRM_MS)
    assert parse_url("redis+sentinel://h:1/s?confirm_replicas=0").confirm == Confirm(0)
    assert parse_url("redis+sentinel://h:1/s?confirm_replicas=1").confirm == Confirm(1)
    assert parse_url("redis://h:1/0?confirm_replicas=ALL").confirm == Confirm(CONFIRM_ALL)


def test_sentinels_with_their_own_credentials_and_tls() -> None:
    d = parse_url(
        "rediss+sentinel://h:1/s?sentinel_password=x&sentinel_username=y&ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
    )
    assert d.tls
    assert d.options == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required", "ssl": True}
    assert d.sentinel_options == {
        "sentinel_password": "x", "sentinel_username": "y", "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": "required", "ssl": True,
    }  # fmt: skip


def test_a_cluster_url_names_its_seed_nodes() -> None:
    d = parse_url("rediss+cluster://:pw@[::1]:7000,127.0.0.1:7001?ssl_check_hostname=false")
    assert (d.kind, d.nodes, d.tls) == ("cluster", (("::1", 7000), ("127.0.0.1", 7001)), True)
    assert d.options == {"password": "pw", "ssl_check_hostname": False, "ssl": True}
    assert d.confirm == Confirm()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:6379", "expected e.g. redis://"),
        ("http://u:secret@h:1", "unknown scheme 'http'"),
        ("redis+sentinel://u:secret@h:1", "service"),
        ("redis+sentinel://u:secret@h:1/s/x", "must be a number"),
        ("redis+sentinel://u:secret@h:1/s/1/2", "service"),
        ("redis+cluster://u:secret@h:1/0", "one database"),
        ("redis+cluster://u:secret@h", "is not host:port"),
        ("redis+cluster://u:secret@h:0", "is not host:port"),
        ("redis+cluster://u:secret@h:1,", "is not host:port"),
        ("redis+cluster://u:secret@h:1?ssl_ca_certs=/ca", "need rediss"),
        ("redis+cluster://u:secret@h:1?bogus=1", "unknown parameter 'bogus'"),
        ("redis+cluster://u:secret@h:1?confirm_replicas=1", "cannot apply to a cluster"),
        ("redis+cluster://u:secret@h:1?sentinel_password=x", "cannot apply to a cluster"),
        ("redis+cluster://u:secret@h:1?socket_timeout=soon", "must be a number"),
        ("rediss+cluster://u:secret@h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs is one of"),
        ("redis://u:secret@h:1?confirm_replicas=-1", "whole number"),
        ("redis://u:secret@h:1?confirm_ms=0", "at least 1"),
    ],
)
def test_a_malformed_url_is_a_bad_request_that_masks_the_password(url: str, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_url(url)
    assert says in caught.value.message
    assert "secret" not in caught.value.message


def test_from_url_refuses_a_malformed_url_before_connecting() -> None:
    with pytest.raises(BadRequest, match="unknown scheme"):
        Boss.from_url("memcached://h:1", holder="t")


def test_redact_masks_only_the_password() -> None:
    assert redact("redis+sentinel://app:pw@h:1/s") == "redis+sentinel://app:***@h:1/s"
    assert redact("redis://h:1/0") == "redis://h:1/0"


PRIMARY, DEPOSED = ("10.0.0.1", 6379), ("10.0.0.2", 6379)


@pytest.mark.parametrize(
    ("replicas", "acked", "written_to", "counts"),
    [
        (Replicas(1, 1, sentinels=True, primary=PRIMARY), 1, PRIMARY, True),
        (Replicas(1, 1, sentinels=True, primary=PRIMARY), 2, PRIMARY, True),
        (Replicas(2, 2, sentinels=True, primary=PRIMARY), 1, PRIMARY, False),  # one replica lacks it
        # the old primary of a planned failover, its other replica still attached and confirming
        (Replicas(1, 1, sentinels=True, primary=PRIMARY), 1, DEPOSED, False),
        (Replicas(1, 1, sentinels=True, primary=None), 1, PRIMARY, False),  # the sentinels disagree
        (Replicas(1, 1, sentinels=True, primary=PRIMARY), 1, None, False),  # a Unix socket: not it
        (Replicas(1, 1), 1, None, True),  # no Sentinel: the one primary there is
        (Replicas(0, 0), 0, PRIMARY, True),
        (Replicas(2, 2), 1, PRIMARY, False),
    ],
)
def test_a_write_counts_on_every_replica_counted_and_only_on_the_named_primary(
    replicas: Replicas, acked: int, written_to: tuple[str, int] | None, counts: bool
) -> None:
    assert replicas.confirm(acked, written_to) is counts


def test_a_replica_found_attached_counts_from_then_on() -> None:
    counted = Replicas(1, 2, sentinels=True, primary=PRIMARY)  # one of two listed is down
    assert counted.attached(2) == Replicas(2, 2, sentinels=True, primary=PRIMARY)
    assert counted.attached(3) == Replicas(3, 3, sentinels=True, primary=PRIMARY)


def test_addresses_read_from_sentinel_replies_and_connections() -> None:
    assert address(b"127.0.0.1", b"26379") == ("127.0.0.1", 26379)
    assert address("::1", 6379) == ("::1", 6379)
    conn = redis.Connection(host="127.0.0.1", port=7000)
    assert address_of(conn) == ("127.0.0.1", 7000)
    assert address_of(redis.UnixDomainSocketConnection(path="/tmp/redis.sock")) is None
    assert replicas_of(["master", 10, [["127.0.0.1", "7001", "10"]]]) == 1
    assert replicas_of(["slave", "127.0.0.1", 7000, "connected", 10]) == 0


def test_without_an_answering_sentinel_the_count_stays_and_names_no_primary() -> None:
    no_retry = {"retry": Retry(NoBackoff(), 0)}
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", 1)], sentinel_kwargs=no_retry)  # nothing listens
    counted = _backend_sync.count_replicas(sentinel.master_for("nowhere"), 2)
    assert counted == Replicas(2, 2, sentinels=True)
    assert not counted.confirm(2, ("127.0.0.1", 6379))


def _replica(port: int, flags: str) -> dict[str, str]:
    return {"ip": "10.0.0.9", "port": str(port), "flags": flags}


def test_the_sentinels_views_make_one_count() -> None:
    up, down = _replica(1, "slave"), _replica(2, "s_down,slave,disconnected")
    agreed = [(PRIMARY, [up, down]), (("10.0.0.1", b"6379"), [up, _replica(2, "slave")])]
    assert Replicas.from_sentinels(agreed, 0) == Replicas(2, 2, sentinels=True, primary=PRIMARY)
    # a sentinel promoting a replica: its primary is in flux, whatever the others name
    promoting = [(PRIMARY, [up, down]), (PRIMARY, [_replica(1, "slave,promoted"), up])]
    assert Replicas.from_sentinels(promoting, 3) == Replicas(3, 3, sentinels=True)
    # the sentinels name two primaries: the last count holds; RESP3 replies give flags as sets
    split = [(PRIMARY, [up]), (DEPOSED, [{"flags": {"slave"}}])]
    assert Replicas.from_sentinels(split, 0) == Replicas(1, 1, sentinels=True)
