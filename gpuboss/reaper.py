"""The reaper: ends expired leases and abandoned waiters on time, even when no client is active.

Every script already reaps the pool it touches, so with busy clients this loop finds little to
do; it is what returns the memory of a dead holder in a quiet pool within its TTL plus
``interval_s``.
"""

from __future__ import annotations

import asyncio
import logging

from gpuboss_client import AsyncBoss

__all__ = ["Reaper"]

log = logging.getLogger("gpuboss.reaper")


class Reaper:
    """Calls :meth:`AsyncBoss.reap` every ``interval_s`` seconds in a background task.

    A failed pass (Redis unreachable) is logged once per outage and tried again at the next
    interval; :meth:`stop` cancels the loop and waits for it.
    """

    def __init__(self, boss: AsyncBoss, interval_s: float) -> None:
        self.boss = boss
        self.interval_s = interval_s
        #: leases and waiters ended so far
        self.reaped = 0
        #: passes that completed
        self.passes = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start reaping in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="gpuboss-reaper")

    async def stop(self) -> None:
        """Stop reaping; a pass in flight is cancelled (each script is atomic, so that is safe)."""
        if self._task is not None:
            self._stopping = True
            # Cancel until it ends: a Redis client caught mid-reply may swallow one cancellation.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.1)
            self._task = None

    async def run(self) -> None:
        """Reap until cancelled."""
        failing = False
        while not self._stopping:
            try:
                n = await self.boss.reap()
            except Exception as exc:  # outages above all; the reaper must outlive them
                if not failing:
                    log.warning("reaper cannot reach Redis (retrying every %s s): %s", self.interval_s, exc)
                failing = True
            else:
                if failing:
                    log.info("reaper reaches Redis again")
                failing = False
                self.passes += 1
                self.reaped += n
                if n:
                    log.info("reaped %d expired lease(s) or waiter(s)", n)
            await asyncio.sleep(self.interval_s)
