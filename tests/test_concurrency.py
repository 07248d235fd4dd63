"""Many real processes contend for two devices; the event stream must show a correct history.

Sixteen OS processes (``tests/holder.py hammer``) start together behind a barrier (each waits for
a line on stdin) and run acquire / hold briefly / release cycles of random size (1-6 GiB),
priority (10, 50, 90) and timeout (0, i.e. try once; 50 ms; 300 ms; 5 s) against two devices of
10 GiB in one pool, half through ``acquire``/``release`` and half through ``with boss.lease``.
Both devices have the same budget, so every request could use either, and a waiter that does not
fit blocks both for everyone behind it. The whole history is then replayed from the pool's event
stream, which every script appends to inside the same atomic step as the change it records:

(a) the granted MiB on each device never exceed its budget, and every grant goes to the best fit
    (the device with the least room left over; ties to the first by name);
(b) no lease id is granted twice, every lease ends exactly once, and fencing tokens strictly
    increase;
(c) at each grant, no request of higher priority is waiting, nor one of the same priority that
    queued earlier (a request granted at once, without queueing, counts as queued last);
(d) no request waits that could have been served: at each ``queued`` event either a request of
    the same or higher priority is already waiting (it blocks both devices), or the request fits
    on neither device;
(e) what each process saw (granted with this token on this device, timed out, busy) is what the
    stream recorded; nobody lost a lease, and no waiter was abandoned;
and at the end no lease, waiter or used MiB is left.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from gpuboss_client import Boss, PoolKeys

pytestmark = pytest.mark.slow

HOLDER = Path(__file__).with_name("holder.py")
WORKERS = 16
CYCLES = 30
DEVICES = ("gpu0", "gpu1")
BUDGET_MIB = 10 * 1024
ENDS_HELD = {"released", "expired", "force_released", "revoked"}
ENDS_WAITING = {"cancelled", "abandoned"}


@dataclass
class Replay:
    """The pool's history rebuilt from its event stream, and every rule it broke."""

    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEVICES, 0))
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEVICES, 0))
    waiting: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # id -> prio, order, ms
    live: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> device, mib
    granted: dict[str, dict[str, str]] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    waits_ms: dict[int, list[int]] = field(default_factory=dict)  # priority -> queued-to-granted
    max_live: int = 0
    last_token: int = 0
    order: int = 0
    problems: list[str] = field(default_factory=list)

    def bad(self, at: str, what: str) -> None:
        self.problems.append(f"{at}: {what}")

    def feed(self, entry_id: str, f: dict[str, str]) -> None:
        ev, lid = f["event"], f.get("lease", "")
        at = f"{entry_id} {ev} {lid}"
        if ev.startswith("device_"):
            return
        if lid in self.ended:
            self.bad(at, f"event after the lease had ended ({self.ended[lid]})")
        if ev == "queued":
            self.on_queued(at, lid, f, int(entry_id.split("-")[0]))
        elif ev == "granted":
            self.on_granted(at, lid, f, int(entry_id.split("-")[0]))
        elif ev in ENDS_HELD and "device" in f:
            held = self.live.pop(lid, None)
            if held is None:
                self.bad(at, "ended a lease that was not held")
                return
            if held != (f["device"], int(f["mib"])):
                self.bad(at, f"ended as {f['device']}/{f['mib']} but was granted as {held}")
            self.used[held[0]] -= held[1]
            self.ended[lid] = ev
        elif ev in ENDS_WAITING or ev in ENDS_HELD:
            if self.waiting.pop(lid, None) is None:
                self.bad(at, "ended a request that was not waiting")
            self.ended[lid] = ev
        else:
            self.bad(at, "unknown event")

    def on_queued(self, at: str, lid: str, f: dict[str, str], ms: int) -> None:
        mib, prio = int(f["mib"]), int(f["priority"])
        if lid in self.queued or lid in self.granted:
            self.bad(at, "queued twice, or after it was granted")
        ahead = [w for w, (p, _, _) in self.waiting.items() if p >= prio]
        fits = [d for d in DEVICES if self.used[d] + mib <= BUDGET_MIB]
        if not ahead and fits:  # (d)
            self.bad(at, f"{mib} MiB waits though it fits on {fits} and nobody of priority >= {prio} waits")
        self.queued.add(lid)
        self.waiting[lid] = (prio, self.order, ms)
        self.order += 1

    def on_granted(self, at: str, lid: str, f: dict[str, str], ms: int) -> None:
        mib, prio, dev, token = int(f["mib"]), int(f["priority"]), f["device"], int(f["token"])
        if lid in self.granted:  # (b)
            self.bad(at, "granted twice")
        if token <= self.last_token:  # (b)
            self.bad(at, f"token {token} after token {self.last_token}")
        self.last_token = max(self.last_token, token)
        mine = self.waiting.pop(lid, None)
        my_order = mine[1] if mine else math.inf
        if mine is not None:
            if mine[0] != prio:
                self.bad(at, f"queued at priority {mine[0]}, granted at {prio}")
            self.waits_ms.setdefault(prio, []).append(ms - mine[2])
        jumped = sorted(
            w for w, (p, o, _) in self.waiting.items() if p > prio or (p == prio and o < my_order)
        )
        if jumped:  # (c)
            self.bad(at, f"granted at priority {prio} while {jumped} waited ahead of it")
        left = {d: BUDGET_MIB - self.used[d] - mib for d in DEVICES}
        if left[dev] < 0:  # (a)
            self.bad(at, f"{mib} MiB on {dev} exceeds its budget: {self.used[dev]} MiB already used")
        fitting = [d for d in DEVICES if left[d] >= 0]
        if fitting and dev != min(fitting, key=lambda d: (left[d], d)):  # (a) best fit
            self.bad(at, f"placed on {dev} though room left over would be {left}")
        self.used[dev] += mib
        self.peak[dev] = max(self.peak[dev], self.used[dev])
        self.live[lid] = (dev, mib)
        self.granted[lid] = f
        self.max_live = max(self.max_live, len(self.live))


def run_workers(redis_url: str, pool: str, seed: int) -> list[dict[str, Any]]:
    """Start the workers, release them together, and return every request's outcome."""
    env = {**os.environ, "GPUBOSS_REDIS_URL": redis_url}
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(WORKERS):
            cmd = [sys.executable, str(HOLDER), "hammer", "--pool", pool, "--holder", f"w{i:02d}"]
            cmd += ["--cycles", str(CYCLES), "--seed", str(seed + i)]
            procs.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                    env=env,
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # blocks until that worker is connected and waiting
            assert line == "READY\n", f"worker {p.args!r} said {line!r} instead of READY"
        for p in procs:  # the barrier opens: one line to each, as fast as the pipes go
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        results: list[dict[str, Any]] = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            done = [line for line in out.splitlines() if line.startswith("DONE ")]
            assert p.returncode == 0, f"worker {p.args!r} exited {p.returncode}:\n{out}"
            assert len(done) == 1, f"worker {p.args!r} printed no result:\n{out}"
            results += json.loads(done[0].removeprefix("DONE "))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()


def test_sixteen_processes_keep_budget_order_and_fencing(
    real_redis: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = "hammer"
    keys = PoolKeys(pool)
    boss = Boss(real_redis, holder="test")
    for name in DEVICES:
        boss.add_device(name, BUDGET_MIB, pool=pool)
    seed = random.randrange(1 << 30)

    results = run_workers(redis_url, pool, seed)

    entries = cast(list[tuple[str, dict[str, str]]], real_redis.xrange(keys.events))
    assert entries[0][1]["event"] == "device_added", "the stream was trimmed: lower WORKERS or CYCLES"
    replay = Replay()
    for entry_id, fields in entries:
        replay.feed(entry_id, fields)
    assert not replay.problems, f"seed {seed}: {len(replay.problems)} violations:\n" + "\n".join(
        replay.problems[:20]
    )

    # (e) each process's view agrees with the stream.
    outcomes = Counter(r["outcome"] if r["outcome"] != "timeout" or r["timeout"] else "busy" for r in results)
    assert set(outcomes) <= {"released", "timeout", "busy"}, f"seed {seed}: {outcomes}"
    for r in results:
        rid, g = r["id"], replay.granted.get(r["id"])
        if r["outcome"] == "released":
            assert g is not None, f"{rid} was granted, the stream says not"
            assert (g["device"], int(g["token"]), int(g["mib"])) == (r["device"], r["token"], r["mib"]), rid
            assert replay.ended[rid] == "released", rid
        elif r["timeout"]:
            assert g is None, f"{rid} timed out, yet the stream granted it"
            assert replay.ended.get(rid) == "cancelled", f"{rid} timed out but ended {replay.ended.get(rid)}"
        else:
            assert rid not in replay.queued, f"{rid} was busy, yet it queued"
            assert g is None, f"{rid} was busy, yet it was granted"
    assert set(replay.granted) | replay.queued <= {r["id"] for r in results}
    assert Counter(replay.ended.values())["abandoned"] == 0

    # The end state: nothing held, nothing waiting, nothing used.
    assert not replay.live
    assert not replay.waiting
    assert replay.used == dict.fromkeys(DEVICES, 0)
    assert boss.leases(pool) == []
    assert {d.name: d.used_mib for d in boss.devices(pool)} == dict.fromkeys(DEVICES, 0)
    assert real_redis.zcard(keys.queue) == 0
    assert real_redis.zcard(keys.expiry) == 0

    waited = sum(len(v) for v in replay.waits_ms.values())
    assert waited > 0, "no request ever waited: the run did not contend"
    with capsys.disabled():
        worst = {p: max(v) for p, v in sorted(replay.waits_ms.items())}
        print(
            f"\n  {WORKERS} processes x {CYCLES} cycles (seed {seed}): {len(replay.granted)} grants"
            f" ({waited} after waiting), {outcomes['timeout']} timed out in the queue,"
            f" {outcomes['busy']} busy; max {replay.max_live} leases at once, peak MiB {replay.peak};"
            f" longest wait by priority (ms) {worst}; {len(entries)} events"
        )
