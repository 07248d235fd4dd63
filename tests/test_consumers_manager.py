"""The consumer manager in this process, on the real Redis, with consumers it runs as child
processes: in use means never evicted, and a lost lease gives the memory back."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis

from gpuboss.consumers.manager import ConsumerManager
from gpuboss.consumers.registry import Registry
from gpuboss_client import AcquireTimeout, Boss


def registry(*names: str, vram: str = "10GiB") -> Registry:
    """Consumers the boss starts as ``sleep`` processes (nothing to load over HTTP)."""
    return Registry.model_validate(
        {
            "consumers": [
                {"name": n, "url": "http://192.0.2.7:1", "vram": vram, "command": {"argv": ["sleep", "600"]}}
                for n in names
            ]
        }
    )


@pytest.fixture
def gpu0(real_redis: redis.Redis, redis_url: str) -> None:
    with Boss.from_url(redis_url, holder="setup") as boss:
        boss.add_device("gpu0", "16GiB")


@pytest.mark.usefixtures("gpu0")
def test_a_consumer_in_use_is_never_evicted(redis_url: str) -> None:
    async def main() -> None:
        manager = ConsumerManager(registry("a", "b"), redis_url)
        await manager.start()
        try:
            async with manager.using("a") as a:
                assert a.state == "ready"
                with pytest.raises(AcquireTimeout):
                    await manager.ensure("b", timeout=0.5)
                assert a.state == "ready"
                assert a.lease is not None
                assert not a.lease.evicting
            assert a.state == "idle"
            b = await manager.ensure("b", timeout=10)
            assert b.state == "idle"
            assert a.state == "unloaded"
            assert a.evictions == 1
        finally:
            await manager.aclose()

    asyncio.run(main())


@pytest.mark.usefixtures("gpu0")
def test_the_processes_it_started_stop_with_the_manager(redis_url: str, real_redis: redis.Redis) -> None:
    async def main() -> int | None:
        manager = ConsumerManager(registry("a", vram="1GiB"), redis_url)
        await manager.start()
        try:
            unit = await manager.ensure("a")
            return unit.runtime.actions.child_pid
        finally:
            await manager.aclose()

    pid = asyncio.run(main())
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert real_redis.hgetall("gpuboss:{default}:v1:leases") == {}
