"""The CLI in HTTP mode: the same commands sent to the real boss service instead of Redis.

The service is the real app (:func:`gpuboss.api.create_app`) under uvicorn on a free loopback
port in a thread, over the real Redis. Each command runs once with ``--redis-url`` and once with
``--boss-url`` on the same state, and must print the same thing (JSON equal) and fail with the same
error code and exit code.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from support import CLEAN_ENV, serve_app, wait_for
from typer.testing import CliRunner, Result

from gpuboss.agent import Agent
from gpuboss.api import create_app
from gpuboss.fakenvml import FakeGpu, FakeNvml, FakeProcess, fake_uuid
from gpuboss.probe import NvmlProbe
from gpuboss.settings import ServiceSettings, Token
from gpuboss_cli.http import HttpBoss
from gpuboss_cli.main import app
from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    Boss,
    Forbidden,
    Lease,
    LeaseNotFound,
    PoolKeys,
    ProtocolError,
    Unauthorized,
)
from gpuboss_client.errors import error_for
from gpuboss_client.ops import Findings

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "gpuboss"
WAIT_S = 15.0
OPERATOR = Token("ops", "operator", "operator-secret-0123456789")
HOLDER = Token("tts", "holder", "holder-secret-0123456789ab")


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@contextlib.contextmanager
def serve(settings: ServiceSettings, redis_url: str) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port in a thread; yields its base URL."""
    with serve_app(create_app(settings, redis_url)) as url:
        yield url


# The reaper is slowed down so that only `gpuboss reap` ends expired leases in these tests.
SETTINGS: dict[str, Any] = {"redis_url": None, "reap_interval_s": 60}


@pytest.fixture(scope="module")
def boss_url(redis_url: str) -> Iterator[str]:
    """A boss service without tokens (everyone is an operator, as on a laptop)."""
    with serve(ServiceSettings(**SETTINGS), redis_url) as url:
        yield url


@pytest.fixture(scope="module")
def secured_url(redis_url: str) -> Iterator[str]:
    """A boss service that needs tokens: an operator's and a holder's."""
    with serve(ServiceSettings(**SETTINGS, tokens=[OPERATOR, HOLDER]), redis_url) as url:
        yield url


@pytest.fixture
def admin(real_redis: redis.Redis, redis_url: str) -> Iterator[Boss]:
    """A client of the flushed real Redis, holder "svc", to set the scene."""
    with Boss.from_url(redis_url, holder="svc") as boss:
        yield boss


def gb(where: list[str], *args: str, env: dict[str, str | None] | None = None) -> Result:
    return runner.invoke(app, [*where, *args], env=CLEAN_ENV | (env or {}))


# Numbers with one decimal are times ("expires in s", "waiting s") that move between two runs.
_MOVING = re.compile(r"-?\d+\.\d(?=\s|$)(?! [GMT]iB)")
_HEADER = re.compile(r"^gpuboss watch: .*$", re.MULTILINE)


def steady(text: str) -> str:
    return _HEADER.sub("gpuboss watch: ...", _MOVING.sub("#", text))


def without_now(doc: Any) -> Any:
    """``doc`` without the Redis times of the moment (``now_ms``), which differ between two runs."""
    if isinstance(doc, dict):
        return {k: without_now(v) for k, v in doc.items() if k != "now_ms"}
    if isinstance(doc, list):
        return [without_now(v) for v in doc]
    return doc


def outcome(result: Result) -> tuple[int, Any, str]:
    """(exit code, what it printed, error code) of a run: JSON parsed, less the Redis time of the
    moment, and text with its moving numbers masked."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    err = result.stderr
    if result.exit_code:
        assert err.count("\n") == 1, err
        code = err.split("]", 1)[0].removeprefix("error[")
    else:
        assert err == "", err
        code = ""
    return result.exit_code, printed(result.stdout), code


def printed(out: str) -> Any:
    """A JSON document, or JSON lines, less the Redis times of the moment; else the text, steady."""
    with contextlib.suppress(ValueError):
        return without_now(json.loads(out))
    with contextlib.suppress(ValueError):
        return [without_now(json.loads(line)) for line in out.splitlines()]
    return steady(out)


def same(redis_url: str, boss_url: str, *args: str) -> tuple[Result, Result]:
    """Run a command over Redis and over HTTP; both must end alike and print alike."""
    direct, http = gb(["--redis-url", redis_url], *args), gb(["--boss-url", boss_url], *args)
    assert outcome(http) == outcome(direct), (args, direct.stdout, direct.stderr, http.stdout, http.stderr)
    return direct, http


@contextlib.contextmanager
def waiter(
    redis_url: str, real_redis: redis.Redis, request_id: str, vram: str, **kwargs: Any
) -> Iterator[None]:
    """A request queued by a thread blocked in ``acquire``, until the block ends."""
    events = PoolKeys(kwargs.get("pool", "default")).events
    last: Any = real_redis.xrevrange(events, count=1)
    cursor = last[0][0] if last else "0-0"
    boss = Boss.from_url(redis_url, holder="waiter")
    outcome: list[Lease | Exception] = []

    def wait() -> None:
        try:
            outcome.append(boss.acquire(vram, request_id=request_id, timeout=30, **kwargs))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    try:
        while True:  # block on the event stream until the request is logged as queued
            reply: Any = real_redis.xread({events: cursor}, block=10_000)
            assert reply, "the waiter was never queued"
            cursor = reply[0][1][-1][0]
            if any(f["event"] == "queued" and f["lease"] == request_id for _, f in reply[0][1]):
                break
        yield
    finally:
        if thread.is_alive():
            boss.force_release(request_id)
        thread.join(10)
        boss.close()


# --- the same output over both paths --------------------------------------------------------------


def test_reads_print_the_same_over_http(
    admin: Boss, redis_url: str, boss_url: str, real_redis: redis.Redis
) -> None:
    for args in (["status"], ["status", "--json"], ["leases"], ["devices", "list"], ["watch", "--once"]):
        same(redis_url, boss_url, *args)  # nothing there yet
    admin.add_device("gpu0", "24GiB", reserved="1GiB", host="h1", cuda_index=0)
    admin.add_device("gpu1", 16384, host="h1", cuda_index=1)
    admin.add_device("a100", "80GiB", pool="big", host="h2", cuda_index=3)
    admin.acquire("20GiB", device="gpu0", priority="high", labels={"model": "[bold]llama"}, ttl=60)
    warm = admin.acquire("10GiB", device="gpu1", priority="low", ttl=60)
    admin.idle(warm)
    admin.acquire("1GiB", pool="big", priority=7, ttl=30)
    with (
        waiter(redis_url, real_redis, "w-low", "10GiB", device="gpu0", priority="low", ttl=60),
        waiter(redis_url, real_redis, "w-high", "10GiB", device="gpu0", priority="high", ttl=60),
    ):
        reads = [["status"], ["status", "--json"], ["leases"], ["leases", "--json"], ["devices", "list"]]
        reads += [
            ["devices", "list", "--json"],
            ["watch", "--once"],
            ["events", "--json"],
            ["events", "-n", "3"],
        ]
        for args in reads:
            same(redis_url, boss_url, *args)
        for pool in (["--pool", "big"], ["--pool", "nowhere"]):
            for args in (["status", "--json"], ["leases"], ["devices", "list"], ["events"]):
                same(redis_url, boss_url, *args, *pool)
        for args in (
            ["plan", "--vram", "8GiB"],
            ["plan", "--vram", "8GiB", "--json"],
            ["plan", "--vram", "8GiB", "--priority", "high", "--device", "gpu1", "--json"],
            ["plan", "--vram", "200GiB"],
            ["plan", "--vram", "4GiB", "--devices", "2", "--json"],
            ["plan", "--vram", "1GiB", "--pool", "big", "--exclusive"],
        ):
            direct, http = same(redis_url, boss_url, *args)
            assert http.stdout == direct.stdout
        doc = json.loads(gb(["--boss-url", boss_url], "status", "--json").stdout)
        assert [x["id"] for x in doc["pools"]["default"]["queue"]] == ["w-high", "w-low"]
        assert "evict" in gb(["--boss-url", boss_url], "plan", "--vram", "8GiB", "--priority", "high",
                             "--device", "gpu1").stdout  # fmt: skip


def actions(where: list[str], admin: Boss, real_redis: redis.Redis) -> list[tuple[int, str, str]]:
    """A session of an operator changing things, and what each step printed; from an empty Redis."""
    real_redis.flushdb()
    out = []

    def run(*args: str) -> None:
        out.append(outcome(gb(where, *args)))

    run(
        "devices", "add", "gpu0", "--vram", "24GiB", "--reserved", "1GiB", "--host", "h1", "--cuda-index", "0"
    )
    run("devices", "add", "gpu0", "--vram", "49152", "--host", "h1", "--cuda-index", "0")
    run("devices", "add", "b0", "--vram", "8G", "--pool", "big", "--host", "h2")
    run("pool", "configure", "--min-residency", "5", "--aging", "30")
    run("pool", "configure", "--pool", "big", "--aging", "2.5")
    held = admin.acquire("2GiB", request_id="held", ttl=60)
    short = admin.acquire("1GiB", request_id="short", pool="big", ttl=0.05, keepalive=False)
    expires_ms = short.info.expires_at_ms or 0
    wait_for("the short lease to expire on Redis's clock", lambda: redis_ms(real_redis) > expires_ms)
    run("reap", "--pool", "default")
    run("reap")
    run("release", held.id)
    run("release", held.id, "--force", "--pool", "big")
    run("devices", "remove", "gpu0")
    run("release", held.id, "--force")
    run("release", short.id, "--force")
    run("release", "nope", "--force")
    admin.acquire("1GiB", request_id="again", ttl=60)
    run("devices", "remove", "gpu0")
    run("devices", "remove", "gpu9")
    run("devices", "remove", "gpu0", "--force")
    run("devices", "remove", "b0", "--pool", "big")
    run("status", "--json")
    # (no pool has devices left, so each is named: the events of every pool are those of live pools)
    events = [
        (e.pool, e.name, e.fields) for pool in ("default", "big") for e in admin.events(pool, count=1000)
    ]
    out.append((0, events, ""))
    return out


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_actions_do_and_print_the_same_over_http(
    admin: Boss, redis_url: str, boss_url: str, real_redis: redis.Redis
) -> None:
    direct = actions(["--redis-url", redis_url], admin, real_redis)
    http = actions(["--boss-url", boss_url], admin, real_redis)
    assert http == direct
    codes = [code for _, _, code in direct]
    assert codes == [
        *["", "", "", "", "", "", ""],  # add, update, add, configure x2, reap x2
        *["lease_not_held", "lease_not_found", "device_busy"],  # no --force, wrong pool, has a lease
        *["", "", "lease_not_found", "device_busy", "device_not_found"],
        *["", "", "", ""],  # remove --force, remove, status, events
    ]
    texts = [text for _, text, _ in direct]
    assert "added device gpu0 in pool default: total 24.0 GiB, reserved 1.0 GiB, budget 23.0 GiB" in texts[0]
    assert texts[1].startswith("updated device gpu0")
    assert texts[5:7] == ["reaped 0 expired leases and abandoned waiters in pool default\n",
                          "reaped 1 expired leases and abandoned waiters\n"]  # fmt: skip
    assert "2.0 GiB on default/gpu0: force_released (operator)" in texts[10]
    assert "had already ended: expired" in texts[11]
    assert texts[-2] == {"pools": {}}
    default_events = [name for pool, name, _ in texts[-1] if pool == "default"]
    assert default_events[-2:] == ["force_released", "device_removed"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["devices", "add", "gpu0", "--vram", "24XB"], BadRequest),
        (["devices", "add", "gpu0", "--vram", "0"], BadRequest),
        (["devices", "add", "gpu0", "--vram", "8GiB", "--reserved", "lots"], BadRequest),
        (["devices", "add", "gpu 0", "--vram", "8GiB"], BadRequest),
        (["devices", "add", "a/b", "--vram", "8GiB"], BadRequest),
        (["devices", "add", "gpu0", "--vram", "8GiB", "--pool", "no/slash"], BadRequest),
        (["devices", "add", "gpu0", "--vram", "8GiB", "--cuda-index", "-1"], BadRequest),
        (["devices", "remove", "../x"], BadRequest),
        (["status", "--pool", "bad pool"], BadRequest),
        (["leases", "--pool", "a/b"], BadRequest),
        (["plan", "--vram", "-1"], BadRequest),
        (["plan", "--vram", "1GiB", "--priority", "urgent"], BadRequest),
        (["plan", "--vram", "1GiB", "--devices", "2", "--device", "gpu0"], BadRequest),
        (["plan", "--vram", "1GiB", "--pool", "nowhere"], None),
        (["pool", "configure", "--aging", "-1"], BadRequest),
        (["pool", "configure", "--pool", "a b"], BadRequest),
        (["events", "-n", "0"], BadRequest),
        (["events", "-n", "5000"], BadRequest),
        (["release", "bad id!", "--force"], BadRequest),
        (["release", "..", "--force"], LeaseNotFound),
        (["release", "x", "--force", "--pool", "a/b"], BadRequest),
        (["reap", "--pool", "bad pool"], BadRequest),
        (["watch", "--once", "--pool", "bad pool"], BadRequest),
    ],
)
def test_errors_keep_their_codes_over_http(
    admin: Boss, redis_url: str, boss_url: str, args: list[str], error: type | None
) -> None:
    admin.add_device("gpu0", "8GiB")
    before = admin.devices()
    _direct, http = same(redis_url, boss_url, *args)
    if error is not None:
        assert http.exit_code == error.exit_code
        assert http.stderr.startswith(f"error[{error.code}]: ")
        assert http.stdout == ""
    assert admin.devices() == before  # bad input changed nothing


# --- reaching the boss ------------------------------------------------------------------------------


@pytest.fixture
def closed_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["leases"],
        ["reap"],
        ["devices", "list"],
        ["devices", "add", "gpu0", "--vram", "8GiB"],
        ["devices", "remove", "gpu0"],
        ["release", "x", "--force"],
        ["plan", "--vram", "1GiB"],
        ["pool", "configure"],
        ["events"],
        ["events", "--follow"],
        ["watch"],
        ["watch", "--once"],
    ],
)
def test_unreachable_boss(closed_url: str, args: list[str]) -> None:
    result = gb(["--boss-url", closed_url], *args)
    assert result.exit_code == BackendUnavailable.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error[backend_unavailable]: cannot reach the boss at {closed_url}: ")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_unreachable_boss_masks_the_password(closed_url: str) -> None:
    url = closed_url.replace("http://", "http://user:s3cret@")
    result = gb(["--boss-url", url], "status")
    assert result.exit_code == BackendUnavailable.exit_code
    assert "s3cret" not in result.stderr
    assert "cannot reach the boss at http://user:***@127.0.0.1:" in result.stderr


@pytest.mark.slow
def test_boss_without_redis_says_so(tmp_path: Path) -> None:
    """The boss answers, but its Redis is gone: a different line from an unreachable boss."""
    server = shutil.which("redis-server")
    assert server is not None
    with _listening_socket() as probe:
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for("redis-server to listen", lambda: _pings(url), timeout=WAIT_S)
        with serve(ServiceSettings(**SETTINGS, redis_timeout_s=1), url) as boss_url:
            assert gb(["--boss-url", boss_url], "status").exit_code == 0
            proc.terminate()
            proc.wait(WAIT_S)
            result = gb(["--boss-url", boss_url], "status")
            assert result.exit_code == BackendUnavailable.exit_code, result.stderr
            assert result.stderr.startswith(
                f"error[backend_unavailable]: the boss at {boss_url} cannot reach Redis: "
            )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def plain_http_server(status: int, body: bytes, content_type: str) -> Iterator[str]:
    """A web server that is not a boss: it answers every GET with ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(WAIT_S)
        server.server_close()


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b"<html>hello</html>", "text/html"),
        (502, b"Bad Gateway", "text/plain"),
        (200, b'{"something": "else"}', "application/json"),
        (500, b'{"error": "no_such_code", "message": "?"}', "application/json"),
    ],
)
def test_a_server_that_is_not_a_boss_is_a_protocol_error(status: int, body: bytes, content_type: str) -> None:
    with plain_http_server(status, body, content_type) as url:
        result = gb(["--boss-url", url], "status")
    assert result.exit_code == ProtocolError.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[protocol_error]: ")


def test_a_wrong_path_ends_with_the_error_the_boss_names(admin: Boss, boss_url: str) -> None:
    """An unknown route is the boss's 404 ``not_found``, rebuilt as the client's error table says."""
    result = gb(["--boss-url", f"{boss_url}/not-here"], "devices", "list")
    want = error_for("not_found", "")
    assert result.exit_code == want.exit_code, result.stderr
    assert result.stderr.startswith(f"error[{want.code}]: ")
    assert "not_found" in result.stderr


# --- tokens -------------------------------------------------------------------------------------------


OPERATOR_ONLY = [
    ["devices", "add", "gpu1", "--vram", "8GiB"],
    ["release", "held", "--force"],
    ["devices", "remove", "gpu0"],
    ["reap"],
    ["pool", "configure", "--aging", "10"],
]
READS = [["status"], ["status", "--json"], ["leases"], ["devices", "list"], ["plan", "--vram", "1GiB"],
         ["events"], ["watch", "--once"]]  # fmt: skip


def test_tokens_and_scopes(admin: Boss, secured_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    admin.acquire("1GiB", request_id="held", ttl=60)
    before = (admin.devices(), admin.leases())
    for args in OPERATOR_ONLY + READS:
        for token in (None, "wrong-token-0123456789"):
            result = gb(["--boss-url", secured_url, *(["--token", token] if token else [])], *args)
            assert result.exit_code == Unauthorized.exit_code, (args, token, result.stderr)
            assert result.stderr.startswith("error[unauthorized]: "), result.stderr
            assert result.stderr.rstrip().endswith("(give the boss's token with --token or GPUBOSS_TOKEN)")
            assert result.stdout == ""
        as_holder = gb(["--boss-url", secured_url, "--token", HOLDER.secret], *args)
        if args in READS:
            assert as_holder.exit_code == 0, (args, as_holder.stderr)
        else:
            assert as_holder.exit_code == Forbidden.exit_code, (args, as_holder.stderr)
            assert as_holder.stderr.startswith("error[forbidden]: ")
    assert (admin.devices(), admin.leases()) == before  # none of it changed anything

    # GPUBOSS_TOKEN is read; --token wins over it
    env = {"GPUBOSS_TOKEN": OPERATOR.secret}
    assert "reaped 0" in gb(["--boss-url", secured_url], "reap", env=env).stdout
    assert gb(["--boss-url", secured_url, "--token", HOLDER.secret], "reap", env=env).exit_code == 16
    for args in OPERATOR_ONLY:
        result = gb(["--boss-url", secured_url], *args, env=env)
        assert result.exit_code == 0, (args, result.stderr)
    assert admin.leases() == []
    assert [d.name for d in admin.devices()] == ["gpu1"]
    assert admin.devices()[0].total_mib == 8192


# --- choosing the path -------------------------------------------------------------------------------


def test_boss_url_from_the_environment_and_options_win(
    admin: Boss, redis_url: str, boss_url: str, closed_url: str
) -> None:
    admin.add_device("gpu0", "8GiB")
    env: dict[str, str | None] = {"GPUBOSS_BOSS_URL": boss_url, "GPUBOSS_REDIS_URL": "redis://127.0.0.1:1/0"}
    assert "gpu0" in gb([], "devices", "list", env=env).stdout  # the boss URL wins over the Redis one
    # --redis-url beats GPUBOSS_BOSS_URL, and --boss-url beats GPUBOSS_REDIS_URL
    env_closed: dict[str, str | None] = {"GPUBOSS_BOSS_URL": closed_url}
    assert "gpu0" in gb(["--redis-url", redis_url], "devices", "list", env=env_closed).stdout
    assert (
        "gpu0" in gb(["--boss-url", boss_url], "devices", "list", env={"GPUBOSS_REDIS_URL": redis_url}).stdout
    )
    result = gb([], "status", env=env_closed)
    assert result.exit_code == BackendUnavailable.exit_code
    assert closed_url in result.stderr
    assert (
        "gpu0"
        in gb([], "devices", "list", env={"GPUBOSS_BOSS_URL": "", "GPUBOSS_REDIS_URL": redis_url}).stdout
    )


@pytest.mark.parametrize(
    ("where", "env"),
    [
        (["--redis-url", "redis://127.0.0.1:1/0", "--boss-url", "http://127.0.0.1:1"], {}),
        (["--boss-url", "ftp://127.0.0.1:1"], {}),
        (["--boss-url", "127.0.0.1:8765"], {}),
        (["--boss-url", "http://[::1"], {}),
        ([], {"GPUBOSS_BOSS_URL": "http://127.0.0.1:1", "GPUBOSS_BOSS_TIMEOUT_S": "soon"}),
    ],
)
def test_bad_boss_settings_are_bad_requests(where: list[str], env: dict[str, str | None]) -> None:
    result = gb(where, "status", env=env)
    assert result.exit_code == BadRequest.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: ")


def test_http_boss_returns_the_client_types(admin: Boss, boss_url: str) -> None:
    """HttpBoss answers with what Boss answers, field for field (times of the moment aside)."""
    admin.add_device("gpu0", "24GiB", cuda_index=0)
    held = admin.acquire("4GiB", labels={"k": "v"}, ttl=60)
    with HttpBoss(boss_url) as http:
        assert http.devices() == admin.devices()
        assert http.leases() == admin.leases()
        [direct], [over_http] = admin.status(), http.status()
        assert (over_http.pool, over_http.devices, over_http.granted) == ("default", direct.devices, 1)
        assert http.plan("30GiB") == admin.plan("30GiB")
        assert http.events(count=5) == admin.events(count=5)
        assert http.force_release(held.id) == admin.run(_lease_info(held.id))


def _lease_info(lease_id: str) -> Any:
    from gpuboss_client import ops

    return ops.lease_info("default", lease_id)


# --- events --follow over HTTP -----------------------------------------------------------------------


@pytest.mark.slow
def test_events_follow_over_http(admin: Boss, boss_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    first = admin.acquire("1GiB", ttl=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")} | {
        "GPUBOSS_BOSS_URL": boss_url
    }
    proc = subprocess.Popen(
        [str(SCRIPT), "events", "--follow", "--json", "--count", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    cond = threading.Condition()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with cond:
                lines.append(line)
                cond.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def expect(n: int) -> list[dict[str, Any]]:
        with cond:
            assert cond.wait_for(lambda: len(lines) >= n or proc.poll() is not None, WAIT_S), lines
            assert len(lines) >= n, (lines, proc.poll())
            return [json.loads(x) for x in lines]

    try:
        assert expect(2) == [e.to_dict() for e in admin.events(count=2)]  # device_added, granted
        admin.release(first)
        admin.add_device("b0", "8GiB", pool="later")
        # (in pool order: across pools, events of one millisecond come in either order)
        docs = sorted(expect(4)[2:], key=lambda d: d["pool"])
        assert [(d["pool"], d["event"]) for d in docs] == [("default", "released"), ("later", "device_added")]
        assert docs == sorted((e.to_dict() for e in admin.events(count=2)), key=lambda d: d["pool"])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
        reader.join(WAIT_S)
        assert len(lines) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_findings_over_http_equal_redis_mode(
    boss_url: str, admin: Boss, real_redis: redis.Redis, redis_url: str
) -> None:
    gpus = [fake_uuid(0), fake_uuid(1)]
    nvml = FakeNvml([FakeGpu(u, "NVIDIA L4", 24576) for u in gpus])
    probe = NvmlProbe(nvml)
    agent = Agent(Boss(real_redis, holder="gpuboss-agent"), probe, host="node-a", smoothing=1.0)
    try:
        agent.run_once()
        llm = Boss(real_redis, holder="llm", host="node-a", pid=100)
        lease = llm.acquire("2GiB", device=gpus[0], labels={"model": "m1"})
        nvml.gpus[0].processes.append(FakeProcess(100, 4096))
        nvml.gpus[1].processes.append(FakeProcess(500, 1000))
        agent.run_once()
        agent.run_once()
    finally:
        probe.close()
    reply = httpx.get(f"{boss_url}/v1/findings", params={"pool": "default"}, timeout=WAIT_S)
    assert reply.status_code == 200, reply.text
    (doc,) = reply.json()["findings"]
    (direct,) = admin.findings("default")
    assert without_now(doc) == without_now(json.loads(json.dumps(direct.to_dict())))
    assert [(x["id"], x["finding"]) for x in doc["leases"]] == [(lease.id, "over_use")]
    assert [d["leak_pids"] for d in doc["devices"]] == [[], [500]]
    with HttpBoss(boss_url) as http:
        (rebuilt,) = http.findings(None)
    assert rebuilt == Findings.from_dict(direct.to_dict() | {"now_ms": rebuilt.now_ms})
    bad = httpx.get(f"{boss_url}/v1/findings", params={"pool": "no such pool"}, timeout=WAIT_S)
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_request")

    over_http = gb(["--boss-url", boss_url], "status", "--json")
    over_redis = gb(["--redis-url", redis_url], "status", "--json")
    assert over_http.exit_code == over_redis.exit_code == 0, (over_http.stderr, over_redis.stderr)
    assert "findings" in json.loads(over_http.stdout)
    assert without_now(json.loads(over_http.stdout)) == without_now(json.loads(over_redis.stdout))
    text_http = gb(["--boss-url", boss_url], "status")
    text_redis = gb(["--redis-url", redis_url], "status")
    assert "without a lease" in text_http.stdout
    assert steady(text_http.stdout) == steady(text_redis.stdout)
    llm.release(lease)
