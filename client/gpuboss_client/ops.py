"""The client's operations, for programs that drive them with :meth:`Boss.run` / :meth:`AsyncBoss.run`.

Each is a generator over Redis steps (see ``_core``); ``Boss`` and ``AsyncBoss`` methods are thin
wrappers around them. The boss service uses them to act for HTTP holders, who present a
:class:`LeaseRef` (pool, id, token) instead of holding a :class:`~gpuboss_client.Lease` object.
"""

from ._core import (
    DEFAULT_GRACE,
    DEFAULT_POOL,
    DEFAULT_TTL,
    MAX_EVENTS,
    MAX_READINGS,
    AcquireOptions,
    AcquireRequest,
    Beat,
    DeviceHealth,
    Event,
    Findings,
    Holder,
    LeaseRef,
    LeaseUsage,
    Measurement,
    acquire,
    findings,
    heartbeat_ref,
    lease_info,
    mark_ref,
    measure,
    note,
    read_events,
    recent_events,
    release_ref,
    withdraw,
)

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_POOL",
    "DEFAULT_TTL",
    "MAX_EVENTS",
    "MAX_READINGS",
    "AcquireOptions",
    "AcquireRequest",
    "Beat",
    "DeviceHealth",
    "Event",
    "Findings",
    "Holder",
    "LeaseRef",
    "LeaseUsage",
    "Measurement",
    "acquire",
    "findings",
    "heartbeat_ref",
    "lease_info",
    "mark_ref",
    "measure",
    "note",
    "read_events",
    "recent_events",
    "release_ref",
    "withdraw",
]
