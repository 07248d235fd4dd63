"""The boss service's HTTP API, through the real app under uvicorn, against the real Redis.

Each test starts the app (:func:`serve`) on a free loopback port in a thread of its own, with its
lifespan: the reaper and the event hub run as in production. Requests go over real HTTP with
httpx, so long polls, server-sent events and headers behave as they do for users.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from support import POOL, in_thread, redis_ms, serve_app, snapshot, state, used, wait_for

from gpuboss.api import BeatDoc, DeviceDoc, EventDoc, LeaseDoc, create_app
from gpuboss.hub import EventHub
from gpuboss.settings import ServiceSettings
from gpuboss_client import AsyncBoss, BackendUnavailable, DeviceInfo, LeaseInfo, script_shas
from gpuboss_client.ops import Beat, Event

GIB = 1024
START_S = 15.0  # generous: the app's start-up on a loaded machine


def make_settings(redis_url: str, **overrides: Any) -> ServiceSettings:
    """Settings for a test service: one 24 GiB device, a fast reaper, short waits."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "devices": "gpu0=24GiB:0",
        "tokens": [],
        "reap_interval_s": 0.05,
        "max_wait_s": 20.0,
        "max_queue": 100,
        "redis_timeout_s": 2.0,
    }
    return ServiceSettings(**(values | overrides))


@dataclass
class Service:
    """A running app: its base URL, the app object, and a client for it."""

    url: str
    app: FastAPI
    client: httpx.Client

    def new_client(self, token: str | None = None) -> httpx.Client:
        """Another client (its own connections), with a bearer token if given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=60.0, headers=headers)


@contextmanager
def serve(settings: ServiceSettings, redis_url: str | None = None) -> Iterator[Service]:
    """Run ``create_app(settings, redis_url)`` under uvicorn on a free port until the block ends."""
    app = create_app(settings, redis_url or settings.redis_url or "")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60.0) as client:
        yield Service(url, app, client)


@pytest.fixture
def api(real_redis: redis.Redis, redis_url: str) -> Iterator[Service]:
    """The service on the session's real Redis (flushed), with gpu0 of 24 GiB and no tokens."""
    with serve(make_settings(redis_url)) as svc:
        yield svc


def acquire(client: httpx.Client, vram: int | str, **body: Any) -> httpx.Response:
    """POST /v1/leases with ``vram`` and any other fields (timeout_s 0 unless given)."""
    return client.post("/v1/leases", json={"vram": vram, "timeout_s": 0} | body)


def granted(response: httpx.Response) -> dict[str, Any]:
    """The lease of a 201 reply (fails with the reply's body otherwise)."""
    assert response.status_code == 201, response.text
    doc: dict[str, Any] = response.json()
    return doc


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error body of a reply that must be ``status`` with error ``code``."""
    assert response.status_code == status, response.text
    doc: dict[str, Any] = response.json()
    assert doc["error"] == code, doc
    assert isinstance(doc["message"], str)
    assert doc["message"]
    assert isinstance(doc["retryable"], bool)
    return doc


def ref(lease: dict[str, Any]) -> dict[str, Any]:
    """The body that acts on a held lease: its pool and token."""
    return {"pool": lease["pool"], "token": lease["token"]}


# --- health --------------------------------------------------------------------------------------


def test_healthz_and_readyz_report_version_and_script_shas(api: Service, real_redis: redis.Redis) -> None:
    health = api.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": "0.1.0"}
    shas = script_shas()
    assert api.client.get("/readyz").json() == {"status": "ready", "redis": "ok", "scripts": shas}
    # A Redis restart empties its script cache; readiness loads the scripts again.
    real_redis.script_flush()
    # (the reaper may load its own script again at once; nothing of the service runs "plan")
    assert real_redis.script_exists(shas["plan"]) == [False]
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["scripts"] == shas
    assert all(real_redis.script_exists(*shas.values()))


@contextmanager
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of its own on a unix socket (this test stops it)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{sock}"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server exited"
            return False

    try:
        wait_for("redis-server to listen", up, timeout=START_S)
        yield url, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_readyz_is_503_while_redis_is_down_and_healthz_stays_up(tmp_path: Path) -> None:
    with private_redis(tmp_path) as (url, proc), serve(make_settings(url)) as svc:
        assert svc.client.get("/readyz").status_code == 200
        proc.terminate()
        proc.wait(10)
        ready = svc.client.get("/readyz")
        doc = error(ready, 503, "backend_unavailable")
        assert doc["retryable"] is True
        assert ready.headers["Retry-After"] == "1"
        assert svc.client.get("/healthz").status_code == 200
        error(acquire(svc.client, 1024), 503, "backend_unavailable")


def test_service_does_not_start_without_redis(tmp_path: Path) -> None:
    app = create_app(make_settings(f"unix://{tmp_path}/none.sock"), f"unix://{tmp_path}/none.sock")

    async def main() -> None:
        with pytest.raises(BackendUnavailable, match="Redis unreachable"):
            async with app.router.lifespan_context(app):
                pass

    asyncio.run(main())


# --- leases --------------------------------------------------------------------------------------


def test_lease_life_cycle_over_http(api: Service, real_redis: redis.Redis) -> None:
    c = api.client
    lease = granted(acquire(c, "8GiB", priority="high", labels={"model": "xtts"}, pid=42))
    assert lease["state"] == "active"
    assert (lease["mib"], lease["priority"], lease["device"], lease["holder"]) == (
        8 * GIB,
        90,
        "gpu0",
        "http",
    )
    assert lease["holder_host"] == "127.0.0.1"
    assert lease["holder_pid"] == 42
    assert lease["labels"] == {"model": "xtts"}
    assert lease["env"] == {
        "GPUBOSS_LEASE_ID": lease["id"],
        "GPUBOSS_LEASE_TOKEN": str(lease["token"]),
        "GPUBOSS_DEVICE": "gpu0",
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    lid = lease["id"]
    # An HTTP holder has no pub/sub channel: eviction reaches it in heartbeat replies.
    assert real_redis.hget(POOL.lease(lid), "notify") is None
    assert state(real_redis, lid) == "active"
    assert used(real_redis) == 8 * GIB

    info = c.get(f"/v1/leases/{lid}").json()
    assert (info["id"], info["state"], info["token"]) == (lid, "active", lease["token"])
    status = c.get("/v1/status").json()["pools"]["default"]
    assert [x["id"] for x in status["leases"]] == [lid]
    assert status["devices"][0]["used_mib"] == 8 * GIB
    assert [d["name"] for d in c.get("/v1/devices").json()["devices"]] == ["gpu0"]
    assert [x["id"] for x in c.get("/v1/leases", params={"pool": "default"}).json()["leases"]] == [lid]
    assert c.get("/v1/queue").json() == {"queue": []}

    before = redis_ms(real_redis)
    beat = c.post(f"/v1/leases/{lid}/heartbeat", json=ref(lease) | {"ttl_s": 30}).json()
    assert beat["state"] == "active"
    assert beat["evict_deadline_ms"] is None
    assert beat["expires_at_ms"] >= before + 30_000
    assert c.post(f"/v1/leases/{lid}/idle", json=ref(lease)).json()["state"] == "idle"
    assert state(real_redis, lid) == "idle"
    assert c.post(f"/v1/leases/{lid}/busy", json=ref(lease)).json()["state"] == "active"
    # Without ttl_s a heartbeat renews for the lease's own TTL (30 s since the last one).
    beat = c.post(f"/v1/leases/{lid}/heartbeat", json=ref(lease)).json()
    assert beat["expires_at_ms"] - beat["now_ms"] == 30_000

    assert c.post(f"/v1/leases/{lid}/release", json=ref(lease)).json() == {"id": lid, "state": "released"}
    assert state(real_redis, lid) == "released"
    assert used(real_redis) == 0
    # Releasing again is harmless (a retried release); the lease no longer beats.
    assert c.post(f"/v1/leases/{lid}/release", json=ref(lease)).json()["state"] == "released"
    error(c.post(f"/v1/leases/{lid}/heartbeat", json=ref(lease)), 409, "lease_lost")
    wrong = ref(lease) | {"token": lease["token"] + 1}
    error(c.post(f"/v1/leases/{lid}/release", json=wrong), 409, "lease_not_held")
    error(c.get("/v1/leases/nope"), 404, "lease_not_found")


def test_acquire_waits_and_is_granted_by_a_release_from_another_client(
    api: Service, real_redis: redis.Redis
) -> None:
    first = granted(acquire(api.client, "20GiB"))
    with api.new_client() as other:
        t, out = in_thread(lambda: acquire(other, "10GiB", request_id="waiter", timeout_s=15))
        wait_for("the request to queue", lambda: state(real_redis, "waiter") == "queued")
        queue_doc = api.client.get("/v1/queue").json()["queue"]
        assert [x["id"] for x in queue_doc] == ["waiter"]
        assert t.is_alive()  # still long-polling
        api.client.post(f"/v1/leases/{first['id']}/release", json=ref(first)).raise_for_status()
        t.join(15)
    assert not t.is_alive()
    second = granted(out["value"])
    assert second["id"] == "waiter"
    # The 201 reply is the whole lease, as GET shows it (times included), at once or after a wait.
    assert second["requested_at_ms"] < second["granted_at_ms"]
    assert first["requested_at_ms"] == first["granted_at_ms"]
    shown = api.client.get(f"/v1/leases/{first['id']}", params={"pool": "default"}).json()
    assert {k: first[k] for k in ("requested_at_ms", "granted_at_ms")} == {
        k: shown[k] for k in ("requested_at_ms", "granted_at_ms")
    }
    assert second["token"] > first["token"]
    assert state(real_redis, "waiter") == "active"


def test_acquire_timeout_is_503_with_retry_after_and_the_waiter_leaves(
    api: Service, real_redis: redis.Redis
) -> None:
    granted(acquire(api.client, "20GiB"))
    waited = acquire(api.client, "10GiB", request_id="late", timeout_s=0.3)
    doc = error(waited, 503, "acquire_timeout")
    assert doc["retryable"] is True
    assert waited.headers["Retry-After"] == "1"
    assert real_redis.zcard(POOL.queue) == 0
    assert state(real_redis, "late") == "cancelled"
    # timeout_s 0 tries once and never queues
    once = acquire(api.client, "10GiB", request_id="once")
    error(once, 503, "acquire_timeout")
    assert state(real_redis, "once") is None
    assert real_redis.zcard(POOL.queue) == 0


def test_a_waiter_whose_client_disconnects_leaves_the_queue_at_once(
    api: Service, real_redis: redis.Redis
) -> None:
    granted(acquire(api.client, "20GiB", ttl_s=60))
    body = json.dumps({"vram": "10GiB", "request_id": "gone", "timeout_s": 15}).encode()
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = "POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for("the request to queue", lambda: state(real_redis, "gone") == "queued")
    closed = time.monotonic()
    wait_for("the waiter to leave", lambda: real_redis.zcard(POOL.queue) == 0, timeout=5)
    assert time.monotonic() - closed < 0.1
    assert state(real_redis, "gone") == "cancelled"


def test_acquire_with_the_same_request_id_never_grants_twice(api: Service, real_redis: redis.Redis) -> None:
    first = granted(acquire(api.client, "4GiB", request_id="job-1"))
    again = granted(acquire(api.client, "4GiB", request_id="job-1"))
    assert (again["id"], again["token"], again["device"]) == ("job-1", first["token"], "gpu0")
    assert used(real_redis) == 4 * GIB
    assert [x["id"] for x in api.client.get("/v1/leases").json()["leases"]] == ["job-1"]
    error(acquire(api.client, "5GiB", request_id="job-1"), 409, "request_conflict")
    assert used(real_redis) == 4 * GIB


def test_heartbeat_reports_eviction_of_a_preemptible_http_lease(
    api: Service, real_redis: redis.Redis
) -> None:
    low = granted(acquire(api.client, "20GiB", priority="low", preemptible=True, grace_s=30))
    with api.new_client() as other:
        t, out = in_thread(
            lambda: acquire(other, "10GiB", priority="high", request_id="urgent", timeout_s=15)
        )
        wait_for("the low lease to be asked back", lambda: state(real_redis, low["id"]) == "evicting")
        beat = api.client.post(f"/v1/leases/{low['id']}/heartbeat", json=ref(low)).json()
        assert beat["state"] == "evicting"
        assert beat["now_ms"] < beat["evict_deadline_ms"] <= beat["now_ms"] + 30_000
        busy = api.client.post(f"/v1/leases/{low['id']}/busy", json=ref(low))
        error(busy, 409, "lease_evicted")
        assert state(real_redis, low["id"]) == "evicting"
        assert t.is_alive()  # the memory is promised, not yet given back
        api.client.post(f"/v1/leases/{low['id']}/release", json=ref(low)).raise_for_status()
        t.join(15)
    assert granted(out["value"])["id"] == "urgent"


def test_queue_cap_is_429_and_adds_nothing(real_redis: redis.Redis, redis_url: str) -> None:
    with serve(make_settings(redis_url, max_queue=1)) as svc:
        first = granted(acquire(svc.client, "20GiB"))
        with svc.new_client() as other:
            t, out = in_thread(lambda: acquire(other, "10GiB", request_id="w1", timeout_s=15))
            wait_for("the first waiter", lambda: state(real_redis, "w1") == "queued")
            full = acquire(svc.client, "10GiB", request_id="w2", timeout_s=5)
            doc = error(full, 429, "queue_full")
            assert doc["retryable"] is True
            assert full.headers["Retry-After"] == "1"
            assert state(real_redis, "w2") is None
            assert real_redis.zcard(POOL.queue) == 1
            svc.client.post(f"/v1/leases/{first['id']}/release", json=ref(first)).raise_for_status()
            t.join(15)
        assert granted(out["value"])["id"] == "w1"


# --- bad input -----------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/leases", {"vram": "lots"}),
    ("POST", "/v1/leases", {"vram": 0}),
    ("POST", "/v1/leases", {"vram": -5}),
    ("POST", "/v1/leases", {"vram": "99TiB"}),
    ("POST", "/v1/leases", {"vram": 1024, "vram_gb": 1.0}),
    ("POST", "/v1/leases", {}),
    ("POST", "/v1/leases", {"vram": True}),
    ("POST", "/v1/leases", {"vram": 1024, "priority": 101}),
    ("POST", "/v1/leases", {"vram": 1024, "priority": "urgent"}),
    ("POST", "/v1/leases", {"vram": 1024, "ttl_s": 0}),
    ("POST", "/v1/leases", {"vram": 1024, "timeout_s": 21}),  # above max_wait_s
    ("POST", "/v1/leases", {"vram": 1024, "timeout_s": -1}),
    ("POST", "/v1/leases", {"vram": 1024, "labels": {"model": 3}}),
    ("POST", "/v1/leases", {"vram": 1024, "labels": {"k": "v" * 5000}}),
    ("POST", "/v1/leases", {"vram": 1024, "pool": "no pool!"}),
    ("POST", "/v1/leases", {"vram": 1024, "device": "gpu 0"}),
    ("POST", "/v1/leases", {"vram": 1024, "request_id": "a/b"}),
    ("POST", "/v1/leases", {"vram": 1024, "devices": 2, "device": "gpu0"}),
    ("POST", "/v1/leases", {"vram": 1024, "holder": ""}),
    ("POST", "/v1/leases", {"vram": 1024, "holder": "\ud800"}),
    ("POST", "/v1/leases", {"vram": 1024, "colour": "blue"}),
    ("POST", "/v1/leases", {"vram": 1024, "timeout_s": "5"}),
    ("POST", "/v1/leases", "not json"),
    ("POST", "/v1/leases/x/heartbeat", {"token": "1"}),
    ("POST", "/v1/leases/x/heartbeat", {"token": -1}),
    ("POST", "/v1/leases/x/heartbeat", {"token": 1, "ttl_s": 0}),
    ("POST", "/v1/leases/x/heartbeat", {"pool": "default"}),
    ("POST", "/v1/leases/x/release", {"token": 1, "extra": 1}),
    ("POST", "/v1/leases/x/idle", {"token": 1.5}),
    ("POST", "/v1/leases/x/busy", None),
    ("POST", "/v1/plan", {"vram": "8 bananas"}),
    ("GET", "/v1/events?count=0", None),
    ("GET", "/v1/events?count=1001", None),
    ("GET", "/v1/events/stream?last=-1", None),
    ("GET", "/v1/status?pool=bad%20pool", None),
    ("GET", "/v1/leases/x?pool=bad%20pool", None),
    ("PUT", "/v1/devices/gpu1", {"vram": "big"}),
    ("PUT", "/v1/devices/gpu1", {"vram": 1024, "reserved": -1}),
    ("PUT", "/v1/devices/gpu%201", {"vram": 1024}),
    ("DELETE", "/v1/devices/gpu0?force=maybe", None),
    ("POST", "/v1/leases/x/force-release", {"pool": 5}),
    ("POST", "/v1/reap", {"pool": "a b"}),
    ("PUT", "/v1/pools/default/config", {"min_residency_s": -1}),
    ("PUT", "/v1/pools/default/config", {"aging_s": "soon"}),
]


def test_bad_input_is_400_bad_request_and_changes_nothing(api: Service, real_redis: redis.Redis) -> None:
    lease = granted(acquire(api.client, "4GiB", request_id="held"))
    before = snapshot(real_redis)
    for method, path, body in BAD_REQUESTS:
        if isinstance(body, str):
            reply = api.client.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
        elif body is None:
            reply = api.client.request(method, path)
        else:
            content = json.dumps(body)  # lone surrogates stay escaped, as any client would send them
            reply = api.client.request(
                method, path, content=content, headers={"content-type": "application/json"}
            )
        assert reply.status_code == 400, (method, path, body, reply.text)
        assert reply.json()["error"] == "bad_request", (method, path, body, reply.text)
        assert reply.json()["retryable"] is False
    huge = json.dumps({"vram": 1024, "labels": {"k": "v" * 100_000}})
    too_large = api.client.post("/v1/leases", content=huge, headers={"content-type": "application/json"})
    error(too_large, 413, "payload_too_large")
    assert snapshot(real_redis) == before
    assert state(real_redis, lease["id"]) == "active"


def test_unknown_routes_and_methods_answer_json(api: Service) -> None:
    error(api.client.get("/v2/nothing"), 404, "not_found")
    wrong = api.client.delete("/v1/status")
    error(wrong, 405, "method_not_allowed")
    assert "GET" in wrong.headers["Allow"]
    # A path two routes share: Allow names the methods of both; a catch-all of the proxy is not one.
    both = api.client.patch("/v1/devices/gpu0", json={})
    error(both, 405, "method_not_allowed")
    assert both.headers["Allow"] == "DELETE, PUT"
    leases = api.client.patch("/v1/leases")
    error(leases, 405, "method_not_allowed")
    assert leases.headers["Allow"] == "GET, POST"
    validation = api.client.post("/v1/leases", json={"vram": 1024, "colour": "blue"}).json()
    assert "colour" in validation["message"]
    assert validation["problems"][0]["where"] == "body.colour"


# --- events --------------------------------------------------------------------------------------


@contextmanager
def event_stream(client: httpx.Client, **kwargs: Any) -> Iterator[Iterator[str]]:
    """The lines of ``GET /v1/events/stream``, read as they arrive (httpx's read timeout bounds each)."""
    with client.stream("GET", "/v1/events/stream", **kwargs) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        yield reply.iter_lines()


def until(lines: Iterator[str], prefix: str) -> list[dict[str, str]]:
    """Read up to the first line starting with ``prefix``; the SSE messages (id, event, data) seen."""
    messages: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if current:
                messages.append(current)
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value
        if line.startswith(prefix):
            return [*messages, current]
    raise AssertionError(f"the stream ended before {prefix!r}")


def test_event_stream_delivers_a_grant_live_and_resumes_after_last_event_id(api: Service) -> None:
    with api.new_client() as reader, event_stream(reader) as lines:
        until(lines, "retry:")  # subscribed: the live part begins
        lease = granted(acquire(api.client, "2GiB", request_id="live"))
        live = until(lines, "data:")[-1]
        assert live["event"] == "granted"
        data = json.loads(live["data"])
        assert (data["pool"], data["event"], data["fields"]["lease"]) == ("default", "granted", "live")
        assert live["id"] == f"default/{data['id']}"
    api.client.post(f"/v1/leases/{lease['id']}/release", json=ref(lease)).raise_for_status()
    acquire(api.client, "1GiB", request_id="after").raise_for_status()

    # A reconnecting client replays what came after its last id, then goes live.
    with api.new_client() as reader, event_stream(reader, headers={"Last-Event-ID": live["id"]}) as lines:
        replay = [m for m in until(lines, "retry:") if "data" in m]
        assert [(m["event"], json.loads(m["data"])["fields"]["lease"]) for m in replay] == [
            ("released", "live"),
            ("granted", "after"),
        ]
    # last=N replays the last N events of the pool first.
    with api.new_client() as reader, event_stream(reader, params={"pool": "default", "last": 2}) as lines:
        assert [m["event"] for m in until(lines, "retry:") if "data" in m] == ["released", "granted"]
    error(api.client.get("/v1/events/stream", headers={"Last-Event-ID": "garbage"}), 400, "bad_request")


def test_events_route_returns_the_last_events_oldest_first(api: Service) -> None:
    lease = granted(acquire(api.client, "2GiB"))
    api.client.post(f"/v1/leases/{lease['id']}/release", json=ref(lease)).raise_for_status()
    events = api.client.get("/v1/events", params={"count": 2}).json()["events"]
    assert [e["event"] for e in events] == ["granted", "released"]
    assert all(e["fields"]["lease"] == lease["id"] for e in events)
    everything = api.client.get("/v1/events", params={"pool": "default"}).json()["events"]
    assert [e["event"] for e in everything] == ["device_added", "granted", "released"]


def test_event_hub_counts_events_since_start(api: Service) -> None:
    hub: EventHub = api.app.state.hub
    lease = granted(acquire(api.client, "2GiB"))
    api.client.post(f"/v1/leases/{lease['id']}/release", json=ref(lease)).raise_for_status()
    wait_for("the hub to count", lambda: hub.counts.get(("default", "released")) == 1)
    assert hub.counts[("default", "granted")] == 1
    assert ("default", "device_added") not in hub.counts  # before the hub started


def test_event_hub_drops_a_slow_subscriber_and_keeps_serving_the_others(
    real_redis: redis.Redis, redis_url: str
) -> None:
    async def main() -> None:
        boss = AsyncBoss.from_url(redis_url, holder="test")
        await boss.add_device("gpu0", "8GiB")
        hub = EventHub(boss, block_s=0.05, queue_size=2)
        hub.start()
        await asyncio.wait_for(hub.tailing.wait(), 10)
        try:
            slow, fast = hub.subscribe(), hub.subscribe("default")
            other_pool = hub.subscribe("elsewhere")
            for i in range(3):
                await boss.add_device(f"gpu{i + 1}", "8GiB")
                # the fast subscriber keeps up: read each event as it comes
                event = await fast.get(timeout=10)
                assert event is not None
                assert event.fields["device"] == f"gpu{i + 1}"
            assert slow.dropped
            assert hub.dropped == 1
            assert hub.subscribers == 2
            # the slow one still gets what was queued for it, then its stream ends
            assert [e.fields["device"] async for e in slow] == ["gpu1", "gpu2"]
            assert not fast.dropped
            with pytest.raises(TimeoutError):  # nothing for a pool it does not follow
                await other_pool.get(timeout=0.05)
            await boss.remove_device("gpu3")
            removed = await fast.get(timeout=10)
            assert removed is not None
            assert removed.name == "device_removed"
            assert hub.counts[("default", "device_added")] == 3
        finally:
            await hub.stop()
            await boss.aclose()
        assert await fast.get() is None  # stopping the hub ends every subscription

    asyncio.run(main())


# --- reaper --------------------------------------------------------------------------------------


def test_reaper_ends_an_expired_lease_with_no_client_active(api: Service, real_redis: redis.Redis) -> None:
    lease = granted(acquire(api.client, "4GiB", ttl_s=0.3))
    assert state(real_redis, lease["id"]) == "active"
    # No client call from here on: only the service's reaper runs scripts.
    wait_for("the reaper to expire the lease", lambda: state(real_redis, lease["id"]) == "expired")
    assert used(real_redis) == 0
    assert api.app.state.reaper.reaped >= 1


# --- admin ---------------------------------------------------------------------------------------


def test_operator_routes_manage_devices_pools_and_leases(real_redis: redis.Redis, redis_url: str) -> None:
    with serve(make_settings(redis_url, reap_interval_s=60)) as svc:  # the reaper stays out of the way
        operate(svc.client, real_redis)


def operate(c: httpx.Client, real_redis: redis.Redis) -> None:
    added = c.put("/v1/devices/gpu1", json={"vram": "16GiB", "reserved": 1024, "cuda_index": 1, "host": "h1"})
    assert added.status_code == 200, added.text
    doc = added.json()
    assert doc["created"] is True
    assert doc["device"] | {"free_mib": 0} == {
        "pool": "default", "name": "gpu1", "host": "h1", "cuda_index": 1, "total_mib": 16 * GIB,
        "reserved_mib": 1024, "unmanaged_mib": 0, "budget_mib": 15 * GIB, "used_mib": 0, "free_mib": 0,
        "leases": 0,
    }  # fmt: skip
    again = c.put("/v1/devices/gpu1", json={"vram": "12GiB"}).json()
    assert (again["created"], again["device"]["total_mib"]) == (False, 12 * GIB)

    lease = granted(acquire(c, "10GiB", device="gpu1"))
    error(c.delete("/v1/devices/gpu1"), 409, "device_busy")
    plan = c.post("/v1/plan", json={"vram": "20GiB", "priority": "high"}).json()
    assert plan == {"outcome": "grant", "device": "gpu0", "victims": [], "ahead": 0, "largest_mib": 0}
    never = c.post("/v1/plan", json={"vram_gb": 100}).json()
    assert (never["outcome"], never["largest_mib"]) == ("never", 24 * GIB)

    ended = c.post(f"/v1/leases/{lease['id']}/force-release", json={"pool": "default"}).json()
    assert (ended["id"], ended["state"]) == (lease["id"], "force_released")
    again = c.post(f"/v1/leases/{lease['id']}/force-release").json()  # any pool; already ended
    assert (again["state"], again["ended_at_ms"]) == ("force_released", ended["ended_at_ms"])
    assert c.delete("/v1/devices/gpu1", params={"force": True}).json() == {
        "removed": "gpu1",
        "pool": "default",
    }
    assert real_redis.sismember(POOL.devices, "gpu1") == 0
    error(c.delete("/v1/devices/gpu1"), 404, "device_not_found")

    expired = granted(acquire(c, "1GiB", ttl_s=0.05))
    wait_for("the lease's expiry time", lambda: redis_ms(real_redis) > expired["expires_at_ms"])
    assert state(real_redis, expired["id"]) == "active"  # nothing has reaped it yet
    assert c.post("/v1/reap", json={"pool": "default"}).json() == {"reaped": 1}
    assert state(real_redis, expired["id"]) == "expired"
    assert c.post("/v1/reap").json() == {"reaped": 0}

    config = c.put("/v1/pools/default/config", json={"min_residency_s": 30, "aging_s": 60}).json()
    assert config == {"pool": "default", "min_residency_s": 30, "aging_s": 60}
    assert real_redis.hgetall(POOL.config) == {"min_residency_ms": "30000", "aging_ms": "60000"}


# --- documents -----------------------------------------------------------------------------------


def test_response_documents_have_exactly_the_client_fields() -> None:
    lease = LeaseInfo(
        "a", "default", "active", "h", "host", 1, 1, 50, "gpu0", 1, (0,), None, 1, 1, 1, 1, None, None
    )
    device = DeviceInfo("gpu0", "default", "host", 0, 1, 0, 0, 0, 0)
    assert set(LeaseDoc.model_fields) == set(lease.to_dict())
    assert set(DeviceDoc.model_fields) == set(device.to_dict())
    assert set(BeatDoc.model_fields) == set(Beat("a", "active", 1, 1, None).to_dict())
    assert set(EventDoc.model_fields) == set(Event("default", "1-0", "granted", {}).to_dict())


def test_the_openapi_document_asks_for_a_token_only_when_there_are_tokens(redis_url: str) -> None:
    def document(**settings: Any) -> dict[str, Any]:
        doc: dict[str, Any] = create_app(make_settings(redis_url, **settings), redis_url).openapi()
        return doc

    open_doc = document()
    assert "securitySchemes" not in open_doc.get("components", {})
    operations = [op for path in open_doc["paths"].values() for op in path.values()]
    assert not any("security" in op or "401" in op["responses"] for op in operations)
    secured = document(tokens="root:operator:root-secret-0123456789")
    assert "bearer" in secured["components"]["securitySchemes"]
    assert secured["paths"]["/v1/status"]["get"]["security"] == [{"bearer": []}]


def test_the_proxy_reads_at_most_64_mib_of_an_openai_body(api: Service) -> None:
    big = b'{"model": "m", "x": "' + b"a" * (64 * 1024 * 1024) + b'"}'
    error(api.client.post("/v1/chat/completions", content=big), 413, "payload_too_large")
    # Under the cap it is read, and routed by its model (here to no consumer).
    error(api.client.post("/v1/chat/completions", json={"model": "m"}), 404, "no_consumer")
