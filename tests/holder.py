"""A lease holder that the crash and concurrency tests run as a separate OS process.

Not a test module: the tests start it with the venv's python, read what it prints (one line per
fact, flushed at once) and kill, stop or resume it. The Redis URL comes in ``GPUBOSS_REDIS_URL``.

Modes:

``hold``    acquire one lease per ``--device`` (or one anywhere) with ``with boss.lease(...)``
            (``--async``: ``async with AsyncBoss.lease(...)``), print ``HOLDING <id> <token>`` for
            each, then block for ever with the heartbeats running, until killed.
``manual``  ``lease = boss.acquire(...)`` (the GPUBoss pattern: no ``with``), print ``HOLDING <id>
            <token>``, then block for ever while the client renews the lease, until killed.
``lost``    acquire with ``with boss.lease(...)``, print ``HOLDING``, then wait until
            ``lease.lost`` turns true by itself (the test stops this process past its TTL), ask
            Redis with ``boss.heartbeat`` and print ``LOST <reason> / heartbeat says <state>``,
            then leave the ``with`` block and print ``EXIT <error>`` for the LeaseLost it raises.
``wait``    print ``WAITING <request id>``, acquire (queueing behind whatever holds the memory),
            print ``GRANTED <id> <token>``, then block for ever without heartbeats.
``hammer``  print ``READY``, wait for a line on stdin (the start barrier), then run ``--cycles``
            acquire / hold briefly / release cycles of random size, priority and timeout, and
            print ``DONE <json>``: what each request got, as this client saw it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from typing import Any

from gpuboss_client import AcquireTimeout, AsyncBoss, Boss, LeaseLost


def say(*words: object) -> None:
    print(*words, flush=True)


def url() -> str:
    return os.environ["GPUBOSS_REDIS_URL"]


def ttl(args: argparse.Namespace) -> dict[str, float]:
    """The ``ttl`` option, if the test gave one (else the client's default)."""
    return {} if args.ttl is None else {"ttl": args.ttl}


def manual(args: argparse.Namespace) -> None:
    """The GPUBoss pattern: ``lease = boss.acquire(...)``, work, ``boss.release(lease)`` (here the
    work never ends: the test kills or terminates the process)."""
    boss = Boss.from_url(url(), holder=args.holder)
    lease = boss.acquire(args.mib, pool=args.pool, **ttl(args))
    say("HOLDING", lease.id, lease.token)
    threading.Event().wait()  # until killed


def hold(args: argparse.Namespace) -> None:
    devices: list[str | None] = args.device or [None]
    boss = Boss.from_url(url(), holder=args.holder)
    with contextlib.ExitStack() as stack:
        for device in devices:
            lease = stack.enter_context(boss.lease(args.mib, device=device, pool=args.pool, **ttl(args)))
            say("HOLDING", lease.id, lease.token)
        threading.Event().wait()  # until killed


async def hold_async(args: argparse.Namespace) -> None:
    devices: list[str | None] = args.device or [None]
    async with AsyncBoss.from_url(url(), holder=args.holder) as boss, contextlib.AsyncExitStack() as stack:
        for device in devices:
            lease = await stack.enter_async_context(
                boss.lease(args.mib, device=device, pool=args.pool, **ttl(args))
            )
            say("HOLDING", lease.id, lease.token)
        await asyncio.Event().wait()  # until killed


def lost(args: argparse.Namespace) -> None:
    boss = Boss.from_url(url(), holder=args.holder)
    tick = threading.Event()
    try:
        with boss.lease(args.mib, pool=args.pool, **ttl(args)) as lease:
            say("HOLDING", lease.id, lease.token)
            # The holder finds out by itself: no signal from the test, only the lease's own state.
            while not lease.lost:
                tick.wait(0.02)
            try:
                info = boss.heartbeat(lease)
                truth = f"still {info.state}"
            except LeaseLost as exc:
                truth = str(exc.details.get("state", exc.code))
            say("LOST", lease.lost_reason, "/ heartbeat says", truth)
    except LeaseLost as exc:
        say("EXIT", type(exc).__name__, exc.code, exc)
    else:
        say("EXIT none")
    boss.close()


def wait(args: argparse.Namespace) -> None:
    boss = Boss.from_url(url(), holder=args.holder)
    say("WAITING", args.request_id)
    lease = boss.acquire(
        args.mib,
        pool=args.pool,
        timeout=args.timeout,
        request_id=args.request_id,
        keepalive=False,
        **ttl(args),
    )
    say("GRANTED", lease.id, lease.token)
    threading.Event().wait()  # until killed


def hammer(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    boss = Boss.from_url(url(), holder=args.holder)
    boss.status(args.pool)  # connect before the barrier, so all start together
    say("READY")
    sys.stdin.readline()
    results: list[dict[str, Any]] = []
    for cycle in range(args.cycles):
        mib = rng.randint(1024, 6 * 1024)
        priority = rng.choice((10, 50, 90))
        timeout = rng.choice((0, 0.05, 0.3, 5.0))
        rid = f"{args.holder}-{cycle}"
        hold_s = rng.uniform(0, 0.01)  # simulated work while holding, not synchronisation
        got: dict[str, Any] = {"id": rid, "mib": mib, "priority": priority, "timeout": timeout}
        try:
            if cycle % 2:
                with boss.lease(
                    mib, priority=priority, pool=args.pool, timeout=timeout, request_id=rid
                ) as held:
                    got |= {"outcome": "released", "device": held.device, "token": held.token}
                    time.sleep(hold_s)
            else:
                lease = boss.acquire(mib, priority=priority, pool=args.pool, timeout=timeout, request_id=rid)
                got |= {"outcome": "released", "device": lease.device, "token": lease.token}
                time.sleep(hold_s)
                boss.release(lease)
        except AcquireTimeout:
            got["outcome"] = "timeout"
        except LeaseLost as exc:
            got["outcome"] = f"lost: {exc}"
        results.append(got)
    boss.close()
    say("DONE", json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("hold", "manual", "lost", "wait", "hammer"))
    p.add_argument("--pool", required=True)
    p.add_argument("--holder", default=f"holder-{os.getpid()}")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--ttl", type=float, default=None, help="seconds (default: the client's)")
    p.add_argument("--device", action="append")
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--request-id")
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.mode == "hold":
        if args.use_async:
            asyncio.run(hold_async(args))
        else:
            hold(args)
    else:
        {"manual": manual, "lost": lost, "wait": wait, "hammer": hammer}[args.mode](args)


if __name__ == "__main__":
    main()
