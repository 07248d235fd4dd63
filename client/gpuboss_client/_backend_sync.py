"""Concurrency for :mod:`gpuboss_client.sync`: threads, events and sleeps.

The same names as :mod:`gpuboss_client._backend_aio`, for the client generated from ``aio.py``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
import redis.client
import redis.cluster
import redis.sentinel

from ._connect import Address, Classes, Replicas, address_of, replicas_of
from ._connect import connect as _connect
from .urls import Deployment

T = TypeVar("T")

#: the Redis client type this backend drives
Redis = redis.Redis
PubSub = redis.client.PubSub
_CLASSES = Classes(
    redis.Redis, redis.sentinel.Sentinel, redis.cluster.RedisCluster, redis.cluster.ClusterNode
)


def connect(deployment: Deployment, **options: Any) -> Any:
    """A blocking Redis client for ``deployment`` (see :mod:`gpuboss_client._connect`)."""
    return _connect(deployment, _CLASSES, **options)


class Worker:
    """A daemon thread running ``fn(*args)``."""

    def __init__(self, fn: Callable[..., None], *args: Any, name: str) -> None:
        self._thread = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        """Wait until it ends (it must have been told to stop)."""
        if self._thread is not threading.current_thread():
            self._thread.join()


class Signal:
    """A flag that wakes a worker waiting for it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None) -> bool:
        """Wait until set or ``timeout`` seconds passed; returns whether it is set."""
        return self._event.wait(None if timeout is None else max(0.0, timeout))


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def resolve(value: T) -> T:
    """A callback's result, as it is (the sync client takes plain callbacks)."""
    return value


def close_pubsub(pubsub: Any) -> None:
    pubsub.close()


def close_redis(client: Any) -> None:
    client.close()
    # A client of the primary Sentinel names also holds connections to the sentinels.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def sync_twin(client: Any, deployment: Deployment | None = None) -> Any:
    """A blocking client for the same server: this one."""
    return client


def pubsub(client: Any) -> Any:
    """A pub/sub connection of ``client``."""
    return client.pubsub()


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, redis.cluster.RedisCluster)


def drop_idle_connections(client: Any) -> None:
    """Close ``client``'s idle connections, so that its next call connects afresh."""
    client.connection_pool.disconnect(inuse_connections=False)


def drop_connections(client: Any) -> None:
    """Close every connection of ``client``, those in use too (their commands fail, retryably), so
    that no call goes on through a connection made before."""
    client.connection_pool.disconnect(inuse_connections=True)


def count_replicas(client: Any, known: int) -> Replicas:
    """How many replicas ``client``'s primary has: behind Sentinel, from what the sentinels say
    (:meth:`~gpuboss_client._connect.Replicas.from_sentinels`, ``known`` the last count); else as
    the primary's ``ROLE`` lists them."""
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        attached = replicas_of(client.execute_command("ROLE"))
        return Replicas(attached, attached)
    views = []
    for sentinel in manager.sentinels:
        try:
            named = sentinel.sentinel_get_master_addr_by_name(pool.service_name)
            views.append((named, sentinel.sentinel_slaves(pool.service_name)))
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

    def run(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` at once; their replies in order, an error reply as its exception."""
        conn = self._connection
        conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies


@contextlib.contextmanager
def held_connection(client: Any) -> Iterator[Held]:
    """A connection of ``client``'s pool for a sequence of commands; closed if the sequence fails
    half-way (its replies may be half read), given back to the pool either way."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        yield Held(connection)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
