"""A holder of a warm (idle) or preemptible lease that the eviction tests run as an OS process.

Not a test module: ``tests/test_eviction_processes.py`` starts it with the venv's python, reads
what it prints (one line per fact, flushed at once) and kills it in teardown. The Redis URL comes
in ``GPUBOSS_REDIS_URL``.

It loads a stand-in "model" (a bytearray), leases memory for it with ``with boss.lease(...)``
(``--async``: ``async with AsyncBoss.lease(...)``), and then, with ``--state idle``, marks the
lease idle (kept warm); with ``--state preemptible`` it keeps it active but preemptible. Then it
prints ``HOLDING <lease id> <token> <notify channel>`` and waits to be evicted:

- by default its ``on_evict`` (a coroutine with ``--async``) prints
  ``EVICT <lease id> <CLOCK_MONOTONIC ns at its start> <evict deadline ms>``, unloads the model and
  prints ``UNLOADED <bytes still resident>``; the client then releases the lease by itself, which
  the holder sees as ``lease.lost`` with the reason ``released`` and prints ``RELEASED <reason>``;
- with ``--ignore`` it has no ``on_evict`` and never releases: it waits until its lease is lost
  (at the eviction deadline less the client's margin), prints ``LOST <Redis ms> <reason>``, waits
  until Redis's clock has passed the deadline, then asks Redis itself: ``BEAT <error> <code> <state>`` for its
  own heartbeat, and ``RELEASE <error> <code> <state>`` (or ``RELEASE ok``) for a release with the
  old token.

Last it leaves the ``with`` block and prints ``EXIT <error> <code>`` (or ``EXIT none``), then
``CALLS <n>``, the number of times ``on_evict`` ran, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

from gpuboss_client import AsyncBoss, Boss, GpubossError, Lease, LeaseLost

WAIT_S = 60.0  # bound on every wait: the test kills the process long before


def say(*words: object) -> None:
    print(*words, flush=True)


def redis_ms(boss: Boss) -> int:
    """Redis's clock, ms."""
    sec, usec = boss.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def mono_ns() -> int:
    """System-wide monotonic time, comparable with the test process's clock."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Model:
    """Stands in for weights resident in VRAM: loading allocates, unloading frees."""

    def __init__(self, nbytes: int) -> None:
        self.weights = bytearray(nbytes)

    def unload(self) -> int:
        self.weights = bytearray()
        return len(self.weights)


def error_words(exc: GpubossError) -> tuple[str, str, str]:
    return type(exc).__name__, exc.code, str(exc.details.get("state", "-"))


def hold(args: argparse.Namespace) -> None:
    boss = Boss.from_url(os.environ["GPUBOSS_REDIS_URL"], holder="evict-holder")
    model = Model(args.model_bytes)
    evicted = threading.Event()
    calls = 0

    def on_evict(lease: Lease) -> None:
        nonlocal calls
        calls += 1
        say("EVICT", lease.id, mono_ns(), lease.evict_deadline_ms)
        say("UNLOADED", model.unload())
        evicted.set()

    tick = threading.Event()  # never set: its wait() is the polling interval below
    try:
        with boss.lease(
            args.mib, priority=args.priority, pool=args.pool, ttl=args.ttl, grace=args.grace,
            preemptible=args.state == "preemptible", on_evict=None if args.ignore else on_evict,
        ) as lease:  # fmt: skip
            if args.state == "idle":
                lease.idle()
            say("HOLDING", lease.id, lease.token, boss.holder.notify)
            if not args.ignore and not evicted.wait(WAIT_S):
                say("TIMEOUT waiting for on_evict")
            # The client releases the lease once on_evict returns, or (--ignore) the heartbeats
            # find it revoked: either way the lease turns lost. Nothing to block on but its state.
            deadline = time.monotonic() + WAIT_S
            while not lease.lost and time.monotonic() < deadline:
                tick.wait(0.005)
            if args.ignore:
                # Lost at the eviction deadline less the margin, before the server revokes it;
                # then, once Redis's clock is past the deadline, it asks Redis.
                say("LOST", redis_ms(boss), lease.lost_reason)
                while redis_ms(boss) <= (lease.evict_deadline_ms or 0) and time.monotonic() < deadline:
                    tick.wait(0.005)
                try:
                    info = boss.heartbeat(lease)
                    say("BEAT ok", info.state)
                except GpubossError as exc:
                    say("BEAT", *error_words(exc))
                try:
                    boss.release(lease)
                    say("RELEASE ok")
                except GpubossError as exc:
                    say("RELEASE", *error_words(exc))
            else:
                say("RELEASED", lease.lost_reason)
    except LeaseLost as exc:
        say("EXIT", type(exc).__name__, exc.code)
    else:
        say("EXIT none")
    say("CALLS", calls)
    boss.close()


async def hold_async(args: argparse.Namespace) -> None:
    model = Model(args.model_bytes)
    evicted = asyncio.Event()
    calls = 0

    async def on_evict(lease: Lease) -> None:
        nonlocal calls
        calls += 1
        say("EVICT", lease.id, mono_ns(), lease.evict_deadline_ms)
        left = await asyncio.to_thread(model.unload)  # unloading off the event loop
        say("UNLOADED", left)
        evicted.set()

    async with AsyncBoss.from_url(os.environ["GPUBOSS_REDIS_URL"], holder="evict-holder") as boss:
        try:
            async with boss.lease(
                args.mib, priority=args.priority, pool=args.pool, ttl=args.ttl, grace=args.grace,
                preemptible=args.state == "preemptible", on_evict=None if args.ignore else on_evict,
            ) as lease:  # fmt: skip
                if args.state == "idle":
                    await lease.idle()
                say("HOLDING", lease.id, lease.token, boss.holder.notify)
                if not args.ignore:
                    try:
                        await asyncio.wait_for(evicted.wait(), WAIT_S)
                    except TimeoutError:
                        say("TIMEOUT waiting for on_evict")
                deadline = time.monotonic() + WAIT_S
                while not lease.lost and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)  # the client's own release task: nothing to await
                if args.ignore:
                    try:
                        info = await boss.heartbeat(lease)
                        say("BEAT ok", info.state)
                    except GpubossError as exc:
                        say("BEAT", *error_words(exc))
                    try:
                        await boss.release(lease)
                        say("RELEASE ok")
                    except GpubossError as exc:
                        say("RELEASE", *error_words(exc))
                else:
                    say("RELEASED", lease.lost_reason)
        except LeaseLost as exc:
            say("EXIT", type(exc).__name__, exc.code)
        else:
            say("EXIT none")
    say("CALLS", calls)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--pool", required=True)
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--priority", default="low")
    p.add_argument("--state", choices=("idle", "preemptible"), default="idle")
    p.add_argument("--ttl", type=float, default=10.0)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--ignore", action="store_true", help="no on_evict, never release")
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--model-bytes", type=int, default=8 << 20)
    args = p.parse_args()
    if args.use_async:
        asyncio.run(hold_async(args))
    else:
        hold(args)


if __name__ == "__main__":
    main()
