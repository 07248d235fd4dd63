"""Concurrency for :mod:`gpuboss_client.aio`: tasks, events and sleeps of asyncio.

:mod:`gpuboss_client._backend_sync` offers the same names with threads, for the client that
``client/unasync.py`` generates from ``aio.py``: the client's logic is written once, and only these
few primitives differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.asyncio.sentinel

from ._connect import Address, Classes, Replicas, address_of, replicas_of
from ._connect import connect as _connect
from .urls import Deployment

T = TypeVar("T")

#: the Redis client type this backend drives
Redis = aioredis.Redis
PubSub = aioredis.client.PubSub
_CLASSES = Classes(
    aioredis.Redis, redis.asyncio.sentinel.Sentinel, redis.asyncio.cluster.RedisCluster,
    redis.asyncio.cluster.ClusterNode,
)  # fmt: skip


def connect(deployment: Deployment, **options: Any) -> Any:
    """An asyncio Redis client for ``deployment`` (see :mod:`gpuboss_client._connect`)."""
    return _connect(deployment, _CLASSES, **options)


_tasks: set[asyncio.Task[Any]] = set()


class Worker:
    """A background task (a thread in the sync backend) running ``fn(*args)``."""

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(fn(*args), name=name)
        _tasks.add(self._task)  # asyncio keeps only weak references to tasks
        self._task.add_done_callback(_tasks.discard)

    def alive(self) -> bool:
        return not self._task.done()

    async def join(self) -> None:
        """Wait until it ends (it must have been told to stop)."""
        if self._task is not asyncio.current_task():
            await asyncio.wait([self._task])


class Signal:
    """A flag that wakes a worker waiting for it (asyncio.Event, or threading.Event)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float | None) -> bool:
        """Wait until set or ``timeout`` seconds passed; returns whether it is set."""
        if timeout is not None and timeout <= 0:
            return self._event.is_set()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def resolve(value: Awaitable[T] | T) -> T:
    """A callback's result: awaited if it is awaitable (only this backend accepts async callbacks)."""
    if inspect.isawaitable(value):
        return await value
    return value


async def close_pubsub(pubsub: Any) -> None:
    await pubsub.aclose()


async def close_redis(client: Any) -> None:
    await client.aclose()
    # A client of the primary Sentinel names also holds connections to the sentinels.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


_TWIN_KWARGS = ("host", "port", "db", "username", "password", "path", "socket_timeout")


def sync_twin(client: Any, deployment: Deployment | None = None) -> Any:
    """A blocking client for the same server (for the release at interpreter exit, when no event
    loop runs any more): for ``deployment`` where the client was made from one."""
    import redis

    from . import _backend_sync

    if deployment is not None:
        return _backend_sync.connect(deployment)
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _TWIN_KWARGS or k.startswith("ssl_")}
    connection_class = getattr(redis, pool.connection_class.__name__, redis.Connection)
    sync_pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
    return redis.Redis(connection_pool=sync_pool, decode_responses=True)


async def pubsub(client: Any) -> Any:
    """A pub/sub connection of ``client`` (a cluster client learns its slot map first: its
    pub/sub routes by slot but does not load the map itself)."""
    if is_cluster(client):
        await client.initialize()
    return client.pubsub()


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, redis.asyncio.cluster.RedisCluster)


async def drop_idle_connections(client: Any) -> None:
    """Close ``client``'s idle connections, so that its next call connects afresh."""
    await client.connection_pool.disconnect(inuse_connections=False)


async def drop_connections(client: Any) -> None:
    """Close every connection of ``client``, those in use too (their commands fail, retryably), so
    that no call goes on through a connection made before."""
    await client.connection_pool.disconnect(inuse_connections=True)


async def count_replicas(client: Any, known: int) -> Replicas:
    """How many replicas ``client``'s primary has: behind Sentinel, from what the sentinels say
    (:meth:`~gpuboss_client._connect.Replicas.from_sentinels`, ``known`` the last count); else as
    the primary's ``ROLE`` lists them."""
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        attached = replicas_of(await client.execute_command("ROLE"))
        return Replicas(attached, attached)
    views = []
    for sentinel in manager.sentinels:
        try:
            named = await sentinel.sentinel_get_master_addr_by_name(pool.service_name)
            views.append((named, await sentinel.sentinel_slaves(pool.service_name)))
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            continue
    return Replicas.from_sentinels(views, known)


class Held:
    """One connection taken from a client's pool: its commands' replies come back on it, and a
    ``WAIT`` sent on it confirms the writes made on it."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    @property
    def address(self) -> Address | None:
        """The server it is connected to."""
        return address_of(self._connection)

    async def run(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` at once; their replies in order, an error reply as its exception."""
        conn = self._connection
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies


@contextlib.asynccontextmanager
async def held_connection(client: Any) -> AsyncIterator[Held]:
    """A connection of ``client``'s pool for a sequence of commands; closed if the sequence fails
    half-way (its replies may be half read), given back to the pool either way."""
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        yield Held(connection)
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
