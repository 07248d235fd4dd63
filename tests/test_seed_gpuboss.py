"""The usage of GPUBoss, the system gpuboss replaces, run as written (``seeds/004``), on gpuboss.

The only renames (also in the README's "Coming from GPUBoss"): ``gpu_boss`` is an ``AsyncBoss`` (or
a ``Boss`` in blocking code) made with ``from_url(redis_url, holder=<service>)``; what ``acquire``
returns is a :class:`Lease`, which ``release`` takes as it takes its id, and whose ``str()`` is the
device string. The pipeline phases of ``seeds/003`` end with ``release_all()``.
"""

from __future__ import annotations

import asyncio

import pytest
import redis
from support import Tier, redis_ms, state, wait_for

from gpuboss_client import AsyncBoss, Boss, LeaseNotHeld

GiB = 1024


class Model:
    """A stand-in for a model that a service loads on the device it is given."""

    def __init__(self, device: str) -> None:
        self.device = device

    def generate(self) -> str:
        return f"generated on {self.device}"


def load_model(device: object) -> Model:
    assert isinstance(device, str) or hasattr(device, "device_string")
    return Model(str(device))


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_async_context_manager_used_as_the_device(tier: Tier) -> None:
    results: list[str] = []

    async def service() -> None:
        gpu_boss = AsyncBoss(tier.make_async(), holder="imajin-diffusion")
        await gpu_boss.add_device("gpu0", "24GiB", cuda_index=0)
        # --- as in the seed -------------------------------------------------------------------
        async with gpu_boss.lease(vram_gb=8, priority="normal") as device:
            # device = "cuda:0"
            model = load_model(device)
            result = model.generate()
        # -----------------------------------------------------------------------------------------
        results.append(result)
        await gpu_boss.aclose()

    asyncio.run(service())
    assert results == ["generated on cuda:0"]


@pytest.mark.slow
def test_async_manual_acquire_and_release_with_work_longer_than_the_ttl(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """Every setting at its default: the work outlasts the lease's TTL, and the release still
    finds the lease held (it renewed itself meanwhile)."""
    ids: list[str] = []

    async def service() -> None:
        gpu_boss = AsyncBoss.from_url(redis_url, holder="imajin-prompt")
        await gpu_boss.add_device("gpu0", "80GiB", cuda_index=0)
        # --- as in the seed -------------------------------------------------------------------
        lease_id = await gpu_boss.acquire(vram_gb=8)
        try:
            # ... use GPU: for longer than the TTL, in Redis's time
            ttl_ms = lease_id.ttl_ms
            until = redis_ms(real_redis) + ttl_ms + 500
            while redis_ms(real_redis) < until:
                await asyncio.sleep(0.05)  # the "GPU work"; the heartbeat worker runs meanwhile
            ids.append(lease_id.id)
        finally:
            await gpu_boss.release(lease_id)
        # -----------------------------------------------------------------------------------------
        await gpu_boss.aclose()

    real_redis.flushdb()
    asyncio.run(service())
    assert state(real_redis, ids[0]) == "released"


def test_sync_manual_acquire_and_release_by_the_plain_id(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "24GiB", cuda_index=0)
    lease_id = boss.acquire(vram_gb=8, ttl=1.0).id  # the plain id, as a service may keep it
    first_expiry = boss.leases()[0].expires_at_ms
    assert first_expiry is not None
    try:
        wait_for("work longer than the TTL", lambda: redis_ms(r) > first_expiry + 300)
    finally:
        boss.release(lease_id)
    assert state(r, lease_id) == "released"
    with pytest.raises(LeaseNotHeld):
        boss.release(lease_id)  # released: this client no longer holds it


def test_pipeline_phases_end_with_release_all(boss: Boss) -> None:
    """``seeds/003``: Crawl (no GPU) → Analysis (Vidi) → Script+TTS (CosyVoice) → Video (ComfyUI)
    → Render (CPU only) → ``release_all()``."""
    r = boss.redis
    boss.add_device("gpu0", "24GiB", cuda_index=0)
    assert boss.release_all() == []  # phase 1: no GPU needed
    vidi = boss.acquire(vram_gb=4, labels={"service": "vidi"})
    cosyvoice = boss.acquire(vram_gb=4, labels={"service": "cosyvoice"})
    comfyui = boss.acquire(vram_gb=16, priority=100, labels={"service": "comfyui"})
    assert [str(x) for x in (vidi, cosyvoice, comfyui)] == ["cuda:0"] * 3

    released = boss.release_all()  # phase 5: render on the CPU

    assert sorted(released) == sorted(x.id for x in (vidi, cosyvoice, comfyui))
    assert boss.devices()[0].used_mib == 0
    assert [state(r, x.id) for x in (vidi, cosyvoice, comfyui)] == ["released"] * 3
