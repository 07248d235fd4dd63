"""What redis-py's exceptions mean to gpuboss: every outage, failover, migration and full memory
is a retryable :class:`BackendUnavailable`; an ACL refusal is :class:`BackendForbidden`, naming
what was refused, and so is a server whose TLS certificate this client does not trust; anything
else Redis refuses is a :class:`ProtocolError` (a bug, or a server that is not Redis enough).

Errors raised inside a script keep their code at the start of the message (Redis 7), so a
``READONLY`` from a ``redis.call`` reads the same as one from a plain command.
"""

from __future__ import annotations

import ssl

import redis
import redis.exceptions as rx

from .errors import BackendForbidden, BackendUnavailable, GpubossError, ProtocolError

__all__ = ["RETRY_CODES", "backend_error"]

#: how Redis words an ACL refusal of a command inside a script (no NOPERM code there)
_SCRIPT_REFUSED = "user executing the script can't run this command"
#: error codes of a deployment in transition or out of room: the same call succeeds later
RETRY_CODES = frozenset(
    {"TRYAGAIN", "CLUSTERDOWN", "READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING", "OOM", "BUSY", "UNBLOCKED"}
)
#: why each retryable code happens, for the message
_WHY = {
    "TRYAGAIN": "a slot is migrating",
    "CLUSTERDOWN": "the cluster is down",
    "READONLY": "this node is a replica now (failover)",
    "NOREPLICAS": "too few replicas acknowledge writes (min-replicas-to-write)",
    "MASTERDOWN": "the replica lost its primary",
    "LOADING": "Redis is loading its data",
    "OOM": "Redis is full (maxmemory); nothing was written",
    "BUSY": "Redis is busy running a script",
    "UNBLOCKED": "a blocked call was cut short: the primary became a replica (failover)",
}
_UNAVAILABLE = (
    rx.RedisClusterException,
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.ReadOnlyError,
    rx.MasterDownError,
    rx.SlotNotCoveredError,
    rx.OutOfMemoryError,
    rx.BusyLoadingError,
)
# redis-py strips the code of the errors it has a class for; put it back to read them alike
_CODE_OF: dict[type[Exception], str] = {
    rx.ReadOnlyError: "READONLY",
    rx.OutOfMemoryError: "OOM",
    rx.NoPermissionError: "NOPERM",
    rx.BusyLoadingError: "LOADING",
    rx.TryAgainError: "TRYAGAIN",
    rx.ClusterDownError: "CLUSTERDOWN",
    rx.MasterDownError: "MASTERDOWN",
}


def _untrusted(exc: BaseException) -> bool:
    """Whether ``exc`` came from a TLS certificate this client does not trust: no retry fixes it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def backend_error(exc: redis.RedisError) -> GpubossError:
    """The gpuboss error for a failed Redis call."""
    text = str(exc)
    code = _CODE_OF.get(type(exc)) or text.split(" ", 1)[0]
    if code == "NOPERM" or isinstance(exc, rx.NoPermissionError) or _SCRIPT_REFUSED in text:
        return BackendForbidden(f"Redis refused this client's user: {text}")
    if _untrusted(exc):
        return BackendForbidden(f"Redis's TLS certificate is not trusted (check ssl_ca_certs): {text}")
    if code in RETRY_CODES:
        return BackendUnavailable(f"Redis cannot serve this now ({_WHY[code]}): {text}", redis_error=code)
    if isinstance(exc, _UNAVAILABLE):
        return BackendUnavailable(f"Redis unreachable: {text}")
    return ProtocolError(f"Redis refused a command: {text}")
