"""``gpuboss serve`` as a new user meets it, and the embedded Redis on its own.

The end-to-end tests run the real command in a process of its own with a fresh ``HOME`` and
``XDG_STATE_HOME`` and no ``GPUBOSS_*`` settings: once with ``redis-server`` on ``PATH`` (durable
state across a restart), once without (the fakeredis fallback and its warning). The embedded
Redis's life cycle (lock per state dir, socket path, stop, parent death) is tested directly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from support import Served, gpuboss_command, wait_for
from typer.testing import CliRunner

from gpuboss import embedded
from gpuboss.embedded import (
    NO_PERSISTENCE_WARNING,
    SUN_PATH_MAX,
    embedded_redis,
    socket_path_for,
    start_fakeredis,
    start_redis_server,
)
from gpuboss_cli.main import app
from gpuboss_client import BackendUnavailable, Boss

REDIS_SERVER = shutil.which("redis-server")
LINE_WAIT_S = 30.0  # a cold start on a loaded 2-CPU machine imports FastAPI and starts Redis
STOP_WAIT_S = 30.0
OPEN_HOST_REFUSED = "refusing to listen on 0.0.0.0 without tokens"

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")


def _new_user_env(tmp_path: Path, path: list[str]) -> dict[str, str]:
    """The environment of a user who never configured gpuboss: fresh home and state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    env.pop("XDG_RUNTIME_DIR", None)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return env | {"HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "state"), "PATH": os.pathsep.join(path)}


def _ready(base: str, proc: subprocess.Popen[str]) -> httpx.Client:
    """An HTTP client for ``base`` once /readyz answers 200 (polled with a deadline)."""
    http = httpx.Client(base_url=base, timeout=10.0)

    def ready() -> bool:
        assert proc.poll() is None, f"gpuboss serve exited {proc.returncode}"
        try:
            return http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for("/readyz to answer 200", ready, timeout=LINE_WAIT_S)
    return http


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Exited but not yet reaped by whoever inherited it (a container's init may be slow to).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _lease_over_http(http: httpx.Client, vram: str, holder: str) -> dict[str, Any]:
    r = http.post("/v1/leases", json={"vram": vram, "ttl_s": 3600, "timeout_s": 5, "holder": holder})
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    assert doc["state"] == "active"
    assert doc["holder"] == holder
    assert doc["device"] == "gpu0"
    return doc


def _live(http: httpx.Client) -> dict[str, dict[str, Any]]:
    r = http.get("/v1/leases")
    assert r.status_code == 200, r.text
    return {x["id"]: x for x in r.json()["leases"]}


@pytest.mark.slow
def test_new_user_gets_a_durable_embedded_redis(tmp_path: Path, served: list[Served]) -> None:
    assert REDIS_SERVER is not None
    env = _new_user_env(tmp_path, [str(Path(REDIS_SERVER).parent)])
    state_dir = tmp_path / "state" / "gpuboss"

    first = Served(["--port", "0", "--device", "gpu0=24GiB"], env)
    served.append(first)
    base, url = first.started()
    assert url == f"unix://{state_dir / 'redis.sock'}?db=0"
    assert "devices:   gpu0 in pool default: 24 GiB total" in "\n".join(first.seen)
    assert "auth:      off" in "\n".join(first.seen)
    pid = int(re.search(r"embedded redis-server \(pid (\d+)\), durable", "\n".join(first.seen)).group(1))  # type: ignore[union-attr]
    assert (state_dir / "redis").stat().st_mode & 0o777 == 0o700
    http = _ready(base, first.proc)

    over_http = _lease_over_http(http, "8GiB", "http-user")
    boss = Boss.from_url(url, holder="py-user")  # not closed: closing would release the lease
    lease = boss.acquire("4GiB", ttl=3600, timeout=5, keepalive=False)
    assert lease.device == "gpu0"
    assert {over_http["id"], lease.id} <= set(_live(http))
    http.close()

    assert first.stop(signal.SIGTERM) == 0, first.seen
    assert _gone(pid), f"redis-server {pid} outlived gpuboss serve"
    assert not (state_dir / "redis.sock").exists()

    # Again on the same state dir, without --device: what was there is still there.
    second = Served(["--port", "0"], env)
    served.append(second)
    base, url2 = second.started()
    assert url2 == url
    assert "devices:   gpu0 in pool default: 24 GiB total, 24 GiB budget, 12 GiB free, 2 leases" in "\n".join(
        second.seen
    )
    http = _ready(base, second.proc)
    devices = http.get("/v1/devices").json()["devices"]
    assert [(d["name"], d["total_mib"], d["used_mib"]) for d in devices] == [("gpu0", 24576, 12288)]
    live = _live(http)
    assert live[over_http["id"]]["state"] == "active"
    assert live[over_http["id"]]["token"] == over_http["token"]
    assert live[lease.id]["holder"] == "py-user"
    with Boss.from_url(url2, holder="py-user") as boss:
        boss.heartbeat(lease)  # the same lease, token and all, survived the restart
        boss.release(lease)
    r = http.post(f"/v1/leases/{over_http['id']}/release", json={"token": over_http["token"]})
    assert r.status_code == 200, r.text
    assert _live(http) == {}
    http.close()
    assert second.stop(signal.SIGINT) == 0, second.seen


@pytest.mark.slow
def test_without_redis_server_fakeredis_serves_with_a_warning(tmp_path: Path, served: list[Served]) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = _new_user_env(tmp_path, [str(empty)])
    s = Served(["--port", "0", "--device", "gpu0=24GiB:0"], env)
    served.append(s)
    base, url = s.started()
    out = "\n".join(s.seen)
    assert NO_PERSISTENCE_WARNING in out
    assert "NOT durable" in out
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url), url
    http = _ready(base, s.proc)

    over_http = _lease_over_http(http, "8GiB", "http-user")
    assert over_http["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    with Boss.from_url(url, holder="py-user") as boss:
        lease = boss.acquire("4GiB", ttl=3600, timeout=5)
        assert {over_http["id"], lease.id} == set(_live(http))
        boss.release(lease)
    http.close()
    assert s.stop(signal.SIGTERM) == 0, s.seen
    assert not (tmp_path / "state" / "gpuboss").exists()  # nothing written: nothing persists


@pytest.mark.slow
def test_a_signal_during_startup_stops_the_embedded_redis(tmp_path: Path, served: list[Served]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stuck = bin_dir / "redis-server"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")  # never answers PING
    stuck.chmod(0o755)
    s = Served(["--port", "0"], _new_user_env(tmp_path, [str(bin_dir), "/usr/bin", "/bin"]))
    served.append(s)
    pid = int(s.expect(r"started \S+redis-server \(pid (\d+)\)").group(1))
    assert s.stop(signal.SIGTERM) == 0, s.seen
    assert _gone(pid), s.seen
    assert not any("is serving" in line for line in s.seen)


@pytest.mark.slow
def test_open_host_without_tokens_is_refused(tmp_path: Path) -> None:
    assert REDIS_SERVER is not None
    env = _new_user_env(tmp_path, [str(Path(REDIS_SERVER).parent)])
    proc = subprocess.run(
        [*gpuboss_command(), "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"error[bad_request]: {OPEN_HOST_REFUSED}"), proc.stderr
    assert "GPUBOSS_TOKENS" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was started


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"GPUBOSS_HOST": "0.0.0.0"}, OPEN_HOST_REFUSED),
        (["--host", "10.1.2.3"], {}, "refusing to listen on 10.1.2.3 without tokens"),
        (["--device", "gpu0"], {}, "--device / GPUBOSS_DEVICES: a device is NAME=SIZE[:CUDA_INDEX]"),
        (["--device", "gpu0=lots"], {}, "--device / GPUBOSS_DEVICES: cannot read size 'lots'"),
        (["--port", "70000"], {}, "--port / GPUBOSS_PORT: "),
        (["--pool", "a b"], {}, "--pool / GPUBOSS_POOL: a pool is"),
        (["--log-level", "loud"], {}, "--log-level / GPUBOSS_LOG_LEVEL: "),
        ([], {"GPUBOSS_MAX_QUEUE": "0"}, "GPUBOSS_MAX_QUEUE: "),
        ([], {"GPUBOSS_TOKENS": "alice:admin:0123456789abcdef"}, "GPUBOSS_TOKENS: a token is"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("GPUBOSS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    result = runner.invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith(f"error[bad_request]: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "state").exists()


def test_a_taken_port_or_an_unreachable_redis_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("GPUBOSS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error[bad_request]: cannot listen on 127.0.0.1 port {port}: "), (
        result.stderr
    )
    assert not (tmp_path / "state").exists()  # found before any Redis was started

    # The global option works for serve too; the nearer one wins.
    result = runner.invoke(
        app,
        [
            "--redis-url",
            "redis://127.0.0.1:2/0",
            "serve",
            "--port",
            "0",
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
    )
    assert result.exit_code == 12, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[backend_unavailable]: cannot reach Redis at redis://127.0.0.1:1/0")
    result = runner.invoke(app, ["--redis-url", "redis://:hunter2@127.0.0.1:1/0", "serve", "--port", "0"])
    assert result.exit_code == 12, (result.stdout, result.stderr)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in result.stderr
    assert "hunter2" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The embedded Redis on its own


@pytest.mark.slow
def test_redis_server_child_lock_stop_and_durability(tmp_path: Path) -> None:
    assert REDIS_SERVER is not None
    state = tmp_path / "state"
    child = start_redis_server(state, binary=REDIS_SERVER)
    try:
        held = re.escape(
            f"already runs on {state} (gpuboss serve pid {os.getpid()}, redis-server pid {child.pid})"
        )
        with pytest.raises(BackendUnavailable, match=held):
            start_redis_server(state, binary=REDIS_SERVER, lock_wait_s=0)
        with Boss.from_url(child.url, holder="t") as boss:
            assert boss.add_device("gpu0", "24GiB", cuda_index=0)
        conf = (state / "redis" / "redis.conf").read_text()
        for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", "port 0"):
            assert f"\n{line}\n" in conf
        with redis.Redis.from_url(child.url) as r:
            assert r.config_get("hz") == {"hz": "100"}
            assert r.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        assert child.stop() == 0
    assert child.stop() == 0  # idempotent
    assert _gone(child.pid)

    again = start_redis_server(state, binary=REDIS_SERVER)
    try:
        assert again.url == child.url
        with Boss.from_url(again.url, holder="t") as boss:
            assert [(d.name, d.total_mib, d.cuda_index) for d in boss.devices()] == [("gpu0", 24576, 0)]
    finally:
        assert again.stop() == 0


@pytest.mark.slow
def test_a_long_state_dir_gets_a_short_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert REDIS_SERVER is not None
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    state = tmp_path / ("s" * 60) / ("t" * 60)
    path = socket_path_for(state)
    assert path is not None
    assert len(os.fsencode(path)) <= SUN_PATH_MAX
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert socket_path_for(state) == path  # the same on every start, so clients keep their URL
    assert socket_path_for(tmp_path / "other") != path
    child = start_redis_server(state, binary=REDIS_SERVER)
    try:
        assert child.url == f"unix://{path}?db=0"
        with redis.Redis.from_url(child.url) as r:
            assert r.ping()
    finally:
        assert child.stop() == 0
    assert (state / "redis" / "appendonlydir").is_dir()


@pytest.mark.slow
def test_no_socket_path_fits_so_a_loopback_port_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert REDIS_SERVER is not None
    monkeypatch.setattr(embedded, "SUN_PATH_MAX", 8)  # as if every candidate path were too long
    state = tmp_path / "state"
    assert socket_path_for(state) is None
    child = start_redis_server(state, binary=REDIS_SERVER)
    try:
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", child.url), child.url
        assert "\nbind 127.0.0.1\n" in (state / "redis" / "redis.conf").read_text()
        with Boss.from_url(child.url, holder="t") as boss:
            assert boss.add_device("gpu0", "8GiB")
    finally:
        assert child.stop() == 0


@pytest.mark.slow
def test_redis_server_child_dies_with_its_parent(tmp_path: Path) -> None:
    assert REDIS_SERVER is not None
    state = tmp_path / "state"
    code = (
        "import sys; from pathlib import Path; from gpuboss.embedded import start_redis_server; "
        "c = start_redis_server(Path(sys.argv[1]), binary=sys.argv[2]); print(c.pid, flush=True); "
        "sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(state), REDIS_SERVER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.kill()  # no chance to clean up
        parent.wait()
        wait_for("the orphaned redis-server to exit", lambda: _gone(pid), timeout=15)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()
    child = start_redis_server(state, binary=REDIS_SERVER)  # its lock went with it
    assert child.stop() == 0


def test_redis_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot open config' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(
        BackendUnavailable, match=r"did not start: it exited 1(.|\n)*FATAL: cannot open config"
    ):
        start_redis_server(tmp_path / "state", binary=str(fake), timeout_s=10)
    # The failed start released the state dir.
    with pytest.raises(BackendUnavailable, match="did not start"):
        start_redis_server(tmp_path / "state", binary=str(fake), timeout_s=10)


def test_fakeredis_runs_lua_and_pubsub_and_stops() -> None:
    fake = start_fakeredis()
    try:
        with Boss.from_url(fake.url, holder="t") as boss:
            boss.add_device("gpu0", "24GiB")
            lease = boss.acquire("8GiB", ttl=60, timeout=1)
            assert lease.device == "gpu0"
            boss.release(lease)
    finally:
        fake.stop()
    fake.stop()  # idempotent
    assert not fake.thread.is_alive()
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(fake.url, socket_timeout=1) as r:
        r.ping()


def test_embedded_redis_without_a_binary_warns_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with embedded_redis(tmp_path / "state", use_path=False) as emb:
        assert (emb.kind, emb.durable, emb.pid) == ("fakeredis", False, None)
        with redis.Redis.from_url(emb.url) as r:
            assert r.ping()
    assert NO_PERSISTENCE_WARNING in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
