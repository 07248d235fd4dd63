"""Test fixtures: a real redis-server started for the session, and a fakeredis tier.

The session starts ``redis-server`` on a free loopback port in a temporary directory (no Docker
needed). ``GPUBOSS_TEST_REDIS_URL`` points the tests at an existing server instead; its database
is flushed before every test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from support import Child, Rig, Served, Tier, fake_server

from gpuboss_client import Boss, aio, sync

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {proc.poll()})") from None
            time.sleep(0.02)  # waiting for an external process to listen: nothing to block on


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Processes a test starts; every one is killed and waited for afterwards."""
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


@pytest.fixture(autouse=True)
def _stop_client_workers() -> Iterator[None]:
    """After each test, stop the heartbeat and notice workers of the clients it made (without
    releasing anything), so that no test's leases are renewed into the next one."""
    before = {*sync._clients, *aio._clients}
    yield
    for client in {*sync._clients, *aio._clients} - before:  # a module's shared service stays
        client._stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the real Redis for this session."""
    given = os.environ.get("GPUBOSS_TEST_REDIS_URL")
    if given:
        yield given
        return
    if REDIS_SERVER is None:
        pytest.exit("redis-server is not installed (apt-get install redis-server)", returncode=3)
    workdir: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_ready(url, proc, 10.0)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the real Redis, database flushed."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(params=["redis", "fakeredis"])
def rclient(request: pytest.FixtureRequest, redis_url: str) -> Iterator[redis.Redis]:
    """The same scenario against the real server and against fakeredis (the fast tier)."""
    if request.param == "redis":
        client: redis.Redis = redis.Redis.from_url(redis_url, decode_responses=True)
        client.flushdb()
    else:
        client = fakeredis.FakeRedis(server=fake_server(), decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def boss(rclient: redis.Redis) -> Boss:
    """A client for holder "test" over both tiers."""
    return Boss(rclient, holder="test")


@pytest.fixture(params=["redis", "fakeredis"])
def tier(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Tier]:
    """Sync and async clients on the real Redis (flushed) and on one fakeredis server."""
    if request.param == "redis":
        sync: redis.Redis = redis.Redis.from_url(redis_url, decode_responses=True)
        sync.flushdb()
        t = Tier(sync, lambda: aioredis.Redis.from_url(redis_url, decode_responses=True))
    else:
        server = fake_server()
        sync = fakeredis.FakeRedis(server=server, decode_responses=True)
        t = Tier(sync, lambda: fakeredis.FakeAsyncRedis(server=server, decode_responses=True))
    yield t
    sync.close()


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Servers a test starts; any left running are killed at the end."""
    started: list[Served] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture
def rig(tmp_path: Path, redis_url: str, served: list[Served], children: list[Child]) -> Iterator[Rig]:
    made = Rig(tmp_path, redis_url, served, children)
    yield made
    for http in made.clients:
        http.close()
