"""A seeded, time-bounded chaos run of gpuboss, and the checker that judges what it recorded.

Run it from the repository root::

    .venv/bin/python tests/chaos.py --seed 7 --duration 60 [--workers 6] [--devices 3] [--json out.json]
    .venv/bin/python tests/chaos.py --topology sentinel --seed 7 --duration 30

What one run does (``--topology single``, the default):

- starts its own ``redis-server`` on a free loopback port in a temporary directory, with
  ``appendonly yes`` and ``appendfsync always`` (a restart loses nothing acknowledged), and
  registers ``--devices`` devices of 8192 MiB in pool ``default`` through ``Boss.from_url``;
- starts ``--workers`` worker processes (this file, ``worker`` mode) that reach Redis through a
  loopback TCP proxy (:class:`Proxy`) and loop: acquire (random size, priority, preemptible or not,
  a device or the best fit, a timeout, a TTL, a grace), hold for a random short time in units of
  work of 10 ms while the client renews the lease (now and then kept warm with ``lease.idle()``),
  then release. Each worker writes its history as JSON lines to its own file (see
  :class:`History`): ``invoke``, ``ok``/``fail``, ``evict_notice``/``unloaded``, ``held`` (the
  interval it believed it held the memory) and ``release``. Times are ``CLOCK_MONOTONIC``
  nanoseconds, which are system-wide on Linux, so intervals of different processes compare;
- injects faults at seeded random moments from the registry :data:`FAULTS` (kill -9 of a worker
  and a replacement, SIGSTOP past the TTL then SIGCONT, ``CLIENT KILL TYPE pubsub``, replies delayed
  by the proxy, every proxied connection dropped, Redis restarted by ``SHUTDOWN NOSAVE`` or
  SIGKILL); each kind at least once (the first ones go round every kind);
- reaps every 250 ms (``Boss.reap``, as the boss service does), samples Redis's clock against
  ``CLOCK_MONOTONIC`` and records the pool's event stream as it grows (nothing lost to its cap);
- stops the workers, waits until every lease has ended, and runs :func:`check` on what it recorded.

It prints figures (run length, grants, faults by kind, violations by kind, reclaim latency after
kill -9, eviction latency against the grace deadline) and exits 1 on any violation, else 0.
``--json`` writes the same as a document; ``--keep DIR`` keeps the histories, the Redis log and
``recording.json``, which ``--check recording.json`` judges again without running anything.

With ``--topology sentinel`` the run starts a primary, two replicas and three Sentinels instead
(``tests/topology.sentinel_group``: loopback, no persistence, ``failover-timeout`` 5000; the run
sets ``down-after-milliseconds`` to 1000, 1300 and 1600, see :data:`SENTINEL_DOWN_MS`), and the
workers and the reaper connect with
``redis+sentinel://...`` (each state change confirmed by every replica with ``WAIT``, the
default; a 1 s read timeout, so a frozen primary holds no call for long). Faults of that mode (see
:data:`FAULTS`, each kind's ``topologies``): the worker faults (``kill``, ``stop``, ``pubsub``), and
three failovers, each only once the deployment has settled from the last (every sentinel names
one primary, both other data nodes replicate it with their link up and the sentinels see them
healthy): ``failover`` (``SENTINEL FAILOVER``), ``primary_kill`` (SIGKILL, restarted later as a
replica of the new primary) and ``primary_stop`` (SIGSTOP until a replica is promoted, then SIGCONT:
the old primary wakes up still a primary). Sentinel demotes a primary that a failover left behind
about 10 s after it is reachable again; the run sends it ``REPLICAOF`` the new primary itself
1.5-3 s after the failover (or the SIGCONT) instead, so that a short run fails over often. Skipped
in that mode: ``delay`` and ``drop`` (the workers reach the data nodes directly, as the sentinels
name them, not through the proxy) and ``restart`` (a data node without persistence that restarts
as a primary comes back empty; ``primary_kill`` is the restart of that mode).

A failover can leave writes behind: what an old primary wrote and no promoted replica received.
The event recorder follows the primary the sentinels name and, each time it (re)connects and at
the end, matches what it recorded against the stream of the primary it reads (see
:func:`merge_stream`); the run also reads a left-behind primary's stream just before it demotes
it (what it wrote after the sentinels named another, which the recorder did not read). The
surviving history is what :func:`check` judges; the entries that did not survive are kept apart
(``lost_events``, in the figures), and the checker names the violations they explain (cause
``lost_in_failover``: a lost grant or renewal that a worker was told about). Workers also record
when the client renewed their lease (``renewed``). The figures add the failovers by kind, the time
from each to the promotion of a replica (the harness sees its ``ROLE`` turn master), and to the
first grant on the new primary (the first ``granted`` entry the new primary wrote itself).

The checker's rules are in :func:`check`'s docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from topology import Node, SentinelGroup, sentinel_group

from gpuboss_client import (
    BackendUnavailable,
    Boss,
    GpubossError,
    Lease,
    LeaseEvicted,
    LeaseLost,
    PoolKeys,
)

POOL = "default"
KEYS = PoolKeys(POOL)
DEVICE_MIB = 8192
TTLS = (1.0, 2.0, 3.0)  # seconds; a SIGSTOP lasts longer than the longest
GRACES = (0.5, 1.0, 2.0)
UNIT_S = 0.01  # one unit of a holder's work: it checks its lease between units
REAP_EVERY_S = 0.25
WORKER_SOCKET_TIMEOUT_S = 5.0
#: clock mapping tolerance (ms) when comparing a holder's moments with Redis's event times: the
#: events' ids have ms resolution and the CLOCK_MONOTONIC -> Redis TIME mapping is sampled
TOLERANCE_MS = 5.0
TERMINAL = frozenset({"released", "expired", "revoked", "force_released", "cancelled", "abandoned"})
ENDS_HELD = frozenset({"released", "expired", "revoked", "force_released"})
ENDS_WAITING = frozenset({"cancelled", "abandoned", "force_released"})
REDIS_SERVER = shutil.which("redis-server")
TOPOLOGIES = ("single", "sentinel")
#: the Sentinel service the sentinel mode's group monitors
SERVICE = "gpuboss"
#: the sentinel mode's connection options (workers and reaper): every replica confirms each state
#: change (WAIT, at most 500 ms and half the read timeout); a frozen primary holds a call 1 s at most
SENTINEL_OPTIONS = "confirm_ms=500&socket_timeout=1&socket_connect_timeout=0.5"  # confirm_replicas=all
#: how far back (ms before the last entry recorded) the recorder matches its record against the
#: stream of a primary it (re)connects to: a failover's divergence is seconds old at most
RECONCILE_MS = 30_000
#: a failover's replica must be promoted within this long (down-after 1 s, then the election)
PROMOTE_S = 20.0
#: the sentinels' down-after-milliseconds (sentinel_group sets 1000 for each): staggered
SENTINEL_DOWN_MS = (1000, 1300, 1600)


def mono_ns() -> int:
    """System-wide monotonic time (the clock every process of the run shares), ns."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def secs_to_ns(seconds: float) -> int:
    """A ``time.monotonic()`` reading (what the client's deadlines are in) as ns."""
    return int(seconds * 1e9)


def free_port() -> int:
    """A free loopback TCP port (bound and closed: a small race, as in ``conftest.py``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_boss(url: str, holder: str, **defaults: float) -> Boss:
    """``Boss.from_url(url)``, with the connection options ``defaults`` where the URL's query does
    not set them (a keyword argument would override the URL's)."""
    query = parse_qs(urlsplit(url).query)
    return Boss.from_url(url, holder=holder, **{k: v for k, v in defaults.items() if k not in query})


# --------------------------------------------------------------------------------------------
# The worker: one lease holder process
# --------------------------------------------------------------------------------------------


class History:
    """A worker's history file: one JSON object per line, each ``{"k": kind, "t": ns, "pid",
    "slot", ...}``, appended with one ``write`` each (whole lines even if the process is killed).

    Kinds and their fields: ``start``; ``invoke`` (``rid``, ``req``: the request); ``retry``
    (``rid``, ``code``: a retryable failure, tried again with the same request id); ``ok``
    (``rid``, ``lease``, ``token``, ``device``, ``mib``); ``fail`` (``rid``, ``code``);
    ``evict_notice`` (``rid``, ``deadline_ms``: Redis time, ``fence``: the client's local fence,
    ns); ``unloaded`` (``rid``); ``renewed`` (``rid``, ``deadline``: the lease's new local deadline,
    ns, seen by the worker between two units of work); ``held`` (``rid``, ``lease``, ``device``,
    ``mib``, ``from``, ``until``: ns, ``why``: released/lost/evicted/stopped/error, ``noticed``: when
    the worker saw it, ``reason``: the client's lost reason); ``release`` (``rid``, ``outcome``);
    ``error`` (``rid``, ``error``: an exception the client does not document there: outside
    gpuboss's error tree, or one where another is promised; during a hold, the belief ends then);
    ``exit``.
    """

    def __init__(self, path: Path, slot: int) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._base = {"pid": os.getpid(), "slot": slot}

    def write(self, kind: str, **fields: Any) -> None:
        record = {"k": kind, "t": fields.pop("t", None) or mono_ns(), **self._base, **fields}
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


@dataclass(frozen=True)
class Request:
    """One acquire a worker makes, and what it does with the lease."""

    rid: str
    mib: int
    priority: int
    device: str | None
    timeout: float
    ttl: float
    preemptible: bool
    grace: float
    hold_s: float  # how long it means to hold the lease
    idle: bool  # keep it warm (idle) for the middle part of the hold
    unload_s: float  # how long its on_evict takes to "unload"

    @classmethod
    def draw(cls, rng: random.Random, rid: str, devices: Sequence[str]) -> Request:
        grace = rng.choice(GRACES)
        slow = rng.random() < 0.25  # unloads too slowly: past the fence, or revoked
        return cls(
            rid=rid,
            mib=rng.randrange(2048, 7169, 512),
            priority=rng.choice((10, 50, 90)),
            device=rng.choice(devices) if rng.random() < 0.35 else None,
            timeout=rng.choice((0.0, 0.5, 2.0, 4.0)),
            ttl=rng.choice(TTLS),
            preemptible=rng.random() < 0.5,
            grace=grace,
            hold_s=rng.uniform(0.1, 2.5),
            idle=rng.random() < 0.4,
            unload_s=rng.uniform(0.5, 1.5) * grace if slow else rng.uniform(0.0, 0.2) * grace,
        )


def lease_fence_ns(lease: Lease) -> int:
    """The client's own promise: the local moment from which it counts ``lease`` as lost (its
    renewal deadline, or the eviction fence once asked to give the lease back), ns."""
    fence = lease.deadline
    evict = lease.evict_deadline
    if evict is not None:
        fence = min(fence, evict)
    return secs_to_ns(fence)


class Attempt:
    """The state of one acquire and hold, shared with the client's ``on_evict`` thread."""

    def __init__(self, req: Request, hist: History, stop: threading.Event) -> None:
        self.req, self.hist, self.stop = req, hist, stop
        self.evicted = threading.Event()
        self.unloaded = threading.Event()
        self.unloaded_at: int | None = None

    def on_evict(self, lease: Lease) -> None:
        """The client calls this once when gpuboss asks for the memory back: "unload" (the
        workload: a random time, sometimes past the grace), then return; the client releases."""
        fence = lease.evict_deadline
        self.hist.write(
            "evict_notice",
            rid=self.req.rid,
            deadline_ms=lease.evict_deadline_ms,
            fence=None if fence is None else secs_to_ns(fence),
        )
        self.evicted.set()
        self.stop.wait(self.req.unload_s)  # unloading the model (workload, cut short at the end)
        self.unloaded_at = mono_ns()
        self.hist.write("unloaded", rid=self.req.rid, t=self.unloaded_at)
        self.unloaded.set()


class Worker:
    """The worker process: acquire, hold while the client renews, release, until told to stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.slot: int = args.slot
        self.rng = random.Random(args.seed)
        self.devices: list[str] = args.devices.split(",")
        self.hist = History(Path(args.out), self.slot)
        self.stop = threading.Event()
        self.parent = os.getppid()
        self.boss = connect_boss(
            args.url,
            f"chaos-s{self.slot}-p{os.getpid()}",
            socket_timeout=WORKER_SOCKET_TIMEOUT_S,
            socket_connect_timeout=2.0,
        )
        self.broke = False  # --break over-grant: done once
        self.unreleased: list[tuple[str, Lease]] = []  # Redis was away when we gave them back

    def stopping(self) -> bool:
        if os.getppid() != self.parent or mono_ns() >= self.args.until_ns:
            self.stop.set()  # the run is gone or over: stop by ourselves
        return self.stop.is_set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        self.hist.write("start")
        n = 0
        while not self.stopping():
            n += 1
            req = Request.draw(self.rng, f"s{self.slot}p{os.getpid()}n{n}", self.devices)
            self.retry_releases()
            try:
                self.attempt(req)
            except Exception as exc:  # outside gpuboss's error tree: recorded, judged later
                self.hist.write("error", rid=req.rid, error=repr(exc))
        with contextlib.suppress(Exception):
            self.boss.close()
        self.hist.write("exit")

    def attempt(self, req: Request) -> None:
        att = Attempt(req, self.hist, self.stop)
        lease = self.acquire(req, att)
        if lease is None:
            return
        if self.args.breaks == "over-grant" and not self.broke:
            self.broke = True  # test-only: pretend to hold a whole device never granted
            self.hist.write(
                "ok", rid=f"{req.rid}-fake", lease=f"{req.rid}-fake", token=lease.token,
                device=lease.device, mib=self.args.capacity,
            )  # fmt: skip
            fake = True
        else:
            fake = False
        start = mono_ns()
        try:
            why, noticed = self.hold(lease, att, start)
        except Exception as exc:  # not what the client documents: the workload stops using the memory
            noticed = mono_ns()
            self.hist.write("error", rid=req.rid, error=repr(exc), t=noticed)
            why = "error"
        until = min(noticed, lease_fence_ns(lease))
        if att.unloaded_at is not None:
            # on_evict unloaded by then, whatever the loop noticed later (it may have been inside a
            # busy() that waited out a failover while the client released the lease after on_evict)
            until = min(until, att.unloaded_at)
        held = {"lease": lease.id, "device": lease.device, "mib": lease.mib, "from": start, "until": until}
        self.hist.write("held", rid=req.rid, why=why, noticed=noticed, reason=lease.lost_reason, **held)
        if fake:
            held |= {"lease": f"{req.rid}-fake", "mib": self.args.capacity}
            self.hist.write("held", rid=f"{req.rid}-fake", why=why, noticed=noticed, reason=None, **held)
        outcome = self.release(lease)
        self.hist.write("release", rid=req.rid, outcome=outcome)
        if outcome == "backend_unavailable":
            self.unreleased.append((req.rid, lease))  # else the client renews it for ever

    def retry_releases(self) -> None:
        """Give back the leases a release could not reach Redis for (the client still renews them)."""
        left = []
        for rid, lease in self.unreleased:
            outcome = self.release(lease)
            self.hist.write("release", rid=rid, outcome=outcome, late=True)
            if outcome == "backend_unavailable":
                left.append((rid, lease))
        self.unreleased = left

    def acquire(self, req: Request, att: Attempt) -> Lease | None:
        """Acquire, retrying a retryable backend failure with the same request id (never granted
        twice); None when it failed."""
        self.hist.write("invoke", rid=req.rid, req=asdict(req))
        for _ in range(4):
            try:
                lease = self.boss.acquire(
                    req.mib, priority=req.priority, device=req.device, timeout=req.timeout, ttl=req.ttl,
                    preemptible=req.preemptible, grace=req.grace, request_id=req.rid, on_evict=att.on_evict,
                )  # fmt: skip
            except BackendUnavailable as exc:
                self.hist.write("retry", rid=req.rid, code=exc.code)
                if self.stop.wait(self.rng.uniform(0.05, 0.2)):  # back off, unless stopping
                    break
                continue
            except GpubossError as exc:
                self.hist.write("fail", rid=req.rid, code=exc.code)
                return None
            self.hist.write(
                "ok", rid=req.rid, lease=lease.id, token=lease.token, device=lease.device, mib=lease.mib
            )
            return lease
        self.hist.write("fail", rid=req.rid, code="backend_unavailable")
        return None

    def hold(self, lease: Lease, att: Attempt, start: int) -> tuple[str, int]:
        """Hold ``lease`` for the request's time in units of work, checking it between units; returns
        why the hold ended and when the worker noticed."""
        req = att.req
        end = start + secs_to_ns(req.hold_s)
        idle_at = start + secs_to_ns(req.hold_s * 0.3) if req.idle else None
        busy_at = start + secs_to_ns(req.hold_s * 0.7)
        idle = False
        deadline = [lease.deadline]

        def renewed(now: int) -> None:
            if lease.deadline > deadline[0]:  # the client renewed it (in sentinel mode: confirmed it)
                deadline[0] = lease.deadline
                self.hist.write("renewed", rid=req.rid, deadline=secs_to_ns(deadline[0]), t=now)

        while True:
            now = mono_ns()
            renewed(now)
            if lease.lost:
                return "lost", now
            if att.evicted.is_set():
                break
            if now >= end or self.stopping():
                return ("stopped" if self.stop.is_set() else "released"), now
            try:
                if idle_at is not None and not idle and now >= idle_at:
                    lease.idle()
                    idle = True
                elif idle and now >= busy_at:
                    lease.busy()
                    idle, idle_at = False, None
            except LeaseEvicted:
                pass  # asked back: on_evict runs (or ran)
            except LeaseLost:
                return "lost", mono_ns()
            except BackendUnavailable:
                pass  # Redis away for now; the client fences by its own deadline
            att.evicted.wait(min(UNIT_S, max(0.0, (end - now) / 1e9)))  # one unit of work
        # Asked back: the memory is in use until on_evict has unloaded, or the client's fence passed.
        while not att.unloaded.is_set() and not lease.lost:
            att.unloaded.wait(UNIT_S)
            renewed(mono_ns())
        return "evicted", mono_ns() if att.unloaded_at is None else att.unloaded_at

    def release(self, lease: Lease) -> str:
        """Give the lease back (also when the client released it after on_evict, or it is lost:
        the outcome is recorded); retried while Redis is away, else it expires by itself."""
        for _ in range(4):
            try:
                self.boss.release(lease)
                return "ok"
            except BackendUnavailable:
                if self.stop.wait(self.rng.uniform(0.05, 0.2)):
                    break
            except LeaseLost as exc:
                return f"{exc.code}:{exc.details.get('state', '')}"
            except GpubossError as exc:
                return exc.code
        return "backend_unavailable"


def worker_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="chaos.py worker", description="one lease holder of a chaos run")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--devices", required=True)
    p.add_argument("--capacity", type=int, default=DEVICE_MIB)
    p.add_argument("--until-ns", type=int, required=True, help="stop by itself at this CLOCK_MONOTONIC ns")
    p.add_argument("--break", dest="breaks", choices=("over-grant",))
    if os.environ.get("GPUBOSS_CHAOS_DEBUG"):  # the client's own log, in the worker's log file
        logging.basicConfig(level=logging.DEBUG, format="%(created).3f %(threadName)s %(name)s %(message)s")
    Worker(p.parse_args(argv)).run()


# --------------------------------------------------------------------------------------------
# The proxy between the workers and Redis
# --------------------------------------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy (asyncio, in a thread) that the workers reach Redis through.

    Modes: pass; ``delay_s > 0``: every reply (Redis to worker) is held that long, in order;
    :meth:`drop` aborts every proxied connection at once (requests in flight and replies held are
    lost; the workers reconnect). When Redis closes a connection (it restarted), the worker's is
    closed after the replies already received are delivered.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="chaos-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()  # Redis is down: the worker sees its connection refused
            return
        self._writers |= {writer, up_writer}
        tasks = [
            asyncio.ensure_future(self._requests(reader, up_writer)),
            asyncio.ensure_future(self._replies(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    @staticmethod
    async def _requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await held.get()) is not None:
                due, data = item
                if (wait := due - self._loop.time()) > 0:
                    await asyncio.sleep(wait)  # the injected delay
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            with contextlib.suppress(OSError):
                while (data := await reader.read(65536)) and not sender.done():
                    held.put_nowait((self._loop.time() + self.delay_s, data))
            held.put_nowait(None)
            with contextlib.suppress(OSError):
                await sender  # Redis closed: what it answered still goes out, then the close
        finally:
            sender.cancel()

    def drop(self) -> int:
        """Abort every proxied connection now; returns how many (worker side)."""

        async def abort() -> int:
            writers = list(self._writers)
            for w in writers:
                w.transport.abort()
            return len(writers) // 2

        return asyncio.run_coroutine_threadsafe(abort(), self._loop).result(10)

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` child on a loopback port, append-only with ``fsync`` on every write, that
    can be stopped (``SHUTDOWN NOSAVE`` or SIGKILL) and started again on the same port and data."""

    def __init__(self, workdir: Path) -> None:
        if REDIS_SERVER is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.up = threading.Event()  # set while it serves

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log"), "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=2.0)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    break
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})") from None
                    time.sleep(0.01)  # an external process coming up: nothing to block on
        finally:
            client.close()
        self.up.set()

    def stop(self, how: str) -> None:
        """``shutdown`` (SHUTDOWN NOSAVE: the AOF is already on disk) or ``sigkill``."""
        self.up.clear()
        assert self.proc is not None
        if how == "sigkill":
            self.proc.kill()
        else:
            # No retries: redis-py would otherwise try SHUTDOWN again on the closed port for seconds.
            client = redis.Redis(port=self.port, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))
            with contextlib.suppress(redis.ConnectionError):
                client.shutdown(nosave=True)
            client.close()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


Entry = tuple[str, dict[str, str]]  # one entry of the event stream: id, fields


def entry_id(eid: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``, or ``ms``) as numbers, for comparing."""
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def merge_stream(
    recorded: Sequence[Entry], fetched: Sequence[Entry], since: tuple[int, int]
) -> tuple[list[Entry], list[Entry]]:
    """Match what the recorder read against a primary's stream: ``fetched``, its entries from id
    ``since`` on. Returns the record as that primary has it (the entries recorded before ``since``,
    then ``fetched``) and the recorded entries from ``since`` on that it does not have: writes of an
    earlier primary that no replica received before it was promoted (lost in the failover). An
    entry counts as the same by its id and its fields (two primaries can write one id)."""
    have = {(i, tuple(sorted(f.items()))) for i, f in fetched}
    kept = [e for e in recorded if entry_id(e[0]) < since]
    lost = [
        e for e in recorded if entry_id(e[0]) >= since and (e[0], tuple(sorted(e[1].items()))) not in have
    ]
    return kept + list(fetched), lost


def admin(port: int, timeout: float = 2.0) -> redis.Redis:
    """A client of one loopback server for the harness, without retries: a dead or frozen node fails
    the call at once or after ``timeout``."""
    return redis.Redis(
        port=port, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip


def call(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` (redis-py leaves it untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _fields(reply: Any) -> dict[str, str]:
    """A Sentinel reply's entry as a dict (RESP3 sends maps, RESP2 flat lists)."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {str(k): str(v) for k, v in pairs}


def _flags(entry: Mapping[str, str]) -> set[str]:
    return set(entry.get("flags", "").split(","))


class Sentinels:
    """The sentinel mode's deployment (:func:`topology.sentinel_group`: a primary, two replicas, three
    sentinels) and what the faults and the recorder ask of it. Each call opens its own short
    connections (the injector, the recorder and the end call from their own threads)."""

    def __init__(self, group: SentinelGroup) -> None:
        self.group = group
        #: what the workers and the reaper connect with
        self.url = f"{group.url}?{SENTINEL_OPTIONS}"
        # On loopback the sentinels find a primary down at the same moment, each asks for votes for
        # itself, and none is elected: the election is tried again 2 x failover-timeout (10 s)
        # later. Across hosts they drift apart; here each waits 300 ms longer than the last.
        for i, s in enumerate(group.sentinels):
            with contextlib.closing(admin(s.port)) as c:
                call(c, "SENTINEL", "SET", SERVICE, "down-after-milliseconds", str(SENTINEL_DOWN_MS[i % 3]))

    def named(self) -> tuple[str, int] | None:
        """The primary that the first sentinel to answer names, or None."""
        for s in self.group.sentinels:
            try:
                with contextlib.closing(admin(s.port)) as c:
                    reply = call(c, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except redis.RedisError:
                continue
            if reply:
                return str(reply[0]), int(reply[1])
        return None

    def settled(self) -> Node | str:
        """The primary, once the deployment has settled from the last failover: every sentinel names
        it and has no failover under way, it says it is master, and each other data node runs,
        replicates it with its link up and every sentinel sees it as a healthy replica. Else why not."""
        g = self.group
        named: set[tuple[str, int]] = set()
        try:
            for s in g.sentinels:
                with contextlib.closing(admin(s.port)) as c:
                    master = _fields(call(c, "SENTINEL", "MASTER", SERVICE))
                    replicas = [_fields(e) for e in call(c, "SENTINEL", "REPLICAS", SERVICE)]
                if _flags(master) != {"master"}:
                    return f"sentinel {s.port} flags the primary {master.get('flags')}"
                named.add((master["ip"], int(master["port"])))
                healthy = {(e["ip"], int(e["port"])) for e in replicas if _flags(e) == {"slave"}}
                want = {n.addr for n in g.data_nodes} - {(master["ip"], int(master["port"]))}
                if not want <= healthy:
                    return f"sentinel {s.port} sees healthy replicas {sorted(healthy)}, not {sorted(want)}"
            if len(named) != 1:
                return f"the sentinels name {sorted(named)}"
            primary = g.node_at(named.pop())
            for node in g.data_nodes:
                if not node.reachable:
                    return f"{node.port} is down or frozen"
                with contextlib.closing(admin(node.port)) as c:
                    info = c.info("replication")
                if node is primary:
                    if info.get("role") != "master":
                        return f"the named primary {node.port} is {info.get('role')}"
                elif (info.get("role"), int(info.get("master_port", 0)), info.get("master_link_status")) != (
                    "slave", primary.port, "up",
                ):  # fmt: skip
                    return f"{node.port} is {info.get('role')} of {info.get('master_port')}"
        except (redis.RedisError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return primary

    def promotion(self, old: Node) -> tuple[Node, int, str | None] | None:
        """Wait (:data:`PROMOTE_S` at most) until a data node other than ``old`` says (``ROLE``) it is
        a primary: returns it, when the harness saw it (CLOCK_MONOTONIC ns), and the id of its
        stream's last entry then, the last one it has from the old primary (no client knows the new
        primary before a sentinel names it, after reading its INFO: up to a second later)."""
        clients = [(n, admin(n.port, 0.5)) for n in self.group.data_nodes if n is not old and n.reachable]
        deadline = time.monotonic() + PROMOTE_S
        try:
            while time.monotonic() < deadline:
                for node, c in clients:
                    with contextlib.suppress(redis.RedisError):
                        if call(c, "ROLE")[0] == "master":
                            seen = mono_ns()
                            last = cast(list[Any], c.xrevrange(KEYS.events, "+", "-", count=1))
                            return node, seen, str(last[0][0]) if last else None
                time.sleep(0.01)  # polling another process's state: nothing to block on
        finally:
            for _, c in clients:
                c.close()
        return None

    def demote(self, old: Node, after: str | None) -> tuple[str, list[Entry]]:
        """Send ``old``, a primary that a failover left behind, ``REPLICAOF`` the primary the
        sentinels name (once they name another: up to a second after the promotion), as Sentinel
        does itself some 10 s after it is reachable again. Says who demoted it (``run``, or
        ``sentinel`` if it follows already), and returns what its stream had after entry id
        ``after`` (the new primary's last one from it) just before: what it wrote that the new
        primary never had, also what the recorder (following the primary the sentinels name) did not
        read. The read and ``REPLICAOF`` go in one pipeline: Redis runs them back to back."""
        deadline = time.monotonic() + PROMOTE_S
        while (named := self.named()) in (None, old.addr) and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the sentinels
        if not old.reachable or named is None or named == old.addr:
            return "not demoted: it is down, or still the primary", []
        with contextlib.closing(admin(old.port)) as c:
            if call(c, "ROLE")[0] != "master":
                return "sentinel", []
            pipe = c.pipeline(transaction=False)
            pipe.xrange(KEYS.events, "-" if after is None else f"({after}", "+")
            pipe.execute_command("REPLICAOF", named[0], str(named[1]))  # type: ignore[no-untyped-call]
            entries, _ = pipe.execute()
        old.role = "replica"
        return "run", [(str(i), dict(f)) for i, f in entries]

    def kill_pubsub(self) -> int:
        """CLIENT KILL TYPE pubsub on every data node that answers (a listener stays connected to a
        primary that became a replica)."""
        killed = 0
        for node in self.group.data_nodes:
            if node.reachable:
                with contextlib.suppress(redis.RedisError), contextlib.closing(admin(node.port)) as c:
                    killed += int(c.client_kill_filter(_type="pubsub"))
        return killed


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

#: A fault: applied to the run at a random moment with the injector's random source; returns what
#: it did (recorded with its kind and time), or None when it cannot apply now (tried again later).
FaultFn = Callable[["ChaosRun", random.Random], "dict[str, Any] | None"]


@dataclass(frozen=True)
class FaultKind:
    """A registered fault: its name (the ``--faults`` and report key), what applies it, its doc, and
    the ``--topology`` modes it applies to."""

    name: str
    apply: FaultFn
    doc: str
    topologies: tuple[str, ...] = TOPOLOGIES


#: Every fault kind the injector knows, by name. A new kind is one decorated function.
FAULTS: dict[str, FaultKind] = {}


def fault(name: str, *, topologies: tuple[str, ...] = TOPOLOGIES) -> Callable[[FaultFn], FaultFn]:
    def register(fn: FaultFn) -> FaultFn:
        FAULTS[name] = FaultKind(name, fn, (fn.__doc__ or "").strip(), topologies)
        return fn

    return register


def faults_for(topology: str) -> list[str]:
    """The fault kinds that apply to a ``--topology`` mode, sorted."""
    return sorted(k for k, f in FAULTS.items() if topology in f.topologies)


@fault("kill")
def kill_worker(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """SIGKILL a worker (stopped or not) and start a new one in its place."""
    slot = rng.choice(sorted(run.workers))
    proc = run.workers[slot]
    t = mono_ns()
    proc.kill()
    proc.wait(30)
    run.stopped.pop(proc.pid, None)
    run.spawn(slot)
    return {"t": t, "pid": proc.pid, "slot": slot}


@fault("stop")
def stop_worker(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """SIGSTOP a running worker for longer than the longest lease TTL, then SIGCONT it."""
    running = sorted(s for s, p in run.workers.items() if p.pid not in run.stopped)
    if len(running) < 2:
        return None
    slot = rng.choice(running)
    proc = run.workers[slot]
    pause = max(TTLS) + rng.uniform(0.3, 1.0)
    proc.send_signal(signal.SIGSTOP)
    run.stopped[proc.pid] = proc
    run.later(pause, lambda: run.resume(proc), f"SIGCONT {proc.pid}")
    return {"pid": proc.pid, "slot": slot, "pause_s": round(pause, 3)}


@fault("pubsub")
def kill_pubsub(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """CLIENT KILL TYPE pubsub: every eviction-notice listener loses its connection (in sentinel
    mode, on every data node)."""
    if run.sentinels is not None:
        return {"killed": run.sentinels.kill_pubsub()}
    try:
        killed = run.direct.client_kill_filter(_type="pubsub")
    except (redis.ConnectionError, redis.TimeoutError):
        return None  # Redis is restarting
    return {"killed": killed}


@fault("delay", topologies=("single",))
def delay_replies(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """The proxy holds every reply 50-800 ms for 0.5-2 s."""
    proxy = run.proxy
    assert proxy is not None
    ms = rng.randint(50, 800)
    span = rng.uniform(0.5, 2.0)
    proxy.delay_s = ms / 1000
    run.later(span, lambda: setattr(proxy, "delay_s", 0.0), "proxy pass")
    return {"ms": ms, "for_s": round(span, 3)}


@fault("drop", topologies=("single",))
def drop_connections(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """The proxy aborts every worker connection (requests and replies in flight are lost)."""
    assert run.proxy is not None
    return {"dropped": run.proxy.drop()}


@fault("restart", topologies=("single",))
def restart_redis(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """Stop Redis (SHUTDOWN NOSAVE or SIGKILL) and start it again on the same port and AOF."""
    assert run.server is not None
    how = rng.choice(("shutdown", "sigkill"))
    down = mono_ns()
    run.server.stop(how)
    run.server.start()
    return {"how": how, "down_ms": round((mono_ns() - down) / 1e6, 1)}


@fault("failover", topologies=("sentinel",))
def sentinel_failover(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """``SENTINEL FAILOVER``: a replica is promoted at once, and the old primary goes on as a
    primary (with the replica not moved yet) until it is told to follow the new one."""
    assert run.sentinels is not None
    old = run.sentinels.settled()
    if isinstance(old, str):
        return None  # still settling from the last failover
    t = mono_ns()
    try:
        with contextlib.closing(admin(rng.choice(run.sentinels.group.sentinels).port)) as c:
            call(c, "SENTINEL", "FAILOVER", SERVICE)
    except redis.RedisError:
        return None  # INPROG, NOGOODSLAVE: later
    return run.failed_over("failover", t, old, rng)


@fault("primary_kill", topologies=("sentinel",))
def kill_primary(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """SIGKILL the primary: the sentinels promote a replica after down-after; 0.3-1.5 s after the
    promotion the old primary starts again as a replica of the new one."""
    assert run.sentinels is not None
    old = run.sentinels.settled()
    if isinstance(old, str):
        return None
    t = mono_ns()
    run.sentinels.group.kill(old)
    return run.failed_over("primary_kill", t, old, rng)


@fault("primary_stop", topologies=("sentinel",))
def stop_primary(run: ChaosRun, rng: random.Random) -> dict[str, Any] | None:
    """SIGSTOP the primary until a replica is promoted, then SIGCONT it 0-1.2 s later: it wakes up a
    primary still (a partition that heals), with the clients that reached it meanwhile."""
    assert run.sentinels is not None
    old = run.sentinels.settled()
    if isinstance(old, str):
        return None
    t = mono_ns()
    run.sentinels.group.freeze(old)
    return run.failed_over("primary_stop", t, old, rng)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """Everything the checker judges, as plain data (``recording.json`` with ``--keep``).

    ``capacities``: device -> MiB leasable; ``events``: the pool's stream as ``[id, fields]``;
    ``histories``: every worker's records (see :class:`History`); ``faults``: what the injector
    did (``kind``, ``t`` ns, ...), where ``end_kill`` is a worker killed at the end because it did
    not stop; ``clock``: samples ``[CLOCK_MONOTONIC ns, Redis TIME ms]``; ``final_used``: the
    devices' ``used_mib`` after the pool drained; ``events_added``: how many entries the stream
    ever had (None: unknown); ``harness``: problems of the run itself (a worker that crashed, a
    pool that did not drain). Sentinel mode: ``events`` is the history that survived the failovers,
    ``lost_events`` the entries that the recorder, or the run just before it demoted a primary that
    a failover left behind, read there and that the last primary does not have (see
    :func:`merge_stream`), ``failovers`` one record per failover fault (``kind``, ``t``, ``old``
    and ``new`` primary ports, ``promoted_t`` ns, ``boundary``: the new primary's last entry id
    when promoted, and what followed: ``thawed_t``, ``restarted_t``, ``demoted`` and
    ``demoted_t``).
    """

    capacities: dict[str, int]
    events: list[tuple[str, dict[str, str]]]
    histories: list[dict[str, Any]]
    faults: list[dict[str, Any]] = field(default_factory=list)
    clock: list[tuple[int, float]] = field(default_factory=list)
    final_used: dict[str, int] | None = None
    events_added: int | None = None
    harness: list[str] = field(default_factory=list)
    seed: int = 0
    duration_s: float = 0.0
    workers: int = 0
    topology: str = "single"
    lost_events: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    failovers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Recording:
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["events"] = [(str(i), dict(f)) for i, f in doc["events"]]
        doc["lost_events"] = [(str(i), dict(f)) for i, f in doc.get("lost_events", [])]
        doc["clock"] = [(int(a), float(b)) for a, b in doc["clock"]]
        return cls(**doc)


class ChaosRun:
    """One chaos run: Redis (one server, or a Sentinel group), the proxy (one server only), the
    workers, the injector and the recorders."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.seed: int = args.seed
        self.workdir = workdir
        self.topology: str = args.topology
        self.devices = [f"gpu{i}" for i in range(args.devices)]
        applicable = faults_for(self.topology)
        self.kinds = applicable if args.faults == "all" else [k for k in args.faults.split(",") if k]
        unknown = set(self.kinds) - set(FAULTS) - {"none"}
        if unknown:
            raise SystemExit(f"unknown fault kinds: {sorted(unknown)} (known: {sorted(FAULTS)})")
        self.kinds = [k for k in self.kinds if k != "none"]
        if wrong := sorted(set(self.kinds) - set(applicable)):
            raise SystemExit(
                f"fault kinds {wrong} do not apply to --topology {self.topology} ({applicable} do)"
            )
        self.server: RedisServer | None = None
        self.proxy: Proxy | None = None
        self.sentinels: Sentinels | None = None
        self._stack = contextlib.ExitStack()  # the Sentinel group
        self.failovers: list[dict[str, Any]] = []
        self.lost_events: list[Entry] = []
        self.stale_events: list[Entry] = []  # read from primaries that failovers left behind
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.generation: dict[int, int] = defaultdict(int)
        self.stopped: dict[int, subprocess.Popen[bytes]] = {}
        self.exited: set[int] = set()
        self.faults: list[dict[str, Any]] = []
        self.harness: list[str] = []
        self.events: list[tuple[str, dict[str, str]]] = []
        self.clock: list[tuple[int, float]] = []
        self.reaped = 0
        self._pending: list[tuple[int, Callable[[], None], str]] = []
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self.hard_end_ns = 0

    # --- set-up and tear-down --------------------------------------------------------------

    def start(self) -> None:
        if self.topology == "sentinel":
            group = self._stack.enter_context(sentinel_group(self.workdir / "sentinel", 2, 3, SERVICE))
            self.sentinels = Sentinels(group)
            #: the primary the sentinels name, for the harness (drain, figures): no confirmation
            self.direct = group.client(socket_timeout=5.0)
            self.worker_url = self.admin_url = self.sentinels.url
        else:
            self.server = RedisServer(self.workdir)
            self.server.start()
            self.direct = redis.Redis(port=self.server.port, decode_responses=True, socket_timeout=5.0)
            self.proxy = Proxy(self.server.port)
            self.worker_url = f"redis://127.0.0.1:{self.proxy.port}/0"
            self.admin_url = self.server.url
        boss = connect_boss(self.admin_url, "chaos-main")
        for name in self.devices:
            boss.add_device(name, DEVICE_MIB, pool=POOL, cuda_index=self.devices.index(name))
        boss.close()
        for target, name in ((self._record_events, "chaos-events"), (self._reap, "chaos-reaper")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        # Workers stop by themselves this long after the run should have ended (if it died).
        self.hard_end_ns = mono_ns() + secs_to_ns(self.args.duration + 120)
        for slot in range(self.args.workers):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        self.generation[slot] += 1
        gen = self.generation[slot]
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--url", self.worker_url,
               "--out", str(self.workdir / f"history-s{slot}-g{gen}.jsonl"), "--slot", str(slot),
               "--seed", str(self.seed * 1_000_003 + slot * 1009 + gen), "--devices", ",".join(self.devices),
               "--capacity", str(DEVICE_MIB), "--until-ns", str(self.hard_end_ns)]  # fmt: skip
        if self.args.breaks and slot == 0 and gen == 1:
            cmd += ["--break", self.args.breaks]
        with open(self.workdir / f"worker-s{slot}-g{gen}.log", "wb") as log:
            self.workers[slot] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def resume(self, proc: subprocess.Popen[bytes]) -> None:
        if self.stopped.pop(proc.pid, None) is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def later(self, after_s: float, action: Callable[[], None], what: str) -> None:
        self._pending.append((mono_ns() + secs_to_ns(after_s), action, what))

    def _run_due(self, now: int, everything: bool = False) -> None:
        due = [p for p in self._pending if everything or p[0] <= now]
        self._pending = [p for p in self._pending if p not in due]
        for _, action, _what in sorted(due, key=lambda p: p[0]):
            action()

    def failed_over(self, kind: str, t: int, old: Node, rng: random.Random) -> dict[str, Any]:
        """After a failover fault on the primary ``old`` at ``t``: wait for a replica's promotion,
        record the failover, and schedule what follows its kind (the old primary restarted, thawed,
        demoted). Returns the fault's record."""
        assert self.sentinels is not None
        sentinels = self.sentinels
        got = sentinels.promotion(old)
        info: dict[str, Any] = {"kind": kind, "t": t, "old": old.port, "new": None}
        self.failovers.append(info)
        if got is None:
            self.harness.append(f"{kind} at {t}: no replica was promoted within {PROMOTE_S} s")
        else:
            new, seen, boundary = got
            info |= {"new": new.port, "promoted_t": seen, "boundary": boundary}

        def demote() -> None:
            info["demoted"], entries = sentinels.demote(old, info.get("boundary"))
            info["demoted_t"] = mono_ns()
            self.stale_events += entries

        def thaw() -> None:
            sentinels.group.thaw(old)
            info["thawed_t"] = mono_ns()

        def restart() -> None:
            try:
                sentinels.group.restart(old)
            except (RuntimeError, TimeoutError, redis.RedisError) as exc:
                self.harness.append(f"{kind}: the old primary {old.port} did not rejoin: {exc}")
            info["restarted_t"] = mono_ns()

        if kind == "primary_kill":
            self.later(rng.uniform(0.3, 1.5), restart, f"restart {old.port}")
        elif kind == "primary_stop":
            thaw_in = 0.0 if got is None else rng.uniform(0.0, 1.2)
            self.later(thaw_in, thaw, f"SIGCONT {old.port}")
            self.later(thaw_in + rng.uniform(1.5, 3.0), demote, f"demote {old.port}")
        else:
            self.later(rng.uniform(1.5, 3.0), demote, f"demote {old.port}")
        promoted = None if got is None else round((got[1] - t) / 1e6, 1)
        return {"old": old.port, "new": info["new"], "promoted_ms": promoted}

    def settle(self) -> None:
        """Sentinel mode: wait until the deployment has settled (see :meth:`Sentinels.settled`)."""
        assert self.sentinels is not None
        deadline = time.monotonic() + 60
        while isinstance(why := self.sentinels.settled(), str):
            if time.monotonic() > deadline:
                self.harness.append(f"the Sentinel group did not settle: {why}")
                return
            time.sleep(0.05)  # polling other processes' state

    def _watch_workers(self) -> None:
        """A worker that exited without being killed crashed: note it and start another."""
        for slot, proc in list(self.workers.items()):
            if proc.poll() is not None and proc.pid not in self.exited:
                self.exited.add(proc.pid)
                log = self.workdir / f"worker-s{slot}-g{self.generation[slot]}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.harness.append(f"worker s{slot} pid {proc.pid} exited {proc.returncode}: {tail}")
                self.spawn(slot)

    # --- the injector ------------------------------------------------------------------------

    def inject(self) -> None:
        """Apply faults at seeded random moments until the run's time is up. The first faults go
        round every kind once (in a random order), so that every kind happens in a short run; a kind
        of that round that cannot apply yet (a failover while the last one settles) goes to its end."""
        rng = random.Random(self.seed)
        kinds = list(self.kinds)
        first = rng.sample(kinds, len(kinds))
        span = min(2.0, 0.7 * self.args.duration / max(1, len(kinds)))
        start = mono_ns()
        end = start + secs_to_ns(self.args.duration)
        next_at = start + secs_to_ns(rng.uniform(0.5, 1.0) * span)
        pace = threading.Event()  # never set: the injector's random waits are the workload
        while (now := mono_ns()) < end:
            self._run_due(now)
            self._watch_workers()
            if kinds and now >= next_at:
                kind = first[0] if first else rng.choice(kinds)
                t = mono_ns()
                done = FAULTS[kind].apply(self, rng)
                if done is not None:
                    self.faults.append({"kind": kind, "t": t} | done)
                    if first:
                        first.pop(0)
                    next_at = mono_ns() + secs_to_ns(rng.uniform(0.5, 1.0) * span)
                else:
                    if first:
                        first.append(first.pop(0))
                    next_at = mono_ns() + secs_to_ns(0.2)
            wake = min(
                [next_at if kinds else end, end, now + secs_to_ns(0.1)] + [p[0] for p in self._pending]
            )
            pace.wait(max(0.0, (wake - mono_ns()) / 1e9))
        if first:
            self.harness.append(f"fault kinds never injected: {first}")

    # --- background: events, reaping, clock --------------------------------------------------

    def _primary(self) -> tuple[str, int] | None:
        """Where the primary is: the one server, or the one a sentinel names (None: none does)."""
        if self.sentinels is not None:
            return self.sentinels.named()
        assert self.server is not None
        return "127.0.0.1", self.server.port

    def _record_events(self) -> None:
        """Read the pool's event stream as it grows (the stream is capped: nothing may be missed),
        from the primary; in sentinel mode, on each (re)connection, first match the record against
        the stream of the primary it reaches (a failover may have left entries behind)."""
        r: redis.Redis | None = None
        at: tuple[str, int] | None = None
        last = "0-0"
        while not self._done.is_set():
            try:
                addr = self._primary()
                if addr is None:
                    raise redis.ConnectionError("no sentinel names a primary")
                if r is None or addr != at:
                    if r is not None:
                        r.close()
                    r, at = admin(addr[1], 5.0), addr
                    if self.sentinels is not None and self.events:
                        since = entry_id(self.events[-1][0])[0] - RECONCILE_MS
                        last = self._reconcile(r, str(max(0, since)))
                got = cast(list[Any], r.xread({KEYS.events: last}, count=1000, block=200) or [])
            except (
                redis.ConnectionError,
                redis.TimeoutError,
                redis.BusyLoadingError,
                redis.ResponseError,
            ) as exc:
                if isinstance(exc, redis.ResponseError) and not str(exc).startswith("UNBLOCKED"):
                    raise  # UNBLOCKED: the node it read from was demoted while it blocked there
                if r is not None:
                    r.close()
                r = None
                if self.server is not None:
                    self.server.up.wait(1.0)
                self._done.wait(0.05)  # back off while Redis restarts or fails over
                continue
            for _key, entries in got:
                for eid, fields in entries:
                    self.events.append((str(eid), dict(fields)))
                    last = str(eid)
        if r is not None:
            r.close()

    def _reconcile(self, r: redis.Redis, since: str) -> str:
        """Match the record against ``r``'s stream from ``since`` (an id, or ``-``) on; see
        :func:`merge_stream`. Returns the id to read on from."""
        fetched = [(str(i), dict(f)) for i, f in cast(list[Any], r.xrange(KEYS.events, since, "+"))]
        first = fetched[0][0] if fetched else "0-0"  # "-": the whole stream, as far as its cap kept it
        self.events, lost = merge_stream(self.events, fetched, entry_id(first if since == "-" else since))
        self.lost_events += lost
        return self.events[-1][0] if self.events else "0-0"

    def _reap(self) -> None:
        """What the boss service's reaper does: reap now and then; also sample Redis's clock."""
        boss = connect_boss(self.admin_url, "chaos-reaper", socket_timeout=2.0)
        while not self._done.wait(REAP_EVERY_S):
            with contextlib.suppress(GpubossError):
                self.reaped += boss.reap(POOL)
            self.sample_clock(boss.redis)
        boss.close()

    def sample_clock(self, r: redis.Redis) -> None:
        """One sample of (CLOCK_MONOTONIC ns, Redis TIME ms), kept if the round trip was short."""
        try:
            t0 = mono_ns()
            sec, usec = r.time()
            t1 = mono_ns()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return
        if t1 - t0 < 2_000_000:
            self.clock.append(((t0 + t1) // 2, int(sec) * 1000 + int(usec) / 1000))

    # --- the end -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Resume and stop the workers, let every lease end, and catch up with the event stream."""
        self._run_due(mono_ns(), everything=True)  # SIGCONT the stopped, the proxy passes, ...
        if self.proxy is not None:
            self.proxy.delay_s = 0.0
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for slot, proc in self.workers.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.faults.append({"kind": "end_kill", "t": mono_ns(), "pid": proc.pid, "slot": slot})
                proc.kill()
                proc.wait(30)
            # -SIGTERM: terminated before it set its handler (a replacement just started).
            if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM) and proc.pid not in self.exited:
                log = self.workdir / f"worker-s{slot}-g{self.generation[slot]}.log"
                self.harness.append(f"worker s{slot} exited {proc.returncode}: {log.read_text()[-2000:]}")
        if self.sentinels is not None:
            self.settle()  # the old primaries restarted, thawed and demoted: one primary again
        self.drain()
        for _ in range(5):
            self.sample_clock(self.direct)
        self._done.set()
        for t in self._threads:
            t.join(30)
        if self.sentinels is not None:
            self._reconcile(self.direct, "-")  # the history that survived: the last primary's
            survived = {(i, tuple(sorted(f.items()))) for i, f in [*self.events, *self.lost_events]}
            stale = {(i, tuple(sorted(f.items()))): (i, f) for i, f in self.stale_events}
            self.lost_events += [e for k, e in stale.items() if k not in survived]
            self.lost_events.sort(key=lambda e: entry_id(e[0]))
        else:
            last = self.events[-1][0] if self.events else "0-0"
            tail = cast(list[tuple[str, dict[str, str]]], self.direct.xrange(KEYS.events, f"({last}", "+"))
            self.events += [(str(i), dict(f)) for i, f in tail]
        info = self.direct.xinfo_stream(KEYS.events)
        self.events_added = int(info["entries-added"]) if "entries-added" in info else None
        boss = Boss(self.direct, holder="chaos-main")
        self.final_used = {d.name: d.used_mib for d in boss.devices(POOL)}

    def drain(self) -> None:
        """Reap until no lease or waiter is left (each ends within its TTL or grace)."""
        boss = Boss(self.direct, holder="chaos-main")
        deadline = time.monotonic() + max(TTLS) + max(GRACES) + 15
        while True:
            with contextlib.suppress(BackendUnavailable):
                boss.reap(POOL)
                live = boss.leases(POOL)
                if not live:
                    return
                sec, usec = self.direct.time()
                now_ms = int(sec) * 1000 + int(usec) // 1000
                soonest = min((x.expires_at_ms or now_ms) for x in live) - now_ms
                # Until the next event, or until the soonest expiry is due for reaping.
                self.direct.xread({KEYS.events: "$"}, block=int(min(500, max(5, soonest + 5))))
            if time.monotonic() > deadline:
                self.harness.append(f"the pool did not drain: {[x.id for x in boss.leases(POOL)]}")
                return

    def close(self) -> None:
        self._done.set()
        for proc in self.workers.values():
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(30)
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()
        if self.server is not None:
            self.server.close()
        self._stack.close()  # stops the Sentinel group (SIGCONT first)

    def recording(self) -> Recording:
        histories: list[dict[str, Any]] = []
        for path in sorted(self.workdir.glob("history-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    histories.append(json.loads(line))
        return Recording(
            capacities=dict.fromkeys(self.devices, DEVICE_MIB),
            events=self.events,
            histories=histories,
            faults=self.faults,
            clock=self.clock,
            final_used=self.final_used,
            events_added=self.events_added,
            harness=self.harness,
            seed=self.seed,
            duration_s=self.args.duration,
            workers=self.args.workers,
            topology=self.topology,
            lost_events=self.lost_events,
            failovers=self.failovers,
        )


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One broken rule. ``cause``, where the checker can tell, says which mechanism broke it (for
    ``fence`` and ``capacity_holders``): ``revoked_unheard``: revoked at its eviction deadline
    before its holder had heard of the eviction (no ``evict_notice`` before the revocation);
    ``evict_fence``: revoked although the holder had heard, so the client's eviction fence was
    late; ``ttl_fence``: expired while the holder's local TTL deadline was still ahead;
    For ``error_tree``: ``idle_busy_not_lost``: ``lease.idle()`` or ``busy()`` raised LeaseNotFound
    or LeaseNotHeld (not LeaseLost, and the lease not marked lost); ``unblocked_not_retryable``: Redis's
    ``UNBLOCKED`` (a blocked ``WAIT`` or ``BLPOP`` on a primary being demoted) came as a ProtocolError.
    ``lost_in_failover`` (also for ``history``): the holder was told of a grant that only a primary
    a failover left behind had written (an entry of ``lost_events``; the new primary may grant the
    same waiter again later, even with the same token), or its lease expired while
    its local deadline was still ahead and the renewal that set that deadline was seen while such
    a primary still took writes (a renewal lost with it); otherwise how the lease ended."""

    kind: str
    message: str
    cause: str = ""


@dataclass
class Verdict:
    violations: list[Violation]
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(v.kind for v in self.violations).items()))


class ClockMap:
    """CLOCK_MONOTONIC ns -> Redis ms, interpolated between samples (identity without any)."""

    def __init__(self, samples: Sequence[tuple[int, float]]) -> None:
        pts = sorted(samples)
        self._ns = [a for a, _ in pts]
        self._off = [b - a / 1e6 for a, b in pts]

    def ms(self, ns: int) -> float:
        if not self._ns:
            return ns / 1e6
        i = bisect.bisect_left(self._ns, ns)
        if i == 0:
            off = self._off[0]
        elif i == len(self._ns):
            off = self._off[-1]
        else:
            a, b = self._ns[i - 1], self._ns[i]
            off = self._off[i - 1] + (self._off[i] - self._off[i - 1]) * (ns - a) / (b - a)
        return ns / 1e6 + off


@dataclass
class _Grant:
    lease: str
    ms: int
    device: str
    mib: int
    token: int
    priority: int
    holder: str
    state: str = "active"  # active, idle, evicting
    deadline: int | None = None  # eviction deadline, Redis ms
    end_ms: int | None = None
    end: str | None = None


@dataclass
class _Wait:
    id: str
    mib: int
    priority: int
    want: str
    order: int
    ms: int


@dataclass
class _Eviction:
    victim: str
    ms: int
    deadline: int
    requester: str
    end_ms: int | None = None
    end: str | None = None


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _dist(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99), "max": max(values)}


def check(rec: Recording) -> Verdict:
    """Judge a run: returns every violation (by kind) and the figures. Pure: no I/O.

    Server side, replaying the event stream in order (Redis appends each event inside the atomic
    script that makes the change, so the stream is the pool's history):

    - ``capacity_server``: at every grant, the MiB granted on the device and not yet ended (by
      ``released``, ``expired``, ``revoked``, ``force_released``) stay within its budget (from its
      ``device_added`` event, else ``capacities``); after the drain they match the devices'
      ``used_mib`` (``final_used``).
    - ``token``: fencing tokens strictly increase in grant order across the pool.
    - ``terminal``: every queued or granted id reaches exactly one terminal event, and no event
      names it afterwards, with one exception from ``acquire.lua``: a waiter that was ``abandoned``
      (it stopped polling) asks anew under the same id when it polls again, and may queue again or
      be granted at once (it was never granted before, so this is no double grant); a held
      lease ends as released/expired/revoked/force_released with the device and MiB it was granted,
      a waiter as cancelled/abandoned/force_released; ``revoked`` only for an evicting lease and not
      before its eviction deadline.
    - ``double_grant``: an id is granted at most once (workers retry with the same request id).
    - ``eviction`` (the unambiguous parts of the README's Eviction section): a victim is a live lease
      on the device the event names, not already evicting; an *active* victim was requested
      ``preemptible`` and has strictly lower priority than the request it makes room for (an *idle*
      victim may have any priority: the last resort); the request is waiting (queued, not granted
      or ended) and gets one promise at most; its device is not held back by a waiter ahead of it
      (see ``queue_order``); and the victims make it fit: budget - used + their MiB >= its MiB.
    - ``promise``: memory promised to a request whose victims unload is nobody else's: at every
      grant of lease x on device d, used(d) after the grant + every promise on d other than x's own
      <= budget(d). A promise (the request's MiB on the eviction's device) lasts from its first
      ``evicting`` event until the request is granted or ends.
    - ``queue_order`` (README: no barging): a lease x granted on device d had no waiter ahead of it
      that could use d (wants d or any device, fits d's budget) and holds back (has no promise),
      unless x was granted memory promised to x itself. Ahead: higher priority, or the same priority
      and queued earlier; for x granted without queueing, any waiter of priority >= x's.

    Holder side, from the workers' histories:

    - ``history``: every ``ok`` matches a ``granted`` event of the same id with the same token,
      device and MiB, on the device the request named (if it named one); no request id is ok'ed
      twice; every belief is closed (``held``), or its process was killed (it ends at the kill).
      In sentinel mode the events are the history that survived the failovers: an ``ok`` whose
      grant a failover left behind (in ``lost_events``) breaks this rule, with that cause.
    - ``fence`` (the client's promise, README "Safety model"): a holder believes it holds a lease
      from when ``acquire`` returned (``held.from``) until it released it, noticed it lost or
      evicted, or until the client's own fence passed, whichever came first: ``held.until`` =
      min(noticed, the lease's local deadline, its eviction fence, on_evict finished unloading);
      for a killed process, the kill. That belief must lie within the server's life of the lease:
      from its ``granted`` event to its terminal event, within :data:`TOLERANCE_MS` (events have ms
      resolution and the monotonic -> Redis clock mapping is sampled). The slack allowed is exactly
      the lag between the client's fence and the worker noticing (its 10 ms unit of work, or a
      SIGSTOP): the README asks holders to check ``lease.lost`` between units of work, and says a
      paused process cannot be fenced; nothing else is allowed. The client's fence itself must be
      right: the TTL's margin (20%, at most 2 s) before expiry, and the grace's before revocation.
    - ``capacity_holders``: at no moment do the beliefs of the holders on one device add up past its
      budget.
    - ``error_tree``: no exception that the client does not document reached a worker: one outside
      gpuboss's error tree, or one where the README promises another (``lease.idle()`` and
      ``busy()`` raise LeaseEvicted or LeaseLost for a lease that is no longer held).

    Run: ``events_incomplete`` (the stream had entries the recorder did not see), ``harness``
    (a worker crashed, the pool did not drain, a fault kind was never injected).
    """
    return _Checker(rec).run()


class _Checker:
    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.clock = ClockMap(rec.clock)
        self.violations: list[Violation] = []
        self.caps: dict[str, int] = dict(rec.capacities)
        self.used: dict[str, int] = defaultdict(int)
        self.live: dict[str, _Grant] = {}
        self.grants: dict[str, _Grant] = {}
        self.waiting: dict[str, _Wait] = {}
        self.promises: dict[str, tuple[str, int]] = {}
        self.ended: dict[str, str] = {}
        self.evictions: list[_Eviction] = []
        self.evicting: dict[str, _Eviction] = {}
        self.last_token: int | None = None
        self.requests: dict[str, dict[str, Any]] = {}
        self.notices: dict[str, int] = {}  # rid -> when its holder heard of its eviction (ns)
        # rid -> cause, for beliefs that outlived their lease or that the surviving history lacks
        self.fenced: dict[str, str] = {}
        self.renewals: dict[str, list[int]] = defaultdict(list)  # rid -> when its holder saw renewals
        for r in rec.histories:
            if r.get("k") == "invoke":
                self.requests[r["rid"]] = r["req"]
            elif r.get("k") == "evict_notice":
                self.notices.setdefault(r["rid"], int(r["t"]))
            elif r.get("k") == "renewed":
                self.renewals[r["rid"]].append(int(r["t"]))
        # While a primary that a failover left behind took writes (ns): after a planned failover from
        # the promotion, after a SIGSTOP from the SIGCONT, until the old primary was demoted.
        self.left_behind: list[tuple[int, int, str]] = []
        for f in rec.failovers:
            begin = {"failover": f.get("promoted_t"), "primary_stop": f.get("thawed_t")}.get(str(f["kind"]))
            if begin is not None:
                self.left_behind.append((int(begin), int(f.get("demoted_t") or 2**63), str(f["kind"])))

    def bad(self, kind: str, message: str, cause: str = "") -> None:
        self.violations.append(Violation(kind, message, cause))

    def run(self) -> Verdict:
        self.replay()
        beliefs = self.histories()
        self.holder_capacity(beliefs)
        for problem in self.rec.harness:
            self.bad("harness", problem)
        if self.rec.events_added is not None and self.rec.events_added != len(self.rec.events):
            self.bad(
                "events_incomplete",
                f"the stream had {self.rec.events_added} entries, {len(self.rec.events)} were recorded",
            )
        return Verdict(self.violations, self.figures(beliefs))

    # --- the server's view -------------------------------------------------------------------

    def replay(self) -> None:
        events = self.rec.events
        i = 0
        while i < len(events):
            entry_id, f = events[i]
            ev, lid = f.get("event", "?"), f.get("lease", "")
            ms = int(entry_id.split("-")[0])
            at = f"{entry_id} {ev} {lid}".rstrip()
            if ev == "evicting":
                j = i
                while (
                    j < len(events)
                    and events[j][1].get("event") == "evicting"
                    and (events[j][1].get("for") == f.get("for"))
                ):
                    j += 1
                self.on_evicting(events[i:j])
                i = j
                continue
            i += 1
            if ev in ("device_added", "device_updated"):
                self.caps[f["device"]] = int(f["total_mib"]) - int(f.get("reserved_mib", 0))
            elif ev == "queued":
                self.on_queued(at, lid, f, ms, i)
            elif ev == "granted":
                self.on_granted(at, lid, f, ms)
            elif ev in ("idle", "busy"):
                g = self.live.get(lid)
                if g is None:
                    self.bad("terminal", f"{at}: for a lease that is not live")
                elif g.state != "evicting":
                    g.state = "idle" if ev == "idle" else "active"
            elif ev in TERMINAL:
                self.on_terminal(at, lid, f, ms, ev)
        for lid in sorted(self.live):
            self.bad("terminal", f"lease {lid} never ended (no terminal event)")
        for lid in sorted(self.waiting):
            self.bad("terminal", f"waiter {lid} never ended (no terminal event)")
        if self.rec.final_used is not None:
            replayed = {d: self.used.get(d, 0) for d in self.rec.final_used}
            if replayed != self.rec.final_used:
                self.bad("capacity_server", f"devices' used_mib {self.rec.final_used} != replayed {replayed}")

    def after_end(self, at: str, lid: str) -> bool:
        if lid in self.ended:
            self.bad("terminal", f"{at}: after the id had ended ({self.ended[lid]})")
            return True
        return False

    def on_queued(self, at: str, lid: str, f: Mapping[str, str], ms: int, order: int) -> None:
        if lid in self.waiting or lid in self.live:
            self.bad("terminal", f"{at}: queued while it waits or holds already")
            return
        if lid in self.grants:
            self.bad("terminal", f"{at}: queued after it was granted")
            return
        if self.ended.get(lid) == "abandoned":
            del self.ended[lid]  # it stopped polling and lost its place: it asks anew (acquire.lua)
        elif self.after_end(at, lid):
            return
        want = f.get("want", "")
        self.waiting[lid] = _Wait(lid, int(f["mib"]), int(f["priority"]), want, order, ms)

    def blockers(self, priority: int, order: int | None, device: str, exclude: str) -> list[str]:
        """Waiters ahead of a request (priority, and queue order or None for a new request) that
        could use ``device`` and hold it back (no promise of their own)."""
        out = []
        for w in self.waiting.values():
            if w.id == exclude or w.id in self.promises:
                continue
            ahead = (
                w.priority > priority or (w.priority == priority and w.order < order)
                if order is not None
                else w.priority >= priority
            )
            if ahead and w.want in ("", device) and w.mib <= self.caps.get(device, 0):
                out.append(w.id)
        return sorted(out)

    def on_granted(self, at: str, lid: str, f: Mapping[str, str], ms: int) -> None:
        dev, mib, token, prio = f["device"], int(f["mib"]), int(f["token"]), int(f["priority"])
        if lid in self.grants:
            self.bad("double_grant", f"{at}: granted again (first with token {self.grants[lid].token})")
        elif self.ended.get(lid) == "abandoned":
            del self.ended[lid]  # an abandoned waiter that asks anew may be granted at once
        else:
            self.after_end(at, lid)
        if self.last_token is not None and token <= self.last_token:
            self.bad("token", f"{at}: token {token} after token {self.last_token}")
        self.last_token = token if self.last_token is None else max(self.last_token, token)
        wait = self.waiting.pop(lid, None)
        if wait is not None and wait.want not in ("", dev):
            self.bad("queue_order", f"{at}: granted on {dev}, it asked for {wait.want}")
        own = self.promises.get(lid)
        if own is None or own[0] != dev:
            ahead = self.blockers(prio, None if wait is None else wait.order, dev, lid)
            if ahead:
                self.bad(
                    "queue_order", f"{at}: granted on {dev} at priority {prio} while {ahead} waited ahead"
                )
        promised = sum(m for r, (d, m) in self.promises.items() if d == dev and r != lid)
        cap = self.caps.get(dev, 0)
        if self.used[dev] + mib + promised > cap and self.used[dev] + mib <= cap:
            self.bad(
                "promise",
                f"{at}: {mib} MiB on {dev} with {self.used[dev]} used takes memory promised to waiters "
                f"({promised} MiB; budget {cap})",
            )
        self.used[dev] += mib
        if self.used[dev] > cap:
            self.bad("capacity_server", f"{at}: {self.used[dev]} MiB granted on {dev}, budget {cap}")
        self.promises.pop(lid, None)
        grant = _Grant(lid, ms, dev, mib, token, prio, f.get("holder", ""))
        self.grants.setdefault(lid, grant)
        self.live[lid] = grant

    def on_evicting(self, group: Sequence[tuple[str, dict[str, str]]]) -> None:
        entry_id, f0 = group[0]
        rid, dev = f0.get("for", ""), f0.get("device", "")
        at = f"{entry_id} evicting for {rid} on {dev}"
        r = self.waiting.get(rid)
        freed = 0
        for eid, f in group:
            vid = f.get("lease", "")
            v = self.live.get(vid)
            if v is None:
                self.bad("eviction", f"{eid} evicting {vid}: not a live lease")
                continue
            if v.device != dev or f.get("device") != dev:
                self.bad("eviction", f"{eid} evicting {vid}: it holds {v.device}, the eviction is on {dev}")
            if v.state == "evicting":
                self.bad("eviction", f"{eid} evicting {vid}: it is being evicted already")
            elif v.state == "active" and r is not None:
                req = self.requests.get(vid)
                if req is not None and not req.get("preemptible"):
                    self.bad("eviction", f"{eid} evicting {vid}: active and not preemptible")
                if v.priority >= r.priority:
                    self.bad(
                        "eviction",
                        f"{eid} evicting {vid}: active at priority {v.priority} for {rid} at {r.priority}",
                    )
            v.state = "evicting"
            v.deadline = int(f["deadline"])
            freed += v.mib
            ev = _Eviction(vid, int(eid.split("-")[0]), v.deadline, rid)
            self.evictions.append(ev)
            self.evicting[vid] = ev
        if r is None:
            self.bad("eviction", f"{at}: the request is not waiting")
            return
        if rid in self.promises:
            self.bad("eviction", f"{at}: the request has a promise already ({self.promises[rid]})")
        ahead = self.blockers(r.priority, r.order, dev, rid)
        if ahead:
            self.bad("eviction", f"{at}: {ahead} wait ahead of it for {dev}")
        cap = self.caps.get(dev, 0)
        if cap - self.used[dev] + freed < r.mib:
            self.bad(
                "eviction",
                f"{at}: victims free {freed} MiB, {cap - self.used[dev]} free, it needs {r.mib}",
            )
        self.promises[rid] = (dev, r.mib)

    def on_terminal(self, at: str, lid: str, f: Mapping[str, str], ms: int, ev: str) -> None:
        g = self.live.pop(lid, None)
        if g is not None:
            if ev not in ENDS_HELD:
                self.bad("terminal", f"{at}: a held lease cannot end {ev}")
            if (f.get("device"), int(f.get("mib", -1))) != (g.device, g.mib):
                self.bad(
                    "terminal", f"{at}: ended as {f.get('device')}/{f.get('mib')}, granted {g.device}/{g.mib}"
                )
            if ev == "revoked" and (g.deadline is None or ms < g.deadline):
                self.bad("eviction", f"{at}: revoked before its eviction deadline {g.deadline}")
            self.used[g.device] -= g.mib
            g.end_ms, g.end = ms, ev
            evicted = self.evicting.pop(lid, None)
            if evicted is not None:
                evicted.end_ms, evicted.end = ms, ev
            self.ended[lid] = ev
            return
        w = self.waiting.pop(lid, None)
        if w is not None:
            if ev not in ENDS_WAITING:
                self.bad("terminal", f"{at}: a waiter cannot end {ev}")
            self.promises.pop(lid, None)
            self.ended[lid] = ev
            return
        if lid in self.ended:
            self.bad("terminal", f"{at}: a second terminal event (it ended {self.ended[lid]})")
        else:
            self.bad("terminal", f"{at}: ends an id that never queued nor was granted")

    # --- the holders' view -------------------------------------------------------------------

    def histories(self) -> list[dict[str, Any]]:
        """Check each ok against the stream and build the beliefs: ``{lease, device, mib, from,
        until, why, pid}`` (ns)."""
        kills: dict[int, int] = {}
        for x in self.rec.faults:
            if x.get("kind") in ("kill", "end_kill"):
                kills[int(x["pid"])] = int(x["t"])
        oks: dict[str, list[dict[str, Any]]] = defaultdict(list)
        helds: dict[str, dict[str, Any]] = {}
        for r in self.rec.histories:
            k = r.get("k")
            if k == "ok":
                oks[r["rid"]].append(r)
            elif k == "held":
                helds[r["rid"]] = r
            elif k == "error":
                error = str(r["error"])
                cause = (
                    "idle_busy_not_lost"
                    if error.startswith(("LeaseNotFound(", "LeaseNotHeld("))
                    else "unblocked_not_retryable"
                    if "UNBLOCKED" in error
                    else ""
                )
                self.bad("error_tree", f"pid {r['pid']} {r['rid']}: {error}", cause)
        # grants a failover left behind: (lease, token) -> the lost entry's id
        lost = {
            (f.get("lease"), f.get("token")): i
            for i, f in self.rec.lost_events
            if f.get("event") == "granted"
        }
        beliefs: list[dict[str, Any]] = []
        for rid, got in sorted(oks.items()):
            if len(got) > 1:
                self.bad("double_grant", f"{rid}: the holder was granted it {len(got)} times")
            ok = got[0]
            g = self.grants.get(ok["lease"])
            left = lost.get((ok["lease"], str(ok["token"])))
            why = "" if left is None else f" (granted in lost entry {left}: a failover left it behind)"
            cause = "" if left is None else "lost_in_failover"
            if cause and (g is None or g.token != ok["token"]):
                self.fenced[rid] = cause
            if g is None:
                self.bad(
                    "history",
                    f"{rid}: pid {ok['pid']} holds lease {ok['lease']}, which was never granted{why}",
                    cause,
                )
            elif (g.token, g.device, g.mib) != (ok["token"], ok["device"], ok["mib"]):
                self.bad(
                    "history",
                    f"{rid}: the holder got token {ok['token']} on {ok['device']} for {ok['mib']} MiB, "
                    f"the stream granted token {g.token} on {g.device} for {g.mib} MiB{why}",
                    cause,
                )
            req = self.requests.get(rid)
            if req is not None and req.get("device") not in (None, ok["device"]):
                self.bad("history", f"{rid}: asked for {req['device']}, got {ok['device']}")
            held = helds.get(rid)
            if held is not None:
                until, why = int(held["until"]), str(held["why"])
            elif ok["pid"] in kills and kills[ok["pid"]] >= ok["t"]:
                until, why = kills[ok["pid"]], "killed"
            else:
                self.bad("history", f"{rid}: pid {ok['pid']} never closed its belief in lease {ok['lease']}")
                until, why = 2**63, "open"
            belief = {"rid": rid, "lease": ok["lease"], "device": ok["device"], "mib": ok["mib"]}
            belief |= {"from": int(ok["t"]), "until": until, "why": why, "pid": ok["pid"]}
            beliefs.append(belief)
            if g is not None and until > belief["from"]:
                self.fence(belief, g, left)
        return beliefs

    def fence(self, belief: Mapping[str, Any], g: _Grant, left: str | None = None) -> None:
        """``left``: the id of a lost ``granted`` entry of the belief's lease and token, if any."""
        start, end = self.clock.ms(belief["from"]), self.clock.ms(belief["until"])
        rid = belief["rid"]
        if start + TOLERANCE_MS < g.ms:
            if left is None:
                self.bad("fence", f"{rid}: believed from {start:.1f}, granted only at {g.ms} (Redis ms)")
            else:  # a failover lost the grant the holder was told of; the new primary granted it later
                self.fenced[rid] = "lost_in_failover"
                self.bad(
                    "fence",
                    f"{rid}: believed from {start:.1f}, granted only at {g.ms} (Redis ms): the grant it was "
                    f"told of is lost entry {left} (a failover left it behind), this is another",
                    "lost_in_failover",
                )
        if g.end_ms is not None and end > g.end_ms + 1 + TOLERANCE_MS:
            cause = str(g.end)
            if g.end == "revoked":
                heard = self.notices.get(rid)
                cause = (
                    "evict_fence"
                    if heard is not None and self.clock.ms(heard) <= g.end_ms
                    else "revoked_unheard"
                )
            elif g.end == "expired":
                cause = "ttl_fence"
                seen = [t for t in self.renewals.get(rid, ()) if t <= belief["until"]]
                windows = [w for w in self.left_behind if seen and w[0] <= seen[-1] <= w[1]]
                if windows:  # its deadline came from a renewal that a left-behind primary confirmed
                    cause = "lost_in_failover"
            self.fenced[rid] = cause
            self.bad(
                "fence",
                f"{rid}: pid {belief['pid']} believed it held {g.lease} ({g.mib} MiB on {g.device}) until "
                f"{end:.1f}, {end - g.end_ms:.1f} ms after the server ended it ({g.end} at {g.end_ms}; "
                f"ended {belief['why']}; cause {cause})",
                cause,
            )

    def holder_capacity(self, beliefs: Sequence[Mapping[str, Any]]) -> None:
        by_device: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
        for b in beliefs:
            if b["until"] > b["from"]:
                by_device[b["device"]] += [
                    (b["from"], 1, b["mib"], b["rid"]),
                    (b["until"], 0, -b["mib"], b["rid"]),
                ]
        for dev, points in sorted(by_device.items()):
            cap = self.caps.get(dev, 0)
            total, holders, over = 0, set(), False
            for t, _start, delta, rid in sorted(points):  # at equal times, ends before starts
                total += delta
                if delta > 0:
                    holders.add(rid)
                else:
                    holders.discard(rid)
                if total > cap and not over:
                    causes = sorted({self.fenced[h] for h in holders if h in self.fenced})
                    self.bad(
                        "capacity_holders",
                        f"{dev} at {self.clock.ms(t):.1f} (Redis ms): holders {sorted(holders)} believe "
                        f"they hold {total} MiB, budget {cap}"
                        + (f" (beliefs past their lease's end or lost: {causes})" if causes else ""),
                        ",".join(causes),
                    )
                over = total > cap

    # --- figures -----------------------------------------------------------------------------

    def figures(self, beliefs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rec = self.rec
        kinds = Counter(str(r.get("k")) for r in rec.histories)
        fails = Counter(str(r["code"]) for r in rec.histories if r.get("k") == "fail")
        whys = Counter(str(b["why"]) for b in beliefs)
        events = Counter(f.get("event", "?") for _, f in rec.events)
        faults = Counter(str(x["kind"]) for x in rec.faults if x.get("kind") != "end_kill")
        reclaim: list[float] = []
        for x in rec.faults:
            if x.get("kind") != "kill":
                continue
            kill_ms = self.clock.ms(int(x["t"]))
            suffix = f"-p{x['pid']}"
            for g in self.grants.values():
                if (
                    g.holder.endswith(suffix)
                    and g.ms <= kill_ms
                    and g.end_ms is not None
                    and g.end_ms >= kill_ms
                ):
                    reclaim.append(round(g.end_ms - kill_ms, 1))
        to_end = [float(e.end_ms - e.ms) for e in self.evictions if e.end_ms is not None]
        margin = [float(e.deadline - e.end_ms) for e in self.evictions if e.end_ms is not None]
        notices = {r["rid"]: r for r in rec.histories if r.get("k") == "evict_notice"}
        notice_ms = [
            round(self.clock.ms(int(notices[e.victim]["t"])) - e.ms, 1)
            for e in self.evictions
            if e.victim in notices
        ]
        lag = [
            round((int(h["noticed"]) - int(h["until"])) / 1e6, 1)
            for h in rec.histories
            if h.get("k") == "held" and h.get("why") == "lost"
        ]
        return {
            "seed": rec.seed,
            "duration_s": rec.duration_s,
            "workers": rec.workers,
            "topology": rec.topology,
            "devices": dict(sorted(self.caps.items())),
            "events": len(rec.events),
            "attempts": kinds["invoke"],
            "grants": events["granted"],
            "held_by_workers": len(beliefs),
            "belief_ends": dict(sorted(whys.items())),
            "fails": dict(sorted(fails.items())),
            "retries": kinds["retry"],
            "server_ends": {k: events[k] for k in sorted(TERMINAL) if events[k]},
            "evictions": len(self.evictions),
            "faults": dict(sorted(faults.items())),
            "violations": dict(sorted(Counter(v.kind for v in self.violations).items())),
            "reclaim_after_kill_ms": _dist(reclaim),
            "eviction_notice_to_end_ms": _dist(to_end),
            "eviction_end_before_deadline_ms": {
                "n": len(margin),
                "min": min(margin) if margin else None,
                "p50": _pct(margin, 50) if margin else None,
            },
            "eviction_revoked": sum(1 for e in self.evictions if e.end == "revoked"),
            "eviction_notice_delay_ms": _dist(notice_ms),
            "lost_noticed_after_fence_ms": _dist(lag),
        } | self.failover_figures()

    def failover_figures(self) -> dict[str, Any]:
        """Per failover kind: how many, fault -> promotion (the harness saw the new primary's ROLE
        turn master), fault -> the first grant on the new primary (the first ``granted`` entry of
        the surviving history after the new primary's last entry from the old one), in ms; and the
        entries failovers left behind, by event."""
        grants = [
            (entry_id(i), int(i.split("-")[0])) for i, f in self.rec.events if f.get("event") == "granted"
        ]
        kinds = sorted({str(f["kind"]) for f in self.rec.failovers})
        promoted: dict[str, list[float]] = {k: [] for k in kinds}
        to_grant: dict[str, list[float]] = {k: [] for k in kinds}
        for f in self.rec.failovers:
            kind, t = str(f["kind"]), int(f["t"])
            if f.get("promoted_t") is not None:
                promoted[kind].append(round((int(f["promoted_t"]) - t) / 1e6, 1))
            if f.get("boundary") is not None:
                after = entry_id(str(f["boundary"]))
                first = next((ms for eid, ms in grants if eid > after), None)
                if first is not None:
                    to_grant[kind].append(round(first - self.clock.ms(t), 1))
        lost = Counter(f.get("event", "?") for _, f in self.rec.lost_events)
        return {
            "failovers": dict(sorted(Counter(str(f["kind"]) for f in self.rec.failovers).items())),
            "failover_to_promotion_ms": {k: _dist(v) for k, v in promoted.items()},
            "failover_to_grant_ms": {k: _dist(v) for k, v in to_grant.items()},
            "lost_in_failover": dict(sorted(lost.items())),
        }


# --------------------------------------------------------------------------------------------
# The report and the command line
# --------------------------------------------------------------------------------------------


def _fmt(d: Mapping[str, Any]) -> str:
    if not d.get("n"):
        return "n=0"
    return " ".join(f"{k}={v}" for k, v in d.items())


def report(verdict: Verdict) -> str:
    """The figures and violations as lines for a human."""
    f = verdict.figures
    lines = [
        f"chaos run: seed {f['seed']}, {f['duration_s']} s, {f['workers']} workers, devices {f['devices']}",
        f"  events {f['events']}; attempts {f['attempts']}; grants {f['grants']}; held by workers "
        f"{f['held_by_workers']} (ends: {f['belief_ends']}); retries {f['retries']}",
        f"  acquire failures: {f['fails']}",
        f"  server ends: {f['server_ends']}",
        f"  faults injected: {f['faults']}",
        f"  reclaim after kill -9 (kill -> lease end, ms): {_fmt(f['reclaim_after_kill_ms'])}",
        f"  evictions {f['evictions']}, revoked {f['eviction_revoked']}; notice -> end (ms): "
        f"{_fmt(f['eviction_notice_to_end_ms'])}; end before deadline (ms): "
        f"{_fmt(f['eviction_end_before_deadline_ms'])}; holder heard it after (ms): "
        f"{_fmt(f['eviction_notice_delay_ms'])}",
        f"  lost leases noticed after the client's fence (ms): {_fmt(f['lost_noticed_after_fence_ms'])}",
    ]
    if f.get("topology", "single") != "single":
        lines.append(f"  topology: {f['topology']}; failovers: {f['failovers']}")
        for kind in f["failovers"]:
            lines.append(
                f"    {kind}: fault -> promotion (ms): {_fmt(f['failover_to_promotion_ms'][kind])}; "
                f"fault -> first grant on the new primary (ms): {_fmt(f['failover_to_grant_ms'][kind])}"
            )
        lines.append(f"  stream entries a failover left behind: {f['lost_in_failover'] or 'none'}")
    lines.append(f"  violations: {verdict.by_kind() or 'none'}")
    for v in verdict.violations[:30]:
        lines.append(f"    [{v.kind}{'/' + v.cause if v.cause else ''}] {v.message}")
    if len(verdict.violations) > 30:
        lines.append(f"    ... and {len(verdict.violations) - 30} more")
    return "\n".join(lines)


def run_chaos(args: argparse.Namespace) -> Recording:
    """Run the chaos (start, inject for ``--duration`` s, finish) and return what it recorded."""
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(args.keep)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuboss-chaos-")))
        run = ChaosRun(args, workdir)
        try:
            run.start()
            run.inject()
            run.finish()
        finally:
            run.close()
        rec = run.recording()
        if args.keep:
            (workdir / "recording.json").write_text(json.dumps(asdict(rec)), encoding="utf-8")
        return rec


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults and work")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument(
        "--topology", choices=TOPOLOGIES, default="single",
        help="one redis-server behind a proxy, or a primary, two replicas and three sentinels",
    )  # fmt: skip
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--json", help="write the figures and violations here")
    p.add_argument("--keep", help="keep histories, logs and recording.json in this directory")
    p.add_argument("--faults", default="all", help=f"comma-separated kinds of {sorted(FAULTS)}, or none")
    p.add_argument("--break", dest="breaks", choices=("over-grant",), help="test only: break a worker")
    p.add_argument("--check", help="judge this recording.json instead of running")
    args = p.parse_args(argv)
    if time.get_clock_info("monotonic").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        raise SystemExit("needs time.monotonic() to be CLOCK_MONOTONIC (Linux)")
    rec = Recording.load(Path(args.check)) if args.check else run_chaos(args)
    verdict = check(rec)
    print(report(verdict), flush=True)
    if args.json:
        doc = verdict.figures | {"violation_list": [asdict(v) for v in verdict.violations]}
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
