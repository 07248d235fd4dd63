"""A Redis client for a :class:`~gpuboss_client.urls.Deployment`, with the classes of either
backend (redis-py's blocking or asyncio ones): one Redis, the primary Sentinel names, or a Redis
Cluster. Replies are decoded to text."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .urls import Deployment

__all__ = [
    "Address",
    "Classes",
    "Replicas",
    "address",
    "address_of",
    "connect",
    "replicas_of",
    "unconfirmed",
]

#: ``(host, port)`` of a Redis server
Address = tuple[str, int]

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


def replicas_of(role: Any) -> int:
    """How many replicas a ``ROLE`` reply lists (none where the node is not a primary)."""
    return len(role[2]) if role and role[0] in ("master", b"master") else 0


#: flags a sentinel gives a replica it cannot count on: down, or its link lost
_DOWN = frozenset({"s_down", "o_down", "disconnected"})
#: flags a sentinel gives replicas while it fails their primary over (one is being promoted)
_FAILING_OVER = frozenset({"promoted", "reconf_sent", "reconf_inprog", "reconf_done"})


def address(host: str | bytes, port: int | str | bytes) -> Address:
    """``(host, port)`` from a reply (sentinels' connections do not decode theirs)."""
    return (host.decode() if isinstance(host, bytes) else host, int(port))


def address_of(connection: Any) -> Address | None:
    """Where a redis-py connection is connected to (None for a Unix socket)."""
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return None if host is None or port is None else address(host, port)


@dataclass(frozen=True)
class Replicas:
    """How many replicas a primary has, as the backends' ``count_replicas`` counts them."""

    #: the replicas that must confirm a write: those not down
    count: int
    #: every replica known, down or not (behind Sentinel: as the sentinels list them)
    listed: int
    #: whether Sentinel counted them
    sentinels: bool = False
    #: behind Sentinel, the primary that every sentinel that answered names (None while they differ)
    primary: Address | None = None

    def attached(self, replicas: int) -> Replicas:
        """This count, after a write found ``replicas`` attached to the primary (more than counted)."""
        return replace(self, count=replicas, listed=max(self.listed, replicas))

    def confirm(self, acked: int, written_to: Address | None) -> bool:
        """Whether a write that ``acked`` replicas of the node at ``written_to`` confirmed counts:
        each replica counted has it, and behind Sentinel that node is the primary they all name
        (not one that a failover is leaving behind, whose replicas still confirm its writes)."""
        return acked >= self.count and (
            not self.sentinels or (self.primary is not None and self.primary == written_to)
        )

    @classmethod
    def from_sentinels(cls, views: list[tuple[Any, list[dict[str, Any]]]], known: int) -> Replicas:
        """The count from what each sentinel that answered says: ``(GET-MASTER-ADDR-BY-NAME,
        REPLICAS)``. The most replicas any of them thinks neither down nor cut off, the most it
        lists, and the primary they all name; ``known`` (the last count), and no primary, while
        one is failing it over or they do not agree on one (mid-failover, the primary named may be
        deposed already, and a view that counts fewer may be the new primary's, not the one a
        client still writes to)."""
        counts, listed, primaries, failing_over = [], [], set(), False
        for named, replicas in views:
            flags = [
                set(f.split(",")) if isinstance(f := r.get("flags", ""), str) else set(f) for r in replicas
            ]
            counts.append(sum(not f & _DOWN for f in flags))
            listed.append(len(replicas))
            failing_over |= any(f & _FAILING_OVER for f in flags)
            primaries.add(None if named is None else address(*named))
        if failing_over or len(primaries) != 1:
            return cls(max([known, *counts]), max([known, *listed]), sentinels=True)
        return cls(max(counts), max(listed), sentinels=True, primary=primaries.pop())


def unconfirmed(
    acked: int, need: int, fresh: Replicas | None, written_to: Address | None, wait_ms: int
) -> str:
    """Why a write that ``acked`` replicas of ``written_to`` confirmed does not count (``fresh``:
    the count taken after it, with ``confirm_replicas=all``)."""
    need = need if fresh is None else max(need, fresh.count)
    if acked < need or fresh is None:
        return f"Redis confirmed the write on {acked} of {need} replicas within {wait_ms} ms"
    if fresh.primary is None:
        return f"the write went to {written_to} while the sentinels fail the primary over"
    return f"the write went to {written_to}, not to the primary the sentinels name ({fresh.primary})"
