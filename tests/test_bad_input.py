"""Bad input gets a specific typed error and changes nothing in Redis, byte for byte.

Every test runs against the real Redis with a populated pool: leases on two devices, a waiter in
the queue, a second pool, all with long TTLs so that no script reaps anything in passing. Each
bad call is wrapped in :func:`unchanged`, which compares ``TYPE`` and ``DUMP`` of every key before
and after. Input that the client already refuses is also sent straight to the Lua scripts, to
prove that they refuse it without writing too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from support import dump_all

from gpuboss_client import (
    BadRequest,
    Boss,
    DeviceBusy,
    DeviceNotFound,
    GpubossError,
    InsufficientVram,
    Lease,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    PoolKeys,
    PoolNotFound,
)
from gpuboss_client._core import parse_reply

GiB = 1024
LONG = 3600.0
KEYS = PoolKeys("default").script_keys()


@contextmanager
def unchanged(r: redis.Redis) -> Iterator[None]:
    before = dump_all(r)
    assert before, "the world fixture should have written keys"
    yield
    assert dump_all(r) == before


@dataclass
class World:
    r: redis.Redis
    boss: Boss
    lease: Lease  # 20 GiB on gpu0
    other: Lease  # 16 GiB on gpu1


@pytest.fixture
def world(real_redis: redis.Redis) -> World:
    boss = Boss(real_redis, holder="test")
    boss.add_device("gpu0", 24 * GiB, reserved=0, cuda_index=0)
    boss.add_device("gpu1", 16 * GiB, cuda_index=1)
    boss.add_device("gpuX", 8 * GiB, pool="other")
    lease = boss.acquire(20 * GiB, device="gpu0", ttl=LONG, labels={"model": "m"}, request_id="held")
    other = boss.acquire(16 * GiB, device="gpu1", ttl=LONG)
    boss.acquire(4 * GiB, pool="other", ttl=LONG)
    # A waiter, queued without blocking: the acquire script with wait=1.
    reply = boss.script(
        "acquire", KEYS, ["waiter", "w", "h", 1, 8 * GiB, 50, "gpu0", int(LONG * 1000), "{}", 1]
    )
    assert parse_reply(reply, frozenset({"queued"}))[0] == "queued"
    return World(real_redis, boss, lease, other)


def forged(lease: Lease, **changes: Any) -> Lease:
    fake = copy.copy(lease)
    for name, value in changes.items():
        setattr(fake, name, value)
    return fake


BAD_SIZES: list[Any] = [
    -1, 0, 2**24 + 1, 10**30, float("nan"), float("inf"), 1.5, "8XB", "", " ", "GiB", "-8G",
    "8 G B", "0G", "0", "17TiB", "1e3", "8,5G", "0x10", True, False, b"8G", [8], None,
]  # fmt: skip
BAD_VRAM_GB: list[Any] = [float("nan"), float("inf"), -1, 0, -0.0, 16 * 1024 + 1, True, "8", None]
BAD_PRIORITIES: list[Any] = [-1, 101, "urgent", True, False, 50.5, "", None, "1e2", "-1", "101"]
BAD_TTLS: list[Any] = [0, -1, -0.0, 86400.001, 86401, float("nan"), float("inf"), True, "10", None]
BAD_TIMEOUTS: list[Any] = [-1, -0.001, float("nan"), float("-inf"), True, "5"]
BAD_IDS: list[Any] = ["", "a b", "x" * 65, "{x}", "a\nb", "é", "a/b", 5]
BAD_POOLS: list[Any] = ["", "a b", "{x}", "a:b", "x" * 65, "a/b", "é"]
BAD_LABELS: list[Any] = [{"a": 1}, {1: "a"}, {"a": None}, {"k": "x" * 5000}, {"k" * 4100: ""}]


@pytest.mark.parametrize("vram", BAD_SIZES)
def test_acquire_bad_size(world: World, vram: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(vram, timeout=0)


@pytest.mark.parametrize("vram_gb", BAD_VRAM_GB)
def test_acquire_bad_vram_gb(world: World, vram_gb: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(vram_gb=vram_gb, timeout=0)


def test_acquire_vram_and_vram_gb_together(world: World) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1024, vram_gb=1, timeout=0)
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(timeout=0)


@pytest.mark.parametrize("priority", BAD_PRIORITIES)
def test_acquire_bad_priority(world: World, priority: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, priority=priority, timeout=0)


@pytest.mark.parametrize("ttl", BAD_TTLS)
def test_acquire_bad_ttl(world: World, ttl: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, ttl=ttl, timeout=0)


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_acquire_bad_timeout(world: World, timeout: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, timeout=timeout)


@pytest.mark.parametrize("request_id", BAD_IDS)
def test_acquire_bad_request_id(world: World, request_id: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, request_id=request_id, timeout=0)


@pytest.mark.parametrize("device", BAD_IDS)
def test_acquire_bad_device_name(world: World, device: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, device=device, timeout=0)


@pytest.mark.parametrize("pool", BAD_POOLS)
def test_bad_pool_name_everywhere(world: World, pool: Any) -> None:
    boss = world.boss
    calls: list[Callable[[], object]] = [
        lambda: boss.acquire(1, pool=pool, timeout=0),
        lambda: boss.lease(1, pool=pool),
        lambda: boss.add_device("gpu7", 1024, pool=pool),
        lambda: boss.remove_device("gpu0", pool=pool),
        lambda: boss.force_release("held", pool=pool),
        lambda: boss.status(pool),
        lambda: boss.devices(pool),
        lambda: boss.leases(pool),
        lambda: boss.reap(pool),
    ]
    for call in calls:
        with unchanged(world.r), pytest.raises(BadRequest):
            call()


@pytest.mark.parametrize("labels", BAD_LABELS)
def test_acquire_bad_labels(world: World, labels: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, labels=labels, timeout=0)


@pytest.mark.parametrize("labels", [{1: "a", "b": "c"}, {"a": object()}, "ab", ["ab"]])
def test_acquire_labels_that_break_the_encoder(world: World, labels: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, labels=labels, timeout=0)


def test_acquire_size_that_overflows_a_float(world: World) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire("1" + "0" * 400, timeout=0)


def test_acquire_priority_unicode_digit(world: World) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.acquire(1, priority="²", timeout=0)


def test_lease_context_refuses_bad_input_before_acquiring(world: World) -> None:
    cases: list[dict[str, Any]] = [{"vram": 0}, {"vram": 1, "ttl": 0}, {"vram": 1, "priority": 101}]
    for kwargs in cases:
        with unchanged(world.r), pytest.raises(BadRequest):
            world.boss.lease(**kwargs)


def test_acquire_unknown_device_pool_and_too_big(world: World) -> None:
    boss = world.boss
    with unchanged(world.r), pytest.raises(DeviceNotFound):
        boss.acquire(1, device="gpu9", timeout=0)
    with unchanged(world.r), pytest.raises(DeviceNotFound):
        boss.acquire(1, device="gpu0", pool="other", timeout=0)
    with unchanged(world.r), pytest.raises(PoolNotFound):
        boss.acquire(1, pool="nowhere", timeout=0)
    with unchanged(world.r), pytest.raises(InsufficientVram):
        boss.acquire(24 * GiB + 1)  # bigger than every budget: refused at once, even waiting
    with unchanged(world.r), pytest.raises(InsufficientVram):
        boss.acquire(16 * GiB + 1, device="gpu1")


def test_wrong_token(world: World) -> None:
    boss, lease = world.boss, world.lease
    for token in (lease.token + 1, lease.token - 1, 0, world.other.token):
        with unchanged(world.r), pytest.raises(LeaseNotHeld):
            boss.release(forged(lease, token=token))
        with unchanged(world.r), pytest.raises(LeaseNotHeld):
            boss.heartbeat(forged(lease, token=token))
    with unchanged(world.r), pytest.raises(LeaseNotHeld):
        boss.release(forged(lease, id="waiter"))  # a waiter has no token yet


def test_unknown_and_garbage_lease_ids(world: World) -> None:
    boss, lease = world.boss, world.lease
    with unchanged(world.r), pytest.raises(LeaseLost, match="no lease ghost"):  # a holder's view
        boss.release(forged(lease, id="ghost"))
    with unchanged(world.r), pytest.raises(LeaseLost, match="no lease ghost"):  # a holder's view
        boss.heartbeat(forged(lease, id="ghost"))
    with unchanged(world.r), pytest.raises(LeaseNotFound):
        boss.force_release("ghost")
    with unchanged(world.r), pytest.raises(LeaseNotFound):
        boss.force_release("held", pool="other")
    for bad in BAD_IDS:
        with unchanged(world.r), pytest.raises(BadRequest):
            boss.force_release(bad)
        if isinstance(bad, str):
            with unchanged(world.r), pytest.raises(BadRequest):
                boss.release(forged(lease, id=bad))
            with unchanged(world.r), pytest.raises(BadRequest):
                boss.heartbeat(forged(lease, id=bad))


@pytest.mark.parametrize("name", BAD_IDS)
def test_bad_device_names(world: World, name: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.add_device(name, 1024)
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.remove_device(name)


@pytest.mark.parametrize("vram", BAD_SIZES)
def test_add_device_bad_size(world: World, vram: Any) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.add_device("gpu0", vram)


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"reserved": 25 * GiB}, "lua"),
        ({"reserved": "25GiB"}, "lua"),
        ({"reserved": -1}, "client"),
        ({"reserved": "8XB"}, "client"),
        ({"reserved": True}, "client"),
        ({"reserved": 1.5}, "client"),
        ({"cuda_index": -1}, "client"),
        ({"cuda_index": True}, "client"),
        ({"cuda_index": "0"}, "client"),
        ({"cuda_index": 1.0}, "client"),
        ({"cuda_index": 65536}, "lua"),
        ({"host": "h" * 256}, "lua"),
    ],
)
def test_add_device_bad_fields(world: World, kwargs: dict[str, Any], where: str) -> None:
    # An existing device: a refused update must leave it (and its leases) exactly as it was.
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.add_device("gpu0", 24 * GiB, **kwargs)


def test_remove_device_unknown_or_busy(world: World) -> None:
    boss = world.boss
    with unchanged(world.r), pytest.raises(DeviceNotFound):
        boss.remove_device("gpu9")
    with unchanged(world.r), pytest.raises(DeviceNotFound):
        boss.remove_device("gpu0", pool="nowhere")
    with unchanged(world.r), pytest.raises(DeviceBusy):
        boss.remove_device("gpu0")


@pytest.mark.parametrize("holder", ["", "x" * 129, "é" * 65, 5, None])
def test_bad_holder(real_redis: redis.Redis, holder: Any) -> None:
    with unchanged_empty(real_redis), pytest.raises(BadRequest):
        Boss(real_redis, holder=holder)


@contextmanager
def unchanged_empty(r: redis.Redis) -> Iterator[None]:
    r.set("sentinel", "1")
    before = dump_all(r)
    yield
    assert dump_all(r) == before


# --- the scripts refuse on their own ---------------------------------------------------------

ACQ = ["id1", "holder", "host", 1, 1024, 50, "", 60_000, "{}", 1]
ACQUIRE_BAD: list[tuple[int, Any]] = [
    (0, ""), (0, "a b"), (0, "x" * 65), (0, "{x}"),
    (1, ""), (1, "x" * 129),
    (2, "h" * 256),
    (3, "-1"), (3, "x"), (3, "4294967296"), (3, "1.5"),
    (4, "0"), (4, "-1"), (4, str(2**24 + 1)), (4, "1.5"), (4, "nan"), (4, "inf"), (4, ""), (4, "x"),
    (4, "1e999"),
    (5, "-1"), (5, "101"), (5, "x"), (5, "50.5"), (5, ""),
    (6, "a b"), (6, "{x}"), (6, "x" * 65),
    (7, "0"), (7, "-5"), (7, "86400001"), (7, "x"), (7, "1.5"),
    (8, "x" * 4097),
]  # fmt: skip


def script(world: World, name: str, args: list[Any], pool: str = "default") -> Any:
    return world.boss.script(name, PoolKeys(pool).script_keys(), args)


def refused(world: World, name: str, args: list[Any], error: type[GpubossError] = BadRequest) -> None:
    with unchanged(world.r), pytest.raises(error):
        parse_reply(script(world, name, args), frozenset({"ok", "granted", "queued", "busy", "released"}))


@pytest.mark.parametrize(("index", "value"), ACQUIRE_BAD)
def test_acquire_script_refuses(world: World, index: int, value: Any) -> None:
    args = list(ACQ)
    args[index] = value
    refused(world, "acquire", args)


def test_acquire_script_refuses_for_the_pool(world: World) -> None:
    args = list(ACQ)
    args[6] = "gpu9"
    refused(world, "acquire", args, DeviceNotFound)
    args[6], args[4] = "", str(24 * GiB + 1)
    refused(world, "acquire", args, InsufficientVram)
    with unchanged(world.r), pytest.raises(PoolNotFound):
        parse_reply(script(world, "acquire", ACQ, pool="nowhere"), frozenset({"granted"}))


def test_release_script_refuses(world: World) -> None:
    tok = world.lease.token
    for args in (["", tok, 0], ["a b", tok, 0], ["held", "x", 0], ["held", "-1", 0], ["held", "1.5", 0]):
        refused(world, "release", args)
    refused(world, "release", ["held", tok + 1, 0], LeaseNotHeld)
    refused(world, "release", ["ghost", tok, 0], LeaseNotFound)
    refused(world, "release", ["ghost", 0, 1], LeaseNotFound)


def test_heartbeat_script_refuses(world: World) -> None:
    tok = world.lease.token
    bad = [["{x}", tok, 1000], ["held", "x", 1000], ["held", tok, "0"], ["held", tok, "86400001"]]
    for args in [*bad, ["held", tok, "x"], ["held", tok, "-1"]]:
        refused(world, "heartbeat", args)
    refused(world, "heartbeat", ["held", tok + 1, 1000], LeaseNotHeld)
    refused(world, "heartbeat", ["ghost", tok, 1000], LeaseNotFound)


def test_cancel_script_refuses(world: World) -> None:
    for bad in ("", "a b", "x" * 65):
        refused(world, "cancel", [bad])
    refused(world, "cancel", ["ghost"], LeaseNotFound)


def test_add_device_script_refuses(world: World) -> None:
    good = ["gpu0", 24 * GiB, 0, "host", 0]
    bad = [
        (0, "a b"), (0, ""), (1, "0"), (1, str(2**24 + 1)), (1, "x"), (2, "-1"), (2, str(24 * GiB + 1)),
        (2, "x"), (3, "h" * 256), (4, "-2"), (4, "65536"), (4, "x"), (4, "1.5"),
    ]  # fmt: skip
    for index, value in bad:
        args = list(good)
        args[index] = value
        refused(world, "add_device", args)


def test_remove_device_script_refuses(world: World) -> None:
    for bad in ("", "a b", "{x}"):
        refused(world, "remove_device", [bad, 1])
    refused(world, "remove_device", ["gpu9", 1], DeviceNotFound)
    refused(world, "remove_device", ["gpu0", 0], DeviceBusy)


def test_listing_scripts_refuse(world: World) -> None:
    for args in (["-1", 10], ["x", 10], [0, "0"], [0, "1001"], [0, "x"]):
        refused(world, "leases", args)
    for limit in ("0", "10001", "x", "-1", "1.5"):
        refused(world, "reap", [limit])


@pytest.mark.parametrize("name", ["acquire", "add_device", "heartbeat", "release", "cancel", "remove_device"])
def test_scripts_with_missing_arguments_write_nothing(world: World, name: str) -> None:
    # A Lua runtime error (a nil argument) or bad_request: either way, nothing is written.
    with unchanged(world.r), pytest.raises((redis.ResponseError, BadRequest)):
        parse_reply(script(world, name, []), frozenset({"ok"}))
    if name not in ("cancel", "remove_device"):  # these take one argument: it is all there
        with unchanged(world.r), pytest.raises((redis.ResponseError, BadRequest)):
            parse_reply(script(world, name, ["held"]), frozenset({"ok"}))


def test_the_world_is_as_built(world: World) -> None:
    # The fixture's claims, so that "unchanged" compares something meaningful.
    keys = PoolKeys("default")
    assert world.r.hget(keys.lease("waiter"), "state") == "queued"
    assert world.r.hget(keys.lease("held"), "state") == "active"
    assert world.r.zcard(keys.queue) == 1
    assert world.r.xlen(keys.events) == 5  # 2 devices added, 2 grants, 1 queued
    assert world.r.hget(keys.device("gpu0"), "used_mib") == str(20 * GiB)


def test_add_device_reserved_false(world: World) -> None:
    with unchanged(world.r), pytest.raises(BadRequest):
        world.boss.add_device("gpu0", 24 * GiB, reserved=False)
