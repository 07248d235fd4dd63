"""A Redis client for a :class:`~gpuboss_client.urls.Deployment`, with the classes of either
backend (redis-py's blocking or asyncio ones): one Redis, the primary Sentinel names, or a Redis
Cluster. Replies are decoded to text."""

from __future__ import annotations

from typing import Any, NamedTuple

from .urls import Deployment

__all__ = ["Classes", "connect"]

#: connection options that also apply to the connections to the sentinels
_TO_SENTINELS = ("socket_timeout", "socket_connect_timeout")


class Classes(NamedTuple):
    """redis-py's client classes of one backend."""

    Redis: Any
    Sentinel: Any
    RedisCluster: Any
    ClusterNode: Any


def connect(deployment: Deployment, classes: Classes, **options: Any) -> Any:
    """A client for ``deployment``; ``options`` (redis-py's) add to and override the URL's."""
    d = deployment
    if d.kind == "single":
        return classes.Redis.from_url(d.url, decode_responses=True, **options)
    kwargs = d.options | options
    if d.kind == "cluster":
        nodes = [classes.ClusterNode(host, port) for host, port in d.nodes]
        return classes.RedisCluster(startup_nodes=nodes, decode_responses=True, **kwargs)
    to_sentinels = {k: v for k, v in kwargs.items() if k in _TO_SENTINELS}
    for name in ("username", "password"):
        if f"sentinel_{name}" in d.sentinel_options:
            to_sentinels[name] = d.sentinel_options[f"sentinel_{name}"]
    to_sentinels |= {k: v for k, v in d.sentinel_options.items() if k.startswith("ssl")}
    sentinel = classes.Sentinel(list(d.nodes), sentinel_kwargs=to_sentinels, **kwargs)
    return sentinel.master_for(d.service, db=d.db, decode_responses=True)
