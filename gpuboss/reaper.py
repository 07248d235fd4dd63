"""The reaper: ends expired leases and abandoned waiters on time, even when no client is active.

Every script already reaps the pool it touches, so with busy clients this loop finds little to
do; it is what returns the memory of a dead holder in a quiet pool within its TTL plus
``interval_s``.
"""

from __future__ import annotations

import asyncio
import logging

from gpuboss_client import AsyncBoss

from .background import BackgroundLoop

__all__ = ["Reaper"]

log = logging.getLogger("gpuboss.reaper")


#: passes between two repairs of the pool registry (a scan of the keyspace: not every pass)
REPAIR_EVERY = 60


class Reaper(BackgroundLoop):
    """Calls :meth:`AsyncBoss.reap` every ``interval_s`` seconds in a background task, and now and
    then :meth:`AsyncBoss.repair_pools`.

    A failed pass (Redis unreachable) is logged once per outage and tried again at the next
    interval; :meth:`stop` cancels the loop and waits for it.
    """

    task_name = "gpuboss-reaper"

    def __init__(self, boss: AsyncBoss, interval_s: float) -> None:
        super().__init__()
        self.boss = boss
        self.interval_s = interval_s
        #: leases and waiters ended so far
        self.reaped = 0
        #: passes that completed
        self.passes = 0

    async def run(self) -> None:
        """Reap until cancelled."""
        failing = False
        while not self._stopping:
            try:
                if self.passes % REPAIR_EVERY == 0:  # at the start, then now and then
                    for pool in await self.boss.repair_pools():
                        log.warning(
                            "pool %s had devices but was missing from the pool registry: restored", pool
                        )
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
