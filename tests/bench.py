"""Benchmark: gpuboss leases next to redis-py ``Lock`` and python-redis-lock, in one run.

Run it as ``.venv/bin/python tests/bench.py`` (``--quick`` for a smoke run, ``--json PATH`` to keep
the numbers, ``--sections 2,9`` for some of them). It starts its own ``redis-server`` on a free
loopback port in a temporary directory and measures, section by section:

1. uncontended acquire + release pairs from one client process: pairs/s, per-pair latency p50/p99,
   and where the time goes: client CPU (``process_time``), server main-thread CPU (``INFO cpu``)
   and time inside scripts (``INFO commandstats``), per pair. Beside them the floor under a gpuboss
   pair: the same Redis commands (checked: the same ones, as many) from two functions that compute
   nothing, called from the thinnest client;
2. hand-off under contention: 8 processes loop acquire (blocking) / hold / release on one lock, or
   on one device that fits one lease at a time. Hand-off latency is the time from just before a
   release to the return of the next holder's acquire, on the system-wide monotonic clock; fairness
   is the number of turns each process got (min/max and Jain's index). redis-py's Lock polls while
   it waits (every 0.1 s by default), so it runs twice: as shipped, and polling every 1 ms. Beside
   them the floor any Redis-based queue can reach: a list holding one token, acquire ``BLPOP``,
   release ``RPUSH`` (Redis serves blocked ``BLPOP`` clients in order);
3. uncontended pairs again with 10 .. 100,000 other live leases in the pool (other live lock keys
   for the locks), to show whether the cost stays flat;
4. eviction latency (gpuboss alone: the locks have no eviction): a holder process keeps a
   low-priority lease idle on a device that fits one lease, with an ``on_evict`` that returns at
   once (the client then releases the lease); this process asks for the whole device at high
   priority, round after round. It reports the time from the acquire call to the start of the
   holder's ``on_evict`` (notice over pub/sub) and to the requester holding the memory, on the
   system-wide monotonic clock. Between rounds it releases, and the holder, queued meanwhile, is
   granted and idles again; the two processes take turns over a pipe, never by sleeping;
5. the same uncontended pairs over HTTP: the service's app (``gpuboss.api.create_app``, what
   ``gpuboss serve`` runs) under uvicorn in its own process on a free loopback port, against this
   run's redis-server, driven by one keep-alive ``httpx.Client`` (POST /v1/leases with
   ``timeout_s`` 0, then POST /v1/leases/{id}/release), interleaved with the direct client and
   the locks on the same Redis. It adds the service process's CPU per pair (``/proc``), and the
   floor under it: the same two requests answered by a bare ASGI app (no Redis, no framework)
   under the same uvicorn, what any Python HTTP service costs here;
6. the heartbeat worker: one client holds N leases (1 MiB each, TTL 3 s, so its one background
   worker renews each once a second) and sits idle for a fixed window, after 1.5 beat intervals
   of warm-up (every lease has beaten once). It reports the heartbeats Redis ran per second
   (``INFO commandstats``: nothing else runs scripts meanwhile), the worker thread's CPU per wall
   second (its own CPU clock, read from the main thread; ``/proc/self/task/<tid>/stat`` beside
   it, in clock ticks) and per beat, and redis-server's main-thread CPU per second and per beat;
7. the gated proxy's overhead per request against calling a stand-in engine directly;
8. what confirming writes on replicas costs: this run's redis-server gets two replicas, and pairs
   run with ``confirm_replicas`` 0, 1 and 2 (``WAIT`` after every state-changing script);
9. saturation: 2 .. 16 processes run uncontended pairs flat out (gpuboss: each its own pool, leases
   without keepalive; redis-py Lock: each its own key) to find the ceiling in pairs/s, with
   redis-server's CPU over each window (``INFO cpu``) and per-pair latency from every process; then
   open loop at 50, 80 and 100 % of the ceiling, each process starting its pairs on a fixed
   timetable and measuring from the scheduled start (no coordinated omission). Where the clients
   run out of CPU before Redis does (two CPUs: the clients share one), it says so and projects
   pairs per second of Redis CPU: what one Redis core would serve.

The locks get a 10 s expiry (a lease's default TTL until it became 3 s; kept so that runs
compare). Uncontended runs are split into rounds
that alternate between contenders, so that noise from other work on the machine falls on all of
them alike. With at least two CPUs, redis-server is pinned to one and every client process to
another; the HTTP service shares redis-server's CPU, as it would sit beside Redis.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, cast

import httpx
import redis
import redis_lock  # type: ignore[import-untyped]
import uvicorn

from gpuboss_client import AcquireTimeout, Boss, Confirm, Lease
from gpuboss_client.keys import PoolKeys
from gpuboss_client.scripts import script_shas, source

GPUBOSS = "gpuboss"
GPUBOSS_SCRIPTS = "gpuboss, scripts"  # the verbs as EVALSHA, where a server has no functions
COMMANDS_FLOOR = "floor: a pair's commands"  # the Redis commands of a gpuboss pair, no logic, no client
REDIS_PY = "redis-py Lock"
REDIS_PY_FAST = "redis-py Lock sleep=0.001"
PRLOCK = "python-redis-lock"
HTTP = "gpuboss over HTTP"
HTTP_FLOOR = "bare ASGI app, same HTTP"
UNCONTENDED = (GPUBOSS, REDIS_PY, PRLOCK)
BLPOP_FLOOR = "BLPOP hand-off"
CONTENDED = (GPUBOSS, REDIS_PY, REDIS_PY_FAST, PRLOCK, BLPOP_FLOOR)
SATURATED = (GPUBOSS, REDIS_PY)
LOCK_EXPIRE_S = 10  # as a lease's default TTL was (now 3 s); kept so that runs compare
HANDOFF_MIB = 1024  # the hand-off device fits exactly one lease of this size
FLOOR_KEY = "bench:floor:token"  # the BLPOP floor's list: one token, held by one process at a time
FLOOR_TOKEN = "token"
FLOOR_WAIT_S = 30  # bound on one BLPOP (a hand-off takes milliseconds)
LIVE_DEVICE_MIB = 16 * 1024 * 1024  # room for every live lease plus the measured one
EVICT_MIB = 1024  # the eviction device fits exactly one lease of this size
EVICT_WAIT_S = 30  # bound on every step of an eviction round (each takes milliseconds)
HTTP_MIB = 1024  # what each HTTP pair (and the direct pair beside it) leases
SERVE_WAIT_S = 30  # bound on the HTTP service's start
HEARTBEAT_MIB = 1  # what each lease of the heartbeat section holds
HEARTBEAT_TTL_S = 3.0  # the worker renews a lease every third of its TTL: once a second
HEARTBEAT_THREAD = "gpuboss-heartbeats"  # the name of Boss's heartbeat worker thread
SAT_MIB = 1  # what each saturation pair leases, on a device of its own pool
SAT_LEVELS = (50, 80, 100)  # open-loop load, % of the ceiling
SAT_WARMUP = 50  # pairs each saturation process runs before its first window
SAT_SAMPLES = 50_000  # latencies a saturation process sends back per window, at most (evenly strided)
SAT_SATURATED_PCT = 80.0  # redis-server main-thread CPU at the ceiling below this: not saturated
SAT_WAIT_S = 30  # bound on a saturation process's start and on its reply, beyond the window


def mono_ns() -> int:
    """System-wide monotonic time: comparable across processes, unlike perf_counter."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def pct(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def jain(counts: list[int]) -> float:
    """Jain's fairness index: 1.0 when every process got the same number of turns."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else 0.0


# --- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (a running redis-server has several)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


@contextlib.contextmanager
def redis_server(server_cpu: int | None, *extra: str) -> Iterator[str]:
    """A private redis-server on a free loopback port, without persistence (``extra``: more
    command-line options, e.g. ``--replicaof host port``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="gpuboss-bench-") as workdir:
        port = free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        try:
            probe = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"redis-server did not start (exit {proc.poll()})")
                    time.sleep(0.02)  # waiting for an external process to listen
            probe.close()
            if server_cpu is not None:
                pin_process(proc.pid, server_cpu)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def server_cpu_us(client: redis.Redis) -> float:
    """CPU time of the server's main thread so far (commands, Lua and socket I/O), in µs."""
    cpu: dict[str, float] = client.info("cpu")
    user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    sys_ = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
    return (float(user) + float(sys_)) * 1e6


def lua_usec(client: redis.Redis) -> int:
    """Microseconds spent running scripts and functions since the last CONFIG RESETSTAT.

    Commands that scripts call are counted again under their own names, so only EVAL/EVALSHA/FCALL
    are summed here: the time inside scripts, redis.call included."""
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    names = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")
    return sum(int(v["usec"]) for k, v in stats.items() if k in names)


def script_calls(client: redis.Redis) -> int:
    """Scripts run since the last CONFIG RESETSTAT (EVAL, EVALSHA and FCALL calls)."""
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    names = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")
    return sum(int(v["calls"]) for k, v in stats.items() if k in names)


# --- one acquire + release pair per contender ------------------------------------------------

Pair = Callable[[], None]


def gpuboss_pair(
    client: redis.Redis,
    pool: str,
    mib: int = 1,
    confirm: Confirm | None = None,
    keepalive: bool = True,
    functions: bool = True,
) -> Pair:
    """``keepalive`` False: the lease is never handed to the heartbeat worker (no thread, no wake-up).
    ``functions`` False: the verbs run as scripts (EVALSHA), as on a server without functions."""
    boss = Boss(client, holder="bench", confirm=confirm, functions=functions)

    def pair() -> None:
        lease = boss.acquire(mib, pool=pool, timeout=0, keepalive=keepalive)
        boss.release(lease)

    return pair


#: The floor under a gpuboss pair: the Redis commands an uncontended acquire and release make (the
#: same keys, fields and events), from two functions that compute nothing. What a gpuboss pair costs
#: above it is the verbs' logic and the client's; what it costs above a lock is the data model.
FLOOR_LIBRARY = """#!lua name=bench_floor
-- What both verbs read first: the clock, what expired, the lease.
local function start(keys, args)
  local prefix, id = keys[1], args[1]
  local lease = prefix .. 'lease:' .. id
  redis.call('HGET', keys[7], 'clock_ms')
  local now = redis.call('TIME')[1] .. '000'
  redis.call('ZRANGEBYSCORE', keys[4], '-inf', now, 'LIMIT', 0, 64)
  redis.call('HGETALL', lease)
  return prefix, id, lease, prefix .. 'device:gpu0', now
end
redis.register_function('bench_floor_acquire', function(keys, args)
  local prefix, id, lease, device, now = start(keys, args)
  redis.call('SMEMBERS', keys[2])
  redis.call('HMGET', device, 'total_mib', 'reserved_mib', 'unmanaged_mib', 'used_mib', 'cuda_index',
             'host', 'claimed_mib', 'exclusive')
  redis.call('ZRANGEBYSCORE', keys[3], '-inf', '(55000000000000', 'LIMIT', 0, 64)
  local token = redis.call('INCR', keys[6])
  redis.call('HINCRBY', device, 'used_mib', 1)
  redis.call('SADD', device .. ':leases', id)
  redis.call('HSET', lease, 'state', 'active', 'device', 'gpu0', 'token', token, 'granted_at', now,
             'used_at', now, 'expires_at', now, 'cuda_index', '0', 'device_host', 'host', 'holder',
             'bench', 'holder_host', 'host', 'holder_pid', '1', 'mib', '1', 'priority', '50', 'want', '',
             'ttl_ms', '3000', 'requested_at', now)
  redis.call('ZADD', keys[4], now, id)
  redis.call('HSET', prefix .. 'leases', id, 'bench host:1 1MiB gpu0 active granted=' .. now)
  redis.call('XADD', keys[5], 'MAXLEN', '~', '10000', '*', 'event', 'granted', 'lease', id, 'holder',
             'bench', 'device', 'gpu0', 'mib', '1', 'priority', '50', 'token', token)
  return {'granted', 'now', now, 'token', token}
end)
redis.register_function('bench_floor_release', function(keys, args)
  local prefix, id, lease, device, now = start(keys, args)
  redis.call('HINCRBY', device, 'used_mib', -1)
  redis.call('SREM', device .. ':leases', id)
  redis.call('HDEL', prefix .. 'leases', id)
  redis.call('ZREM', keys[4], id)
  redis.call('HSET', lease, 'state', 'released', 'ended_at', now, 'reason', '')
  redis.call('PEXPIRE', lease, 120000)
  redis.call('XADD', keys[5], 'MAXLEN', '~', '10000', '*', 'event', 'released', 'lease', id, 'holder',
             'bench', 'mib', '1', 'device', 'gpu0')
  redis.call('ZRANGEBYSCORE', keys[3], '-inf', '+inf', 'LIMIT', 0, 64)
  return {'released', 'now', now}
end)
"""


def floor_pair(client: redis.Redis, pool: str) -> Pair:
    """The commands of a gpuboss pair without its logic (:data:`FLOOR_LIBRARY`), from the thinnest
    client: one ``FCALL`` each, replies unparsed."""
    client.function_load(FLOOR_LIBRARY, replace=True)
    keys = PoolKeys(pool).script_keys()
    ids = (f"floor-{i}" for i in itertools.count())
    fcall = client.fcall

    def pair() -> None:
        lease_id = next(ids)
        fcall("bench_floor_acquire", len(keys), *keys, lease_id)
        fcall("bench_floor_release", len(keys), *keys, lease_id)

    return pair


def redis_py_pair(client: redis.Redis, name: str) -> Pair:
    lock = client.lock(name, timeout=LOCK_EXPIRE_S)

    def pair() -> None:
        if not lock.acquire(blocking=False):
            raise RuntimeError(f"{name} is held")
        lock.release()

    return pair


def prlock_pair(client: redis.Redis, name: str) -> Pair:
    lock = redis_lock.Lock(client, name, expire=LOCK_EXPIRE_S)

    def pair() -> None:
        if not lock.acquire(blocking=False):
            raise RuntimeError(f"{name} is held")
        lock.release()

    return pair


@dataclass
class PairStats:
    pairs: int = 0
    elapsed_ns: int = 0
    client_cpu_ns: int = 0
    server_cpu_us: float = 0.0
    lua_us: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    boss_cpu_ns: int | None = None  # CPU of the HTTP service's process, where one runs

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_ns)
        out = {
            "pairs": self.pairs,
            "pairs_per_s": self.pairs / (self.elapsed_ns / 1e9),
            "mean_us": self.elapsed_ns / self.pairs / 1e3,
            "p50_us": pct(lat, 0.50) / 1e3,
            "p99_us": pct(lat, 0.99) / 1e3,
            "client_cpu_us_per_pair": self.client_cpu_ns / self.pairs / 1e3,
            "server_cpu_us_per_pair": self.server_cpu_us / self.pairs,
            "lua_us_per_pair": self.lua_us / self.pairs,
        }
        if self.boss_cpu_ns is not None:
            out["boss_cpu_us_per_pair"] = self.boss_cpu_ns / self.pairs / 1e3
        return out


def process_cpu_ns(pid: int | str, tid: int | None = None) -> int:
    """CPU time (user + system, every thread) of another process so far, from /proc, in ns; with
    ``tid``, of that one thread (``pid`` "self" for a thread of this process). Clock-tick resolution."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def time_pairs(
    pair: Pair, n: int, client: redis.Redis, stats: PairStats, boss_pid: int | None = None
) -> None:
    client.config_resetstat()
    cpu_before = server_cpu_us(client)
    boss_before = process_cpu_ns(boss_pid) if boss_pid is not None else 0
    lat = [0] * n
    clock = time.perf_counter_ns
    cpu_start = time.process_time_ns()
    start = clock()
    for i in range(n):
        t = clock()
        pair()
        lat[i] = clock() - t
    stats.elapsed_ns += clock() - start
    stats.client_cpu_ns += time.process_time_ns() - cpu_start
    stats.server_cpu_us += server_cpu_us(client) - cpu_before
    stats.lua_us += lua_usec(client)
    if boss_pid is not None:
        stats.boss_cpu_ns = (stats.boss_cpu_ns or 0) + process_cpu_ns(boss_pid) - boss_before
    stats.pairs += n
    stats.latencies_ns += lat


def interleaved(
    pairs: dict[str, Pair],
    n: int,
    rounds: int,
    warmup: int,
    client: redis.Redis,
    boss_pid: int | None = None,
    own_pid: dict[str, int] | None = None,
) -> dict[str, PairStats]:
    """``n`` pairs per contender, in ``rounds`` chunks that alternate between contenders.

    With ``boss_pid``, every contender's stats also count that process's CPU while it ran; a
    contender in ``own_pid`` counts that process's instead."""
    for pair in pairs.values():
        for _ in range(warmup):
            pair()
    stats = {name: PairStats() for name in pairs}
    chunk = max(1, n // rounds)
    done = 0
    while done < n:
        step = min(chunk, n - done)
        for name, pair in pairs.items():
            time_pairs(pair, step, client, stats[name], (own_pid or {}).get(name, boss_pid))
        done += step
    return stats


# --- hand-off under contention ---------------------------------------------------------------


def spin_until(t_ns: int) -> None:
    while mono_ns() < t_ns:
        pass


def contender(kind: str, url: str, hold_ns: int, conn: Connection) -> None:
    """One contending process: acquire (blocking), hold ``hold_ns`` busy, release, until told stop."""
    client = connect(url)
    acquire: Callable[[], object]
    release: Callable[[object], None]
    if kind == GPUBOSS:
        boss = Boss(client, holder=f"bench-{os.getpid()}")

        def acquire() -> object:
            return boss.acquire(HANDOFF_MIB, pool="handoff", timeout=None)

        def release(held: object) -> None:
            boss.release(held)  # type: ignore[arg-type]

    elif kind in (REDIS_PY, REDIS_PY_FAST):
        lock = client.lock(
            "bench:handoff", timeout=LOCK_EXPIRE_S, sleep=0.001 if kind == REDIS_PY_FAST else 0.1
        )

        def acquire() -> object:
            if not lock.acquire(blocking=True):
                raise RuntimeError("blocking acquire returned False")
            return lock

        def release(held: object) -> None:
            lock.release()

    elif kind == BLPOP_FLOOR:
        # The token list holds one element: whoever popped it holds; pushing it back wakes the
        # longest-blocked BLPOP client, which pops it in the same step.

        def acquire() -> object:
            got = cast("list[str] | None", client.blpop([FLOOR_KEY], timeout=FLOOR_WAIT_S))
            if got is None:
                raise RuntimeError(f"BLPOP {FLOOR_KEY} timed out")
            return got[1]

        def release(held: object) -> None:
            client.rpush(FLOOR_KEY, cast(str, held))

    else:
        plock = redis_lock.Lock(client, "bench-handoff", expire=LOCK_EXPIRE_S)

        def acquire() -> object:
            if not plock.acquire(blocking=True):
                raise RuntimeError("blocking acquire returned False")
            return plock

        def release(held: object) -> None:
            plock.release()

    client.ping()
    conn.send("ready")
    stop_at: int = conn.recv()
    turns: list[tuple[int, int]] = []
    while True:
        held = acquire()
        acquired = mono_ns()
        spin_until(acquired + hold_ns)
        released = mono_ns()
        release(held)
        turns.append((acquired, released))
        if released >= stop_at:
            break
    conn.send(turns)
    client.close()


@dataclass
class HandoffStats:
    processes: int
    turns: list[int]
    handoffs_ns: list[int]
    switches: int
    overlaps: int

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.handoffs_ns)
        return {
            "processes": self.processes,
            "turns_total": sum(self.turns),
            "turns_per_process": self.turns,
            "turns_min": min(self.turns),
            "turns_max": max(self.turns),
            "jain": jain(self.turns),
            "handoffs": len(lat),
            "switch_pct": 100.0 * self.switches / max(1, len(lat)),
            "p50_us": pct(lat, 0.50) / 1e3 if lat else float("nan"),
            "p99_us": pct(lat, 0.99) / 1e3 if lat else float("nan"),
            "overlaps": self.overlaps,
        }


def analyse(per_process: list[list[tuple[int, int]]]) -> HandoffStats:
    """Pair each acquisition with the latest release before it; count overlapping holds."""
    turns = sorted((a, r, p) for p, ts in enumerate(per_process) for a, r in ts)
    releases = [r for _, r, _ in sorted(turns, key=lambda t: t[1])]
    owner = {r: p for _, r, p in turns}
    handoffs: list[int] = []
    switches = 0
    for acquired, _, proc in turns:
        i = bisect.bisect_left(releases, acquired) - 1
        if i >= 0:
            handoffs.append(acquired - releases[i])
            switches += owner[releases[i]] != proc
    # Mutual exclusion: each hold must start after the previous one ended.
    overlaps = sum(1 for prev, cur in itertools.pairwise(turns) if cur[0] < prev[1])
    return HandoffStats(len(per_process), [len(ts) for ts in per_process], handoffs, switches, overlaps)


def run_contended(kind: str, url: str, processes: int, duration_s: float, hold_ns: int) -> HandoffStats:
    ctx = multiprocessing.get_context("fork")
    conns: list[Connection] = []
    procs = []
    for _ in range(processes):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=contender, args=(kind, url, hold_ns, there), daemon=True)
        proc.start()
        there.close()
        conns.append(here)
        procs.append(proc)
    try:
        for c in conns:
            if not c.poll(30) or c.recv() != "ready":
                raise RuntimeError(f"a {kind} contender did not start")
        stop_at = mono_ns() + int(duration_s * 1e9)
        for c in conns:
            c.send(stop_at)
        results: list[list[tuple[int, int]]] = []
        for c in conns:
            # A polling lock can leave a waiter asleep for its poll interval after the deadline.
            if not c.poll(duration_s + 30):
                raise RuntimeError(f"a {kind} contender did not finish")
            results.append(c.recv())
        for p in procs:
            p.join(10)
            if p.exitcode != 0:
                raise RuntimeError(f"a {kind} contender exited with {p.exitcode}")
        return analyse(results)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


# --- live leases and live locks --------------------------------------------------------------


def add_live_leases(boss: Boss, client: redis.Redis, pool: str, start: int, stop: int) -> None:
    """Grant leases ``start`` .. ``stop - 1`` (1 MiB, 1 h TTL) through the acquire script, pipelined."""
    script = client.register_script(source("acquire"))  # pipelined: EVALSHA loads it once
    keys = PoolKeys(pool).script_keys()
    host, pid = socket.gethostname(), os.getpid()
    batch = 2000
    for lo in range(start, stop, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(stop, lo + batch)):
            script(
                keys=keys,
                args=[f"live-{i}", "bench-live", host, pid, 1, 50, "", 3_600_000, "{}", 0],
                client=pipe,
            )
        for reply in pipe.execute():
            if reply[0] != "granted":
                raise RuntimeError(f"live lease not granted: {reply!r}")


def add_live_locks(client: redis.Redis, start: int, stop: int) -> None:
    """Other held locks in the keyspace, named like python-redis-lock names its keys."""
    batch = 5000
    for lo in range(start, stop, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(stop, lo + batch)):
            pipe.set(f"lock:other-{i}", "held", ex=3600)
        pipe.execute()


# --- eviction --------------------------------------------------------------------------------


def evict_holder(url: str, rounds: int, conn: Connection) -> None:
    """The holder of the eviction section: ``rounds`` times, lease the whole device at low priority
    (waiting while the benchmark holds it), mark the lease idle and say ``idle``; its ``on_evict``
    notes when it starts and says ``evicted``, and the client then releases the lease."""
    client = connect(url)
    boss = Boss(client, holder=f"bench-idle-{os.getpid()}")
    evicted = threading.Event()

    def on_evict(lease: Lease) -> None:
        started = mono_ns()
        conn.send(("evicted", started))  # the main thread is not sending: it waits on `evicted`
        evicted.set()

    for _ in range(rounds):
        lease = boss.acquire(EVICT_MIB, priority="low", pool="evict", timeout=EVICT_WAIT_S, on_evict=on_evict)
        boss.idle(lease)
        conn.send(("idle", mono_ns()))
        if not evicted.wait(EVICT_WAIT_S):
            raise RuntimeError(f"lease {lease.id} was not evicted")
        evicted.clear()
    conn.recv()  # "stop": the benchmark holds the last round's memory, so the last release is done
    boss.close()


def expect(conn: Connection, tag: str) -> int:
    if not conn.poll(EVICT_WAIT_S):
        raise RuntimeError(f"the eviction holder did not say {tag!r}")
    got, value = conn.recv()
    if got != tag:
        raise RuntimeError(f"the eviction holder said {got!r}, not {tag!r}")
    return int(value)


@dataclass
class EvictStats:
    to_callback_ns: list[int]
    to_holding_ns: list[int]
    evicting: int
    revoked: int

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rounds": len(self.to_holding_ns)}
        for name, values in (("to_callback", self.to_callback_ns), ("to_holding", self.to_holding_ns)):
            lat = sorted(values)
            out[name] = {
                "p50_us": pct(lat, 0.50) / 1e3,
                "p99_us": pct(lat, 0.99) / 1e3,
                "max_us": lat[-1] / 1e3,
            }
        out |= {"evicting_events": self.evicting, "revoked": self.revoked}
        return out


def run_evictions(url: str, boss: Boss, client: redis.Redis, rounds: int, warmup: int) -> EvictStats:
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=evict_holder, args=(url, warmup + rounds, there), daemon=True)
    proc.start()
    there.close()
    to_callback: list[int] = []
    to_holding: list[int] = []
    try:
        for i in range(warmup + rounds):
            expect(here, "idle")
            asked = mono_ns()
            lease = boss.acquire(EVICT_MIB, priority="high", pool="evict", timeout=EVICT_WAIT_S)
            holding = mono_ns()
            started = expect(here, "evicted")
            boss.release(lease)  # the holder, queued meanwhile, is granted for the next round
            if i >= warmup:
                to_callback.append(started - asked)
                to_holding.append(holding - asked)
        here.send("stop")
        proc.join(EVICT_WAIT_S)
        if proc.exitcode != 0:
            raise RuntimeError(f"the eviction holder exited with {proc.exitcode}")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    entries = cast(list[tuple[str, dict[str, str]]], client.xrange(PoolKeys("evict").events))
    kinds = [f["event"] for _, f in entries]
    return EvictStats(to_callback, to_holding, kinds.count("evicting"), kinds.count("revoked"))


# --- over HTTP -------------------------------------------------------------------------------

# What `gpuboss serve` runs, minus the embedded Redis and the command line: the service's own app
# under uvicorn, against the benchmark's redis-server. Access logs are off so the number is the
# API's cost, not the cost of writing a line per request.
SERVE = """
import sys
import uvicorn
from gpuboss.api import create_app
from gpuboss.settings import ServiceSettings

url, port = sys.argv[1], int(sys.argv[2])
consumers = sys.argv[3] if len(sys.argv) > 3 else None
settings = ServiceSettings(
    redis_url=url, host="127.0.0.1", port=port, log_level="warning", consumers=consumers
)
uvicorn.run(create_app(settings, url), host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""

# The floor under the service: the same uvicorn answering the same two requests with a bare ASGI
# app that reads the body and sends a fixed reply of the same shape, touching nothing else.
FLOOR = """
import sys
import uvicorn

LEASE = b'{"id": "floor", "pool": "http", "token": 1, "state": "active", "env": {}}'
RELEASED = b'{"id": "floor", "state": "released"}'


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    acquire = scope["path"] == "/v1/leases"
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 201 if acquire else 200, "headers": headers})
    await send({"type": "http.response.body", "body": LEASE if acquire else RELEASED})


url, port = sys.argv[1], int(sys.argv[2])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


@contextlib.contextmanager
def http_service(
    url: str, cpu: int | None, consumers: Path | None = None, code: str = SERVE
) -> Iterator[tuple[str, int]]:
    """The HTTP service in its own process on a free loopback port: its base URL and pid, once ready
    (managing the consumers of the registry file ``consumers``, if given; ``code``: another app)."""
    port = free_port()
    # No tokens and no other settings from this shell: loopback without tokens, every caller an
    # operator that names its holder in the body.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, url, str(port), *([str(consumers)] if consumers else [])],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVE_WAIT_S
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the HTTP service did not start (exit {proc.poll()}):\n{log.read()}")
                time.sleep(0.05)  # waiting for an external process to listen
            if cpu is not None:
                pin_process(proc.pid, cpu)
            yield base, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http_pair(http: httpx.Client, pool: str) -> Pair:
    """Acquire (``timeout_s`` 0: try once) and release over the API, on one keep-alive connection."""
    body = {"vram": HTTP_MIB, "timeout_s": 0, "holder": "bench", "pool": pool}

    def pair() -> None:
        got = http.post("/v1/leases", json=body)
        if got.status_code != 201:
            raise RuntimeError(f"acquire over HTTP: {got.status_code} {got.text}")
        lease = got.json()
        done = http.post(
            f"/v1/leases/{lease['id']}/release", json={"pool": lease["pool"], "token": lease["token"]}
        )
        if done.status_code != 200:
            raise RuntimeError(f"release over HTTP: {done.status_code} {done.text}")

    return pair


# --- the heartbeat worker --------------------------------------------------------------------


def thread_cpu_ns(thread: threading.Thread) -> int:
    """CPU time of another thread of this process so far, in ns, from its CPU clock (``time.thread_time``
    reads only the calling thread's; ``/proc`` counts in clock ticks, 10 ms apiece)."""
    assert thread.ident is not None
    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))


def new_thread(named: str, before: set[threading.Thread]) -> threading.Thread:
    """The one thread called ``named`` that was not running before (other clients have theirs)."""
    found = [t for t in threading.enumerate() if t.name == named and t not in before]
    if len(found) != 1:
        raise RuntimeError(f"expected one new {named!r} thread, found {len(found)}")
    return found[0]


@dataclass
class Sample:
    """Counters at one end of the heartbeat window."""

    wall_ns: int
    worker_cpu_ns: int
    worker_ticks_ns: int
    process_cpu_ns: int
    server_cpu_us: float
    scripts: int
    lua_us: int
    expires_ms: list[int]

    @classmethod
    def take(cls, worker: threading.Thread, client: redis.Redis, leases: list[Lease]) -> Sample:
        assert worker.native_id is not None
        return cls(
            wall_ns=time.perf_counter_ns(),
            worker_cpu_ns=thread_cpu_ns(worker),
            worker_ticks_ns=process_cpu_ns("self", worker.native_id),
            process_cpu_ns=time.process_time_ns(),
            server_cpu_us=server_cpu_us(client),
            scripts=script_calls(client),
            lua_us=lua_usec(client),
            expires_ms=[lease.info.expires_at_ms or 0 for lease in leases],
        )


def run_heartbeats(url: str, client: redis.Redis, n: int, window_s: float) -> dict[str, Any]:
    """One client holding ``n`` self-renewing leases, idle for ``window_s``: what the renewals cost."""
    boss = Boss(connect(url), holder="bench-heartbeats")
    try:
        boss.add_device("gpu0", n * HEARTBEAT_MIB, pool="heartbeat")
        before = set(threading.enumerate())
        started = time.perf_counter()
        leases = [
            boss.acquire(HEARTBEAT_MIB, pool="heartbeat", ttl=HEARTBEAT_TTL_S, timeout=0) for _ in range(n)
        ]
        setup_s = time.perf_counter() - started
        worker = new_thread(HEARTBEAT_THREAD, before)
        interval_s = HEARTBEAT_TTL_S / 3
        # Warm-up: every lease beats once, so the window sees the worker in its steady state. The
        # main thread sleeps on purpose: the worker is what runs, and nothing else may meanwhile.
        time.sleep(1.5 * interval_s)
        first = Sample.take(worker, client, leases)
        time.sleep(window_s)
        last = Sample.take(worker, client, leases)
        lost = sum(lease.lost for lease in leases)
        renewed = sum(b > a for a, b in zip(first.expires_ms, last.expires_ms, strict=True))
        released = len(boss.release_all())
    finally:
        boss.close()
    wall_s = (last.wall_ns - first.wall_ns) / 1e9
    beats = last.scripts - first.scripts
    worker_cpu_s = (last.worker_cpu_ns - first.worker_cpu_ns) / 1e9
    server_s = (last.server_cpu_us - first.server_cpu_us) / 1e6
    per_beat = max(1, beats)
    return {
        "leases": n,
        "ttl_s": HEARTBEAT_TTL_S,
        "beat_interval_s": interval_s,
        "expected_beats_per_s": n / interval_s,
        "setup_s": setup_s,
        "window_s": wall_s,
        "beats": beats,
        "beats_per_s": beats / wall_s,
        "worker_cpu_s_per_s": worker_cpu_s / wall_s,
        "worker_cpu_us_per_beat": worker_cpu_s * 1e6 / per_beat,
        "worker_cpu_proc_s_per_s": (last.worker_ticks_ns - first.worker_ticks_ns) / 1e9 / wall_s,
        "process_cpu_s_per_s": (last.process_cpu_ns - first.process_cpu_ns) / 1e9 / wall_s,
        "redis_cpu_s_per_s": server_s / wall_s,
        "redis_cpu_us_per_beat": server_s * 1e6 / per_beat,
        "lua_us_per_beat": (last.lua_us - first.lua_us) / per_beat,
        "leases_renewed_in_window": renewed,
        "lost": lost,
        "released": released,
    }


# --- saturation ------------------------------------------------------------------------------


def fine_timer_slack() -> None:
    """Let sleeps end within 1 µs of their deadline rather than the default 50 µs (Linux
    ``PR_SET_TIMERSLACK``): an open-loop process wakes for each scheduled pair."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1,000 ns


def closed_loop(pair: Pair, stop_pc: int) -> list[int]:
    """Pairs back to back until ``stop_pc`` (perf_counter): each pair's latency, ns."""
    lat: list[int] = []
    clock = time.perf_counter_ns
    t = clock()
    while t < stop_pc:
        pair()
        end = clock()
        lat.append(end - t)
        t = end
    return lat


def open_loop(
    pair: Pair, first_pc: int, interval_ns: float, stop_pc: int, give_up_pc: int
) -> tuple[list[int], int]:
    """Pairs started on a timetable: the k-th at ``first_pc + k * interval_ns`` (perf_counter), for
    every start before ``stop_pc``. Each latency runs from the scheduled start, so a pair that starts
    late (the one before it ran long) counts its wait. A backlog is worked off after ``stop_pc``
    until ``give_up_pc``; returns the latencies and the scheduled pairs never run."""
    lat: list[int] = []
    clock = time.perf_counter_ns
    k = 0
    while (due := first_pc + round(k * interval_ns)) < stop_pc:
        now = clock()
        if now >= give_up_pc:
            return lat, math.ceil((stop_pc - due) / interval_ns)
        if now < due:
            time.sleep((due - now) / 1e9)  # the timetable: this is the offered load
        pair()
        lat.append(clock() - due)
        k += 1
    return lat, 0


def saturator(
    kind: str, url: str, index: int, go: EventType, start: Synchronized[int], conn: Connection
) -> None:
    """One saturation process: uncontended pairs on its own pool (gpuboss) or key (the lock), one
    window per order (``(pairs/s of this process, 0 for flat out; window ns; phase 0..1)``, None to
    end), each window starting when ``go`` is set at ``start`` (system-wide monotonic ns)."""
    fine_timer_slack()
    client = connect(url)
    if kind == GPUBOSS:
        pair = gpuboss_pair(client, f"sat-{index}", SAT_MIB, keepalive=False)
    else:
        pair = redis_py_pair(client, f"bench:sat-{index}")
    for _ in range(SAT_WARMUP):
        pair()
    conn.send("ready")
    while (order := conn.recv()) is not None:
        rate, window_ns, phase = order
        conn.send("armed")
        go.wait()
        origin = start.value + time.perf_counter_ns() - mono_ns()  # the window's start on perf_counter
        stop = origin + window_ns
        cpu = time.process_time_ns()
        first = mono_ns()
        if rate == 0:
            lat, missed = closed_loop(pair, stop), 0
        else:
            interval = 1e9 / rate
            lat, missed = open_loop(pair, origin + round(phase * interval), interval, stop, stop + window_ns)
        last = mono_ns()
        pairs = len(lat)
        if pairs > SAT_SAMPLES:
            lat = lat[:: -(-pairs // SAT_SAMPLES)]
        conn.send(
            {"pairs": pairs, "first_ns": first, "last_ns": last, "missed": missed,
             "cpu_ns": time.process_time_ns() - cpu, "latencies_ns": lat}
        )  # fmt: skip
    client.close()


def redis_cpu_s(client: redis.Redis) -> tuple[float, float | None]:
    """redis-server's CPU so far, in s: the whole server, and its main thread where INFO has it."""
    cpu: dict[str, float] = client.info("cpu")
    whole = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    if "used_cpu_user_main_thread" in cpu:
        return whole, float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])
    return whole, None


@dataclass
class Saturators:
    """The processes of one contender, started once; a window uses the first ``n`` of them."""

    kind: str
    conns: list[Connection]
    go: EventType
    start: Synchronized[int]

    def window(self, client: redis.Redis, n: int, rate: float, window_s: float) -> dict[str, Any]:
        """One window: ``n`` processes flat out (``rate`` 0) or offering ``rate`` pairs/s between them."""
        conns = self.conns[:n]
        for i, c in enumerate(conns):
            c.send((rate / n, int(window_s * 1e9), i / n))
        for c in conns:
            if not c.poll(SAT_WAIT_S) or c.recv() != "armed":
                raise RuntimeError(f"a {self.kind} saturation process did not arm")
        cpu_before, main_before = redis_cpu_s(client)
        wall_before = mono_ns()
        self.start.value = mono_ns()
        self.go.set()
        replies: list[dict[str, Any]] = []
        for c in conns:
            if not c.poll(2 * window_s + SAT_WAIT_S):
                raise RuntimeError(f"a {self.kind} saturation process did not finish its window")
            replies.append(c.recv())
        wall_s = (mono_ns() - wall_before) / 1e9
        cpu_after, main_after = redis_cpu_s(client)
        self.go.clear()  # every process is back waiting for its next order
        pairs = sum(r["pairs"] for r in replies)
        elapsed_s = (max(r["last_ns"] for r in replies) - min(r["first_ns"] for r in replies)) / 1e9
        lat = sorted(itertools.chain.from_iterable(r["latencies_ns"] for r in replies))
        redis_s = cpu_after - cpu_before
        main_s = main_after - main_before if main_after is not None and main_before is not None else None
        out: dict[str, Any] = {
            "processes": n,
            "target_pairs_per_s": rate or None,
            "pairs": pairs,
            "missed": sum(r["missed"] for r in replies),
            "pairs_per_s": pairs / elapsed_s,
            "redis_cpu_pct": 100 * redis_s / wall_s,
            "redis_main_cpu_pct": 100 * main_s / wall_s if main_s is not None else None,
            "client_cpu_pct": 100 * sum(r["cpu_ns"] for r in replies) / 1e9 / elapsed_s,
            "pairs_per_redis_cpu_s": pairs / (main_s if main_s is not None else redis_s),
            "p50_us": pct(lat, 0.50) / 1e3,
            "p99_us": pct(lat, 0.99) / 1e3,
            "latency_samples": len(lat),
        }
        return out


@contextlib.contextmanager
def saturators(kind: str, url: str, n: int) -> Iterator[Saturators]:
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    start = cast("Synchronized[int]", ctx.Value("q", 0))
    conns: list[Connection] = []
    procs = []
    try:
        for i in range(n):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=saturator, args=(kind, url, i, go, start, there), daemon=True)
            proc.start()
            there.close()
            conns.append(here)
            procs.append(proc)
        for c in conns:
            if not c.poll(SAT_WAIT_S) or c.recv() != "ready":
                raise RuntimeError(f"a {kind} saturation process did not start")
        yield Saturators(kind, conns, go, start)
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(SAT_WAIT_S)
            if p.exitcode != 0:
                raise RuntimeError(f"a {kind} saturation process exited with {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


# --- output ----------------------------------------------------------------------------------


def fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) for c, w in zip(cells, widths, strict=True)]
        padded[0] = cells[0].ljust(widths[0])
        return "  ".join(padded)

    print(f"\n## {title}")
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


PAIR_HEADER = ["contender", "pairs/s", "mean µs", "p50 µs", "p99 µs", "client CPU µs", "server CPU µs",
               "Lua µs"]  # fmt: skip
COST_HEADER = ["command", "calls per pair", "µs per pair", "µs per call"]
HANDOFF_HEADER = ["contender", "turns", "hand-off p50 µs", "p99 µs", "min turns", "max turns", "Jain",
                  "switch %", "overlaps"]  # fmt: skip


def pair_rows(stats: dict[str, dict[str, float]], label: str = "") -> list[list[str]]:
    return [
        [name + label, fmt(s["pairs_per_s"], 0), fmt(s["mean_us"]), fmt(s["p50_us"]), fmt(s["p99_us"]),
         fmt(s["client_cpu_us_per_pair"]), fmt(s["server_cpu_us_per_pair"]), fmt(s["lua_us_per_pair"])]
        for name, s in stats.items()
    ]  # fmt: skip


def handoff_rows(stats: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [name, str(s["turns_total"]), fmt(s["p50_us"]), fmt(s["p99_us"]), str(s["turns_min"]),
         str(s["turns_max"]), f"{s['jain']:.3f}", fmt(s["switch_pct"]), str(s["overlaps"])]
        for name, s in stats.items()
    ]  # fmt: skip


# --- the sections ----------------------------------------------------------------------------


def section_uncontended(args: argparse.Namespace, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    boss.add_device("gpu0", "24GiB", pool="solo")
    pairs = {
        GPUBOSS: gpuboss_pair(client, "solo"),
        GPUBOSS_SCRIPTS: gpuboss_pair(client, "solo", functions=False),
        REDIS_PY: redis_py_pair(client, "bench:solo"),
        PRLOCK: prlock_pair(client, "bench-solo"),
        COMMANDS_FLOOR: floor_pair(client, "floor"),
    }
    stats = interleaved(pairs, args.pairs, args.rounds, args.warmup, client)
    solo = {k: v.summary() for k, v in stats.items()}
    title = f"1. Uncontended acquire + release, {args.pairs:,} pairs each, one process"
    table(title, PAIR_HEADER, pair_rows(solo))
    print("client CPU µs: CPU of this process per pair (Python, redis-py, socket calls)")
    print("server CPU µs: redis-server main-thread CPU per pair (INFO cpu), socket I/O included")
    print("Lua µs: server time inside FCALL/EVALSHA per pair (INFO commandstats), part of server CPU")
    print(f"{GPUBOSS_SCRIPTS}: the same verbs run as EVALSHA scripts (servers without functions)")
    print(f"{COMMANDS_FLOOR}: the Redis commands of a gpuboss pair from two functions that compute nothing")
    ratio_mean = solo[GPUBOSS]["mean_us"] / solo[REDIS_PY]["mean_us"]
    ratio_p50 = solo[GPUBOSS]["p50_us"] / solo[REDIS_PY]["p50_us"]
    print(f"gpuboss / redis-py Lock per pair: {ratio_mean:.2f}x (mean), {ratio_p50:.2f}x (p50); aim <= 1.25x")
    cpu_ratio = solo[GPUBOSS]["server_cpu_us_per_pair"] / solo[REDIS_PY]["server_cpu_us_per_pair"]
    print(f"gpuboss / redis-py Lock Redis CPU per pair: {cpu_ratio:.2f}x; aim <= 1.25x")
    floor_cpu = solo[COMMANDS_FLOOR]["server_cpu_us_per_pair"] / solo[REDIS_PY]["server_cpu_us_per_pair"]
    floor_p50 = solo[COMMANDS_FLOOR]["p50_us"] / solo[REDIS_PY]["p50_us"]
    print(f"{COMMANDS_FLOOR} / redis-py Lock: {floor_cpu:.2f}x Redis CPU, {floor_p50:.2f}x p50 (no logic)")
    costs = command_costs(pairs[GPUBOSS], max(200, args.pairs // 10), client)
    rows = [[name, fmt(c["calls_per_pair"], 2), fmt(c["us_per_pair"], 2), fmt(c["us_per_call"], 2)]
            for name, c in costs.items()]  # fmt: skip
    table("1b. What a gpuboss pair costs Redis, by command (INFO commandstats)", COST_HEADER, rows)
    print("fcall: the two verbs whole; the rest: the redis.calls inside them (counted again in fcall)")
    floor_costs = command_costs(pairs[COMMANDS_FLOOR], max(200, args.pairs // 10), client)
    same = per_pair_calls(costs) == per_pair_calls(floor_costs)
    print(
        f"{COMMANDS_FLOOR}: the same commands, as many per pair, as a gpuboss pair: {'yes' if same else 'NO'}"
    )
    return {
        "pairs": solo,
        "ratio_gpuboss_vs_redis_py_lock": {"mean": ratio_mean, "p50": ratio_p50, "redis_cpu": cpu_ratio},
        "ratio_floor_vs_redis_py_lock": {"p50": floor_p50, "redis_cpu": floor_cpu},
        "commands": costs,
        "floor_commands": floor_costs,
        "floor_makes_the_same_commands": same,
    }


def command_costs(pair: Pair, n: int, client: redis.Redis) -> dict[str, dict[str, float]]:
    """Per command, what ``n`` runs of ``pair`` cost Redis: calls and µs per pair, µs per call."""
    client.config_resetstat()
    for _ in range(n):
        pair()
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    stats.pop("cmdstat_config|resetstat", None)
    out = {
        k.removeprefix("cmdstat_"): {
            "calls_per_pair": int(v["calls"]) / n,
            "us_per_pair": int(v["usec"]) / n,
            "us_per_call": float(v["usec_per_call"]),
        }
        for k, v in stats.items()
    }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_pair"]))


def per_pair_calls(costs: dict[str, dict[str, float]]) -> dict[str, int]:
    """Calls per pair of each command a pair makes (not those of a connection's set-up)."""
    return {k: n for k, c in costs.items() if (n := round(c["calls_per_pair"])) > 0}


def section_handoff(args: argparse.Namespace, url: str, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    boss.add_device("gpu0", HANDOFF_MIB, pool="handoff")
    client.delete(FLOOR_KEY)
    client.rpush(FLOOR_KEY, FLOOR_TOKEN)
    hold_ns = args.hold_us * 1000
    stats = {k: run_contended(k, url, args.processes, args.duration, hold_ns).summary() for k in CONTENDED}
    if (tokens := client.lrange(FLOOR_KEY, 0, -1)) != [FLOOR_TOKEN]:
        raise RuntimeError(f"the BLPOP floor's list should hold its one token again, it holds {tokens!r}")
    title = (
        f"2. Hand-off, {args.processes} processes on one lock / one-lease device, "
        f"hold {args.hold_us} µs, {args.duration:g} s each"
    )
    table(title, HANDOFF_HEADER, handoff_rows(stats))
    print("hand-off: from just before a release to the return of the next holder's acquire")
    print("switch %: hand-offs that went to another process; overlaps: overlapping holds (must be 0)")
    print(f"{BLPOP_FLOOR}: a list holding one token, acquire BLPOP, release RPUSH; the floor of any "
          "Redis-based queue")  # fmt: skip
    ratio = stats[GPUBOSS]["p50_us"] / stats[BLPOP_FLOOR]["p50_us"]
    print(f"gpuboss / {BLPOP_FLOOR} p50: {ratio:.2f}x (target <= 1.1x)")
    return {"contenders": stats, "ratio_gpuboss_vs_blpop_p50": ratio}


def section_live(args: argparse.Namespace, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    client.flushall()
    boss.add_device("gpu0", LIVE_DEVICE_MIB, pool="live")
    pairs = {
        GPUBOSS: gpuboss_pair(client, "live"),
        REDIS_PY: redis_py_pair(client, "bench:live"),
        PRLOCK: prlock_pair(client, "bench-live"),
    }
    live: dict[str, dict[str, dict[str, float]]] = {}
    rows: list[list[str]] = []
    have = 0
    for level in args.levels:
        started = time.perf_counter()
        add_live_leases(boss, client, "live", have, level)
        add_live_locks(client, have, level)
        have = level
        granted = boss.status("live")[0].granted
        if granted != level:
            raise RuntimeError(f"expected {level} live leases, the pool has {granted}")
        print(f"(set up {level:,} live leases and lock keys in {time.perf_counter() - started:.1f} s)")
        stats = interleaved(pairs, args.live_pairs, args.rounds, args.warmup, client)
        live[str(level)] = {k: v.summary() for k, v in stats.items()}
        rows += pair_rows(live[str(level)], f" @ {level:,}")
    title = f"3. Uncontended pairs with N other live leases / lock keys, {args.live_pairs:,} pairs each"
    table(title, PAIR_HEADER, rows)
    lo, hi = str(args.levels[0]), str(args.levels[-1])
    flat = {k: live[hi][k]["p50_us"] / live[lo][k]["p50_us"] for k in UNCONTENDED}
    print(f"p50 at {hi} / p50 at {lo}: " + ", ".join(f"{k} {v:.2f}x" for k, v in flat.items()))
    return {"levels": live, "p50_ratio_last_vs_first": flat, "waiters": queued_waiters(args, client, boss)}


#: waiter counts of section 3b; WALK_LIMIT in lua/_common.lua is 64
WAITER_LEVELS = (0, 16, 63, 64, 10_000)


def queued_waiters(args: argparse.Namespace, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    """Section 3b: pairs on a free device while N waiters (priority normal) queue for another, full
    device of the same pool; pairs of priority normal (behind them) and high (ahead of them)."""
    pool = "queue"
    boss.add_device("full", 1024, pool=pool)
    boss.add_device("free", "24GiB", pool=pool)
    boss.acquire(1024, pool=pool, device="full", ttl=3600, keepalive=False)
    keys = PoolKeys(pool).script_keys()
    script = client.register_script(source("acquire"))  # pipelined: EVALSHA loads it once
    out: dict[str, Any] = {}
    rows: list[list[str]] = []
    for level in WAITER_LEVELS:
        pipe = client.pipeline(transaction=False)
        for i in range(int(client.zcard(PoolKeys(pool).queue)), level):
            waiter: list[str | int] = [
                f"waiter-{i}",
                "bench",
                "host",
                1,
                1024,
                50,
                "full",
                3_600_000,
                "{}",
                1,
            ]
            script(keys=keys, args=waiter, client=pipe)
        pipe.execute()
        for priority in ("normal", "high"):
            client.config_resetstat()
            granted, lat = 0, []
            for _ in range(args.live_pairs):
                t = time.perf_counter_ns()
                try:
                    lease = boss.acquire(1, pool=pool, priority=priority, timeout=0, keepalive=False)
                except AcquireTimeout:
                    lat.append(time.perf_counter_ns() - t)
                    continue
                boss.release(lease)
                lat.append(time.perf_counter_ns() - t)
                granted += 1
            lua = lua_usec(client) / args.live_pairs
            p50 = pct(sorted(lat), 0.5) / 1e3
            out[f"{level}/{priority}"] = {
                "granted": granted,
                "tries": args.live_pairs,
                "p50_us": p50,
                "lua_us": lua,
            }
            rows.append([f"{level:,}", priority, f"{granted:,} of {args.live_pairs:,}", fmt(p50), fmt(lua)])
    table(
        f"3b. Pairs on a free device while N waiters queue for another, {args.live_pairs:,} tries each",
        ["waiters", "priority", "granted", "p50 µs", "Lua µs per try"],
        rows,
    )
    print("normal: as the waiters, so behind them; each try walks the waiters ahead, at most 64 (past them")
    print("the queue's census says that none waits for the free device); high: ahead of them, its acquire")
    print("walks none, but every release walks up to 64")
    return out


def section_eviction(args: argparse.Namespace, url: str, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    boss.add_device("gpu0", EVICT_MIB, pool="evict")
    stats = run_evictions(url, boss, client, args.evict_rounds, args.evict_warmup).summary()
    stats["warmup_rounds"] = args.evict_warmup
    rows = [
        [label, fmt(stats[key]["p50_us"]), fmt(stats[key]["p99_us"]), fmt(stats[key]["max_us"])]
        for label, key in (("acquire call -> holder's on_evict starts", "to_callback"),
                           ("acquire call -> requester holds the memory", "to_holding"))
    ]  # fmt: skip
    title = (
        f"4. Eviction latency, {stats['rounds']:,} rounds: a high-priority acquire evicts an idle "
        "low-priority lease held by another process"
    )
    table(title, ["gpuboss", "p50 µs", "p99 µs", "max µs"], rows)
    print("on_evict starts when the notice arrives over pub/sub; the client releases once it returns")
    print(f"evicting events: {stats['evicting_events']:,} (one per round, warm-up included), "
          f"revoked: {stats['revoked']} (must be 0)")  # fmt: skip
    print(f"on_evict p99: {stats['to_callback']['p99_us'] / 1e3:.2f} ms; aim < 5 ms")
    return stats


HTTP_HEADER = [*PAIR_HEADER, "boss CPU µs"]


def section_http(
    args: argparse.Namespace, url: str, client: redis.Redis, boss: Boss, cpu: int | None
) -> dict[str, Any]:
    boss.add_device("gpu0", "24GiB", pool="http")
    with (
        http_service(url, cpu) as (base, pid),
        httpx.Client(base_url=base, timeout=10) as http,
        http_service(url, cpu, code=FLOOR) as (floor_base, floor_pid),
        httpx.Client(base_url=floor_base, timeout=10) as floor,
    ):
        pairs = {
            HTTP: http_pair(http, "http"),
            HTTP_FLOOR: http_pair(floor, "http"),
            GPUBOSS: gpuboss_pair(client, "http", HTTP_MIB),
            REDIS_PY: redis_py_pair(client, "bench:http"),
            PRLOCK: prlock_pair(client, "bench-http"),
        }
        stats = interleaved(
            pairs, args.http_pairs, args.rounds, args.warmup, client, pid, {HTTP_FLOOR: floor_pid}
        )
    summary = {k: v.summary() for k, v in stats.items()}
    rows = [
        [*row, fmt(s["boss_cpu_us_per_pair"])]
        for row, s in zip(pair_rows(summary), summary.values(), strict=True)
    ]
    title = f"5. Uncontended acquire + release over HTTP and direct, {args.http_pairs:,} pairs each"
    table(title, HTTP_HEADER, rows)
    server = {
        "app": "gpuboss.api.create_app under uvicorn, one process, access log off",
        "pinning": f"HTTP service -> CPU {cpu} (with redis-server)" if cpu is not None else "none",
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "event_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }
    print("HTTP: one httpx.Client, keep-alive; each pair is POST /v1/leases (timeout_s 0) + POST .../release")
    print("client CPU µs for HTTP: httpx in this process; boss CPU µs: the service process, every row")
    print("  (for the direct rows it is the service's own work meanwhile: reaper and event hub;")
    print(f"  for {HTTP_FLOOR!r} the bare app's process: the floor any Python HTTP service pays here)")
    print("service: " + ", ".join(f"{k} {v}" for k, v in server.items()))
    http_row, floor_row, direct = summary[HTTP], summary[HTTP_FLOOR], summary[GPUBOSS]
    ratio = {"mean": http_row["mean_us"] / direct["mean_us"], "p50": http_row["p50_us"] / direct["p50_us"]}
    cpu_us, floor_us = http_row["boss_cpu_us_per_pair"], floor_row["boss_cpu_us_per_pair"]
    print(
        f"service CPU per HTTP pair: {cpu_us:.0f} µs (target <= 500 µs), of it {floor_us:.0f} µs the floor "
        f"and {cpu_us - floor_us:.0f} µs gpuboss's own"
    )
    print(
        f"HTTP / direct client per pair: {ratio['mean']:.1f}x (mean), {ratio['p50']:.1f}x (p50, target "
        f"<= 2x); the floor alone: {floor_row['p50_us'] / direct['p50_us']:.1f}x (p50)"
    )
    return {"pairs": summary, "ratio_http_vs_direct": ratio, "server": server}


@contextlib.contextmanager
def openai_engine(folder: Path) -> Iterator[str]:
    """A stand-in OpenAI-compatible engine (tests/engines.py) with its model loaded: its base URL."""
    state = folder / "gpu.json"
    state.write_text(json.dumps({"gpus": [{"name": "bench", "total": "24GiB"}]}), encoding="utf-8")
    engines = Path(__file__).with_name("engines.py")
    args = ["openai", "--state", str(state), "--model", "m=1GiB", "--loaded", "--token-delay", "0"]
    proc = subprocess.Popen([sys.executable, str(engines), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{proc.stdout.readline().split()[1]}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def time_requests(http: httpx.Client, path: str, body: dict[str, Any], n: int) -> list[int]:
    """Latency of ``n`` requests, each read to its end, ns."""
    out = []
    for _ in range(n):
        t = mono_ns()
        with http.stream("POST", path, json=body) as reply:
            for _chunk in reply.iter_raw():
                pass
            if reply.status_code != 200:
                raise RuntimeError(f"{path}: {reply.status_code}")
        out.append(mono_ns() - t)
    return out


def section_proxy(args: argparse.Namespace, url: str, boss: Boss, cpu: int | None) -> dict[str, Any]:
    boss.add_device("gpu0", "24GiB")
    short = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    streamed = short | {"stream": True, "messages": [{"role": "user", "content": "one two three four"}]}
    n = args.proxy_requests
    with tempfile.TemporaryDirectory() as tmp, openai_engine(Path(tmp)) as upstream:
        registry = Path(tmp) / "consumers.yaml"
        registry.write_text(
            f"consumers:\n  - {{name: m, url: '{upstream}', vram: 1GiB, serves: [m], self_managed: true}}\n",
            encoding="utf-8",
        )
        with (
            http_service(url, cpu, registry) as (base, _pid),
            httpx.Client(base_url=upstream, timeout=10) as direct,
            httpx.Client(base_url=base, timeout=10) as proxied,
        ):
            samples: dict[str, list[int]] = {}
            for _ in range(args.rounds):  # interleaved, so drift hits every row alike
                for label, http, body in (
                    ("direct, short JSON", direct, short),
                    ("through the boss, short JSON", proxied, short),
                    ("direct, streamed (6 chunks)", direct, streamed),
                    ("through the boss, streamed (6 chunks)", proxied, streamed),
                ):
                    samples.setdefault(label, []).extend(time_requests(http, "/v1/chat/completions", body, n))
    summary = {}
    for label, values in samples.items():
        values.sort()
        summary[label] = {
            "p50_us": pct(values, 0.5) / 1000,
            "p99_us": pct(values, 0.99) / 1000,
            "n": len(values),
        }
    each = f"{n * args.rounds:,} each"
    print(f"\n## 7. The gated proxy: an OpenAI chat request direct and through the boss, {each}")
    table(
        "latency of one request, read to its end",
        ["path", "p50 µs", "p99 µs"],
        [[label, fmt(s["p50_us"]), fmt(s["p99_us"])] for label, s in summary.items()],
    )
    for kind in ("short JSON", "streamed (6 chunks)"):
        d, p = summary[f"direct, {kind}"], summary[f"through the boss, {kind}"]
        extra = {q: fmt(p[f"{q}_us"] - d[f"{q}_us"]) for q in ("p50", "p99")}
        print(f"proxy overhead, {kind}: p50 +{extra['p50']} µs, p99 +{extra['p99']} µs")
    print("upstream: tests/engines.py openai (a Python http.server, one connection per request); the "
          "consumer is self-managed (resident, no lease round trip per request)")  # fmt: skip
    return summary


def section_heartbeats(args: argparse.Namespace, url: str, client: redis.Redis) -> dict[str, Any]:
    n, window = args.heartbeat_leases, args.heartbeat_window
    stats = run_heartbeats(url, client, n, window)
    print(
        f"\n## 6. Heartbeat worker: one client renewing {n:,} leases (TTL {HEARTBEAT_TTL_S:g} s, "
        f"a beat each every {stats['beat_interval_s']:g} s), {window:g} s window"
    )
    worker = f"{stats['worker_cpu_s_per_s']:.3f} s/s ({fmt(stats['worker_cpu_us_per_beat'])} µs per beat)"
    server = f"{stats['redis_cpu_s_per_s']:.3f} s/s ({fmt(stats['redis_cpu_us_per_beat'])} µs per beat)"
    beats = fmt(stats["beats_per_s"], 0)
    print(f"heartbeat worker: {n:,} leases, {beats} beats/s, worker CPU {worker}, Redis CPU {server}")
    print(f"beats/s: heartbeat scripts Redis ran (INFO commandstats); {n:,} leases ask for "
          f"{fmt(stats['expected_beats_per_s'], 0)}")  # fmt: skip
    print(f"worker CPU: the {HEARTBEAT_THREAD} thread alone, from its CPU clock "
          f"({stats['worker_cpu_proc_s_per_s']:.2f} s/s from /proc in clock ticks; whole process "
          f"{stats['process_cpu_s_per_s']:.3f} s/s)")  # fmt: skip
    print(f"Redis CPU: redis-server main thread (INFO cpu); Lua {fmt(stats['lua_us_per_beat'])} µs per beat")
    print(f"renewed in the window: {stats['leases_renewed_in_window']:,} of {n:,} leases; "
          f"lost: {stats['lost']} (must be 0); released at the end: {stats['released']:,} "
          f"(set up in {stats['setup_s']:.1f} s)")  # fmt: skip
    return stats


def section_confirm(args: argparse.Namespace, client: redis.Redis, cpu: int | None) -> dict[str, Any]:
    """Pairs on a primary with two replicas, each write confirmed by 0, 1 or 2 of them (``WAIT``
    after every state-changing script: what ``confirm_replicas`` costs)."""
    host, port = "127.0.0.1", client.connection_pool.connection_kwargs["port"]
    with contextlib.ExitStack() as replicas:
        for _ in range(2):
            replica = connect(replicas.enter_context(redis_server(cpu, "--replicaof", host, str(port))))
            deadline = time.monotonic() + 30
            while replica.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    sys.exit("a replica did not sync")
                time.sleep(0.02)  # waiting for another process to sync
            replica.close()
        Boss(client, holder="bench").add_device("gpu0", "24GiB", pool="confirm")
        pairs = {f"confirmed by {n}": gpuboss_pair(client, "confirm", confirm=Confirm(n)) for n in (0, 1, 2)}
        stats = interleaved(pairs, args.confirm_pairs, args.rounds, args.warmup, client)
    summary = {k: v.summary() for k, v in stats.items()}
    table(
        f"8. Pairs confirmed by replicas (WAIT), {args.confirm_pairs:,} pairs each",
        PAIR_HEADER,
        pair_rows(summary),
    )
    p50 = [summary[f"confirmed by {n}"]["p50_us"] for n in (0, 1, 2)]
    print(f"confirm_replicas=1 / 0 per pair (p50): {p50[1] / p50[0]:.2f}x; =2 / 0: {p50[2] / p50[0]:.2f}x")
    return {"pairs": summary}


SAT_HEADER = ["step", "processes", "target pairs/s", "pairs/s", "Redis CPU %", "main thread %",
              "client CPU %", "pairs per Redis CPU s", "p50 µs", "p99 µs"]  # fmt: skip


def saturation_rows(stats: dict[str, Any]) -> list[list[str]]:
    def row(step: str, w: dict[str, Any]) -> list[str]:
        target = w["target_pairs_per_s"]
        main = w["redis_main_cpu_pct"]
        return [step, str(w["processes"]), "flat out" if target is None else fmt(target, 0),
                fmt(w["pairs_per_s"], 0), fmt(w["redis_cpu_pct"]), "-" if main is None else fmt(main),
                fmt(w["client_cpu_pct"]), fmt(w["pairs_per_redis_cpu_s"], 0), fmt(w["p50_us"]),
                fmt(w["p99_us"])]  # fmt: skip

    rows = [row("ceiling search", w) for w in stats["ceiling_search"]]
    rows += [row(f"open loop {level} %", w) for level, w in stats["levels"].items()]
    return rows


def section_saturation(args: argparse.Namespace, url: str, client: redis.Redis, boss: Boss) -> dict[str, Any]:
    """Uncontended pairs from more and more processes until something gives, then open loop below
    and at the ceiling; gpuboss and redis-py Lock window by window, in turn."""
    most = max(args.sat_processes)
    for i in range(most):
        boss.add_device("gpu0", "24GiB", pool=f"sat-{i}")
    window_s = args.sat_duration
    stats: dict[str, dict[str, Any]] = {k: {"ceiling_search": [], "levels": {}} for k in SATURATED}
    with contextlib.ExitStack() as stack:
        pools = {k: stack.enter_context(saturators(k, url, most)) for k in SATURATED}
        for n in args.sat_processes:
            for kind, pool in pools.items():
                stats[kind]["ceiling_search"].append(pool.window(client, n, 0, window_s))
        for kind in SATURATED:
            best = max(stats[kind]["ceiling_search"], key=lambda w: w["pairs_per_s"])
            stats[kind]["ceiling"] = best
        for level in SAT_LEVELS:
            for kind, pool in pools.items():
                best = stats[kind]["ceiling"]
                rate = best["pairs_per_s"] * level / 100
                stats[kind]["levels"][str(level)] = pool.window(client, best["processes"], rate, window_s)
    for kind in SATURATED:
        ceiling = stats[kind]["ceiling"]
        title = (
            f"9. Saturation: {kind}, uncontended pairs from {', '.join(map(str, args.sat_processes))} "
            f"processes, {window_s:g} s per step"
        )
        table(title, SAT_HEADER, saturation_rows(stats[kind]))
        print(f"ceiling: {fmt(ceiling['pairs_per_s'], 0)} pairs/s with {ceiling['processes']} processes; "
              f"open loop at {', '.join(f'{x} %' for x in SAT_LEVELS)} of it with as many")  # fmt: skip
    print("\nRedis CPU %: redis-server's whole CPU (INFO cpu, user + sys) per wall second of the window; "
          "main thread %: its main thread alone")  # fmt: skip
    print("client CPU %: CPU of every client process together per wall second (100 % = one CPU busy)")
    print("pairs per Redis CPU s: pairs / redis-server main-thread CPU seconds: what one Redis core "
          "would serve at 100 %")  # fmt: skip
    print("open loop: each process starts its pairs on a fixed timetable; latency runs from the "
          "scheduled start, so queueing counts")  # fmt: skip
    main = {k: stats[k]["ceiling"]["redis_main_cpu_pct"] for k in SATURATED}
    peak = {k: v if v is not None else stats[k]["ceiling"]["redis_cpu_pct"] for k, v in main.items()}
    saturated = all(v >= SAT_SATURATED_PCT for v in peak.values())
    clients = len(os.sched_getaffinity(0))
    if not saturated:
        each = " and ".join(
            f"{fmt(peak[k])} % ({k}; clients {fmt(stats[k]['ceiling']['client_cpu_pct'])} %)"
            for k in SATURATED
        )
        print(
            f"NOTE: redis-server's main thread peaked at {each} of a CPU at the ceiling: Redis did not "
            f"saturate. The client processes share {clients} CPU{'s' if clients != 1 else ''} (with "
            "whatever else runs there), and they run out of it long before Redis runs out of its own: "
            "this machine has too few cores for Redis to saturate. The pairs/s above are a lower bound "
            "of what one Redis core serves; pairs per Redis CPU second is the projected per-core capacity."
        )
    capacity = {k: stats[k]["ceiling"]["pairs_per_redis_cpu_s"] for k in SATURATED}
    ratio = capacity[GPUBOSS] / capacity[REDIS_PY]
    how = "measured" if saturated else "projected from pairs per Redis CPU second"
    print(
        f"saturation: {GPUBOSS} {fmt(capacity[GPUBOSS], 0)} pairs/s at 100 % Redis CPU vs {REDIS_PY} "
        f"{fmt(capacity[REDIS_PY], 0)} pairs/s ({ratio:.2f}x; {how})"
    )
    return {
        "processes": args.sat_processes,
        "window_s": window_s,
        "levels_pct": list(SAT_LEVELS),
        "client_cpus": clients,
        "redis_saturated": saturated,
        "contenders": stats,
        "capacity_at_100pct_redis_cpu": capacity,
        "ratio_gpuboss_vs_redis_py_lock": ratio,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20000, help="uncontended pairs per contender")
    ap.add_argument("--live-pairs", type=int, default=5000, help="pairs per contender per live level")
    ap.add_argument("--levels", default="10,1000,100000", help="live leases (and lock keys) to measure at")
    ap.add_argument("--processes", type=int, default=8, help="contending processes")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of contention per contender")
    ap.add_argument("--hold-us", type=int, default=50, help="busy work while holding, µs")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds for uncontended runs")
    ap.add_argument("--evict-rounds", type=int, default=500, help="measured eviction rounds")
    ap.add_argument(
        "--http-pairs", type=int, default=5000, help="pairs per contender over HTTP and beside it"
    )
    ap.add_argument("--heartbeat-leases", type=int, default=1000, help="leases the heartbeat worker renews")
    ap.add_argument(
        "--heartbeat-window", type=float, default=5.0, help="seconds the heartbeat worker is measured"
    )
    ap.add_argument(
        "--proxy-requests", type=int, default=500, help="requests per path and round through the proxy"
    )
    ap.add_argument("--confirm-pairs", type=int, default=3000, help="pairs per replica count in section 8")
    ap.add_argument(
        "--sat-processes", default="2,4,8,16", help="client processes per ceiling-search step in section 9"
    )
    ap.add_argument("--sat-duration", type=float, default=3.0, help="seconds per step of section 9")
    ap.add_argument("--sections", default="1,2,3,4,5,6,7,8,9", help="which sections to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--no-pin", action="store_true", help="do not pin redis-server and clients to CPUs")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.live_pairs, args.levels = 400, 200, "10,1000"
        args.duration, args.rounds, args.evict_rounds = 0.4, 2, 30
        args.http_pairs = 200
        args.heartbeat_leases, args.heartbeat_window = 50, 1.0
        args.proxy_requests = 20
        args.confirm_pairs = 100
        args.sat_processes, args.sat_duration = "2,4", 0.5
    args.levels = [int(x) for x in args.levels.split(",")]
    args.sat_processes = [int(x) for x in args.sat_processes.split(",")]
    if min(args.sat_processes) < 1:
        ap.error("--sat-processes takes positive numbers")
    args.sections = {int(x) for x in args.sections.split(",")}
    if not args.sections <= set(range(1, 10)):
        ap.error("--sections takes numbers from 1 to 9")
    args.warmup = min(500, max(20, args.pairs // 20))
    args.evict_warmup = min(20, max(5, args.evict_rounds // 10))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2 and not args.no_pin
    server_cpu, client_cpu = (cpus[0], cpus[1]) if pinned else (None, None)

    with redis_server(server_cpu) as url:
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})  # the contending processes inherit it
        client = connect(url)
        shas = script_shas()
        meta = {
            "redis_server": client.info("server")["redis_version"],
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "python_redis_lock": redis_lock.__version__,
            "cpus": os.cpu_count(),
            "cpus_available": len(cpus),
            "pinning": f"redis-server -> CPU {server_cpu}, clients -> CPU {client_cpu}" if pinned else "none",
            "load_average_1m": round(os.getloadavg()[0], 2),
            "lock_expire_s": LOCK_EXPIRE_S,
            "scripts": f"acquire={shas['acquire'][:8]} release={shas['release'][:8]}",
        }
        print("# gpuboss benchmark: gpuboss leases next to redis-py Lock and python-redis-lock")
        for k, v in meta.items():
            print(f"{k:18} {v}")
        boss = Boss(client, holder="bench")
        results: dict[str, Any] = {"meta": meta}
        if 1 in args.sections:
            results["uncontended"] = section_uncontended(args, client, boss)
        if 2 in args.sections:
            results["handoff"] = section_handoff(args, url, client, boss)
        if 3 in args.sections:
            results["live"] = section_live(args, client, boss)
        if 4 in args.sections:
            results["eviction"] = section_eviction(args, url, client, boss)
        if 5 in args.sections:
            # A fresh database, as section 3 has: its live leases would otherwise still be there.
            client.flushall()
            results["http"] = section_http(args, url, client, boss, server_cpu)
        if 6 in args.sections:
            client.flushall()  # the worker's leases alone in the database, whatever ran before
            results["heartbeats"] = section_heartbeats(args, url, client)
        if 7 in args.sections:
            client.flushall()
            results["proxy"] = section_proxy(args, url, boss, server_cpu)
        if 8 in args.sections:
            client.flushall()
            results["confirm"] = section_confirm(args, client, server_cpu)
        if 9 in args.sections:
            client.flushall()
            results["saturation"] = section_saturation(args, url, client, boss)
        client.close()
    load = round(os.getloadavg()[0], 2)
    results["meta"]["load_average_1m_at_end"] = load
    print(f"\nload average (1 min) at the end: {load} (other work on the machine skews every column)")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
