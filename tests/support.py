"""Helpers shared by the test modules that drive the engine on real Redis and on fakeredis.

Most of them read the ``default`` pool's keys straight from Redis, poll with a deadline, run a call in a
thread and take snapshots of the whole database;
:class:`Child` runs a holder script in its own process. Test modules import them with
``from support import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from gpuboss_client import Boss, Lease, PoolKeys
from gpuboss_client import _core as core

POOL = PoolKeys("default")
#: for the CLI's test runner: outside settings must not leak in; COLUMNS unset gives the wide
#: layout used for pipes
CLEAN_ENV: dict[str, str | None] = {
    "GPUBOSS_REDIS_URL": None,
    "GPUBOSS_REDIS_TIMEOUT_S": None,
    "GPUBOSS_BOSS_URL": None,
    "GPUBOSS_TOKEN": None,
    "GPUBOSS_BOSS_TIMEOUT_S": None,
    "COLUMNS": None,
}
LINE_WAIT_S = 15.0  # generous: a child on a loaded machine may take seconds to start


def fake_server() -> fakeredis.FakeServer:
    """A server of the fakeredis tier. It plays Redis 6.2, which has no functions: there the client
    runs its Lua verbs as scripts (``EVALSHA``), and against the real server as functions, so the
    tests that run on both tiers run both forms."""
    return fakeredis.FakeServer(version=(6, 2))


def redis_ms(r: redis.Redis) -> int:
    """Redis's own clock, in ms (what the scripts compare times with)."""
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def wait_for(what: str, pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll Redis-side state until ``pred`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)  # polling Redis with a deadline: there is nothing to block on


def field(r: redis.Redis, lease_id: str, name: str) -> str | None:
    """One field of a lease's hash in the ``default`` pool, or None if it is not there."""
    value = r.hget(POOL.lease(lease_id), name)
    return None if value is None else str(value)


def state(r: redis.Redis, lease_id: str) -> str | None:
    """The ``state`` field of a lease in the ``default`` pool."""
    return field(r, lease_id, "state")


def used(r: redis.Redis, device: str = "gpu0") -> int:
    """MiB of ``device`` held by leases, as the device hash says."""
    return int(r.hget(POOL.device(device), "used_mib") or 0)


def claimed(r: redis.Redis, device: str = "gpu0") -> int:
    """MiB of ``device`` promised to requests whose victims are giving memory back."""
    return int(r.hget(POOL.device(device), "claimed_mib") or 0)


class Events:
    """The pool's event stream; :meth:`new` returns the entries appended since the last call."""

    def __init__(self, r: redis.Redis) -> None:
        self.r, self.seen = r, 0
        self.new()

    def new(self) -> list[dict[str, str]]:
        """The entries appended since the last call, as dicts of their fields."""
        entries: list[tuple[str, dict[str, str]]] = self.r.xrange(POOL.events)  # type: ignore[assignment]
        out = [dict(fields) for _id, fields in entries[self.seen :]]
        self.seen = len(entries)
        return out

    def pairs(self) -> list[tuple[str, str]]:
        """The new entries as ``(event, lease)`` pairs (``lease`` is empty where none is named)."""
        return [(e["event"], e.get("lease", "")) for e in self.new()]


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key with its type and content, the event stream included (works on both tiers)."""
    out: dict[str, Any] = {}
    for key in sorted(r.scan_iter("*")):
        kind = r.type(key)
        value: Any
        if kind == "hash":
            value = r.hgetall(key)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "stream":
            value = r.xrange(key)
        else:
            value = r.get(key)
        out[key] = (kind, value)
    return out


def dump_all(r: redis.Redis) -> dict[str, tuple[str, bytes]]:
    """Every key of the database with its TYPE and DUMP (real Redis only)."""
    keys = sorted(str(k) for k in r.scan_iter("*", count=1000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.dump(key)  # binary even on a decoding client
    replies = pipe.execute()
    return {key: (str(replies[2 * i]), replies[2 * i + 1]) for i, key in enumerate(keys)}


def other(boss: Boss, holder: str) -> Boss:
    """Another client (another holder, its own notice channel) over the same Redis."""
    return Boss(boss.redis, holder=holder)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a daemon thread; the dict gets its ``value`` or its ``error`` once it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def join_evict_thread(lease: Lease) -> None:
    """Wait for the client's thread that ran ``on_evict`` and released ``lease`` to finish."""
    for t in threading.enumerate():
        if t.name == f"gpuboss-evict-{lease.id}":
            t.join(5)
            assert not t.is_alive()


class Lines:
    """A process whose output (stdout and stderr together) a thread reads line by line; a test
    waits for a line with a bound."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, matches: Callable[[str], bool], what: str, timeout: float) -> str:
        """Block until a line ``matches``; return it (fails after ``timeout`` or at the exit)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout} s; output: {self.seen}") from None
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} before {what}; output: {self.seen}")
            self.seen.append(line)
            if matches(line):
                return line

    def kill(self) -> None:
        """Kill the process if it still runs, wait for it and close its output."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Child(Lines):
    """A holder script run in its own process (its lines waited for with a bound)."""

    def __init__(self, script: Path, redis_url: str, *args: str) -> None:
        super().__init__([sys.executable, str(script), *args], {**os.environ, "GPUBOSS_REDIS_URL": redis_url})

    def expect(self, prefix: str, timeout: float = LINE_WAIT_S) -> list[str]:
        """Block until the child prints a line starting with ``prefix``; return its words."""
        return self.line(lambda line: line.startswith(prefix), f"{prefix!r} line", timeout).split()

    def finish(self, timeout: float = LINE_WAIT_S) -> list[str]:
        """Wait for the child to exit 0; return every line it printed."""
        assert self.proc.wait(timeout) == 0, f"holder failed; output: {self.seen}"
        self._reader.join(timeout)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        return self.seen

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child."""
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """Kill the child if it still runs, wait for it and close its output."""
        self.kill()


@dataclass
class Tier:
    """One backend for scenarios that need the sync and the asyncio client on the same data."""

    sync: redis.Redis
    make_async: Callable[[], aioredis.Redis]


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` (lifespan included) with uvicorn on a free loopback port in a thread until the
    block ends; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="none", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for("the app to start", lambda: server.started or not thread.is_alive(), timeout=30)
        assert server.started, "the app failed to start (see the log above)"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the app did not stop"


class Stepper:
    """Drives the core's acquire by hand against ``boss``'s scripts.

    It runs the script calls until the operation would block in ``BLPOP`` on its wake list
    (``blocked``) or is done. :meth:`repoll` stands in for the BLPOP timing out (the waiter asks
    acquire again, as it does every third of its TTL); :meth:`woken` really blocks on the wake
    list, as the client does, and returns the lease it was granted.
    """

    def __init__(self, boss: Boss, req: core.AcquireRequest, holder: core.Holder | None = None) -> None:
        self.boss, self.id = boss, req.id
        self.op = core.acquire(req, holder or boss.holder, time.monotonic)
        self.step: core.Step | None = None
        self.value: Any = None
        self._send(None)

    @property
    def blocked(self) -> bool:
        return isinstance(self.step, core.Command)

    def _send(self, reply: Any) -> None:
        while True:
            try:
                self.step = self.op.send(reply)
            except StopIteration as stop:
                self.step, self.value = None, stop.value
                return
            if not isinstance(self.step, core.Call):
                return
            reply = self.boss.script(self.step.script, self.step.keys, self.step.args)

    def repoll(self) -> None:
        assert self.blocked
        self._send(None)

    def woken(self, timeout: float = 5.0) -> Lease:
        assert self.blocked, f"{self.id} is not waiting"
        popped = self.boss.redis.blpop([POOL.wake(self.id)], timeout)
        assert popped is not None, f"{self.id} was not woken within {timeout} s"
        self._send(list(popped))
        return self.lease

    @property
    def lease(self) -> Lease:
        assert self.step is None, f"{self.id} is still waiting"
        assert isinstance(self.value, Lease)
        return self.value


#: a cold start of `gpuboss serve` on a loaded 2-CPU machine imports FastAPI and starts Redis
SERVE_WAIT_S = 30.0

#: a registry whose one consumer the boss starts as a child process (no engine to load or unload it)
SLEEPER_REGISTRY = """
consumers:
  - name: sleeper
    url: http://127.0.0.1:9
    vram: 1GiB
    command: {argv: [sleep, "600"], stop_timeout: 2}
"""


def gpuboss_command() -> list[str]:
    script = Path(sys.executable).parent / "gpuboss"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gpuboss_cli.main import main; main()"]


class Served(Lines):
    """A running ``gpuboss serve`` (its output read line by line)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__([*gpuboss_command(), "serve", *args], env)

    def expect(self, pattern: str, timeout: float = SERVE_WAIT_S) -> re.Match[str]:
        """Block until a line matches ``pattern`` (``re.search``); return the match."""
        line = self.line(lambda line: re.search(pattern, line) is not None, f"line like {pattern!r}", timeout)
        found = re.search(pattern, line)
        assert found is not None
        return found

    def started(self) -> tuple[str, str]:
        """Wait for the startup lines; return (base URL, the Redis URL printed for clients)."""
        base = self.expect(r"dashboard: (http://\S+)/$").group(1)
        url = self.expect(r"GPUBOSS_REDIS_URL=(\S+)").group(1)
        self.expect(r"^Stop with Ctrl-C")
        return base, url

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the exit and all output; return the exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(SERVE_WAIT_S)
        self._reader.join(SERVE_WAIT_S)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        return code


#: the stand-in engines (see tests/engines.py)
ENGINES = Path(__file__).with_name("engines.py")
#: seconds an ensure, a release or a proxied request may take in tests (engines load in a fraction)
CALL_S = 30.0


class Rig:
    """A fake GPU (the state file), stand-in engines, and the boss that manages them."""

    def __init__(self, tmp_path: Path, redis_url: str, served: list[Served], children: list[Child]) -> None:
        self.tmp, self.redis_url, self.served, self.children = tmp_path, redis_url, served, children
        self.state = tmp_path / "gpu.json"
        self.registry = tmp_path / "consumers.yaml"
        self.boss: Served | None = None
        self.clients: list[httpx.Client] = []

    def gpu(self, total: str, other_mib: int = 0) -> None:
        self.state.write_text(
            json.dumps({"gpus": [{"name": "NVIDIA Fake", "total": total, "other_mib": other_mib}]}),
            encoding="utf-8",
        )

    def engine(self, kind: str, *models: str, **flags: Any) -> str:
        """Start a stand-in engine; its base URL."""
        args = [kind, "--state", str(self.state), "--delay", str(flags.pop("delay", 0.2))]
        for model in models:
            args += ["--model", model]
        for flag, value in flags.items():
            name = "--" + flag.replace("_", "-")
            args += [name] if value is True else [name, str(value)]
        child = Child(ENGINES, self.redis_url, *args)
        self.children.append(child)
        port = child.expect("LISTENING")[1]
        return f"http://127.0.0.1:{port}"

    def start(self, registry: str | None = None, **settings: str) -> httpx.Client:
        """Write the registry (if given) and start ``gpuboss serve`` (with ``settings`` as its
        ``GPUBOSS_*`` variables); a client for it."""
        if registry is not None:
            self.registry.write_text(textwrap.dedent(registry), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
        env |= {"GPUBOSS_AGENT": "on", "GPUBOSS_AGENT_INTERVAL_S": "0.5", "GPUBOSS_REAP_INTERVAL_S": "0.2"}
        env |= {f"GPUBOSS_{k.upper()}": v for k, v in settings.items()}
        args = ["--port", "0", "--redis-url", self.redis_url, "--consumers", str(self.registry)]
        self.boss = Served([*args, "--fake-nvml", f"@{self.state}"], env)
        self.served.append(self.boss)
        base, _ = self.boss.started()
        http = httpx.Client(base_url=base, timeout=CALL_S + 10)
        self.clients.append(http)
        return http

    def used(self) -> int:
        """MiB in use on the GPU now: every process and the rest."""
        card = json.loads(self.state.read_text(encoding="utf-8"))["gpus"][0]
        return int(card.get("other_mib", 0)) + sum(p["mib"] for p in card.get("processes", []))

    def ooms(self) -> int:
        return int(json.loads(self.state.read_text(encoding="utf-8"))["gpus"][0].get("ooms", 0))
