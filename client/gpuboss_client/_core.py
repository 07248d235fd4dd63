"""The parts of the client's logic, gathered for the two drivers: the asyncio client (``aio.py``)
and the blocking one written from it (``sync.py``), which run the operations with awaited or
blocking I/O. Everything here is free of I/O and lives in its own module:

- :mod:`._protocol`: the steps an operation yields to Redis (:class:`Call`, :class:`Command`),
  the reply codes and :func:`parse_reply`, and :func:`drive`;
- :mod:`._models`: the data operations return (:class:`LeaseInfo`, :class:`DeviceInfo`,
  :class:`PoolStatus`, :class:`Event`, :class:`Plan`, ...) and the request defaults;
- :mod:`._lease`: the state a holder keeps (:class:`Lease`, :class:`Held`) and its deadlines;
- :mod:`._ops`: the request (:class:`AcquireRequest`) and every operation (acquire, release,
  heartbeat, the operator's ones, events);
- :mod:`._measure`: the NVML agent's measurements and findings.

The drivers, :mod:`.ops` and tests import them from here as ``core.X``; every name stays here.
"""

from __future__ import annotations

# Each name is re-exported (``X as X``, as mypy --strict wants), one statement per module.
# isort: off
from ._lease import (
    Held as Held,
    Lease as Lease,
    beat_interval as beat_interval,
    fence_margin as fence_margin,
    next_beat as next_beat,
    parse_notice as parse_notice,
    raise_if_lost as raise_if_lost,
)
from ._measure import (
    MAX_READINGS as MAX_READINGS,
    DeviceHealth as DeviceHealth,
    Findings as Findings,
    LeaseUsage as LeaseUsage,
    Measurement as Measurement,
    findings as findings,
    measure as measure,
    note as note,
)
from ._models import (
    DEFAULT_GRACE as DEFAULT_GRACE,
    DEFAULT_POOL as DEFAULT_POOL,
    DEFAULT_TTL as DEFAULT_TTL,
    MAX_EVENTS as MAX_EVENTS,
    Beat as Beat,
    DeviceInfo as DeviceInfo,
    Event as Event,
    LeaseInfo as LeaseInfo,
    LeaseRef as LeaseRef,
    Plan as Plan,
    PoolStatus as PoolStatus,
    WaitState as WaitState,
    split_queue as split_queue,
    status_document as status_document,
)
from ._ops import (
    _LIST_PAGE as _LIST_PAGE,
    CLIENT_OPTIONS as CLIENT_OPTIONS,
    LATER as LATER,
    MAX_SEQ as MAX_SEQ,
    RETRY_FIRST_S as RETRY_FIRST_S,
    RETRY_MAX_S as RETRY_MAX_S,
    RETRY_VERB_S as RETRY_VERB_S,
    AcquireOptions as AcquireOptions,
    AcquireRequest as AcquireRequest,
    Ask as Ask,
    Follow as Follow,
    Holder as Holder,
    _check_gang as _check_gang,
    _check_int as _check_int,
    _check_name as _check_name,
    _check_pool as _check_pool,
    _count as _count,
    _granted as _granted,
    _lost as _lost,
    _pools as _pools,
    _ref as _ref,
    _wake_grant as _wake_grant,
    acquire as acquire,
    withdraw as withdraw,
    add_device as add_device,
    close as close,
    configure_pool as configure_pool,
    event_cursors as event_cursors,
    force_release as force_release,
    confirms as confirms,
    heartbeat as heartbeat,
    heartbeat_ref as heartbeat_ref,
    lease_info as lease_info,
    leases as leases,
    load_scripts as load_scripts,
    mark as mark,
    mark_ref as mark_ref,
    max_block_of as max_block_of,
    plan as plan,
    read_events as read_events,
    reap as reap,
    recent_events as recent_events,
    release as release,
    release_ref as release_ref,
    remove_device as remove_device,
    repair_pools as repair_pools,
    status as status,
)
from ._protocol import (
    _ACQUIRE as _ACQUIRE,
    _BEAT as _BEAT,
    _CANCEL as _CANCEL,
    _MARK as _MARK,
    _OK as _OK,
    _RELEASE as _RELEASE,
    Call as Call,
    Clock as Clock,
    Command as Command,
    Op as Op,
    Step as Step,
    T as T,
    _from_doc as _from_doc,
    _ints as _ints,
    _opt_int as _opt_int,
    _pairs as _pairs,
    _text as _text,
    drive as drive,
    parse_reply as parse_reply,
)
# isort: on

__all__ = [
    "Beat",
    "Call",
    "Command",
    "DeviceInfo",
    "Event",
    "Lease",
    "LeaseInfo",
    "LeaseRef",
    "PoolStatus",
]
