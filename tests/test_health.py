"""``GET /health``: VRAM total and free (MiB) over the devices of a pool or of every pool, as the
runbook's ``curl http://localhost:8003/health`` shows, through the real app on the real Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from support import POOL
from test_api import GIB, Service, acquire, error, granted, make_settings, private_redis, serve

from gpuboss.settings import Token

OPERATOR = "health-operator-0123456789"


@pytest.fixture
def bare(real_redis: redis.Redis, redis_url: str) -> Iterator[Service]:
    """The service on the flushed real Redis with no devices and no tokens."""
    with serve(make_settings(redis_url, devices=[])) as svc:
        yield svc


def put_device(client: httpx.Client, name: str, vram: str, **body: Any) -> None:
    reply = client.put(f"/v1/devices/{name}", json={"vram": vram} | body)
    assert reply.status_code in (200, 201), reply.text


def health(client: httpx.Client, **params: str) -> dict[str, Any]:
    reply = client.get("/health", params=params)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    doc: dict[str, Any] = reply.json()
    return doc


def test_runbook_example_one_24_gib_device_with_8_gib_leased(real_redis: redis.Redis, redis_url: str) -> None:
    with serve(make_settings(redis_url)) as svc:  # gpu0=24GiB:0 in the default pool
        granted(acquire(svc.client, "8GiB", device="gpu0", ttl_s=60))
        assert health(svc.client) == {
            "gpu_available": True,
            "vram_total": 24576,
            "vram_free": 16384,
            "devices": [
                {
                    "pool": "default",
                    "name": "gpu0",
                    "host": socket.gethostname(),
                    "cuda_index": 0,
                    "total_mib": 24576,
                    "budget_mib": 24576,
                    "used_mib": 8192,
                    "free_mib": 16384,
                }
            ],
        }


def test_sums_every_pool_and_filters_by_pool(bare: Service) -> None:
    c = bare.client
    put_device(c, "gpu0", "24GiB", host="box-a", cuda_index=0)
    put_device(c, "gpu1", "16GiB", reserved="1GiB", host="box-a", cuda_index=1)
    put_device(c, "big", "80GiB", pool="batch", host="box-b", cuda_index=0)
    granted(acquire(c, "8GiB", device="gpu0", ttl_s=60))
    granted(acquire(c, "5GiB", device="gpu1", ttl_s=60))
    granted(acquire(c, "30GiB", pool="batch", ttl_s=60))

    everything = health(c)
    assert (everything["gpu_available"], everything["vram_total"], everything["vram_free"]) == (
        True,
        (24 + 16 + 80) * GIB,
        (16 + 10 + 50) * GIB,  # reserved MiB are never free
    )
    assert [(d["pool"], d["name"]) for d in everything["devices"]] == [
        ("batch", "big"),
        ("default", "gpu0"),
        ("default", "gpu1"),
    ]
    gpu1 = everything["devices"][2]
    assert gpu1 == {
        "pool": "default",
        "name": "gpu1",
        "host": "box-a",
        "cuda_index": 1,
        "total_mib": 16 * GIB,
        "budget_mib": 15 * GIB,
        "used_mib": 5 * GIB,
        "free_mib": 10 * GIB,
    }

    default = health(c, pool="default")
    assert (default["vram_total"], default["vram_free"]) == (40 * GIB, 26 * GIB)
    assert [d["name"] for d in default["devices"]] == ["gpu0", "gpu1"]
    batch = health(c, pool="batch")
    assert (batch["gpu_available"], batch["vram_total"], batch["vram_free"]) == (True, 80 * GIB, 50 * GIB)
    assert [d["name"] for d in batch["devices"]] == ["big"]


def test_unknown_pool_is_404_and_a_bad_name_400(bare: Service) -> None:
    put_device(bare.client, "gpu0", "24GiB")
    doc = error(bare.client.get("/health", params={"pool": "nope"}), 404, "pool_not_found")
    assert doc["retryable"] is False
    error(bare.client.get("/health", params={"pool": "bad pool"}), 400, "bad_request")
    error(bare.client.get("/health", params={"pool": "x" * 65}), 400, "bad_request")


def test_no_devices_means_no_gpu_available(bare: Service) -> None:
    assert health(bare.client) == {"gpu_available": False, "vram_total": 0, "vram_free": 0, "devices": []}
    error(bare.client.get("/health", params={"pool": "default"}), 404, "pool_not_found")


def test_full_devices_are_not_available_and_free_never_goes_negative(
    bare: Service, real_redis: redis.Redis
) -> None:
    c = bare.client
    put_device(c, "gpu0", "8GiB", host="box-a")
    granted(acquire(c, "8GiB", device="gpu0", ttl_s=60))
    doc = health(c)
    assert (doc["gpu_available"], doc["vram_total"], doc["vram_free"]) == (False, 8 * GIB, 0)
    # unmanaged use (what the agent reports) past the budget: free stays 0, not negative
    put_device(c, "gpu1", "8GiB", host="box-a")
    granted(acquire(c, "4GiB", device="gpu1", ttl_s=60))
    real_redis.hset(POOL.device("gpu1"), "unmanaged_mib", 6 * GIB)
    doc = health(c)
    gpu1 = doc["devices"][1]
    assert (gpu1["budget_mib"], gpu1["used_mib"], gpu1["free_mib"]) == (2 * GIB, 4 * GIB, 0)
    assert (doc["gpu_available"], doc["vram_total"], doc["vram_free"]) == (False, 16 * GIB, 0)


def test_needs_no_token_and_is_documented(real_redis: redis.Redis, redis_url: str) -> None:
    settings = make_settings(redis_url, tokens=[Token("root", "operator", OPERATOR)])
    with serve(settings) as svc:
        error(svc.client.get("/v1/devices"), 401, "unauthorized")
        assert health(svc.client)["vram_total"] == 24 * GIB
        openapi = svc.client.get("/openapi.json").json()
    op = openapi["paths"]["/health"]["get"]
    assert "security" not in op
    assert openapi["paths"]["/v1/devices"]["get"]["security"] == [{"bearer": []}]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GpuHealthDoc"
    }
    assert set(op["responses"]) == {"200", "400", "404", "502", "503"}
    schema = openapi["components"]["schemas"]["GpuHealthDoc"]
    assert set(schema["required"]) == {"gpu_available", "vram_total", "vram_free", "devices"}


@pytest.mark.slow
def test_503_while_redis_is_down(tmp_path: Path) -> None:
    with private_redis(tmp_path) as (url, proc), serve(make_settings(url)) as svc:
        assert health(svc.client)["gpu_available"] is True
        proc.terminate()
        proc.wait(10)
        reply = svc.client.get("/health")
        doc = error(reply, 503, "backend_unavailable")
        assert doc["retryable"] is True
        assert reply.headers["Retry-After"] == "1"
        assert svc.client.get("/healthz").status_code == 200
