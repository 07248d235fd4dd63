"""Least privilege enforced by Redis itself: the users of ``deploy/redis-users.acl``.

A ``redis-server`` of this module's own loads a copy of the ACL file, plus one unrestricted user
that only the tests use (to take snapshots and read ``ACL LOG``). Through the real client, the
CLI and the service, each user does what its role needs, and Redis refuses what it must not do:
a holder cannot add, update or remove devices, configure a pool, force-release a lease or feed
the agent's measurements (the operator scripts' first write, a no-op ``SETRANGE``, is to the pool's
``admin`` key, which a holder may not write), nor run Redis's own administration; an observer
changes nothing. After every refusal the whole database is as it was, byte for byte (``DUMP``),
and ``ACL LOG`` says why Redis refused.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import CLEAN_ENV, dump_all, in_thread, join_evict_thread, redis_ms, serve_app, wait_for
from typer.testing import CliRunner, Result

from gpuboss.api import create_app
from gpuboss.settings import ServiceSettings
from gpuboss_cli.main import app as cli_app
from gpuboss_client import (
    BackendForbidden,
    BackendUnavailable,
    Boss,
    Forbidden,
    Lease,
    PoolKeys,
    ProtocolError,
)
from gpuboss_client import ops as gops

ROOT = Path(__file__).resolve().parents[1]
ACL_FILE = ROOT / "deploy" / "redis-users.acl"
ACL_DOC = ROOT / "deploy" / "ACL.md"
LUA = ROOT / "lua"
USERS = ("gpuboss-boss", "gpuboss-holder", "gpuboss-observer")
#: the test's own unrestricted user, appended to the copy of the ACL file the server loads
ROOT_USER, ROOT_PW = "acl-test-root", "acl-test-root-pw"
#: what Redis says when it refuses: NOPERM to a command sent directly; from inside a script, an
#: ERR that tells what the calling user may not do (Redis 7.0)
REFUSED = ("NOPERM", "no permissions", "The user executing the script can't")
#: the scripts only an operator may run (release.lua too, when forced)
OPERATOR_SCRIPTS = ("add_device", "configure_pool", "measure", "remove_device")
START_S = 10.0

runner = CliRunner()


def acl_users(path: Path = ACL_FILE) -> dict[str, list[str]]:
    """Each user line of the ACL file: user name -> its rules."""
    users: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            word, name, *rules = line.split()
            assert word == "user", line
            users[name] = rules
    return users


def password(user: str) -> str:
    """The (placeholder) password the ACL file gives ``user``."""
    return next(rule[1:] for rule in acl_users()[user] if rule.startswith(">"))


@dataclass
class AclRedis:
    """The module's redis-server: its port and a client of the unrestricted test user."""

    port: int
    root: redis.Redis

    def url(self, user: str) -> str:
        return f"redis://{quote(user)}:{quote(password(user), safe='')}@127.0.0.1:{self.port}/0"

    def raw(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), decode_responses=True)

    def acl_log(self) -> list[dict[str, Any]]:
        """Refusals since the last reset, oldest first, except CLIENT SETINFO's: redis-py sends it
        on connecting and ignores an error (Redis 7.0 does not know it; later ones refuse it)."""
        entries: list[dict[str, Any]] = self.root.acl_log()
        return [e for e in reversed(entries) if e["object"] != "client|setinfo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("acl-redis")
    aclfile = workdir / "users.acl"
    shutil.copyfile(ACL_FILE, aclfile)
    with aclfile.open("a", encoding="utf-8") as f:
        f.write(f"user {ROOT_USER} on >{ROOT_PW} ~* &* +@all\n")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--aclfile", str(aclfile), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    root = redis.Redis(port=port, username=ROOT_USER, password=ROOT_PW, decode_responses=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                root.ping()
                break
            except redis.ConnectionError:
                log = workdir / "redis.log"
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text() if log.exists() else ""
                    pytest.fail(f"redis-server did not start (exit {proc.poll()}): {text[-2000:]}")
                time.sleep(0.02)  # waiting for an external process to listen: nothing to block on
        yield AclRedis(port, root)
    finally:
        root.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def acl(acl_server: AclRedis) -> AclRedis:
    """The server, emptied, with its script cache and ACL log cleared."""
    acl_server.root.flushall()
    acl_server.root.script_flush()
    acl_server.root.acl_log_reset()
    return acl_server


@pytest.fixture
def clients(acl: AclRedis) -> Iterator[Callable[[str, str], Boss]]:
    """``connect(user, holder)``: a :class:`Boss` logged in as ``user``; all closed afterwards,
    leaving their leases to expire (some tests expect nothing to change behind their back)."""
    made: list[Boss] = []

    def connect(user: str, holder: str) -> Boss:
        boss = Boss.from_url(acl.url(user), holder=holder, socket_timeout=10)
        made.append(boss)
        return boss

    yield connect
    for boss in made:
        boss.close(release=False)


def refused(exc: BaseException) -> str:
    """The refusal's text, checked to be Redis's ACL refusal."""
    text = str(exc)
    assert any(phrase in text for phrase in REFUSED), text
    return text


# --- the file itself -------------------------------------------------------------------------------


def test_the_file_defines_the_three_users_and_turns_default_off(acl: AclRedis) -> None:
    users = acl_users()
    assert list(users) == ["default", *USERS]
    assert users["default"][:1] == ["off"]
    for name in USERS:
        rules = users[name]
        assert rules[0] == "on"
        assert {"resetkeys", "resetchannels", "-@all"} <= set(rules)
        assert rules.index("-@all") < min(i for i, r in enumerate(rules) if r.startswith("+"))
        assert not {"~*", "allkeys", "&*", "allchannels", "+@all", "allcommands", "nopass"} & set(rules)
    loaded = {line.split()[1] for line in acl.root.acl_list()}
    assert loaded == {"default", *USERS, ROOT_USER}
    no_retry = Retry(NoBackoff(), 0)
    anonymous = redis.Redis(port=acl.port, retry=no_retry)
    with pytest.raises(redis.AuthenticationError):  # no password: the default user is off
        anonymous.ping()
    wrong = redis.Redis(port=acl.port, username="gpuboss-holder", password="wrong", retry=no_retry)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    anonymous.close()
    wrong.close()


def test_the_readme_section_quotes_the_file_and_explains_every_command() -> None:
    doc = ACL_DOC.read_text(encoding="utf-8")
    for line in ACL_FILE.read_text(encoding="utf-8").splitlines():
        assert line in doc, f"deploy/ACL.md must quote the ACL file's line: {line}"
    commands = {r[1:] for rules in acl_users().values() for r in rules if r.startswith("+")}
    for cmd in sorted(commands):
        assert f"`{cmd.upper().replace('|', ' ')}`" in doc, f"deploy/ACL.md must say why {cmd} is there"


#: the commands the scripts write with
WRITES = (
    "HSET", "HSETNX", "HDEL", "HINCRBY", "INCR", "SADD", "SREM", "ZADD", "ZREM", "XADD", "RPUSH", "PEXPIRE",
    "PUBLISH", "DEL", "PERSIST", "SETRANGE",
)  # fmt: skip
CAPABILITY = re.compile(r"redis\.call\('SETRANGE', PREFIX \.\. '(\w+)', 0, ''\)")
#: a write before the capability check that changes nothing (it lets a script run when Redis is full)
NO_CHANGE = "writes_even_when_full()"


def _writers(common: str) -> set[str]:
    """The functions of _common.lua that write, directly or through one another."""
    bodies: dict[str, str] = {}
    for m in re.finditer(r"^local function (\w+)\(.*?(?=^local |\Z)", common, re.M | re.S):
        bodies[m.group(1)] = m.group(0)
    direct = re.compile(rf"redis\.call\('({'|'.join(WRITES)})'|redis\.call\(unpack")
    found = {name for name, body in bodies.items() if direct.search(body)}
    while True:
        more = {
            n
            for n, body in bodies.items()
            if n not in found and any(re.search(rf"\b{f}\(", body) for f in found)
        }
        if not more:
            return found
        found |= more


def test_each_operator_script_checks_its_capability_before_any_write() -> None:
    """The capability check is the first command that could change anything, so a refused script
    has changed nothing; no holder's script makes it (or every holder would be refused)."""
    pk = PoolKeys("p")
    common = re.sub(r"--[^\n]*", "", (LUA / "_common.lua").read_text(encoding="utf-8"))
    writers = _writers(common)
    assert {"reap", "settle_all", "end_lease", "event", "grant", "wake"} <= writers
    first_write = re.compile(rf"redis\.call\('({'|'.join(WRITES)})'|\b({'|'.join(sorted(writers))})\(")
    gated = {*OPERATOR_SCRIPTS, "release"}
    assert not CAPABILITY.search(common)
    # (a function carries allow-oom instead: it makes no write at all there)
    assert re.search(
        r"local function writes_even_when_full\(\)\n"
        r"  if not in_function then redis\.call\('PERSIST', K_SEQ\) end\nend",
        common,
    )
    for path in sorted(LUA.glob("*.lua")):
        if path.stem == "_common":
            continue
        code = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8")).replace(NO_CHANGE, "")
        checks = CAPABILITY.findall(code)
        if path.stem not in gated:
            assert not checks, f"{path.name} must not check the operator capability"
            continue
        assert checks == [pk.admin.removeprefix(pk.prefix)], path.name
        check = CAPABILITY.search(code)
        assert check is not None
        write = first_write.search(code, 0)
        assert write is not None, path.name
        assert write.start() == check.start(), (path.name, write)
    release = (LUA / "release.lua").read_text(encoding="utf-8")
    assert "writes_even_when_full()\n" in release
    assert "if force then redis.call('SETRANGE', PREFIX .. 'admin', 0, '') end" in release


# --- what each user may do ----------------------------------------------------------------------


def test_boss_sets_up_and_holders_lease_queue_and_read(
    acl: AclRedis, clients: Callable[[str, str], Boss]
) -> None:
    boss = clients("gpuboss-boss", "svc")
    assert boss.add_device("gpu0", 2048, pool="acl", cuda_index=0) is True
    assert boss.add_device("gpu0", 4096, pool="acl", cuda_index=0) is False  # an update
    boss.add_device("gpu9", 1024, pool="acl")
    boss.remove_device("gpu9", pool="acl")
    boss.configure_pool("acl", min_residency=1, aging=2)
    assert acl.root.hgetall(PoolKeys("acl").config) == {"min_residency_ms": "1000", "aging_ms": "2000"}
    acl.root.script_flush()  # the holders load the scripts themselves (after a Redis restart, say)

    tts, llm = clients("gpuboss-holder", "tts"), clients("gpuboss-holder", "llm")
    lease = tts.acquire(3072, pool="acl", ttl=30, labels={"model": "xtts"})
    assert tts.heartbeat(lease).state == "active"
    tts.idle(lease)
    assert acl.root.hget(PoolKeys("acl").lease(lease.id), "state") == "idle"
    tts.busy(lease)
    [status] = tts.status("acl")
    assert (status.granted, status.devices[0].used_mib) == (1, 3072)
    assert [x.id for x in tts.leases("acl")] == [lease.id]
    assert tts.plan(2048, pool="acl").outcome == "wait"
    # A waiter blocks on its wake list and is granted by the release.
    thread, out = in_thread(lambda: llm.acquire(2048, pool="acl", ttl=30, timeout=20))
    wait_for("the waiter to queue", lambda: acl.root.zcard(PoolKeys("acl").queue) == 1)
    tts.release(lease)
    thread.join(20)
    assert "error" not in out, out
    granted: Lease = out["value"]
    assert granted.device == "gpu0"
    assert tts.reap("acl") == 0
    llm.release(granted)
    kinds = [e.name for e in tts.events("acl")]
    assert kinds[-7:] == ["granted", "idle", "busy", "queued", "released", "granted", "released"]
    assert [e.name for e in tts.follow("acl", after="0-0", block=None)] == kinds
    assert acl.acl_log() == []  # nothing was refused on the way


def test_a_holder_hears_its_eviction_notice_and_an_observer_watches(
    acl: AclRedis, clients: Callable[[str, str], Boss]
) -> None:
    clients("gpuboss-boss", "svc").add_device("gpu0", 1024, pool="evict")
    trainer, llm = clients("gpuboss-holder", "trainer"), clients("gpuboss-holder", "llm")
    watcher = acl.raw("gpuboss-observer").pubsub()  # type: ignore[no-untyped-call]
    watcher.psubscribe("gpuboss:notify:*")
    assert watcher.get_message(timeout=5) is not None  # the psubscribe confirmation
    asked = threading.Event()
    # No heartbeats (keepalive=False): the notice can only come over pub/sub.
    victim = trainer.acquire(
        1024, pool="evict", priority="low", preemptible=True, grace=30, ttl=30, keepalive=False,
        on_evict=lambda _: asked.set(),
    )  # fmt: skip
    assert acl.root.pubsub_numsub(trainer.holder.notify) == [(trainer.holder.notify, 1)]
    # The acquire below runs as the holder user and publishes the notice from inside its script.
    winner = llm.acquire(1024, pool="evict", priority="high", ttl=30, timeout=20)
    assert asked.is_set()  # the victim gave its memory back when told, before the winner got it
    join_evict_thread(victim)  # it released the lease, then marked it lost
    assert victim.lost
    assert winner.device == "gpu0"
    notice = None
    deadline = time.monotonic() + 5
    while notice is None and time.monotonic() < deadline:
        message = watcher.get_message(timeout=1)
        if message is not None and message["type"] == "pmessage":
            notice = message
    assert notice is not None, "the observer heard no eviction notice"
    assert notice["channel"] == trainer.holder.notify
    assert str(notice["data"]).startswith(f"evict {victim.id} ")
    watcher.close()
    assert acl.acl_log() == []


def test_a_holder_may_wait_for_replicas(acl: AclRedis, clients: Callable[[str, str], Boss]) -> None:
    """``confirm_replicas`` (the default behind Sentinel) sends WAIT after each write: allowed. This
    server has no replica, so the client says the write is unconfirmed, which proves WAIT ran."""
    clients("gpuboss-boss", "svc").add_device("gpu0", 1024)
    holder = Boss.from_url(acl.url("gpuboss-holder") + "?confirm_replicas=1&confirm_ms=10", holder="h")
    try:
        with pytest.raises(BackendUnavailable, match="on 0 of 1 replicas"):
            holder.acquire(512, ttl=30, timeout=0)
    finally:
        holder.close(release=False)
    assert acl.acl_log() == []


def test_a_holder_may_count_replicas_with_role(acl: AclRedis, clients: Callable[[str, str], Boss]) -> None:
    """``confirm_replicas=all`` (the default behind Sentinel) reads the primary's ``ROLE`` with
    each write: the holder user may; a user from an ACL file without ``+role`` is refused by name,
    before anything is written."""
    clients("gpuboss-boss", "svc").add_device("gpu0", 1024)
    holder = Boss.from_url(acl.url("gpuboss-holder") + "?confirm_replicas=all", holder="h")
    try:
        holder.release(holder.acquire(512, ttl=30, timeout=0))  # no replica: nothing to wait for
    finally:
        holder.close(release=False)
    assert acl.acl_log() == []
    rules = [r for r in acl_users()["gpuboss-holder"] if r != "+role"]
    acl.root.execute_command("ACL", "SETUSER", "old-holder", *rules)
    before = dump_all(acl.root)
    old = Boss.from_url(
        acl.url("gpuboss-holder").replace("gpuboss-holder", "old-holder") + "?confirm_replicas=all",
        holder="h",
    )
    try:
        with pytest.raises(BackendForbidden, match="role"):
            old.acquire(512, ttl=30, timeout=0)
        assert dump_all(acl.root) == before
    finally:
        old.close(release=False)
        acl.root.execute_command("ACL", "DELUSER", "old-holder")


def test_an_observer_reads_state_and_events(acl: AclRedis, clients: Callable[[str, str], Boss]) -> None:
    clients("gpuboss-boss", "svc").add_device("gpu0", 1024, pool="obs")
    lease = clients("gpuboss-holder", "tts").acquire(512, pool="obs", ttl=30)
    observer = clients("gpuboss-observer", "watcher")
    pk = PoolKeys("obs")
    r = acl.raw("gpuboss-observer")
    assert r.smembers("gpuboss:pools") == {"obs"}
    assert r.smembers(pk.devices) == {"gpu0"}
    assert r.hget(pk.device("gpu0"), "used_mib") == "512"
    assert str(r.hgetall(pk.leases)[lease.id]).startswith("tts ")
    assert r.hgetall(pk.lease(lease.id))["state"] == "active"
    assert r.zrange(pk.queue, 0, -1, withscores=True) == []
    assert [e.name for e in observer.events("obs")] == ["device_added", "granted"]
    cursors = observer.event_cursors("obs")
    assert [e.name for e in observer.follow("obs", after="0-0", block=None)] == ["device_added", "granted"]
    assert list(observer.follow("obs", after=cursors, block=None)) == []
    assert r.xread({pk.events: "0-0"}, count=10)
    assert acl.acl_log() == []


# --- what each user may not do ------------------------------------------------------------------


@dataclass
class World:
    """Devices, a live lease of another holder and an expired one that no script reaped yet; no
    client renews anything, so the database changes only if Redis lets a command through."""

    acl: AclRedis
    boss: Boss
    holder: Boss
    observer: Boss
    theirs: Lease
    expired: Lease


@pytest.fixture
def world(acl: AclRedis, clients: Callable[[str, str], Boss]) -> World:
    boss = clients("gpuboss-boss", "svc")
    boss.add_device("gpu0", 4096, cuda_index=0)
    boss.add_device("gpu1", 4096, cuda_index=1)
    boss.configure_pool("default", min_residency=0, aging=0)
    other = clients("gpuboss-holder", "other")
    theirs = other.acquire(1024, device="gpu0", ttl=600, keepalive=False)
    expired = other.acquire(1024, device="gpu0", ttl=0.05, keepalive=False)
    assert expired.info.expires_at_ms is not None
    due = expired.info.expires_at_ms
    wait_for("the short lease to fall due", lambda: redis_ms(acl.root) > due)
    world = World(
        acl, boss, clients("gpuboss-holder", "me"), clients("gpuboss-observer", "eye"), theirs, expired
    )
    assert acl.root.zscore(PoolKeys("default").expiry, expired.id) is not None  # due, not reaped
    acl.root.acl_log_reset()
    return world


def measurement() -> gops.Measurement:
    return gops.Measurement(device="gpu0", host="h", unmanaged_mib=2048, seen_mib=4096)


#: calls through the client that only an operator may make: (name, user, call)
CLIENT_REFUSALS: list[tuple[str, str, Callable[[World], object]]] = [
    ("add a device", "gpuboss-holder", lambda w: w.holder.add_device("gpu9", 1024)),
    ("update a device", "gpuboss-holder", lambda w: w.holder.add_device("gpu0", 65536)),
    ("remove an idle device", "gpuboss-holder", lambda w: w.holder.remove_device("gpu1")),
    ("remove a device by force", "gpuboss-holder", lambda w: w.holder.remove_device("gpu0", force=True)),
    (
        "configure a pool",
        "gpuboss-holder",
        lambda w: w.holder.configure_pool("default", min_residency=5, aging=5),
    ),
    ("force-release in a pool", "gpuboss-holder", lambda w: w.holder.force_release(w.theirs.id, "default")),
    ("force-release anywhere", "gpuboss-holder", lambda w: w.holder.force_release(w.theirs.id)),
    ("measure a device", "gpuboss-holder", lambda w: w.holder.run(gops.measure("default", measurement()))),
    ("acquire", "gpuboss-observer", lambda w: w.observer.acquire(512, timeout=0)),
    ("release", "gpuboss-observer", lambda w: w.observer.run(gops.release_ref(ref(w)))),
    ("heartbeat", "gpuboss-observer", lambda w: w.observer.run(gops.heartbeat_ref(ref(w), 60_000))),
    ("reap", "gpuboss-observer", lambda w: w.observer.reap("default")),
    ("add a device", "gpuboss-observer", lambda w: w.observer.add_device("gpu9", 1024)),
    ("force-release", "gpuboss-observer", lambda w: w.observer.force_release(w.theirs.id, "default")),
    # status() and leases() run scripts that reap in passing: holders' calls, not an observer's
    ("status", "gpuboss-observer", lambda w: w.observer.status("default")),
]


def ref(w: World) -> gops.LeaseRef:
    return gops.LeaseRef("default", w.theirs.id, w.theirs.token)


@pytest.mark.parametrize(
    ("what", "user", "call"),
    CLIENT_REFUSALS,
    ids=[f"{u.removeprefix('gpuboss-')}-{w}" for w, u, _ in CLIENT_REFUSALS],
)
def test_redis_refuses_the_call_and_nothing_changes(
    world: World, what: str, user: str, call: Callable[[World], object]
) -> None:
    before = dump_all(world.acl.root)
    with pytest.raises((ProtocolError, Forbidden)) as exc:
        call(world)
    refused(exc.value)
    assert dump_all(world.acl.root) == before
    log = world.acl.acl_log()
    assert {e["username"] for e in log} == {user}
    if len(log) == 2:
        # A user who may not call functions is refused FCALL, then the same verb as a script.
        assert {(e["reason"], e["object"]) for e in log} == {("command", "fcall"), ("command", "evalsha")}
    [entry] = [e for e in log if e["object"] != "fcall"]
    if "The user executing the script" in str(exc.value):
        # An operator script run by a holder: refused at its capability check (a holder may neither
        # run SETRANGE nor write the admin key: test_redis_refuses_what_no_role_needs).
        assert (entry["context"], entry["reason"], entry["object"]) == ("lua", "command", "setrange")


#: commands sent straight to Redis that no gpuboss role needs: (user, command...)
RAW_REFUSALS: list[tuple[str, tuple[str, ...]]] = [
    ("gpuboss-holder", ("FLUSHALL",)),
    ("gpuboss-holder", ("FLUSHDB",)),
    ("gpuboss-holder", ("CONFIG", "GET", "maxmemory")),
    ("gpuboss-holder", ("CONFIG", "SET", "maxmemory", "1mb")),
    ("gpuboss-holder", ("KEYS", "*")),
    ("gpuboss-holder", ("SCAN", "0")),
    ("gpuboss-holder", ("SCRIPT", "FLUSH")),
    ("gpuboss-holder", ("EVAL", "return 1", "0")),
    ("gpuboss-holder", ("GET", "other-app:secret")),
    ("gpuboss-holder", ("HGETALL", "other-app:secret")),
    ("gpuboss-holder", ("HSET", "gpuboss:{default}:v1:admin", "x", "1")),
    ("gpuboss-holder", ("SETRANGE", "gpuboss:{default}:v1:admin", "0", "")),
    ("gpuboss-holder", ("SADD", "gpuboss:pools", "mine")),
    ("gpuboss-holder", ("HSET", "gpuboss:{default}:v1:peaks", "model=x", "1")),
    ("gpuboss-holder", ("PUBLISH", "other-app:channel", "x")),
    ("gpuboss-holder", ("ACL", "SETUSER", "gpuboss-holder", "+@all")),
    ("gpuboss-holder", ("ACL", "LIST")),
    ("gpuboss-holder", ("CLIENT", "LIST")),
    ("gpuboss-holder", ("CLIENT", "KILL", "TYPE", "normal")),
    ("gpuboss-boss", ("FLUSHALL",)),
    ("gpuboss-boss", ("CONFIG", "SET", "maxmemory", "1mb")),
    ("gpuboss-boss", ("SCRIPT", "FLUSH")),
    ("gpuboss-boss", ("KEYS", "*")),
    ("gpuboss-boss", ("EVAL", "return 1", "0")),
    ("gpuboss-boss", ("GET", "other-app:secret")),
    ("gpuboss-boss", ("ACL", "SETUSER", "gpuboss-boss", "+@all")),
    ("gpuboss-observer", ("HSET", "gpuboss:{default}:v1:device:gpu0", "total_mib", "1")),
    ("gpuboss-observer", ("DEL", "gpuboss:{default}:v1:queue")),
    ("gpuboss-observer", ("XADD", "gpuboss:{default}:v1:events", "*", "event", "fake")),
    ("gpuboss-observer", ("PUBLISH", "gpuboss:notify:x", "evict x 0")),
    ("gpuboss-observer", ("EVALSHA", "0" * 40, "0")),
    ("gpuboss-observer", ("SCRIPT", "LOAD", "return 1")),
    ("gpuboss-observer", ("KEYS", "gpuboss:*")),
    ("gpuboss-observer", ("GET", "other-app:secret")),
]


@pytest.mark.parametrize(
    ("user", "command"),
    RAW_REFUSALS,
    ids=[f"{u.removeprefix('gpuboss-')}-{' '.join(c[:2])}" for u, c in RAW_REFUSALS],
)
def test_redis_refuses_what_no_role_needs(world: World, user: str, command: tuple[str, ...]) -> None:
    world.acl.root.set("other-app:secret", "s3cret")
    before = dump_all(world.acl.root)
    client = world.acl.raw(user)
    with pytest.raises(redis.exceptions.NoPermissionError) as exc:
        client.execute_command(*command)  # type: ignore[no-untyped-call]
    refused(exc.value)
    client.close()
    assert dump_all(world.acl.root) == before
    assert [e["username"] for e in world.acl.acl_log()] == [user]


@pytest.mark.parametrize(("user", "pattern"), [("gpuboss-holder", False), ("gpuboss-observer", True)])
def test_no_subscribing_beyond_the_notice_channels(world: World, user: str, pattern: bool) -> None:
    pubsub = world.acl.raw(user).pubsub()  # type: ignore[no-untyped-call]
    if pattern:
        pubsub.psubscribe("gpuboss:*")  # only the notice channels' exact pattern may be asked for
    else:
        pubsub.subscribe("other-app:channel")
    with pytest.raises(redis.exceptions.NoPermissionError) as exc:
        pubsub.get_message(timeout=5)  # the refusal is the reply to the subscription
    refused(exc.value)
    pubsub.close()


def test_what_redis_cannot_refuse_a_holder(world: World) -> None:
    """The limits deploy/ACL.md states: the scripts run with the caller's rights, so a holder has
    the plain commands and keys they use. It can write a device's hash by hand, and end another
    holder's lease with the fencing token it reads (a token fences; it is no secret)."""
    r = world.acl.raw("gpuboss-holder")
    pk = PoolKeys("default")
    assert r.hset(pk.device("gpu1"), "note", "raw write") == 1
    token = int(r.hget(pk.lease(world.theirs.id), "token") or -1)
    world.holder.run(gops.release_ref(gops.LeaseRef("default", world.theirs.id, token)))
    assert world.acl.root.hget(pk.lease(world.theirs.id), "state") == "released"
    r.close()


def test_when_redis_is_full_the_check_refuses_like_any_first_write(world: World) -> None:
    """Under maxmemory a script is refused at its first write that may grow memory. The capability
    check is such a write, so an operator's add_device is refused before it changed anything, as
    before; a forced release writes first what lets it run when full (writes_even_when_full), so an
    operator can still free memory."""
    root = world.acl.root
    before = dump_all(root)
    root.config_set("maxmemory", 1)
    try:
        with pytest.raises((ProtocolError, BackendUnavailable), match="maxmemory"):
            world.boss.add_device("gpu9", 1024)
        assert dump_all(root) == before
        assert world.boss.force_release(world.theirs.id, "default").state == "force_released"
    finally:
        root.config_set("maxmemory", 0)
    assert world.acl.acl_log() == []


# --- the CLI and the service ----------------------------------------------------------------------


def gb(url: str, *args: str) -> Result:
    return runner.invoke(cli_app, ["--redis-url", url, *args], env=CLEAN_ENV)


def test_cli_as_holder_reads_status_and_is_refused_operator_commands(world: World) -> None:
    url = world.acl.url("gpuboss-holder")
    result = gb(url, "status", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    pool = json.loads(result.stdout)["pools"]["default"]
    assert sorted(d["name"] for d in pool["devices"]) == ["gpu0", "gpu1"]
    assert [x["id"] for x in pool["leases"]] == [world.theirs.id]  # the status reaped the expired one
    world.acl.root.acl_log_reset()
    for args in (
        ("devices", "add", "gpu9", "--vram", "1GiB"),
        ("devices", "remove", "gpu1"),
        ("release", world.theirs.id, "--force", "--pool", "default"),
    ):
        before = dump_all(world.acl.root)
        result = gb(url, *args)
        assert result.exit_code != 0, (args, result.stdout)
        assert result.stderr.startswith("error["), result.stderr
        refused(Exception(result.stderr))
        assert dump_all(world.acl.root) == before, args
    assert {e["username"] for e in world.acl.acl_log()} == {"gpuboss-holder"}
    events = gb(world.acl.url("gpuboss-observer"), "events", "--json", "--pool", "default")
    assert events.exit_code == 0, events.stderr
    assert json.loads(events.stdout.splitlines()[0])["event"] == "device_added"


def test_serve_starts_and_works_as_the_boss_user(acl: AclRedis, clients: Callable[[str, str], Boss]) -> None:
    # A pool missing from the registry: the reaper's first pass finds it (a SCAN) and restores it.
    clients("gpuboss-boss", "svc").add_device("gpu0", 1024, pool="lost")
    acl.root.delete("gpuboss:pools")
    values: dict[str, Any] = {
        "redis_url": acl.url("gpuboss-boss"), "devices": "gpu0=24GiB:0", "tokens": [],
        "reap_interval_s": 0.05, "max_wait_s": 20.0, "max_queue": 100, "redis_timeout_s": 2.0,
    }  # fmt: skip
    settings = ServiceSettings(**values)
    app = create_app(settings, settings.redis_url or "")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30.0) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        wait_for("two passes of the reaper", lambda: app.state.reaper.passes >= 2)
        assert acl.root.smembers("gpuboss:pools") == {"default", "lost"}
        granted = http.post("/v1/leases", json={"vram": 1024, "timeout_s": 0, "holder": "http"})
        assert granted.status_code == 201, granted.text
    assert acl.acl_log() == []
