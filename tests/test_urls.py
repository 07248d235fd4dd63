"""Naming a deployment: every URL form :func:`gpuboss_client.parse_url` takes, what it makes of
each, and the typed error (password masked) for each malformed one."""

from __future__ import annotations

import pytest

from gpuboss_client import BadRequest, Boss, Confirm, Deployment, parse_url
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
