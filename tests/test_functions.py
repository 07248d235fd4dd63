"""The Lua verbs as a Redis function library, and the fallback to scripts.

Against the real server the client calls its library (``FCALL``), loading it on first use and
again after Redis lost it; where ``FCALL`` is refused (a server without functions, a user who may
not call them) or loading is refused (a user who may not load), it runs the same verbs as
``EVALSHA`` scripts. The fakeredis tier plays a server without functions, so every test that runs
on both tiers runs both forms (``support.fake_server``).
"""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis
from support import fake_server

from gpuboss_client import Boss, PoolKeys, script_shas
from gpuboss_client.scripts import LIBRARY, NAMES, function_name, library

GiB = 1024


def calls(r: redis.Redis, command: str) -> int:
    """How often ``command`` succeeded since the last CONFIG RESETSTAT (a call Redis answered with
    NOSCRIPT or "Function not found" counts as failed)."""
    stats = r.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) - int(stats["failed_calls"]) if stats else 0


def library_functions(r: redis.Redis) -> set[str]:
    """The functions of the client's library that Redis has."""
    found = r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY)
    return {f["name"] for lib in found if lib["library_name"] == LIBRARY for f in lib["functions"]}


def a_pair(boss: Boss, pool: str = "default") -> None:
    lease = boss.acquire(GiB, pool=pool, timeout=0, keepalive=False)
    assert boss.heartbeat(lease).state == "active"
    boss.release(lease)


@pytest.fixture
def fresh(real_redis: redis.Redis) -> Iterator[redis.Redis]:
    """The real server with no functions and no scripts, its statistics reset."""
    real_redis.execute_command("FUNCTION", "FLUSH")
    real_redis.script_flush()
    real_redis.config_resetstat()
    yield real_redis
    real_redis.execute_command("FUNCTION", "FLUSH")


def test_the_library_registers_every_verb_under_its_versioned_name() -> None:
    text = library()
    assert text.startswith(f"#!lua name={LIBRARY}\n")
    for name in NAMES:
        assert f"function_name = '{function_name(name)}'" in text
    assert LIBRARY.startswith("gpuboss_")
    assert len(LIBRARY) == len("gpuboss_") + 16


def test_the_real_server_runs_the_verbs_as_functions_loaded_on_first_use(fresh: redis.Redis) -> None:
    boss = Boss(fresh, holder="fn")
    assert boss.add_device("gpu0", 8 * GiB) is True
    a_pair(boss)
    assert boss.library == LIBRARY
    assert library_functions(fresh) == {function_name(n) for n in NAMES}
    assert calls(fresh, "fcall") == 4  # add_device, acquire, heartbeat, release
    assert calls(fresh, "function|load") == 1
    assert calls(fresh, "evalsha") == 0
    assert fresh.script_exists(*script_shas().values()) == [False] * len(NAMES)


def test_a_second_client_calls_the_library_another_loaded(fresh: redis.Redis) -> None:
    Boss(fresh, holder="first").add_device("gpu0", 8 * GiB)
    fresh.config_resetstat()
    a_pair(Boss(fresh, holder="second"))
    assert (calls(fresh, "fcall"), calls(fresh, "function|load")) == (3, 0)


def test_a_lost_library_is_loaded_again(fresh: redis.Redis) -> None:
    boss = Boss(fresh, holder="fn")
    boss.add_device("gpu0", 8 * GiB)
    lease = boss.acquire(GiB, timeout=0, keepalive=False)
    fresh.execute_command("FUNCTION", "FLUSH")  # as a restart without persistence of functions would
    assert boss.heartbeat(lease).state == "active"
    boss.release(lease)
    assert boss.library == LIBRARY
    assert library_functions(fresh) == {function_name(n) for n in NAMES}
    assert fresh.hget(PoolKeys("default").lease(lease.id), "state") == "released"


def test_a_server_without_functions_runs_scripts() -> None:
    r = fakeredis.FakeRedis(server=fake_server(), decode_responses=True)
    boss = Boss(r, holder="old")
    boss.add_device("gpu0", 8 * GiB)
    a_pair(boss)
    assert boss.library is None
    used = ("add_device", "acquire", "heartbeat", "release")
    assert r.script_exists(*[script_shas()[n] for n in used]) == [True] * len(used)
    r.close()


def test_functions_false_runs_scripts(fresh: redis.Redis) -> None:
    boss = Boss(fresh, holder="scripts", functions=False)
    boss.add_device("gpu0", 8 * GiB)
    a_pair(boss)
    assert boss.library is None
    assert (calls(fresh, "fcall"), calls(fresh, "function|load")) == (0, 0)
    assert calls(fresh, "evalsha") == 4


@pytest.fixture
def users(fresh: redis.Redis, redis_url: str) -> Iterator[dict[str, Boss]]:
    """Clients of users who may run everything gpuboss needs but: ``noload`` may not load functions,
    ``nocall`` may not call them."""
    made: dict[str, Boss] = {}
    for user, deny in (("noload", "-function"), ("nocall", "-fcall")):
        fresh.acl_setuser(
            user, enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", deny]
        )
        client = redis.Redis.from_url(redis_url, username=user, password="x", decode_responses=True)
        made[user] = Boss(client, holder=user)
    yield made
    for user, boss in made.items():
        boss.close()
        boss.redis.close()
        fresh.acl_deluser(user)


def test_a_user_who_may_not_load_functions_runs_scripts_until_it_may_call_a_loaded_library(
    fresh: redis.Redis, users: dict[str, Boss]
) -> None:
    boss = users["noload"]
    boss.add_device("gpu0", 8 * GiB)
    a_pair(boss)
    assert boss.library is None
    assert library_functions(fresh) == set()
    # A client that starts after the library was loaded (by the boss service, say) calls it.
    Boss(fresh, holder="loader").load_scripts()
    later = Boss(boss.redis, holder="later")
    fresh.config_resetstat()
    a_pair(later)
    assert later.library == LIBRARY
    assert (calls(fresh, "fcall"), calls(fresh, "evalsha")) == (3, 0)


def test_a_user_who_may_not_call_functions_runs_scripts(fresh: redis.Redis, users: dict[str, Boss]) -> None:
    Boss(fresh, holder="loader").load_scripts()
    boss = users["nocall"]
    boss.add_device("gpu0", 8 * GiB)
    a_pair(boss)
    assert boss.library is None
    assert calls(fresh, "evalsha") == 4


def test_load_scripts_loads_the_library_and_every_script(fresh: redis.Redis) -> None:
    boss = Boss(fresh, holder="svc")
    assert boss.load_scripts() == script_shas()
    assert library_functions(fresh) == {function_name(n) for n in NAMES}
    assert fresh.script_exists(*script_shas().values()) == [True] * len(NAMES)
