"""The ``gpuboss`` command line against the real Redis.

Every command runs through typer's CliRunner in-process (one test runs the installed console
script), and what it prints is checked against what :class:`Boss` reads from the same Redis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import redis
from support import CLEAN_ENV
from typer.testing import CliRunner, Result

import gpuboss_client
from gpuboss_cli.main import app
from gpuboss_cli.settings import Settings
from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    Boss,
    DeviceBusy,
    DeviceNotFound,
    Lease,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    PoolKeys,
)

runner = CliRunner()


def gb(url: str | None, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run ``gpuboss [--redis-url url] args...``."""
    argv = ["--redis-url", url, *args] if url is not None else list(args)
    return runner.invoke(app, argv, env=CLEAN_ENV | (env or {}))


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result.stdout


def failed(result: Result, exit_code: int, code: str) -> str:
    """The one-line error a failed command printed on stderr."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith(f"error[{code}]: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""
    return result.stderr


@pytest.fixture
def admin(real_redis: redis.Redis, redis_url: str) -> Iterator[Boss]:
    """A client of the flushed real Redis, holder "svc", to set the scene and check the result."""
    with Boss.from_url(redis_url, holder="svc") as boss:
        yield boss


@pytest.fixture
def closed_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@dataclass
class Waiter:
    """A request queued by a thread blocked in ``acquire``; ``outcome`` is its lease or error."""

    id: str
    thread: threading.Thread
    outcome: list[Lease | Exception] = field(default_factory=list)

    def result(self) -> Lease | Exception:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.outcome[0]


@contextmanager
def queued_waiter(
    redis_url: str, real_redis: redis.Redis, request_id: str, vram: str, **kwargs: Any
) -> Iterator[Waiter]:
    """Start ``acquire`` in a thread and return once Redis logged its request as queued."""
    events = PoolKeys(kwargs.get("pool", "default")).events
    last: Any = real_redis.xrevrange(events, count=1)
    cursor = last[0][0] if last else "0-0"
    boss = Boss.from_url(redis_url, holder="waiter")
    waiter = Waiter(request_id, threading.Thread(target=lambda: None))

    def wait() -> None:
        try:
            waiter.outcome.append(boss.acquire(vram, request_id=request_id, timeout=30, **kwargs))
        except Exception as exc:
            waiter.outcome.append(exc)

    waiter.thread = threading.Thread(target=wait, daemon=True)
    waiter.thread.start()
    try:
        while True:  # block on the event stream until the request is logged as queued
            reply: Any = real_redis.xread({events: cursor}, block=10_000)
            assert reply, "the waiter was never queued"
            entries = reply[0][1]
            cursor = entries[-1][0]
            if any(f["event"] == "queued" and f["lease"] == request_id for _, f in entries):
                break
        yield waiter
    finally:
        if waiter.thread.is_alive():
            Boss.from_url(redis_url, holder="cleanup").force_release(request_id)
        waiter.thread.join(10)
        boss.close()


def expected_device(d: gpuboss_client.DeviceInfo) -> dict[str, Any]:
    return {
        "pool": d.pool,
        "name": d.name,
        "host": d.host,
        "cuda_index": d.cuda_index,
        "total_mib": d.total_mib,
        "reserved_mib": d.reserved_mib,
        "unmanaged_mib": d.unmanaged_mib,
        "budget_mib": d.budget_mib,
        "used_mib": d.used_mib,
        "free_mib": d.free_mib,
        "leases": d.leases,
    }


def ids(leases: Sequence[dict[str, Any]]) -> list[str]:
    return [x["id"] for x in leases]


# --- status ---------------------------------------------------------------------------------


def test_status_without_devices_says_how_to_add_one(admin: Boss, redis_url: str) -> None:
    out = ok(gb(redis_url, "status"))
    assert "No devices" in out
    assert "gpuboss devices add NAME --vram 24GiB" in out
    assert "--pool gpus" in failed(gb(redis_url, "status", "--pool", "gpus"), 5, "pool_not_found")
    assert json.loads(ok(gb(redis_url, "status", "--json"))) == {"pools": {}}


def test_status_shows_devices_leases_and_queue(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    admin.add_device("gpu0", "24GiB", reserved="1GiB", host="h1", cuda_index=0)
    admin.add_device("a100", "80GiB", pool="big", host="h2", cuda_index=3)
    lease = admin.acquire("20GiB", priority="high", labels={"model": "[bold]llama"}, ttl=60)
    with queued_waiter(redis_url, real_redis, "tts-1", "10GiB", priority=70, ttl=60) as waiter:
        out = ok(gb(redis_url, "status"))
        assert "pool default: 1 device, 1 granted, 1 queued" in out
        assert "pool big: 1 device, 0 granted, 0 queued" in out
        device_rows = [
            " ".join(line.split()) for line in out.splitlines() if line.strip().startswith("gpu0 ")
        ]
        assert device_rows == ["gpu0 h1 0 24.0 GiB 1.0 GiB 0 MiB 23.0 GiB 20.0 GiB 3.0 GiB 1"]
        assert "80.0 GiB" in out
        lease_row = next(line for line in out.splitlines() if lease.id in line)
        host_pid = f"{admin.holder.host}:{admin.holder.pid}"
        for cell in ("svc", host_pid, "gpu0", "20.0 GiB", "90 (high)", "active", "model=[bold]llama"):
            assert cell in lease_row
        queue_row = next(line for line in out.splitlines() if waiter.id in line)
        for cell in ("1", "waiter", "(any)", "10.0 GiB", "70"):
            assert cell in queue_row
        assert "No leases in pool big." in out
        assert "Queue of pool big is empty." in out

        only_big = ok(gb(redis_url, "status", "--pool", "big"))
        assert "a100" in only_big
        assert "gpu0" not in only_big
        assert lease.id not in only_big


def test_status_json_matches_boss_status(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    admin.add_device("gpu0", "24GiB", reserved="1GiB", cuda_index=0)
    admin.add_device("gpu1", 16384, cuda_index=1)
    admin.add_device("a100", "80GiB", pool="big")
    held = [admin.acquire("20GiB", device="gpu0", labels={"model": "llama"}, ttl=60)]
    held.append(admin.acquire("16GiB", device="gpu1", ttl=60))
    held.append(admin.acquire("1GiB", pool="big", priority=7, ttl=60))
    with (
        queued_waiter(redis_url, real_redis, "w-low", "10GiB", priority="low", ttl=60),
        queued_waiter(redis_url, real_redis, "w-high", "10GiB", priority="high", ttl=60),
    ):
        doc = json.loads(ok(gb(redis_url, "status", "--json")))
        statuses = admin.status()
        leases = {x.id: x for x in admin.leases()}
    assert sorted(doc["pools"]) == ["big", "default"]
    for s in statuses:
        got = doc["pools"][s.pool]
        want = s.to_dict()
        assert {k: v for k, v in got.items() if k not in ("now_ms", "leases", "queue")} == {
            k: v for k, v in want.items() if k != "now_ms"
        }
        assert isinstance(got["now_ms"], int)
        assert got["granted"] == len(got["leases"])
        assert got["queued"] == len(got["queue"])
    default, big = doc["pools"]["default"], doc["pools"]["big"]
    assert sorted(ids(default["leases"])) == sorted([held[0].id, held[1].id])
    assert ids(big["leases"]) == [held[2].id]
    assert ids(default["queue"]) == ["w-high", "w-low"]  # queue order: priority first
    assert big["queue"] == []
    for entry in default["leases"] + default["queue"] + big["leases"]:
        info = leases[entry["id"]]
        assert entry["mib"] == info.mib
        assert entry["priority"] == info.priority
        assert entry["state"] == info.state
        assert entry["device"] == info.device
        assert entry["labels"] == info.labels
        assert entry["expires_at_ms"] == info.expires_at_ms
    first = next(x for x in default["leases"] if x["id"] == held[0].id)
    assert (first["mib"], first["labels"], first["token"]) == (20480, {"model": "llama"}, held[0].token)
    assert [x["state"] for x in default["queue"]] == ["queued", "queued"]


# --- devices --------------------------------------------------------------------------------


def test_devices_add_update_list_remove(admin: Boss, redis_url: str) -> None:
    out = ok(gb(redis_url, "devices", "add", "gpu0", "--vram", "24GiB", "--reserved", "1GiB", "--host", "h1",
                "--cuda-index", "2"))  # fmt: skip
    assert "added device gpu0 in pool default" in out
    assert "budget 23.0 GiB" in out
    [dev] = admin.devices()
    assert (dev.name, dev.pool, dev.host, dev.cuda_index) == ("gpu0", "default", "h1", 2)
    assert (dev.total_mib, dev.reserved_mib) == (24576, 1024)

    out = ok(gb(redis_url, "devices", "add", "gpu0", "--vram", "49152", "--host", "h1", "--cuda-index", "2"))
    assert "updated device gpu0 in pool default" in out
    assert [d.total_mib for d in admin.devices()] == [49152]
    ok(gb(redis_url, "devices", "add", "b0", "--vram", "8G", "--pool", "big"))
    assert [d.host for d in admin.devices("big")] == [socket.gethostname()]

    table = ok(gb(redis_url, "devices", "list"))
    row = next(line for line in table.splitlines() if " gpu0 " in line)
    assert row.split()[:5] == ["default", "gpu0", "h1", "2", "48.0"]
    assert "b0" in table
    assert "b0" not in ok(gb(redis_url, "devices", "list", "--pool", "default"))

    doc = json.loads(ok(gb(redis_url, "devices", "list", "--json")))
    assert doc == {"devices": [expected_device(d) for d in admin.devices()]}
    assert [d["name"] for d in doc["devices"]] == ["b0", "gpu0"]
    doc = json.loads(ok(gb(redis_url, "devices", "list", "--pool", "big", "--json")))
    assert [d["name"] for d in doc["devices"]] == ["b0"]

    assert "removed device gpu0 from pool default" in ok(gb(redis_url, "devices", "remove", "gpu0"))
    assert admin.devices("default") == []
    ok(gb(redis_url, "devices", "remove", "b0", "--pool", "big"))
    assert admin.devices() == []
    assert "No devices" in ok(gb(redis_url, "devices", "list"))
    assert json.loads(ok(gb(redis_url, "devices", "list", "--json"))) == {"devices": []}


@pytest.mark.parametrize(
    "args",
    [
        ["devices", "add", "gpu0", "--vram", "24XB"],
        ["devices", "add", "gpu0", "--vram", "0"],
        ["devices", "add", "gpu0", "--vram", "8GiB", "--reserved", "lots"],
        ["devices", "add", "gpu 0", "--vram", "8GiB"],
        ["devices", "add", "gpu0", "--vram", "8GiB", "--pool", "no/slash"],
        ["devices", "add", "gpu0", "--vram", "8GiB", "--cuda-index", "-1"],
        ["status", "--pool", "bad pool"],
    ],
)
def test_bad_input_is_bad_request_and_changes_nothing(admin: Boss, redis_url: str, args: list[str]) -> None:
    failed(gb(redis_url, *args), BadRequest.exit_code, "bad_request")
    assert admin.devices() == []


def test_remove_unknown_device_is_not_found(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    err = failed(gb(redis_url, "devices", "remove", "gpu9"), DeviceNotFound.exit_code, "device_not_found")
    assert "gpu9" in err
    failed(gb(redis_url, "devices", "remove", "gpu0", "--pool", "other"), DeviceNotFound.exit_code,
           "device_not_found")  # fmt: skip
    assert [d.name for d in admin.devices()] == ["gpu0"]


def test_remove_busy_device_needs_force(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    lease = admin.acquire("2GiB", ttl=60)
    err = failed(gb(redis_url, "devices", "remove", "gpu0"), DeviceBusy.exit_code, "device_busy")
    assert "force" in err
    assert [d.leases for d in admin.devices()] == [1]
    admin.heartbeat(lease)  # still held

    ok(gb(redis_url, "devices", "remove", "gpu0", "--force"))
    assert admin.devices() == []
    with pytest.raises(LeaseLost):
        admin.heartbeat(lease)


# --- leases, release, reap --------------------------------------------------------------------


def test_leases_table_and_json(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    assert "No leases." in ok(gb(redis_url, "leases"))
    admin.add_device("gpu0", "8GiB", cuda_index=0)
    admin.add_device("b0", "8GiB", pool="big")
    a = admin.acquire("6GiB", labels={"job": "train"}, ttl=60)
    b = admin.acquire(512, pool="big", priority=0, ttl=30)
    with queued_waiter(redis_url, real_redis, "w1", "4GiB", device="gpu0", ttl=60):
        out = ok(gb(redis_url, "leases"))
        assert "3 leases" in out
        rows = {
            line.split()[0]: line for line in out.splitlines() if line.split()[:1] in ([a.id], [b.id], ["w1"])
        }
        assert "6.0 GiB" in rows[a.id]
        assert "job=train" in rows[a.id]
        assert "512 MiB" in rows[b.id]
        assert "queued" in rows["w1"]
        # soonest expiry first: b (30 s) before a and w1 (60 s)
        assert out.index(b.id) < out.index(a.id)

        doc = json.loads(ok(gb(redis_url, "leases", "--json")))
        want = admin.leases()
        assert ids(doc["leases"]) == [x.id for x in want]
        for got, info in zip(doc["leases"], want, strict=True):
            assert (got["pool"], got["state"], got["mib"], got["device"]) == (
                info.pool, info.state, info.mib, info.device,
            )  # fmt: skip
        only_big = json.loads(ok(gb(redis_url, "leases", "--pool", "big", "--json")))
        assert ids(only_big["leases"]) == [b.id]
    nowhere = gb(redis_url, "leases", "--pool", "nowhere")
    assert nowhere.exit_code == 5
    assert "pool 'nowhere' has no devices" in nowhere.stderr


def test_release_without_force_is_refused(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    lease = admin.acquire("2GiB", ttl=60)
    err = failed(gb(redis_url, "release", lease.id), LeaseNotHeld.exit_code, "lease_not_held")
    assert "--force" in err
    assert lease.id in err
    assert admin.heartbeat(lease).state == "active"


def test_force_release_searches_every_pool(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    admin.add_device("b0", "8GiB", pool="big")
    keep = admin.acquire("2GiB", ttl=60)
    lease = admin.acquire("3GiB", pool="big", ttl=60)

    failed(gb(redis_url, "release", lease.id, "--force", "--pool", "default"), LeaseNotFound.exit_code,
           "lease_not_found")  # fmt: skip
    admin.heartbeat(lease)

    out = ok(gb(redis_url, "release", lease.id, "--force"))
    assert f"lease {lease.id} of svc" in out
    assert "3.0 GiB on big/b0: force_released (operator)" in out
    with pytest.raises(LeaseLost, match="force_released"):
        admin.heartbeat(lease)
    assert [d.used_mib for d in admin.devices("big")] == [0]
    assert admin.heartbeat(keep).state == "active"

    ok(gb(redis_url, "release", keep.id, "--force", "--pool", "default"))
    with pytest.raises(LeaseLost):
        admin.heartbeat(keep)


def test_force_release_of_a_waiter_wakes_it(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    admin.add_device("gpu0", "8GiB")
    admin.acquire("8GiB", ttl=60)
    with queued_waiter(redis_url, real_redis, "w1", "4GiB", ttl=60) as waiter:
        out = ok(gb(redis_url, "release", "w1", "--force"))
        assert "lease w1 of waiter" in out
        assert "force_released" in out
        outcome = waiter.result()
    assert isinstance(outcome, LeaseLost)
    assert admin.status()[0].queued == 0


def test_release_unknown_lease_is_not_found(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    err = failed(gb(redis_url, "release", "nope", "--force"), LeaseNotFound.exit_code, "lease_not_found")
    assert "nope" in err
    failed(gb(redis_url, "release", "bad id!", "--force"), BadRequest.exit_code, "bad_request")


def test_reap_ends_expired_leases(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    admin.add_device("gpu0", "8GiB")
    admin.add_device("b0", "8GiB", pool="big")
    keep = admin.acquire("1GiB", ttl=60)
    short = [
        admin.acquire("1GiB", ttl=0.3, keepalive=False),
        admin.acquire("1GiB", pool="big", ttl=0.3, keepalive=False),
    ]
    expires_ms = max(x.info.expires_at_ms or 0 for x in short)
    # Wait on Redis's clock (the one the scripts use); no script runs meanwhile, so nothing reaps.
    deadline_s, start_s = 10.0, real_redis.time()[0]
    while True:
        secs, micros = real_redis.time()
        if secs * 1000 + micros // 1000 > expires_ms:
            break
        assert secs - start_s < deadline_s
    assert "reaped 2 expired leases" in ok(gb(redis_url, "reap"))
    assert [d.used_mib for d in admin.devices()] == [0, 1024]  # b0, gpu0
    assert "reaped 0 expired leases" in ok(gb(redis_url, "reap", "--pool", "default"))
    admin.heartbeat(keep)

    out = ok(gb(redis_url, "release", short[0].id, "--force"))
    assert "had already ended: expired" in out


# --- settings, errors, version --------------------------------------------------------------


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
    ],
)
def test_unreachable_redis(closed_url: str, args: list[str]) -> None:
    err = failed(gb(closed_url, *args), BackendUnavailable.exit_code, "backend_unavailable")
    assert f"cannot reach Redis at {closed_url}" in err


def test_unreachable_redis_masks_the_password(closed_url: str) -> None:
    url = closed_url.replace("redis://", "redis://user:s3cret@")
    err = failed(gb(url, "status"), BackendUnavailable.exit_code, "backend_unavailable")
    assert "s3cret" not in err
    assert "redis://user:***@127.0.0.1:" in err


def test_env_var_is_honoured_and_option_wins(admin: Boss, redis_url: str, closed_url: str) -> None:
    ok(gb(None, "devices", "add", "gpu0", "--vram", "8GiB", env={"GPUBOSS_REDIS_URL": redis_url}))
    assert [d.name for d in admin.devices()] == ["gpu0"]
    err = failed(gb(None, "status", env={"GPUBOSS_REDIS_URL": closed_url}), BackendUnavailable.exit_code,
                 "backend_unavailable")  # fmt: skip
    assert closed_url in err
    # --redis-url beats the environment, both ways round
    assert "gpu0" in ok(gb(redis_url, "devices", "list", env={"GPUBOSS_REDIS_URL": closed_url}))
    failed(gb(closed_url, "status", env={"GPUBOSS_REDIS_URL": redis_url}), BackendUnavailable.exit_code,
           "backend_unavailable")  # fmt: skip


def test_default_url_is_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUBOSS_REDIS_URL", raising=False)
    assert Settings().redis_url == "redis://localhost:6379/0"
    monkeypatch.setenv("GPUBOSS_REDIS_URL", "redis://elsewhere:1/2")
    assert Settings().redis_url == "redis://elsewhere:1/2"


def test_bad_settings_and_urls_are_bad_requests(redis_url: str) -> None:
    err = failed(gb(redis_url, "status", env={"GPUBOSS_REDIS_TIMEOUT_S": "soon"}), BadRequest.exit_code,
                 "bad_request")  # fmt: skip
    assert "GPUBOSS_REDIS_TIMEOUT_S" in err
    failed(gb("mysql://db/1", "status"), BadRequest.exit_code, "bad_request")


def test_version() -> None:
    out = ok(gb(None, "version"))
    assert out == f"gpuboss {version('gpuboss')} (gpuboss-client {gpuboss_client.__version__})\n"


@pytest.mark.slow
def test_installed_console_script(admin: Boss, redis_url: str) -> None:
    """The console script in the venv, configured by GPUBOSS_REDIS_URL, printing to a real pipe."""
    script = Path(sys.executable).parent / "gpuboss"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    env["GPUBOSS_REDIS_URL"] = redis_url
    admin.add_device("gpu0", "24GiB", cuda_index=0)
    lease = admin.acquire("4GiB", ttl=60)
    proc = subprocess.run([script, "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    [s] = admin.status()
    assert doc["pools"]["default"]["devices"] == s.to_dict()["devices"]
    assert ids(doc["pools"]["default"]["leases"]) == [lease.id]


# --- plan and pool settings -------------------------------------------------------------------


def test_plan_says_what_would_happen_and_changes_nothing(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "24GiB")
    assert ok(gb(redis_url, "plan", "--vram", "8GiB")).strip() == "granted on gpu0"
    assert "cannot ever fit" in ok(gb(redis_url, "plan", "--vram", "30GiB"))
    warm = admin.acquire("20GiB", priority="low")
    admin.idle(warm)
    out = json.loads(ok(gb(redis_url, "plan", "--vram", "8GiB", "--priority", "high", "--json")))
    assert out == {"outcome": "evict", "device": "gpu0", "victims": [warm.id], "ahead": 0, "largest_mib": 0}
    admin.busy(warm)  # active and not preemptible: nobody may evict it now
    assert ok(gb(redis_url, "plan", "--vram", "8GiB", "--priority", "high")).strip() == "would wait behind 0"
    assert admin.leases()[0].state == "active"  # the plans changed nothing
    failed(gb(redis_url, "plan", "--vram", "-1"), 2, "bad_request")


def test_pool_configure_sets_residency_and_aging(
    admin: Boss, redis_url: str, real_redis: redis.Redis
) -> None:
    out = ok(gb(redis_url, "pool", "configure", "--min-residency", "5", "--aging", "30"))
    assert "min residency 5 s, aging 30 s" in out
    assert real_redis.hgetall(PoolKeys("default").config) == {"min_residency_ms": "5000", "aging_ms": "30000"}
    failed(gb(redis_url, "pool", "configure", "--aging", "-1"), 2, "bad_request")
