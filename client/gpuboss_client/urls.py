"""One way to name a Redis deployment, for every entry point: a URL, parsed here without I/O.

==================================================================  ==============================
URL                                                                  deployment
==================================================================  ==============================
``redis://[user:pw@]host:port[/db]``, ``rediss://...`` (TLS)          one Redis
``unix:///path/redis.sock[?db=N]``                                   one Redis over a socket
``redis+sentinel://[user:pw@]host:port[,host:port...]/service[/db]``  the primary Sentinel names
``redis+cluster://[user:pw@]host:port[,host:port...]``                 a Redis Cluster
==================================================================  ==============================

``rediss+sentinel://`` and ``rediss+cluster://`` speak TLS to every node (and to the sentinels).
The user and password are the data nodes'; sentinels that need their own take
``sentinel_username`` and ``sentinel_password``. Query parameters set connection options:
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``,
``required``), ``ssl_check_hostname``, ``socket_timeout``, ``socket_connect_timeout``; and two of
gpuboss's own (see :class:`Confirm`): ``confirm_replicas`` and ``confirm_ms``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .errors import BadRequest

__all__ = ["CONFIRM_ALL", "Confirm", "Deployment", "parse_url", "redact"]

Kind = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_FLOATS = ("socket_timeout", "socket_connect_timeout")
_STRINGS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path", "ssl_password")
_CERT_REQS = ("none", "optional", "required")
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
_CONFIRM = ("confirm_replicas", "confirm_ms")
#: ``Confirm.replicas`` for every replica (``confirm_replicas=all``)
CONFIRM_ALL = -1
_PASSWORD = re.compile(r"(?<=://)([^:@/]*):[^@/]*@")
#: how long a write waits for its replicas by default, where replicas are asked for
DEFAULT_CONFIRM_MS = 500


def redact(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    return _PASSWORD.sub(r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class Confirm:
    """Writes count once ``replicas`` replicas have them (``WAIT replicas ms`` after each script
    that changes state and each grant taken from a wake list); 0: once the primary has them;
    :data:`CONFIRM_ALL` (``confirm_replicas=all``, the default of ``redis+sentinel://``): once every
    replica that is not down has them, counted as the sentinels know them (or as the primary's
    ``ROLE`` lists them) when the client first writes, every minute, and after a write they did
    not all confirm. A call not confirmed in ``ms``
    milliseconds raises :class:`BackendUnavailable` (it may or may not survive a failover): a
    holder renews only what a promoted replica would know, and otherwise fences itself by its
    local deadline. ``WAIT`` blocks its connection at most half the read timeout
    (``socket_timeout``), whatever ``ms`` says.

    Fewer than all is not safe against a failover: Sentinel promotes a replica without regard to
    which replicas confirmed a write, and a primary left behind keeps the others attached (and
    confirming) until it is demoted, then they resynchronise from the new primary and drop what
    it confirmed."""

    replicas: int = 0
    ms: int = DEFAULT_CONFIRM_MS


@dataclass(frozen=True, slots=True)
class Deployment:
    """A parsed Redis URL: what to connect to and how."""

    kind: Kind
    #: for ``single``: the URL redis-py takes (gpuboss's own parameters removed)
    url: str
    #: sentinels, or the cluster's seed nodes
    nodes: tuple[tuple[str, int], ...] = ()
    #: the Sentinel service name of the primary
    service: str | None = None
    db: int = 0
    tls: bool = False
    #: connection options for every data node: credentials, TLS, timeouts
    options: dict[str, Any] = field(default_factory=dict)
    #: options of the connections to the sentinels themselves
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    confirm: Confirm = Confirm()


def parse_url(url: str) -> Deployment:
    """The deployment ``url`` names; :class:`BadRequest` (with the password masked) if it names
    none."""
    if not isinstance(url, str) or "://" not in url:
        raise BadRequest(f"bad Redis URL {redact(str(url))!r}: expected e.g. redis://127.0.0.1:6379/0")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise BadRequest(f"bad Redis URL {redact(url)!r}: unknown scheme {scheme!r} (known: {known})")
    kind, tls = _SCHEMES[scheme]
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    confirm = _confirm(url, query, default_replicas=CONFIRM_ALL if kind == "sentinel" else 0)
    if kind == "single":
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k in _CONFIRM for k, _ in pairs):  # redis-py does not know them
            rest = urlencode([(k, v) for k, v in pairs if k not in _CONFIRM])
            head, fragment = url.partition("?")[0], parts.fragment
            url = head + (f"?{rest}" if rest else "") + (f"#{fragment}" if fragment else "")
        return Deployment("single", url, tls=tls, confirm=confirm)
    options = _options(url, query, tls)
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:
        user, _, password = netloc[0].partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    nodes = _nodes(url, netloc[-1])
    path = [p for p in parts.path.split("/") if p]
    sentinel_options = {k: query.pop(k) for k in _SENTINEL_AUTH if k in query}
    if kind == "cluster":
        if path:
            raise BadRequest(f"bad Redis URL {redact(url)!r}: a cluster has one database, give no path")
        if confirm.replicas or sentinel_options:
            what = "confirm_replicas" if confirm.replicas else "sentinel options"
            raise BadRequest(
                f"bad Redis URL {redact(url)!r}: {what} cannot apply to a cluster (for replicas, set "
                "min-replicas-to-write on its nodes)"
            )
        return Deployment("cluster", url, nodes, tls=tls, options=options, confirm=confirm)
    if not path or len(path) > 2:
        raise BadRequest(
            f"bad Redis URL {redact(url)!r}: expected redis+sentinel://host:port[,host:port...]/service[/db]"
        )
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise BadRequest(f"bad Redis URL {redact(url)!r}: the database must be a number, not {path[1]!r}")
        db = int(path[1])
    if tls:
        sentinel_options |= {k: v for k, v in options.items() if k.startswith("ssl")}
    return Deployment(
        "sentinel", url, nodes, service=unquote(path[0]), db=db, tls=tls, options=options,
        sentinel_options=sentinel_options, confirm=confirm,
    )  # fmt: skip


def _nodes(url: str, hosts: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequest(f"bad Redis URL {redact(url)!r}: {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def _confirm(url: str, query: dict[str, str], default_replicas: int) -> Confirm:
    replicas, ms = query.pop("confirm_replicas", None), query.pop("confirm_ms", None)
    if replicas is not None and replicas.lower() == "all":
        replicas = str(CONFIRM_ALL)
    elif replicas is not None and not (replicas.isdigit() and int(replicas) < 100_000):
        raise BadRequest(
            f"bad Redis URL {redact(url)!r}: confirm_replicas must be a whole number or all, not {replicas!r}"
        )
    if ms is not None and not (ms.isdigit() and int(ms) < 100_000):
        raise BadRequest(f"bad Redis URL {redact(url)!r}: confirm_ms must be a whole number, not {ms!r}")
    confirm = Confirm(default_replicas if replicas is None else int(replicas))
    if ms is not None:
        if int(ms) == 0:
            raise BadRequest(f"bad Redis URL {redact(url)!r}: confirm_ms must be at least 1")
        confirm = Confirm(confirm.replicas, int(ms))
    return confirm


def _options(url: str, query: dict[str, str], tls: bool) -> dict[str, Any]:
    """Connection options from the query of a sentinel or cluster URL (``query`` keeps the rest)."""
    options: dict[str, Any] = {}
    for name in _FLOATS:
        if name in query:
            try:
                options[name] = float(query.pop(name))
            except ValueError:
                raise BadRequest(f"bad Redis URL {redact(url)!r}: {name} must be a number") from None
    for name in _STRINGS:
        if name in query:
            options[name] = query.pop(name)
    if "ssl_cert_reqs" in query:
        value = query.pop("ssl_cert_reqs").lower()
        if value not in _CERT_REQS:
            raise BadRequest(
                f"bad Redis URL {redact(url)!r}: ssl_cert_reqs is one of {', '.join(_CERT_REQS)}"
            )
        options["ssl_cert_reqs"] = value
    if "ssl_check_hostname" in query:
        options["ssl_check_hostname"] = query.pop("ssl_check_hostname").lower() in ("1", "true", "yes")
    unknown = sorted(set(query) - set(_SENTINEL_AUTH))
    if unknown:
        raise BadRequest(f"bad Redis URL {redact(url)!r}: unknown parameter {unknown[0]!r}")
    if tls:
        options["ssl"] = True
    elif any(k.startswith("ssl") for k in options):
        raise BadRequest(f"bad Redis URL {redact(url)!r}: TLS options need rediss+...://")
    return options
