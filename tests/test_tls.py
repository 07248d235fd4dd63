"""gpuboss over TLS, against a real ``redis-server`` that listens only on TLS (``port 0``).

A throwaway CA signs the server's certificate (127.0.0.1, localhost) and a client's
(``topology.make_certs``). The client, the async client, the CLI and the service reach the server
with ``rediss://...?ssl_ca_certs=CA``; where the server wants client certificates
(``tls-auth-clients yes``), a client shows its own with ``ssl_certfile`` and ``ssl_keyfile``. A
client without a certificate, one that does not trust the CA, or one that speaks plain Redis is
refused with a typed :class:`BackendUnavailable` and writes nothing. A Sentinel that speaks only
TLS names a TLS primary for ``rediss+sentinel://``, the client certificate going to both.

Skipped where ``redis-server`` was built without TLS (found by starting one), or where there is no
``openssl`` to make the certificates with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import redis
from support import CLEAN_ENV, Served, gpuboss_command, snapshot, state, wait_for
from topology import Certs, Node, TLSUnsupported, make_certs, tls_redis_server, tls_sentinel
from typer.testing import CliRunner

from gpuboss_cli.main import app as cli
from gpuboss_client import AsyncBoss, BackendForbidden, BackendUnavailable, Boss

pytestmark = pytest.mark.slow

GiB = 1024  # MiB
CLI_S = 30.0  # for one CLI process: a cold start on a loaded machine imports a lot


def tls_url(
    node: Node, query: Mapping[str, str | Path] | None = None, *, scheme: str = "rediss", path: str = "/0"
) -> str:
    """``scheme://127.0.0.1:PORT{path}?{query}`` for ``node``."""
    url = f"{scheme}://{node.host}:{node.port}{path}"
    return url + (f"?{urlencode({k: str(v) for k, v in query.items()})}" if query else "")


def client_cert(certs: Certs) -> dict[str, Path]:
    """The query options of a client that trusts ``certs``' CA and shows its client certificate."""
    return {"ssl_ca_certs": certs.ca, "ssl_certfile": certs.client_cert, "ssl_keyfile": certs.client_key}


@contextlib.contextmanager
def admin_of(node: Node, certs: Certs) -> Iterator[redis.Redis]:
    """A plain redis-py client of ``node`` over TLS (with the client certificate), database flushed."""
    client = redis.Redis(
        host=node.host, port=node.port, decode_responses=True, ssl=True, ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key),
    )  # fmt: skip
    try:
        client.flushdb()
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def tls_server_or_skip(folder: Path, certs: Certs, *, auth_clients: bool) -> Iterator[Node]:
    """:func:`tls_redis_server`, the test skipped where redis-server cannot serve TLS."""
    with contextlib.ExitStack() as stack:
        try:
            node = stack.enter_context(tls_redis_server(folder, certs, auth_clients=auth_clients))
        except TLSUnsupported as exc:
            pytest.skip(str(exc))
        yield node


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def certs(tls_dir: Path) -> Certs:
    try:
        return make_certs(tls_dir / "ca")
    except TLSUnsupported as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def other_certs(tls_dir: Path, certs: Certs) -> Certs:
    """A CA (and its certificates) that the servers do not know."""
    return make_certs(tls_dir / "other-ca", "some other CA")


@pytest.fixture(scope="module")
def server(tls_dir: Path, certs: Certs) -> Iterator[Node]:
    """A TLS-only server that takes any client that trusts its certificate."""
    with tls_server_or_skip(tls_dir / "server", certs, auth_clients=False) as node:
        yield node


@pytest.fixture(scope="module")
def mtls_server(tls_dir: Path, certs: Certs) -> Iterator[Node]:
    """A TLS-only server that takes only clients with a certificate its CA signed."""
    with tls_server_or_skip(tls_dir / "mtls-server", certs, auth_clients=True) as node:
        yield node


@pytest.fixture
def admin(server: Node, certs: Certs) -> Iterator[redis.Redis]:
    with admin_of(server, certs) as client:
        yield client


@pytest.fixture
def mtls_admin(mtls_server: Node, certs: Certs) -> Iterator[redis.Redis]:
    with admin_of(mtls_server, certs) as client:
        yield client


def lease_round_trip(boss: Boss) -> str:
    """Add a device, acquire on it, renew, release; return the lease's id."""
    assert boss.add_device("gpu0", "8GiB")
    lease = boss.acquire("6GiB", ttl=60, timeout=5)
    assert lease.device == "gpu0"
    info = boss.heartbeat(lease)
    assert (info.id, info.holder, info.mib) == (lease.id, boss.holder.name, 6 * GiB)
    [pool] = boss.status()
    assert pool.devices[0].used_mib == 6 * GiB
    boss.release(lease)
    assert boss.status()[0].devices[0].used_mib == 0
    return lease.id


# --- one server, TLS -------------------------------------------------------------------------------


def test_the_client_leases_over_tls(server: Node, certs: Certs, admin: redis.Redis) -> None:
    with Boss.from_url(tls_url(server, {"ssl_ca_certs": certs.ca}), holder="tls-user") as boss:
        lease_id = lease_round_trip(boss)
    assert state(admin, lease_id) == "released"


def test_the_async_client_leases_over_tls(server: Node, certs: Certs, admin: redis.Redis) -> None:
    async def main() -> str:
        async with AsyncBoss.from_url(tls_url(server, {"ssl_ca_certs": certs.ca}), holder="aio-user") as boss:
            assert await boss.add_device("gpu0", "8GiB")
            lease = await boss.acquire("6GiB", ttl=60, timeout=5)
            info = await boss.heartbeat(lease)
            assert (info.id, info.mib) == (lease.id, 6 * GiB)
            assert (await boss.status())[0].devices[0].used_mib == 6 * GiB
            await boss.release(lease)
            return lease.id

    assert state(admin, asyncio.run(main())) == "released"


@pytest.mark.parametrize("client", ["no-ca-given", "another-ca", "plain-redis"])
def test_a_client_that_does_not_trust_the_server_is_refused_and_writes_nothing(
    server: Node, other_certs: Certs, admin: redis.Redis, client: str
) -> None:
    url = {
        "no-ca-given": tls_url(server),  # the system's CAs do not know the test CA
        "another-ca": tls_url(server, {"ssl_ca_certs": other_certs.ca}),
        "plain-redis": tls_url(server, scheme="redis"),
    }[client]
    with Boss.from_url(url, holder="stranger") as stranger:
        if client == "plain-redis":  # the server hangs up: perhaps an outage, worth retrying
            with pytest.raises(BackendUnavailable):
                stranger.add_device("gpu0", "8GiB")
            with pytest.raises(BackendUnavailable):
                stranger.acquire("1GiB", timeout=0)
        else:  # a certificate this client does not trust: no retry helps, so even a wait stops
            with pytest.raises(BackendForbidden) as caught:
                stranger.add_device("gpu0", "8GiB")
            assert "certificate verify failed" in caught.value.message.lower()
            assert not caught.value.retryable
            with pytest.raises(BackendForbidden):
                stranger.acquire("1GiB", timeout=None)
    assert admin.dbsize() == 0


def test_certificate_checks_can_be_turned_off_by_the_url(server: Node, admin: redis.Redis) -> None:
    """``ssl_cert_reqs=none`` (no CA given) reaches the server: the option goes through."""
    with Boss.from_url(tls_url(server, {"ssl_cert_reqs": "none"}), holder="trusting") as boss:
        assert boss.add_device("gpu0", "8GiB")
        assert [d.name for d in boss.devices()] == ["gpu0"]
    assert admin.dbsize() > 0


# --- mutual TLS ------------------------------------------------------------------------------------


def test_mutual_tls_with_a_client_certificate(
    mtls_server: Node, certs: Certs, mtls_admin: redis.Redis
) -> None:
    with Boss.from_url(tls_url(mtls_server, client_cert(certs)), holder="mtls-user") as boss:
        lease_id = lease_round_trip(boss)
    assert state(mtls_admin, lease_id) == "released"

    async def main() -> list[str]:
        async with AsyncBoss.from_url(tls_url(mtls_server, client_cert(certs)), holder="aio") as boss:
            return [d.name for d in await boss.devices()]

    assert asyncio.run(main()) == ["gpu0"]


@pytest.mark.parametrize("client", ["no-certificate", "another-cas-certificate"])
def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(
    mtls_server: Node, certs: Certs, other_certs: Certs, mtls_admin: redis.Redis, client: str
) -> None:
    with Boss.from_url(tls_url(mtls_server, client_cert(certs)), holder="admin") as boss:
        boss.add_device("gpu0", "8GiB")
    before = snapshot(mtls_admin)
    query: dict[str, str | Path] = {"ssl_ca_certs": certs.ca}  # it trusts the server
    if client == "another-cas-certificate":
        query |= {"ssl_certfile": other_certs.client_cert, "ssl_keyfile": other_certs.client_key}
    with Boss.from_url(tls_url(mtls_server, query), holder="stranger") as stranger:
        with pytest.raises(BackendUnavailable, match="Redis unreachable"):
            stranger.add_device("gpu1", "8GiB")
        with pytest.raises(BackendUnavailable):
            stranger.acquire("1GiB", timeout=0)

    async def main() -> None:
        async with AsyncBoss.from_url(tls_url(mtls_server, query), holder="aio-stranger") as boss:
            with pytest.raises(BackendUnavailable):
                await boss.add_device("gpu1", "8GiB")

    asyncio.run(main())
    assert snapshot(mtls_admin) == before


# --- the CLI and the service -----------------------------------------------------------------------


def test_the_cli_works_over_mutual_tls(mtls_server: Node, certs: Certs, mtls_admin: redis.Redis) -> None:
    """The installed command, with the URL as ``--redis-url`` and as ``GPUBOSS_REDIS_URL``."""
    url = tls_url(mtls_server, client_cert(certs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    added = subprocess.run(
        [*gpuboss_command(), "devices", "add", "gpu0", "--vram", "8GiB"],
        env=env | {"GPUBOSS_REDIS_URL": url}, capture_output=True, text=True, timeout=CLI_S,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    with Boss.from_url(url, holder="cli-test") as boss:
        lease = boss.acquire("2GiB", ttl=60, timeout=5)
        shown = subprocess.run(
            [*gpuboss_command(), "--redis-url", url, "status", "--json"],
            env=env, capture_output=True, text=True, timeout=CLI_S,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        pool = json.loads(shown.stdout)["pools"]["default"]
        assert [(d["name"], d["total_mib"], d["used_mib"]) for d in pool["devices"]] == [
            ("gpu0", 8 * GiB, 2 * GiB)
        ]
        assert [x["id"] for x in pool["leases"]] == [lease.id]


def test_the_cli_says_it_cannot_reach_redis_without_a_client_certificate(
    mtls_server: Node, certs: Certs, mtls_admin: redis.Redis
) -> None:
    url = tls_url(mtls_server, {"ssl_ca_certs": certs.ca})
    result = CliRunner().invoke(
        cli, ["--redis-url", url, "devices", "add", "gpu0", "--vram", "8GiB"], env=CLEAN_ENV
    )
    assert result.exit_code == BackendUnavailable.exit_code, (result.stdout, result.stderr)
    assert f"error[{BackendUnavailable.code}]: cannot reach Redis at rediss://" in result.stderr
    assert mtls_admin.dbsize() == 0


def test_gpuboss_serve_over_mutual_tls(
    mtls_server: Node, certs: Certs, mtls_admin: redis.Redis, tmp_path: Path, served: list[Served]
) -> None:
    """``gpuboss serve --redis-url rediss://...`` in a process of its own, with a device to add."""
    url = tls_url(mtls_server, client_cert(certs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    env |= {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    s = Served(["--port", "0", "--redis-url", url, "--device", "gpu0=8GiB"], env)
    served.append(s)
    base, shown = s.started()
    assert shown.startswith(f"rediss://{mtls_server.host}:{mtls_server.port}/0?")
    with httpx.Client(base_url=base, timeout=10) as http:

        def ready() -> bool:
            try:
                return http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("/readyz to answer 200", ready, timeout=CLI_S)
        got = http.post("/v1/leases", json={"vram": 2 * GiB, "timeout_s": 5})
        assert got.status_code == 201, got.text
        lease = got.json()
        status = http.get("/v1/status")
        assert status.status_code == 200, status.text
        devices = status.json()["pools"]["default"]["devices"]
        assert [(d["name"], d["total_mib"], d["used_mib"]) for d in devices] == [("gpu0", 8 * GiB, 2 * GiB)]
        done = http.post(f"/v1/leases/{lease['id']}/release", json={"token": lease["token"]})
        assert done.status_code == 200, done.text
    assert s.stop() == 0, s.seen
    assert state(mtls_admin, lease["id"]) == "released"


# --- Sentinel --------------------------------------------------------------------------------------


def test_a_tls_sentinel_names_a_tls_primary(tls_dir: Path, certs: Certs) -> None:
    """``rediss+sentinel://``: the TLS options (the client certificate too) go to the sentinel
    and to the primary it names; both want client certificates."""
    with (
        tls_server_or_skip(tls_dir / "sentinel-primary", certs, auth_clients=True) as primary,
        tls_sentinel(tls_dir / "sentinel", certs, primary, "gpuboss", auth_clients=True) as sentinel,
        admin_of(primary, certs) as admin,
    ):
        # no replicas here to confirm writes (a sentinel URL asks for one by default)
        query: dict[str, str | Path] = {**client_cert(certs), "confirm_replicas": "0"}
        url = tls_url(sentinel, query, scheme="rediss+sentinel", path="/gpuboss/0")
        with Boss.from_url(url, holder="sentinel-user") as boss:
            lease_id = lease_round_trip(boss)
        assert state(admin, lease_id) == "released"
