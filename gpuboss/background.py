"""A loop the service runs in the background (the reaper, the event hub), started and stopped once."""

from __future__ import annotations

import asyncio

__all__ = ["BackgroundLoop"]


class BackgroundLoop:
    """Runs :meth:`run` as an asyncio task between :meth:`start` and :meth:`stop`.

    ``run`` loops while ``self._stopping`` is false and must outlive Redis outages on its own.
    """

    task_name = "gpuboss-background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the loop in a background task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        """Stop the loop; a Redis call in flight is cancelled (each script is atomic, so that is safe)."""
        if self._task is not None:
            self._stopping = True
            # Cancel until it ends: a Redis client caught mid-reply may swallow one cancellation.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.1)
            self._task = None
