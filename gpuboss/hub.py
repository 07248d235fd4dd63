"""The event hub: one background task tails every pool's event stream for the whole service.

It counts events per (pool, event name) since the service started (for ``/metrics``) and fans
them out to subscribers (the SSE route). Each subscriber has a bounded queue: one that does not
keep up is dropped, its stream ends, and it reconnects with ``Last-Event-ID`` to read what it
missed from Redis. A slow subscriber never holds the hub back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from gpuboss_client import AsyncBoss, Event

from .background import BackgroundLoop

__all__ = ["EventHub", "Subscription", "event_key"]

log = logging.getLogger("gpuboss.hub")

#: the least time between two reads that found events: under load the hub reads batches, not
#: one event per read, which costs Redis and the service far less; an event reaches subscribers
#: at most this much later
PACE_S = 0.02


def event_key(event_id: str) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<n>"`` as a sortable pair."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """Events of one pool (or all) from the moment of subscribing; an async iterator.

    Iteration ends when the hub stops or drops this subscriber for falling behind (after the
    events already queued for it). Leave the ``with`` block (or call :meth:`close`) to unsubscribe.
    """

    def __init__(self, hub: EventHub, pool: str | None, size: int) -> None:
        self.pool = pool
        self.dropped = False
        self._hub = hub
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self._closed = False

    def offer(self, event: Event) -> bool:
        """Queue ``event`` if it is for this subscriber; False if the queue is full."""
        if self._closed or (self.pool is not None and event.pool != self.pool):
            return True
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    def close(self) -> None:
        """Unsubscribe; iteration ends once the queued events are taken."""
        if self._closed:
            return
        self._closed = True
        self._hub._subscribers.discard(self)
        with contextlib.suppress(asyncio.QueueFull):  # a full queue ends by being drained
            self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None once the subscription has ended; TimeoutError after ``timeout`` s."""
        if self._closed and self._queue.empty():
            return None
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EventHub(BackgroundLoop):
    """Tails the event streams of every pool (``counts`` and :meth:`subscribe`).

    Each pass refreshes the list of pools and blocks up to ``block_s`` for new events, at most one
    read that finds events per ``pace_s``. Cursors start
    at Redis's time when the hub starts, also for pools that appear later, so ``counts`` holds every
    event since the start and nothing is skipped between passes. Redis outages are logged and
    retried every ``retry_s``.
    """

    task_name = "gpuboss-event-hub"

    def __init__(
        self,
        boss: AsyncBoss,
        *,
        block_s: float = 1.0,
        retry_s: float = 1.0,
        queue_size: int = 1000,
        pace_s: float = PACE_S,
    ) -> None:
        super().__init__()
        self.boss = boss
        self.block_s = block_s
        self.retry_s = retry_s
        self.queue_size = queue_size
        self.pace_s = pace_s
        #: events seen since the start, by (pool, event name)
        self.counts: dict[tuple[str, str], int] = {}
        #: subscribers dropped for falling behind
        self.dropped = 0
        #: set once the hub knows where it starts reading: every event after that is seen
        self.tailing = asyncio.Event()
        self._subscribers: set[Subscription] = set()
        self._cursors: dict[str, str] = {}

    @property
    def subscribers(self) -> int:
        """How many subscribers are attached."""
        return len(self._subscribers)

    def subscribe(self, pool: str | None = None) -> Subscription:
        """Events of ``pool`` (or of every pool) from now on, until closed or dropped."""
        sub = Subscription(self, pool, self.queue_size)
        self._subscribers.add(sub)
        return sub

    async def stop(self) -> None:
        """Stop tailing and end every subscription."""
        await super().stop()
        for sub in list(self._subscribers):
            sub.close()

    async def run(self) -> None:
        """Tail until cancelled: one :meth:`AsyncBoss.follow` of every pool, resumed after an outage
        where each pool was left (a pool that appears starts at the hub's start)."""
        start: dict[str, str] | None = None
        failing = False
        while not self._stopping:
            try:
                if start is None:
                    start = await self.boss.event_cursors()
                    self.tailing.set()
                async for event in self.boss.follow(
                    after=start | self._cursors, block=self.block_s, pace=self.pace_s
                ):
                    if failing:
                        log.info("event hub reads events again")
                        failing = False
                    self._cursors[event.pool] = event.id
                    key = (event.pool, event.name)
                    self.counts[key] = self.counts.get(key, 0) + 1
                    self.publish(event)
                return  # the client was closed
            except Exception as exc:  # outages above all; the hub must outlive them
                if not failing:
                    log.warning("event hub cannot read events (retrying every %s s): %s", self.retry_s, exc)
                failing = True
                await asyncio.sleep(self.retry_s)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber; drop those whose queue is full."""
        for sub in list(self._subscribers):
            if not sub.offer(event):
                sub.dropped = True
                sub.close()
                self.dropped += 1
                log.warning("dropped an event subscriber that fell %d events behind", self.queue_size)
