"""The consumer manager as the boss service runs it: from ``--consumers FILE``, reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from gpuboss.agent import Agent
from gpuboss.settings import ServiceSettings
from gpuboss_client import GpubossError

from .manager import ConsumerManager
from .registry import Registry, load_registry

__all__ = ["managed_consumers"]

log = logging.getLogger("gpuboss.consumers")


@contextlib.asynccontextmanager
async def managed_consumers(
    settings: ServiceSettings, redis_url: str, agent: Agent | None
) -> AsyncIterator[ConsumerManager]:
    """The manager of the consumers in ``settings.consumers`` (none: an empty one), started, with
    SIGHUP reading the file again where this runs in the main thread. A registry file with errors
    stops the start with :class:`~gpuboss_client.BadRequest` naming the field."""
    path = settings.consumers
    registry = load_registry(path) if path is not None else Registry()
    manager = ConsumerManager(
        registry, redis_url, agent=agent, path=path, socket_connect_timeout=settings.redis_timeout_s
    )
    await manager.start()
    if path is not None:
        log.info("managing %d consumers from %s", len(registry.consumers), path)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            changes = await manager.reload()
            log.info("reloaded %s: %s", path, ", ".join(changes) or "no changes")
        except GpubossError as exc:
            log.error("not reloaded (the running consumers are unchanged): %s", exc.message)

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    hup = False
    if path is not None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            hup = True
    try:
        yield manager
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        await asyncio.gather(*reloads, return_exceptions=True)
        await manager.aclose()
