"""``GET /metrics`` through the service app against the real Redis.

The exposition is parsed with prometheus_client's own parser and every value checked exactly: sizes
in bytes (MiB x 1048576), lease counts by state, the queue, and the event counters moving with
grants, waits, evictions and releases. No lease id or holder may appear anywhere in it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from support import in_thread, redis_ms, serve_app, wait_for

import gpuboss_client
from gpuboss import metrics
from gpuboss.agent import Agent
from gpuboss.api import create_app
from gpuboss.fakenvml import FakeGpu, FakeNvml, FakeProcess, fake_uuid
from gpuboss.metrics import Snapshot, render
from gpuboss.probe import NvmlProbe
from gpuboss.settings import ServiceSettings
from gpuboss_client import Boss, DeviceInfo, LeaseInfo, PoolKeys, PoolStatus

MIB = 1048576


# ---- the app under test ---------------------------------------------------------------------------


def make_app(redis_url: str, **settings: Any) -> FastAPI:
    """The service's app for ``redis_url`` with ``settings`` (ServiceSettings fields)."""
    return create_app(ServiceSettings(redis_url=redis_url, **settings), redis_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- reading the exposition -----------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)[0]


def counter(client: httpx.Client, name: str, pool: str = "default") -> float:
    return value(scrape(client), f"gpuboss_{name}_total", pool=pool)


def warm_up(client: httpx.Client, boss: Boss) -> None:
    """Grant and release on gpu0 until the hub counts both: it may start reading after the first."""

    def counted() -> bool:
        boss.release(boss.acquire(1024, device="gpu0", ttl=30))
        return counter(client, "grants") > 0 and counter(client, "releases") > 0

    wait_for("the event hub to count", counted, timeout=20)
    wait_for(
        "the last warm-up to be counted", lambda: counter(client, "grants") == counter(client, "releases")
    )


# ---- tests ----------------------------------------------------------------------------------------


def start(redis_url: str) -> contextlib.AbstractContextManager[str]:
    return serve_app(make_app(redis_url, devices=["gpu0=24GiB:0", "gpu1=16GiB:1"]))


@pytest.fixture
def service(real_redis: redis.Redis, redis_url: str) -> Iterator[httpx.Client]:
    """The app served, with gpu0=24GiB and gpu1=16GiB in pool default, and gpu9 in pool other."""
    Boss(real_redis, holder="setup").add_device("gpu9", "8GiB", pool="other", host="node-b")
    with start(redis_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def test_exposition_values_states_and_no_lease_ids(service: httpx.Client, real_redis: redis.Redis) -> None:
    # gpu1 loses 1 GiB to reserve, so that budget and total differ.
    admin = Boss(real_redis, holder="admin")
    host = next(d.host for d in admin.devices("default") if d.name == "gpu1")
    admin.add_device("gpu1", "16GiB", reserved="1GiB", host=host, cuda_index=1)
    llm = Boss(real_redis, holder="llm-holder").acquire(8192, device="gpu0", ttl=120, labels={"model": "m1"})
    tts_boss = Boss(real_redis, holder="tts-holder")
    tts = tts_boss.acquire(4096, device="gpu0", ttl=120)
    tts_boss.idle(tts)
    batch = Boss(real_redis, holder="batch-holder").acquire(
        6144, device="gpu1", ttl=120, priority="low", preemptible=True, grace=120
    )
    # Needs 12288 of gpu1's 9216 free: batch is asked to leave and this one waits meanwhile.
    waiter_boss = Boss(real_redis, holder="waiter-holder")
    thread, out = in_thread(
        lambda: waiter_boss.acquire(12288, device="gpu1", priority="high", ttl=120, timeout=60)
    )
    wait_for("the waiter to queue", lambda: admin.status("default")[0].queued == 1)

    before_ms = redis_ms(real_redis)
    response = service.get("/metrics")
    after_ms = redis_ms(real_redis)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples, types = parse(response.text)
    queued = [x for x in admin.leases("default") if x.state == "queued"]
    assert len(queued) == 1
    ids = [llm.id, tts.id, batch.id, queued[0].id]
    for secret in [*ids, "llm-holder", "tts-holder", "batch-holder", "waiter-holder", "m1"]:
        assert secret not in response.text

    gpu0 = {"pool": "default", "device": "gpu0", "host": host}
    gpu1 = {"pool": "default", "device": "gpu1", "host": host}
    gpu9 = {"pool": "other", "device": "gpu9", "host": "node-b"}
    expected = {
        "total": (24576, 16384, 8192),
        "reserved": (0, 1024, 0),
        "unmanaged": (0, 0, 0),
        "budget": (24576, 15360, 8192),
        "leased": (12288, 6144, 0),
        "idle": (4096, 0, 0),
        "evicting": (0, 6144, 0),
        "free": (12288, 9216, 8192),
    }
    for what, mibs in expected.items():
        for labels, mib in zip((gpu0, gpu1, gpu9), mibs, strict=True):
            assert value(samples, f"gpuboss_device_{what}_bytes", **labels) == mib * MIB, (what, labels)
        assert types[f"gpuboss_device_{what}_bytes"] == "gauge"
    assert [value(samples, "gpuboss_device_leases", **d) for d in (gpu0, gpu1, gpu9)] == [2, 1, 0]

    states = {
        s: value(samples, "gpuboss_leases", pool="default", state=s) for s in ("active", "idle", "evicting")
    }
    assert states == {"active": 1, "idle": 1, "evicting": 1}
    assert value(samples, "gpuboss_leases", pool="other", state="active") == 0
    assert value(samples, "gpuboss_queue_depth", pool="default") == 1
    assert value(samples, "gpuboss_queue_depth", pool="other") == 0
    asked = queued[0].requested_at_ms
    assert asked is not None
    waited = value(samples, "gpuboss_queue_oldest_wait_seconds", pool="default")
    assert (before_ms - asked) / 1000 <= waited <= (after_ms - asked) / 1000
    assert value(samples, "gpuboss_queue_oldest_wait_seconds", pool="other") == 0
    assert value(samples, "gpuboss_pool_devices", pool="default") == 2
    assert value(samples, "gpuboss_redis_up") == 1
    assert value(samples, "gpuboss_build_info", version=gpuboss_client.__version__) == 1
    for _event, name, _doc in metrics.COUNTERS:
        assert types[name] == "counter"
        assert (f"{name}_total", frozenset({("pool", "other")})) in samples  # present from zero
    # Base units and no per-lease labels anywhere.
    for name, label_set in samples:
        assert {k for k, _ in label_set} <= {
            "pool",
            "device",
            "host",
            "state",
            "version",
            "event",
            "finding",
        }, name
        assert "_mib" not in name
        assert "_ms" not in name

    batch_boss = Boss(real_redis, holder="batch-holder")
    batch_boss.release(batch)
    thread.join(30)
    assert "error" not in out
    waiter_boss.release(out["value"])


@pytest.mark.slow
def test_counters_move_with_grants_waits_evictions_and_releases(
    service: httpx.Client, real_redis: redis.Redis
) -> None:
    boss = Boss(real_redis, holder="counting")
    warm_up(service, boss)
    before = scrape(service)

    def delta(name: str, pool: str = "default") -> float:
        key = (f"gpuboss_{name}_total", frozenset({("pool", pool)}))
        return scrape(service)[key] - before[key]

    victim = boss.acquire(20480, device="gpu0", ttl=60, priority="low", preemptible=True, grace=60)
    winner = Boss(real_redis, holder="winner")
    thread, out = in_thread(lambda: winner.acquire(12288, device="gpu0", priority="high", ttl=60, timeout=60))
    wait_for("the eviction to be counted", lambda: delta("evictions") == 1 and delta("waits") == 1)
    assert delta("grants") == 1
    boss.release(victim)
    thread.join(30)
    assert "error" not in out
    winner.release(out["value"])
    expect = {"grants": 2, "waits": 1, "evictions": 1, "releases": 2, "expiries": 0, "revocations": 0}
    wait_for("grants and releases to be counted", lambda: delta("releases") == 2)
    assert {name: delta(name) for name in expect} == expect
    assert {name: delta(name, "other") for name in expect} == dict.fromkeys(expect, 0)
    events = scrape(service)
    assert events[("gpuboss_events_total", frozenset({("pool", "default"), ("event", "granted")}))] >= 2


class OwnRedis:
    """A redis-server of this test's own on a fixed port, to stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                return False

        try:
            wait_for("redis-server to answer", ping, timeout=10)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.mark.slow
def test_redis_down_answers_200_with_redis_up_zero(tmp_path: Path) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    try:
        with start(own.url) as base, httpx.Client(base_url=base, timeout=30) as client:
            with redis.Redis.from_url(own.url, decode_responses=True) as r:
                warm_up(client, Boss(r, holder="counting"))
            grants = counter(client, "grants")
            own.stop()
            response = client.get("/metrics")
            assert response.status_code == 200
            samples, _ = parse(response.text)
            assert value(samples, "gpuboss_redis_up") == 0
            names = {name for name, _ in samples}
            assert not {
                n for n in names if n.startswith(("gpuboss_device_", "gpuboss_queue_", "gpuboss_leases"))
            }
            assert value(samples, "gpuboss_grants_total", pool="default") == grants  # the counts stay
            own.start()
            wait_for(
                "metrics to read Redis again", lambda: value(scrape(client), "gpuboss_redis_up") == 1, 20
            )
    finally:
        own.stop()


def test_gang_and_over_budget_devices_render_in_bytes() -> None:
    # A gang lease holds its size on each of its devices; free goes negative past the budget.
    devs = [
        DeviceInfo("a", "p", "h", 0, total_mib=100, reserved_mib=0, unmanaged_mib=90, used_mib=30, leases=1),
        DeviceInfo("b", "p", "h", 1, total_mib=100, reserved_mib=0, unmanaged_mib=0, used_mib=30, leases=1),
    ]
    gang = LeaseInfo(
        id="g1", pool="p", state="idle", holder="x", holder_host="h", holder_pid=1, mib=30, priority=50,
        device="a,b", token=1, cuda_indexes=(0, 1), device_host="h", ttl_ms=1000, expires_at_ms=2000,
        requested_at_ms=1, granted_at_ms=1, ended_at_ms=None, reason=None,
    )  # fmt: skip
    snap = Snapshot([PoolStatus("p", 5000, devs, 1, 0)], [gang], {("p", "granted"): 3}, 0.01)
    samples, _ = parse(render(snap).decode())
    for name in ("a", "b"):
        assert value(samples, "gpuboss_device_idle_bytes", pool="p", device=name, host="h") == 30 * MIB
    assert value(samples, "gpuboss_device_free_bytes", pool="p", device="a", host="h") == -20 * MIB
    assert value(samples, "gpuboss_grants_total", pool="p") == 3
    assert value(samples, "gpuboss_events_total", pool="p", event="granted") == 3
    assert "g1" not in render(snap).decode()


def test_findings_of_one_agent_pass_with_the_fake_nvml(real_redis: redis.Redis, redis_url: str) -> None:
    gpus = [fake_uuid(i) for i in range(3)]
    nvml = FakeNvml([FakeGpu(u, "NVIDIA L4", 24576) for u in gpus])
    probe = NvmlProbe(nvml)
    agent = Agent(Boss(real_redis, holder="gpuboss-agent"), probe, host="node-a", smoothing=1.0)
    try:
        agent.run_once()  # registers the GPUs
        llm = Boss(real_redis, holder="llm", host="node-a", pid=100)
        lease = llm.acquire("2GiB", device=gpus[0], labels={"model": "m1"})
        nvml.gpus[0].processes.append(FakeProcess(100, 4096))
        nvml.gpus[1].processes.append(FakeProcess(500, 1000))
        nvml.gpus[2].lost = True
        agent.run_once()
        Boss(real_redis, holder="admin").add_device("static", "8GiB", host="node-b")  # never measured
        with serve_app(make_app(redis_url)) as base, httpx.Client(base_url=base, timeout=30) as client:
            before_ms = redis_ms(real_redis)
            response = client.get("/metrics")
            after_ms = redis_ms(real_redis)
        assert response.status_code == 200
        samples, types = parse(response.text)
        assert lease.id not in response.text
        assert "llm" not in response.text
        dev = [{"pool": "default", "device": u, "host": "node-a"} for u in gpus]
        assert [value(samples, "gpuboss_device_up", **d) for d in dev] == [1, 1, 0]
        static = {"pool": "default", "device": "static", "host": ""}
        assert ("gpuboss_device_up", frozenset(static.items())) not in samples
        assert [value(samples, "gpuboss_device_seen_bytes", **d) for d in dev[:2]] == [4096 * MIB, 1000 * MIB]
        # A leak is one only once it persists: after one pass nothing leaks yet.
        assert [value(samples, "gpuboss_device_leak_bytes", **d) for d in dev] == [0, 0, 0]
        for d in dev[:2]:
            at = int(real_redis.hget(PoolKeys("default").device(d["device"]), "measured_at") or 0)
            age = value(samples, "gpuboss_device_measurement_age_seconds", **d)
            assert (before_ms - at) / 1000 <= age <= (after_ms - at) / 1000
        assert value(samples, "gpuboss_leases_with_finding", pool="default", finding="over_use") == 1
        assert value(samples, "gpuboss_leases_with_finding", pool="default", finding="under_use") == 0
        assert value(samples, "gpuboss_label_peak_bytes", pool="default", label="model=m1") == 4096 * MIB
        assert len([k for k in samples if k[0] == "gpuboss_label_peak_bytes"]) == 1
        for name in ("gpuboss_device_up", "gpuboss_leases_with_finding", "gpuboss_label_peak_bytes"):
            assert types[name] == "gauge"
        llm.release(lease)
    finally:
        probe.close()
