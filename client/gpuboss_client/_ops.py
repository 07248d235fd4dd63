"""The logic of every operation, once, free of I/O.

Each operation is a generator that yields :class:`Call` (run a script) or :class:`Command` (one
plain Redis command), receives the reply, and finally returns its result. The sync and async
clients are small loops that drive these generators with blocking or awaited I/O, so acquire's
wait loop, the reply parsing and the self-fencing deadlines exist once.

Time is a parameter (``clock``, monotonic seconds) so tests can step it; inside the scripts time
is Redis ``TIME``.

Here are the checks of what callers pass, the lease request (:class:`AcquireRequest`,
:class:`Ask`), acquire and the holder's operations on a lease, the operator's ones on devices and
pools, and the reading and following of events. The agent's measurements are in :mod:`._measure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ._lease import Lease, beat_interval
from ._models import (
    DEFAULT_GRACE,
    DEFAULT_POOL,
    DEFAULT_TTL,
    MAX_EVENTS,
    Beat,
    DeviceInfo,
    Event,
    LeaseInfo,
    LeaseRef,
    Plan,
    PoolStatus,
    WaitState,
)
from ._protocol import (
    _ACQUIRE,
    _BEAT,
    _CANCEL,
    _MARK,
    _OK,
    _RELEASE,
    Call,
    Clock,
    Command,
    Op,
    _ints,
    _opt_int,
    _pairs,
    _text,
    parse_reply,
)
from .errors import (
    AcquireTimeout,
    BadRequest,
    LeaseEvicted,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    ProtocolError,
    error_for,
)
from .keys import POOLS, PoolKeys, hash_slot, valid_name, valid_pool
from .scripts import script_shas, source
from .units import parse_mib, parse_priority, parse_ttl_ms

#: leases per call of the ``leases`` script (:func:`leases` and the findings read page by page)
_LIST_PAGE = 1000


def _check_pool(pool: str) -> PoolKeys:
    if not valid_pool(pool):
        raise BadRequest(f"pool must be 1-64 of [A-Za-z0-9_.-], not {pool!r}")
    return PoolKeys(pool)


def _check_gang(devices: int, device: str | None) -> int:
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= 16:
        raise BadRequest(f"devices must be an int from 1 to 16, not {devices!r}")
    if devices > 1 and device is not None:
        raise BadRequest("a gang of devices cannot name one device")
    return devices


def _check_name(what: str, name: str) -> str:
    if not valid_name(name):
        raise BadRequest(f"{what} must be 1-64 of [A-Za-z0-9_.:-], not {name!r}")
    return name


def _check_int(what: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise BadRequest(f"{what} must be an int from 0 to {top}, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds leases: a service name, plus host and pid."""

    name: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    #: pub/sub channel on which this client hears eviction notices for its leases
    notify: str = field(default_factory=lambda: f"gpuboss:notify:{secrets.token_hex(8)}")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name.encode()) <= 128:
            raise BadRequest(f"holder must be a name of 1-128 bytes, not {self.name!r}")

    @classmethod
    def of(cls, name: str, host: str | None, pid: int | None) -> Holder:
        """A holder, with this process's host and pid where not given."""
        return cls(name, socket.gethostname() if host is None else host, os.getpid() if pid is None else pid)


class AcquireOptions(TypedDict, total=False):
    """The options of :meth:`Boss.acquire` and :meth:`Boss.lease` (and their async twins), spelled
    once; :meth:`AcquireRequest.build` checks them.

    ``vram_gb``: size in GB instead of ``vram``. ``priority``: 0-100 or low/normal/high.
    ``device``: a device name, else the best fit in ``pool``. ``ttl``: seconds the memory stays
    reserved after the holder stops renewing (dies, hangs). ``timeout``: seconds to wait (``0``
    tries once, ``None`` waits for ever). ``labels``: str to str, e.g. the model. ``request_id``:
    retrying the same id never grants twice. ``preemptible``: a request of strictly higher
    priority may evict it while active. ``grace``: seconds to give the memory back once asked.
    ``exclusive``: nobody else on the device. ``devices``: a gang of that many devices of one
    host. ``max_hold``: a hard cap in seconds that ends the lease even while it is renewed.
    ``max_queue``: refuse to queue (``QueueFull``) while this many wait. ``take_over``: the holder's
    own process already uses this memory on ``device`` (the agent counts it as unmanaged): the
    grant moves it from unmanaged to the lease; tried once (``timeout=0``), and only while nobody
    waits in the pool. ``on_evict``: called with
    the lease when gpuboss asks for its memory back; unload, return, and the client releases it.
    ``on_wait``: called with a :class:`WaitState` whenever a waiting request's state changes.
    ``keepalive``: renew the lease in the client's background worker until released (default);
    ``False`` for callers who call ``heartbeat`` themselves.
    """

    vram_gb: float | None
    priority: int | str
    device: str | None
    pool: str
    ttl: float
    timeout: float | None
    labels: Mapping[str, str] | None
    request_id: str | None
    preemptible: bool
    grace: float
    exclusive: bool
    devices: int
    max_hold: float | None
    max_queue: int | None
    take_over: bool
    on_evict: Callable[[Lease], object] | None
    on_wait: Callable[[WaitState], object] | None
    keepalive: bool


#: the options that stay with the client (callbacks, the heartbeat worker), not in the request
CLIENT_OPTIONS = ("on_evict", "on_wait", "keepalive")


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """A validated lease request: what :meth:`Boss.acquire`, ``gpuboss run`` and the service's
    ``POST /v1/leases`` send to the acquire script."""

    keys: PoolKeys
    id: str
    mib: int
    priority: int
    device: str
    ttl_ms: int
    timeout: float | None
    labels: str
    preemptible: bool
    grace_ms: int
    exclusive: bool
    gang: int
    max_hold_ms: int = 0
    max_queue: int = 0
    take_over: bool = False
    #: the caller chose :attr:`id` (``request_id``): it is never replaced by another
    id_chosen: bool = False

    def anew(self) -> AcquireRequest:
        """The same request under a new id (for a grant that ended before its client heard of it)."""
        return dataclasses.replace(self, id=secrets.token_hex(8))

    @classmethod
    def build(
        cls,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = DEFAULT_POOL,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        preemptible: bool = False,
        grace: float = DEFAULT_GRACE,
        exclusive: bool = False,
        devices: int = 1,
        max_hold: float | None = None,
        max_queue: int | None = None,
        take_over: bool = False,
    ) -> AcquireRequest:
        """Check every option (see :class:`AcquireOptions`); raises :class:`BadRequest`."""
        if take_over and (device is None or timeout != 0):
            raise BadRequest("take_over needs a device and timeout=0: it takes over memory in use, once")
        if max_queue is not None and (
            isinstance(max_queue, bool) or not isinstance(max_queue, int) or not 1 <= max_queue <= 1_000_000
        ):
            raise BadRequest(f"max_queue must be None or an int from 1 to 1000000, not {max_queue!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
        ):
            raise BadRequest(f"timeout must be None or seconds >= 0, not {timeout!r}")
        if labels is not None and not (
            isinstance(labels, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise BadRequest(f"labels must map str to str, not {labels!r}")
        text = json.dumps(dict(labels), separators=(",", ":"), sort_keys=True) if labels else "{}"
        if len(text.encode()) > 4096:
            raise BadRequest("labels must be at most 4096 bytes as JSON")
        return cls(
            keys=_check_pool(pool),
            id=_check_name("request_id", request_id) if request_id is not None else secrets.token_hex(8),
            mib=parse_mib(vram, vram_gb),
            priority=parse_priority(priority),
            device=_check_name("device", device) if device is not None else "",
            ttl_ms=parse_ttl_ms(ttl),
            timeout=timeout,
            labels=text,
            preemptible=bool(preemptible),
            grace_ms=parse_ttl_ms(grace, "grace"),
            exclusive=bool(exclusive),
            gang=_check_gang(devices, device),
            max_hold_ms=0 if max_hold is None else parse_ttl_ms(max_hold, "max_hold"),
            max_queue=max_queue or 0,
            take_over=bool(take_over),
            id_chosen=request_id is not None,
        )


@dataclass(frozen=True, slots=True)
class Ask:
    """An acquire as a client method received it: the request, and what stays with the client."""

    request: AcquireRequest
    on_evict: Callable[[Lease], object] | None = None
    on_wait: Callable[[WaitState], object] | None = None
    keepalive: bool = True

    @classmethod
    def of(cls, vram: int | str | None, options: AcquireOptions) -> Ask:
        """Check ``vram`` and the options (:class:`AcquireOptions`); raises BadRequest."""
        opts: dict[str, Any] = dict(options)
        unknown = sorted(set(opts) - AcquireOptions.__optional_keys__)
        if unknown:
            raise BadRequest(f"unknown acquire option(s): {', '.join(unknown)}")
        client = {name: opts.pop(name) for name in CLIENT_OPTIONS if name in opts}
        for name in ("on_evict", "on_wait"):
            if client.get(name) is not None and not callable(client[name]):
                raise BadRequest(f"{name} must be callable, not {client[name]!r}")
        return cls(AcquireRequest.build(vram, **opts), **client)


def _granted(req: AcquireRequest, holder: Holder, f: Mapping[str, Any], sent: float, clock: Clock) -> Lease:
    # The reply carries what the grant decided; the rest is the request, which the script
    # checked is identical for a retried id.
    try:
        info = LeaseInfo(
            id=req.id,
            pool=req.keys.pool,
            state=f["state"],
            holder=holder.name,
            holder_host=holder.host,
            holder_pid=holder.pid,
            mib=req.mib,
            priority=req.priority,
            device=f["device"],
            token=int(f["token"]),
            cuda_indexes=_ints(f["cuda_index"]),
            device_host=f["device_host"] or None,
            ttl_ms=req.ttl_ms,
            expires_at_ms=int(f["expires_at"]),
            requested_at_ms=_opt_int(f.get("requested_at")),
            granted_at_ms=_opt_int(f.get("granted_at")),
            ended_at_ms=None,
            reason=None,
            labels=json.loads(req.labels),
        )
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed grant reply: {dict(f)!r}") from exc
    lease = Lease(info, deadline=0.0, clock=clock, grace_ms=req.grace_ms)
    lease._renewed(sent, info, int(f["now"]))
    if f.get("evict_deadline"):
        lease._evict_notice(int(f["evict_deadline"]))
    return lease


def _wake_grant(popped: Any) -> dict[str, str] | None:
    """The grant in a wake message (see ``wake_message`` in ``lua/_common.lua``), if it is one.

    Anything else (a timeout, or "ended ...") sends the waiter back to ask acquire, which then
    raises the right error.
    """
    if not popped:
        return None
    parts = _text(popped[1]).split(" ", 6)
    if parts[0] != "granted" or len(parts) != 7:
        return None
    names = ("now", "device", "token", "expires_at", "cuda_index", "device_host")
    return {"state": "active"} | dict(zip(names, parts[1:], strict=True))


def _lost(lease_id: str, f: Mapping[str, Any]) -> LeaseLost:
    why = f.get("state", "?") + (f" ({f['reason']})" if f.get("reason") else "")
    cls = LeaseEvicted if f.get("state") == "revoked" else LeaseLost
    return cls(f"lease {lease_id} has ended: {why}", lease=lease_id, state=f.get("state"))


def acquire(
    req: AcquireRequest,
    holder: Holder,
    clock: Clock,
    *,
    max_block: float | None = None,
    on_wait: Callable[[WaitState], object] | None = None,
) -> Op[Lease]:
    """Grant now, or wait in the queue until granted or ``req.timeout`` passes.

    While queued, the waiter blocks on its own wake list, which the release that grants it pushes
    to; it polls again at least every third of its TTL to stay in the queue, and at least every
    ``max_block`` seconds (less than the connection's read timeout, so a long wait never looks
    like a dead connection). ``on_wait`` hears every change of the waiter's :class:`WaitState`.
    """
    pool = req.keys.pool
    keys = req.keys.script_keys()
    args: list[str | int] = [req.id, holder.name, holder.host, holder.pid, req.mib, req.priority]
    args += [req.device, req.ttl_ms, req.labels, 0 if req.timeout == 0 else 1]
    args += [int(req.preemptible), req.grace_ms, holder.notify, int(req.exclusive), req.gang]
    args += [req.max_hold_ms, req.max_queue, int(req.take_over)]
    deadline = None if req.timeout is None else clock() + req.timeout
    poll = beat_interval(req.ttl_ms / 1000)
    if max_block is not None:
        poll = min(poll, max_block)
    told: tuple[int, str, int | None] | None = None
    while True:
        sent = queued_at = clock()
        code, f = parse_reply((yield Call("acquire", keys, args)), _ACQUIRE)
        if code == "granted":
            return _granted(req, holder, f, sent, clock)
        if code == "ended":
            raise _lost(req.id, f)
        if code == "busy":
            raise AcquireTimeout(f"{req.mib} MiB not free now in pool {pool}", lease=req.id)
        if on_wait is not None:
            now_ms, until_ms = int(f["now"]), _opt_int(f.get("until"))
            state = (int(f["position"]), f.get("reason", "no_room"), until_ms)
            if state != told:
                told = state
                until = None if until_ms is None else sent + max(0, until_ms - now_ms) / 1000
                on_wait(WaitState(req.id, pool, state[0], state[1], until, int(f.get("evicting", 0))))
        wait = poll
        if deadline is not None:
            wait = min(wait, deadline - clock())
        if f["position"] == 0 and f["next_expiry"] != "":
            # The head of the queue wakes when the next lease expires, to reap it at once.
            wait = min(wait, max(0.0, (int(f["next_expiry"]) - int(f["now"])) / 1000) + 0.002)
        if wait <= 0:
            sent = clock()
            code, f = parse_reply((yield Call("cancel", keys, [req.id, holder.name])), _CANCEL)
            if code == "granted":
                return _granted(req, holder, f, sent, clock)
            raise AcquireTimeout(
                f"{req.mib} MiB not granted in pool {pool} within {req.timeout} s", lease=req.id
            )
        popped = yield Command(("BLPOP", req.keys.wake(req.id), max(wait, 0.001)))
        granted = _wake_grant(popped)
        if granted is not None:
            # The release that granted it sent the grant along: no further round trip. The grant
            # happened after the acquire call that queued it was sent (not necessarily after the
            # BLPOP was: the reply may have been slow, or this process paused), so its deadline
            # counts from `queued_at` and stays on the safe side.
            return _granted(req, holder, granted, queued_at, clock)


#: a blocking acquire that finds Redis unavailable tries again after this long, then twice as
#: long each time, up to RETRY_MAX_S, until its own timeout
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

#: release, idle and busy that find Redis unavailable (a failover, a restart, a connection closed
#: under them) try again the same way for this long, about the time a Sentinel failover takes;
#: each is idempotent for its lease and token, so a try that went through unheard changes nothing
RETRY_VERB_S = 5.0

#: the scripts that only read (they may reap what expired, which any later call repeats)
READING_SCRIPTS = frozenset({"devices", "leases", "plan"})


def confirms(step: Call | Command) -> bool:
    """Whether a client with :class:`~gpuboss_client.urls.Confirm` replicas waits for ``step`` to
    reach them: every script that changes state (a grant, a renewal, a release, a device), and
    the ``BLPOP`` that takes a grant from a waiter's wake list (a write, so ``WAIT`` covers it and
    the release that pushed the grant)."""
    if isinstance(step, Call):
        return step.script not in READING_SCRIPTS
    return step.args[0] == "BLPOP"


def withdraw(req: AcquireRequest, holder: Holder) -> Op[None]:
    """Take a request that its caller gave up on (cancelled, interrupted, disconnected) out of the
    queue; if it was granted meanwhile, release the grant. Idempotent: a request that is not
    waiting any more, or never queued, is left as it is."""
    keys = req.keys.script_keys()
    try:
        code, f = parse_reply((yield Call("cancel", keys, [req.id, holder.name])), _CANCEL)
    except (LeaseNotFound, LeaseNotHeld):
        return  # never queued (refused, or granted and released), or not ours
    if code == "granted":
        token = _opt_int(f.get("token"))
        if token is not None:
            with contextlib.suppress(LeaseLost):  # it ended by itself meanwhile
                yield from release_ref(LeaseRef(req.keys.pool, req.id, token))


def _ref(ref: LeaseRef) -> PoolKeys:
    _check_name("lease id", ref.id)
    if isinstance(ref.token, bool) or not isinstance(ref.token, int) or ref.token < 0:
        raise BadRequest(f"token must be an int >= 0, not {ref.token!r}")
    return _check_pool(ref.pool)


def release_ref(ref: LeaseRef) -> Op[None]:
    """Release with the lease's token; raises LeaseLost (or LeaseEvicted) if it had ended otherwise."""
    keys = _ref(ref)
    code, f = parse_reply((yield Call("release", keys.script_keys(), [ref.id, ref.token, 0])), _RELEASE)
    if code == "ended":
        raise _lost(ref.id, f)


def heartbeat_ref(ref: LeaseRef, ttl_ms: int) -> Op[Beat]:
    """Renew a lease for ``ttl_ms`` from now and learn its state; raises LeaseLost if it ended."""
    keys = _ref(ref)
    reply = yield Call("heartbeat", keys.script_keys(), [ref.id, ref.token, ttl_ms])
    code, f = parse_reply(reply, _BEAT)
    if code == "ended":
        raise _lost(ref.id, f)
    deadline = _opt_int(f.get("evict_deadline")) if f["state"] == "evicting" else None
    return Beat(ref.id, f["state"], int(f["now"]), int(f["expires_at"]), deadline)


def mark_ref(ref: LeaseRef, verb: str) -> Op[Beat]:
    """``idle`` or ``busy``: move a held lease between kept-warm and in-use.

    Returns the lease's state; ``evicting`` means it is being evicted and must be given back (a
    caller of ``busy`` should treat that as an error). Raises LeaseLost if the lease had ended.
    """
    if verb not in ("idle", "busy"):
        raise BadRequest(f"verb must be idle or busy, not {verb!r}")
    keys = _ref(ref)
    code, f = parse_reply((yield Call(verb, keys.script_keys(), [ref.id, ref.token])), _MARK)
    if code == "ended":
        raise _lost(ref.id, f)
    if code == "evicting":
        return Beat(ref.id, "evicting", int(f["now"]), None, int(f["evict_deadline"]))
    return Beat(ref.id, f["state"], int(f["now"]), None, None)


def lease_info(pool: str, lease_id: str) -> Op[LeaseInfo]:
    """One lease or waiter as Redis holds it (ended ones linger a while); LeaseNotFound if gone."""
    keys = _check_pool(pool)
    _check_name("lease id", lease_id)
    fields = _pairs((yield Command(("HGETALL", keys.lease(lease_id)))) or [])
    if not fields:
        raise error_for("lease_not_found", f"no lease {lease_id} in pool {pool}")
    return LeaseInfo.from_fields(pool, {"id": lease_id} | fields)


def release(lease: Lease) -> Op[None]:
    """Release with the lease's token; raises LeaseLost if it had ended otherwise, or if Redis no
    longer has it."""
    try:
        yield from release_ref(LeaseRef(lease.pool, lease.id, lease.token))
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    except LeaseNotFound as exc:
        lease._mark_lost(exc.message)
        raise LeaseLost(f"lease {lease.id} is lost: {exc.message}", lease=lease.id) from exc
    lease._released = True
    lease._mark_lost("released")


def heartbeat(lease: Lease, clock: Clock) -> Op[LeaseInfo]:
    """Renew the lease and learn its state; marks it lost (and raises) if it has ended."""
    sent = clock()
    try:
        beat = yield from heartbeat_ref(LeaseRef(lease.pool, lease.id, lease.token), lease.ttl_ms)
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    except (LeaseNotFound, LeaseNotHeld) as exc:
        lease._mark_lost(exc.message)
        raise LeaseLost(f"lease {lease.id} is lost: {exc.message}", lease=lease.id) from exc
    if beat.evict_deadline_ms is not None:
        lease._evict_notice(beat.evict_deadline_ms)
    info = dataclasses.replace(lease.info, state=beat.state, expires_at_ms=beat.expires_at_ms)
    lease._renewed(sent, info, beat.now_ms)
    return info


def close(lease: Lease) -> Op[str | None]:
    """Release a lease on leaving its context; returns why it was lost, or None if it was not."""
    if lease._released:  # given back already (by on_evict's handling, or by hand)
        return "evicted" if lease.evicting else None
    reason = lease.lost_reason
    try:
        yield from release(lease)
    except (LeaseNotFound, LeaseNotHeld) as exc:
        reason = reason or exc.message
    return reason


def mark(lease: Lease, verb: str) -> Op[None]:
    """``idle`` or ``busy`` on a held lease; ``busy`` raises LeaseEvicted if it is being evicted,
    and LeaseLost (changing nothing) if the lease is lost here already. A lease Redis no longer
    has is lost (LeaseLost), as to a heartbeat."""
    if verb == "busy":
        lease.check()
    try:
        beat = yield from mark_ref(LeaseRef(lease.pool, lease.id, lease.token), verb)
    except LeaseLost as err:
        lease._mark_lost(err.message)
        raise
    except LeaseNotFound as exc:  # Redis lost it (a failover): lost, as to a heartbeat
        lease._mark_lost(exc.message)
        raise LeaseLost(f"lease {lease.id} is lost: {exc.message}", lease=lease.id) from exc
    if beat.evict_deadline_ms is not None:
        lease._evict_notice(beat.evict_deadline_ms)
        if verb == "busy":
            raise LeaseEvicted(f"lease {lease.id} is being evicted: give it back", lease=lease.id)


def force_release(lease_id: str, pool: str | None) -> Op[LeaseInfo]:
    """Operator: end a lease (or waiter) without its token, whatever pool it is in."""
    _check_name("lease id", lease_id)
    pools = [pool] if pool is not None else sorted(_text(p) for p in (yield Command(("SMEMBERS", POOLS))))
    for name in pools:
        keys = _check_pool(name)
        if pool is None and not (yield Command(("EXISTS", keys.lease(lease_id)))):
            continue
        _code, f = parse_reply((yield Call("release", keys.script_keys(), [lease_id, 0, 1])), _RELEASE)
        return LeaseInfo.from_fields(name, f)
    raise error_for("lease_not_found", f"no lease {lease_id} in any pool")


def add_device(
    name: str,
    vram: int | str,
    *,
    reserved: int | str,
    pool: str,
    host: str | None,
    cuda_index: int | None,
) -> Op[bool]:
    """Add or update a device; returns whether it was new."""
    keys = _check_pool(pool)
    _check_name("device name", name)
    total = parse_mib(vram)
    spare = parse_mib(reserved, minimum=0)
    if cuda_index is not None and (
        isinstance(cuda_index, bool) or not isinstance(cuda_index, int) or cuda_index < 0
    ):
        raise BadRequest(f"cuda_index must be an int >= 0, not {cuda_index!r}")
    host = socket.gethostname() if host is None else host
    args: list[str | int] = [name, total, spare, host, -1 if cuda_index is None else cuda_index]
    _code, f = parse_reply((yield Call("add_device", keys.script_keys(), args)), _OK)
    yield Command(("SADD", POOLS, pool))
    return bool(f["created"])


def remove_device(name: str, *, pool: str, force: bool) -> Op[None]:
    """Remove a device; with ``force``, its leases are force-released first."""
    keys = _check_pool(pool)
    _check_name("device name", name)
    while True:
        code, f = parse_reply(
            (yield Call("remove_device", keys.script_keys(), [name, int(force)])),
            frozenset({"ok", "partial"}),
        )
        if code == "ok":
            break
    if f["devices"] == 0:
        # The registry lives outside the pool's slot, so no script can keep it in step. A device
        # added between the script and this SREM (its own SADD came first) must not lose the pool:
        # look again after removing it, and put it back if the pool has a device by then.
        yield Command(("SREM", POOLS, pool))
        if (yield Command(("SCARD", keys.devices))):
            yield Command(("SADD", POOLS, pool))


def repair_pools() -> Op[list[str]]:
    """Register every pool that has devices but is missing from the pool registry (after a client
    died between a device's script and its registration); returns the pools put back. It scans the
    keyspace, so the reaper runs it now and then, never the hot path (on a cluster, one batch of
    up to 1,000 keys per primary)."""
    pattern = PoolKeys("*").devices  # "gpuboss:{*}:v1:devices": { } are plain characters to SCAN
    known = {_text(p) for p in (yield Command(("SMEMBERS", POOLS)))}
    found: list[str] = []
    cursor = "0"
    while True:
        cursor, keys = yield Command(("SCAN", cursor, "MATCH", pattern, "COUNT", 1000, "TYPE", "set"))
        for key in keys:
            pool = _text(key).split("{", 1)[1].rsplit("}", 1)[0]
            if pool not in known and valid_pool(pool) and (yield Command(("SCARD", _text(key)))):
                yield Command(("SADD", POOLS, pool))
                known.add(pool)
                found.append(pool)
        if isinstance(cursor, dict):  # a cluster scans every primary at once, one batch each
            return found
        cursor = _text(cursor)
        if cursor == "0":
            return found


def _pools(pool: str | None) -> Op[list[PoolKeys]]:
    if pool is not None:
        return [_check_pool(pool)]
    return [PoolKeys(_text(p)) for p in sorted((yield Command(("SMEMBERS", POOLS))))]


def status(pool: str | None) -> Op[list[PoolStatus]]:
    """Devices, budgets and counts of one pool, or of every pool."""
    out = []
    for keys in (yield from _pools(pool)):
        _, f = parse_reply((yield Call("devices", keys.script_keys(), [])), _OK)
        devices = [DeviceInfo.from_fields(keys.pool, _pairs(d)) for d in f["devices"]]
        queued = int(f["queued"])
        out.append(PoolStatus(keys.pool, int(f["now"]), devices, int(f["live"]) - queued, queued))
    return out


def leases(pool: str | None) -> Op[list[LeaseInfo]]:
    """Every live lease and waiter of one pool or all pools, soonest expiry first per pool."""
    out: list[LeaseInfo] = []
    for keys in (yield from _pools(pool)):
        offset = 0
        while True:
            _, f = parse_reply((yield Call("leases", keys.script_keys(), [offset, _LIST_PAGE])), _OK)
            page = [LeaseInfo.from_fields(keys.pool, _pairs(x)) for x in f["leases"] if x]
            out += page
            offset += _LIST_PAGE
            if offset >= int(f["total"]):
                break
    return out


def reap(pool: str | None) -> Op[int]:
    """End expired leases and abandoned waiters now; returns how many went."""
    total = 0
    for keys in (yield from _pools(pool)):
        while True:
            _, f = parse_reply((yield Call("reap", keys.script_keys(), [1000])), _OK)
            total += int(f["reaped"])
            if not int(f["more"]):
                break
    return total


def plan(
    vram: int | str | None,
    vram_gb: float | None,
    priority: int | str,
    device: str | None,
    pool: str,
    exclusive: bool = False,
    devices: int = 1,
) -> Op[Plan]:
    """Dry run: what would happen to this request now. Changes nothing."""
    keys = _check_pool(pool)
    args: list[str | int] = [parse_mib(vram, vram_gb), parse_priority(priority)]
    args.append(_check_name("device", device) if device is not None else "")
    args += [int(bool(exclusive)), _check_gang(devices, device)]
    code, f = parse_reply(
        (yield Call("plan", keys.script_keys(), args)), frozenset({"grant", "evict", "wait", "never"})
    )
    return Plan(
        outcome=code,
        device=f.get("device"),
        victims=tuple(_text(v) for v in f.get("victims", [])),
        ahead=int(f.get("ahead", 0)),
        largest_mib=int(f.get("largest", 0)),
    )


def configure_pool(pool: str, min_residency: float, aging: float) -> Op[None]:
    """Set a pool's minimum residency and aging period (seconds; 0 turns either off)."""
    keys = _check_pool(pool)
    args = [0 if min_residency == 0 else parse_ttl_ms(min_residency, "min_residency")]
    args.append(0 if aging == 0 else parse_ttl_ms(aging, "aging"))
    parse_reply((yield Call("configure_pool", keys.script_keys(), list(args))), _OK)


def _count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EVENTS:
        raise BadRequest(f"count must be an int from 1 to {MAX_EVENTS}, not {count!r}")
    return count


def recent_events(pool: str | None, count: int) -> Op[list[Event]]:
    """The last ``count`` events of one pool or all pools, oldest first."""
    _count(count)
    out: list[Event] = []
    for keys in (yield from _pools(pool)):
        entries = yield Command(("XREVRANGE", keys.events, "+", "-", "COUNT", count))
        out += [Event.from_entry(keys.pool, e) for e in entries or []]
    out.sort(key=lambda e: tuple(map(int, e.id.split("-"))))
    return out[-count:]


def read_events(
    cursors: Mapping[str, str], count: int, block_ms: int | None, *, by_slot: bool = False
) -> Op[list[Event]]:
    """Events after each pool's cursor (an entry id, or ``"$"`` for only new ones), oldest first.

    With ``block_ms``, waits up to that long for the first one (``XREAD BLOCK``). ``by_slot``
    (a Redis Cluster, where one command reads one slot): one ``XREAD`` per slot, the wait shared
    between them until one finds events; the rest are then read without waiting.
    """
    _count(count)
    if not cursors:
        return []
    pools = {_check_pool(p).events: p for p in cursors}
    groups: dict[int, list[str]] = {}
    for key in pools:
        groups.setdefault(hash_slot(key) if by_slot else 0, []).append(key)
    out: list[Event] = []
    for keys in groups.values():
        args: list[str | int] = ["XREAD", "COUNT", count]
        if block_ms is not None and not out:
            args += ["BLOCK", max(1, int(block_ms) // len(groups))]
        args += ["STREAMS", *keys, *(cursors[pools[k]] for k in keys)]
        reply = yield Command(tuple(args))
        streams = reply.items() if isinstance(reply, dict) else (reply or [])
        out += [Event.from_entry(pools[_text(key)], e) for key, entries in streams for e in entries]
    out.sort(key=lambda e: tuple(map(int, e.id.split("-"))))
    return out


#: the largest sequence number of a stream entry id
MAX_SEQ = 2**64 - 1


def load_scripts() -> Op[dict[str, str]]:
    """Make sure Redis has every Lua script cached (loading the missing ones, after a restart or a
    SCRIPT FLUSH); returns their SHAs by name. A PING first: it answers even with no script."""
    yield Command(("PING",))
    shas = script_shas()
    loaded = yield Command(("SCRIPT EXISTS", *shas.values()))  # one word: clusters route it so
    if isinstance(loaded, dict):  # a cluster answers per primary: loaded where every one has it
        loaded = [all(flags) for flags in zip(*loaded.values(), strict=True)]
    for (name, sha), present in zip(shas.items(), loaded, strict=True):
        if not present:
            got = yield Command(("SCRIPT LOAD", source(name)))
            got = {_text(g) for g in got.values()} if isinstance(got, dict) else {_text(got)}
            if got != {sha}:
                raise ProtocolError(f"Redis loaded script {name} as {got}, expected {sha}")
    return shas


#: the key of :func:`event_cursors` for pools that appear later (no pool has this name)
LATER = "*"


def event_cursors(pool: str | None) -> Op[dict[str, str]]:
    """Where the event streams of ``pool`` (or every pool) end now: each pool's last event id, and
    under :data:`LATER` the cursor for pools that appear later. Following from there misses
    nothing and repeats nothing that a read of recent events cut at these cursors showed."""
    pools = yield from _pools(pool)
    sec, usec = yield Command(("TIME",))
    ms = int(_text(sec)) * 1000 + int(_text(usec)) // 1000
    # A pool that appears later has had its entries since this millisecond at the most.
    out = {LATER: f"{ms - 1}-{MAX_SEQ}" if ms else "0-0"}
    for keys in pools:
        last = yield Command(("XREVRANGE", keys.events, "+", "-", "COUNT", 1))
        out[keys.pool] = _text(last[0][0]) if last else "0-0"
    return out


class Follow:
    """Where a reader of events stands in each pool (:meth:`AsyncBoss.follow`), free of I/O.

    It follows ``pool``, or every pool: then the pool registry is read again at most every
    ``look_every`` seconds. ``after`` is one event id for every pool, or a cursor per pool (as
    :func:`event_cursors` gives, or as a reader left them), where :data:`LATER` is for pools that
    appear later (so a pool that comes back does not replay its history).
    """

    def __init__(
        self,
        pool: str | None,
        after: str | Mapping[str, str],
        *,
        clock: Clock,
        look_every: float,
        by_slot: bool = False,
    ) -> None:
        self.pool = pool
        self.by_slot = by_slot
        if isinstance(after, str):
            self.after, self.cursors = after, {}
        else:
            self.after = after.get(LATER, "0-0")
            self.cursors = {p: c for p, c in after.items() if p != LATER and (pool is None or p == pool)}
        if pool is not None:
            _check_pool(pool)
            self.cursors.setdefault(pool, self.after)
        self._clock = clock
        self._look_every = look_every
        self._looked: float | None = None

    def step(self, count: int, block_ms: int | None) -> Op[list[Event]]:
        """The next events (waiting up to ``block_ms`` for one), oldest first; cursors move on."""
        now = self._clock()
        if self.pool is None and (self._looked is None or now - self._looked >= self._look_every):
            for keys in (yield from _pools(None)):
                self.cursors.setdefault(keys.pool, self.after)
            self._looked = now
        if not self.cursors:
            return []
        events = yield from read_events(self.cursors, count, block_ms, by_slot=self.by_slot)
        for event in events:
            self.cursors[event.pool] = event.id
        return events


#: redis-py's read timeout where none is given (its connections' default)
DEFAULT_READ_TIMEOUT = 5.0


def max_block_of(client: Any) -> float | None:
    """The longest a blocking command (BLPOP, XREAD BLOCK) may wait on ``client``'s connections:
    half their read timeout, so that a long wait is never taken for a dead connection."""
    if hasattr(client, "connection_pool"):  # one Redis, or the primary Sentinel names
        kwargs = client.connection_pool.connection_kwargs
    elif hasattr(client, "nodes_manager"):  # a cluster: the blocking client's nodes, the asyncio one's
        kwargs = getattr(client, "connection_kwargs", None) or client.nodes_manager.connection_kwargs
    else:  # a client of another kind: block briefly
        return 1.0
    timeout = kwargs.get("socket_timeout", DEFAULT_READ_TIMEOUT)
    return None if timeout is None else max(0.05, float(timeout) / 2)
