"""Model-based test: the real Lua scripts, driven through ``Boss``, against a small Python model.

A hypothesis state machine adds, updates and removes devices, acquires at once, queues waiters,
retries requests, releases (with the right and a wrong token), cancels, force-releases and
heartbeats. The model follows the rules of ``lua/_common.lua`` (settle, candidates, best fit)
and ``lua/acquire.lua``; after every step the machine checks that Redis agrees with it:

* every device's ``used_mib`` is the sum of its live leases, within its budget, and as modelled;
* every lease and waiter is in the modelled state, on the modelled device, with the modelled
  fencing token, and fencing tokens strictly increase;
* the queue grants exactly the waiters the model predicts (priority, then arrival; a waiter that
  does not fit blocks every device it could use; best fit), and wakes exactly those;
* the event stream holds exactly the modelled events, and every lease or waiter has at most one
  terminal event, none after it, and exactly one once it has ended.

TTLs are long, so nothing expires during a run, and every lease is a plain one (not idle,
preemptible, exclusive or a gang), so nothing is evicted: expiry and eviction have their own tests.
The same machine runs on fakeredis and on the real redis-server; each example starts from an
empty database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import fake_server

from gpuboss_client import Boss, _core
from gpuboss_client._core import Lease, LeaseInfo
from gpuboss_client.errors import (
    ERRORS,
    AcquireTimeout,
    GpubossError,
    LeaseLost,
    LeaseNotFound,
)
from gpuboss_client.keys import PoolKeys

POOL = "model"
HOLDER, HOST, PID = "svc", "h1", 4242
TTL_S = 600.0
TTL_MS = 600_000
DEVICE_NAMES = ("g0", "g1", "g2")
# hypothesis favours the first of sampled values: big requests on middling devices, so that
# requests wait while there is still room for smaller ones (the case that decides queue order).
TOTALS = (12, 8, 16)
RESERVES = (0, 4)
SIZES = (8, 6, 4, 3, 2, 1)
PRIORITIES = (10, 50, 50, 90)  # equal priorities often, for FIFO
WANTS = ("", "", *DEVICE_NAMES)  # best fit twice as often as any one device
TERMINAL = frozenset({"released", "expired", "revoked", "force_released", "cancelled", "abandoned"})
WALK_LIMIT = 64  # lua/_common.lua: queue entries one settle examines at most
QUEUE_SCAN = 256  # lua/_common.lua: waiters a device removal looks at
PROBES = (
    *("retry", "conflict", "wrong_token", "foreign_cancel"),
    *("release_again", "heartbeat", "cancel", "force_unknown"),
)
NUMERIC = frozenset({"mib", "priority", "token", "total_mib", "reserved_mib"})

Event = dict[str, str]


@dataclasses.dataclass
class MLease:
    """The model of one lease or waiter."""

    id: str
    mib: int
    priority: int
    want: str
    state: str
    seq: int | None = None  # arrival order, for waiters
    device: str | None = None
    token: int | None = None
    reason: str | None = None  # set when it ends ("" for none)

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL


class Model:
    """The lease engine in plain Python, following lua/_common.lua and the verb scripts."""

    def __init__(self) -> None:
        self.devices: dict[str, tuple[int, int]] = {}  # name -> (total, reserved)
        self.leases: dict[str, MLease] = {}
        self.seq = 0  # the pool counter: arrival seqs and fencing tokens
        self.wakes: dict[str, list[tuple[str, ...]]] = {}  # each waiter's wake list, parsed
        self.events: list[Event] = []  # events of the current step
        self.over: set[str] = set()  # devices whose budget was cut below their use

    # --- views -----------------------------------------------------------------------------

    def budget(self, name: str) -> int:
        total, reserved = self.devices[name]
        return total - reserved

    def used(self, name: str) -> int:
        return sum(ml.mib for ml in self.leases.values() if ml.state == "active" and ml.device == name)

    def queue(self) -> list[MLease]:
        waiting = [ml for ml in self.leases.values() if ml.state == "queued"]
        return sorted(waiting, key=lambda ml: (-ml.priority, ml.seq))

    def position(self, lease_id: str) -> int:
        return [ml.id for ml in self.queue()].index(lease_id)

    def candidates(self, want: str, mib: int) -> list[str]:
        return [d for d in sorted(self.devices) if want in ("", d) and self.budget(d) >= mib]

    def best_fit(self, cands: list[str], blocked: set[str], mib: int) -> str | None:
        best, best_left = None, 0
        for d in cands:  # in name order: the first of equal leftovers wins
            left = self.budget(d) - self.used(d) - mib
            if d not in blocked and left >= 0 and (best is None or left < best_left):
                best, best_left = d, left
        return best

    # --- transitions -------------------------------------------------------------------------

    def event(self, name: str, **fields: object) -> None:
        self.events.append({"event": name, **{k: str(v) for k, v in fields.items()}})

    def grant(self, ml: MLease, device: str) -> None:
        assert self.used(device) + ml.mib <= self.budget(device), "the model granted past a budget"
        self.seq += 1
        ml.state, ml.device, ml.token = "active", device, self.seq
        self.event("granted", lease=ml.id, holder=HOLDER, device=device, mib=ml.mib,
                   priority=ml.priority, token=ml.token)  # fmt: skip

    def end(self, ml: MLease, state: str, reason: str = "") -> None:
        was_queued = ml.state == "queued"
        ml.state, ml.reason = state, reason
        fields: dict[str, object] = {"lease": ml.id, "holder": HOLDER, "mib": ml.mib}
        if not was_queued:
            fields["device"] = ml.device
        if reason:
            fields["reason"] = reason
        self.event(state, **fields)
        self.note_use()

    def wake(self, ml: MLease) -> None:
        """What the waiter pops: its grant (device, token) or how it ended (state, reason)."""
        if ml.state == "active":
            message = ("granted", str(ml.device), str(ml.token))
        else:
            message = ("ended", ml.state, ml.reason or "")
        self.wakes.setdefault(ml.id, []).append(message)

    def note_use(self) -> None:
        self.over = {d for d in self.over if d in self.devices and self.used(d) > self.budget(d)}

    def settle(self, min_priority: int | None = None) -> tuple[set[str], bool]:
        """lua/_common.lua settle(): walk the queue (waiters of priority >= min_priority)."""
        devs = sorted(self.devices)
        walk = [ml for ml in self.queue() if min_priority is None or ml.priority >= min_priority]
        walk = walk[:WALK_LIMIT]
        blocked: set[str] = set()
        for ml in walk:
            # With every device held back nobody further can be granted (no evictions here, so
            # no memory is promised to anyone further down).
            if len(blocked) >= len(devs):
                return blocked, True
            if ml.want and ml.want not in self.devices:
                self.end(ml, "cancelled", "device_removed")
                self.wake(ml)
                continue
            cands = self.candidates(ml.want, ml.mib)
            device = self.best_fit(cands, blocked, ml.mib)
            if device is not None:
                self.grant(ml, device)
                self.wake(ml)
            else:
                blocked.update(cands)
        return blocked, len(walk) >= WALK_LIMIT

    # --- verbs: each returns the reply code (or error code) the scripts should give ------------

    def add_device(self, name: str, total: int, reserved: int) -> bool:
        created = name not in self.devices
        self.devices[name] = (total, reserved)
        if self.used(name) > self.budget(name):
            self.over.add(name)
        self.event("device_added" if created else "device_updated", device=name, total_mib=total,
                   reserved_mib=reserved, host=HOST)  # fmt: skip
        self.settle()
        self.note_use()
        return created

    def acquire(
        self, lease_id: str, mib: int, priority: int, want: str, wait: bool, ttl_ms: int = TTL_MS
    ) -> str:
        known = self.leases.get(lease_id)
        if known is not None:
            if (known.mib, known.priority, known.want, TTL_MS) != (mib, priority, want, ttl_ms):
                return "request_conflict"
            return self.retry(known)
        if not self.devices:
            return "pool_not_found"
        if want and want not in self.devices:
            return "device_not_found"
        cands = self.candidates(want, mib)
        if not cands:
            return "insufficient_vram"
        blocked, partial = self.settle(min_priority=priority)
        device = None if partial else self.best_fit(cands, blocked, mib)
        ml = MLease(lease_id, mib, priority, want, state="new")
        if device is not None:
            self.leases[lease_id] = ml
            self.grant(ml, device)
            return "granted"
        if not wait:
            return "busy"
        self.seq += 1
        ml.state, ml.seq = "queued", self.seq
        self.leases[lease_id] = ml
        self.event("queued", lease=lease_id, holder=HOLDER, mib=mib, priority=priority, want=want)
        return "queued"

    def retry(self, ml: MLease) -> str:
        if ml.state == "queued" and ((ml.want and ml.want not in self.devices) or not self.devices):
            self.end(ml, "cancelled", "device_removed")
        if ml.state == "cancelled" and ml.reason == "device_removed":
            return "device_not_found"
        if not ml.live:
            return "ended"
        if ml.state == "active":
            self.wakes.pop(ml.id, None)
            return "granted"
        return "queued"

    def release(self, ml: MLease, force: bool) -> str:
        if not ml.live:
            return "released" if ml.state == "released" else "ended"
        was_queued = ml.state == "queued"
        self.end(ml, "force_released" if force else "released", "operator" if force else "")
        if was_queued:
            self.wake(ml)
        self.settle()
        return "released"

    def cancel(self, ml: MLease) -> str:
        if ml.state == "queued":
            self.end(ml, "cancelled")
            self.wakes.pop(ml.id, None)
            self.settle()
            return "cancelled"
        if not ml.live:
            return "ended"
        self.wakes.pop(ml.id, None)
        return "granted"

    def remove_device(self, name: str, force: bool) -> tuple[str, int]:
        """Returns the code and how many force_released events come first (in any order)."""
        if name not in self.devices:
            return "device_not_found", 0
        on_it = [ml for ml in self.leases.values() if ml.state == "active" and ml.device == name]
        if on_it and not force:
            return "device_busy", 0
        for ml in sorted(on_it, key=lambda ml: ml.id):
            self.end(ml, "force_released", "device_removed")
        del self.devices[name]
        self.over.discard(name)
        self.event("device_removed", device=name)
        for ml in self.queue()[:QUEUE_SCAN]:
            if ml.want == name or not self.devices:
                self.end(ml, "cancelled", "device_removed")
                self.wake(ml)
        self.settle()
        return "ok", len(on_it)


def _code(exc: GpubossError) -> str:
    return exc.code


def _wake_fields(message: str) -> tuple[str, ...]:
    """ "granted <now> <device> <token> <expires_at> <cuda_index> <host>" -> (granted, device,
    token); "ended <state> <reason>" -> (ended, state, reason)."""
    if message.startswith("granted "):
        _, _now, device, token, _rest = message.split(" ", 4)
        return ("granted", device, token)
    kind, state, reason = message.split(" ", 2)
    return (kind, state, reason)


SUCCESS = frozenset({"ok", "granted", "queued", "released", "cancelled"})


@contextlib.contextmanager
def _raises(
    expected: str, **errors: type[GpubossError]
) -> Iterator[pytest.ExceptionInfo[GpubossError] | None]:
    """Expect success, or exactly the error of code ``expected`` (or the one ``errors`` maps it to)."""
    if expected in SUCCESS:
        yield None
        return
    cls = errors.get(expected) or ERRORS[expected]
    with pytest.raises(cls) as caught:
        yield caught
    assert type(caught.value) is cls, caught.value


class LeaseMachine(RuleBasedStateMachine):
    """Drives the scripts and the model side by side; subclasses say how to connect."""

    connect: ClassVar[Callable[[], redis.Redis]]

    def __init__(self) -> None:
        super().__init__()
        self.r = type(self).connect()
        self.r.flushdb()
        self.boss = Boss(self.r, holder=HOLDER, host=HOST, pid=PID)
        self.keys = PoolKeys(POOL)
        self.model = Model()
        self.n = 0
        self.last_event = "0-0"
        self.history: dict[str, list[Event]] = {}  # every event per lease, from Redis
        self.max_token = 0
        self.unordered = 0  # leading events of this step whose order is not specified

    def teardown(self) -> None:
        self.r.close()

    def _new_id(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def _lease_obj(self, ml: MLease, token: int) -> Lease:
        info = LeaseInfo(
            id=ml.id, pool=POOL, state="active", holder=HOLDER, holder_host=HOST, holder_pid=PID,
            mib=ml.mib, priority=ml.priority, device=ml.device or "nowhere", token=token,
            cuda_indexes=(), device_host=HOST, ttl_ms=TTL_MS, expires_at_ms=None,
            requested_at_ms=None, granted_at_ms=None, ended_at_ms=None, reason=None,
        )  # fmt: skip
        return Lease(info, deadline=math.inf, clock=time.monotonic)

    def _acquire_script(
        self, lease_id: str, mib: int, priority: int, want: str, wait: bool, ttl_ms: int = TTL_MS
    ) -> str:
        args: list[str | int] = [lease_id, HOLDER, HOST, PID, mib, priority, want, ttl_ms, "{}", int(wait)]
        try:
            reply = self.boss.script("acquire", self.keys.script_keys(), args)
            code, fields = _core.parse_reply(reply, frozenset({"granted", "queued", "busy", "ended"}))
        except GpubossError as exc:
            return _code(exc)
        if code == "queued":
            assert fields["position"] == self.model.position(lease_id)
        self._check_reply(code, fields, self.model.leases.get(lease_id))
        return code

    @staticmethod
    def _check_reply(code: str, fields: dict[str, Any], ml: MLease | None) -> None:
        """A granted reply carries the grant; an ended one the terminal state and reason."""
        if code == "granted":
            assert ml is not None
            got = (fields["state"], fields["device"], str(fields["token"]))
            assert got == (ml.state, ml.device, str(ml.token))
        elif code == "ended":
            assert ml is not None
            assert (fields["state"], fields["reason"]) == (ml.state, ml.reason)

    def _pick(self, data: st.DataObject, prefer: Callable[[MLease], bool]) -> MLease:
        """A known lease or waiter, mostly one that ``prefer`` accepts (when there is one)."""
        ids = sorted(self.model.leases)
        preferred = [i for i in ids if prefer(self.model.leases[i])]
        if preferred and data.draw(st.sampled_from((True, True, True, False)), label="preferred"):
            ids = preferred
        return self.model.leases[data.draw(st.sampled_from(ids), label="id")]

    # --- rules -------------------------------------------------------------------------------

    @initialize(
        devices=st.dictionaries(
            st.sampled_from(DEVICE_NAMES), st.sampled_from(TOTALS), min_size=1, max_size=2
        )
    )
    def start(self, devices: dict[str, int]) -> None:
        for name, total in devices.items():
            self.add_device(name, total, 0)

    @rule(
        name=st.sampled_from(DEVICE_NAMES),
        remove=st.sampled_from((False, False, True)),
        total=st.sampled_from(TOTALS),
        reserved=st.sampled_from(RESERVES),
        force=st.booleans(),
        last=st.integers(0, 4),
    )
    def device(self, name: str, remove: bool, total: int, reserved: int, force: bool, last: int) -> None:
        """Add, update or remove a device."""
        if remove:
            self.remove_device(name, force, last)
        else:
            self.add_device(name, total, reserved)

    def add_device(self, name: str, total: int, reserved: int) -> None:
        """Add a device, or update one (its budget may shrink under its leases, or grow)."""
        created = self.boss.add_device(name, total, reserved=reserved, pool=POOL, host=HOST)
        assert created == self.model.add_device(name, total, reserved)

    # Few rules, each choosing among related calls: hypothesis turns whole rules on and off per
    # example (swarm testing), and a queue needs requests and endings in the same example.

    @rule(
        data=st.data(),
        how=st.sampled_from(("now", "wait", "behind", "behind")),
        mib=st.sampled_from(SIZES),
        priority=st.sampled_from(PRIORITIES),
        want=st.sampled_from(WANTS),
    )
    def request(self, data: st.DataObject, how: str, mib: int, priority: int, want: str) -> None:
        """A new request: tried once, or queued if it does not fit. "behind": a small request at
        the priority of a waiter, which may fit but comes after that waiter on every device the
        waiter could use (the case that decides queue order)."""
        wait = how != "now"
        room = {self.model.budget(d) - self.model.used(d) for d in self.model.devices}
        if how == "behind" and self.model.queue():
            priority = data.draw(st.sampled_from(sorted({ml.priority for ml in self.model.queue()})))
            mib = data.draw(st.sampled_from(sorted({1, 2, 3} | {r for r in room if r > 0})), label="mib")
            wait = data.draw(st.sampled_from((True, True, False)), label="wait")
        elif how == "behind":
            # Nobody waits yet: a request just too big for the room there is (if a device is
            # big enough) to wait first, or one that fills the biggest device.
            budgets = [self.model.budget(d) for d in self.model.devices]
            mib = max(1, min(max(room | {0}) + 1, max([*budgets, 0])))
        if wait:
            self.enqueue(mib, priority, want)
        else:
            self.acquire_now(mib, priority, want)

    def acquire_now(self, mib: int, priority: int, want: str) -> None:
        """``timeout=0``: granted at once, or AcquireTimeout and nothing changes."""
        lease_id = self._new_id("a")
        expected = self.model.acquire(lease_id, mib, priority, want, wait=False)
        with _raises(expected, busy=AcquireTimeout):
            lease = self.boss.acquire(
                mib, priority=priority, device=want or None, pool=POOL, ttl=TTL_S, timeout=0,
                request_id=lease_id,
            )  # fmt: skip
        if expected != "granted":
            return
        ml = self.model.leases[lease_id]
        assert (lease.device, lease.token, lease.mib, lease.priority) == (ml.device, ml.token, mib, priority)

    def enqueue(self, mib: int, priority: int, want: str) -> None:
        """The acquire script with wait=1, as a blocking acquire sends it: granted or queued."""
        lease_id = self._new_id("w")
        expected = self.model.acquire(lease_id, mib, priority, want, wait=True)
        assert self._acquire_script(lease_id, mib, priority, want, wait=True) == expected

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), how=st.sampled_from(("release", "cancel", "release", "force")))
    def finish(self, data: st.DataObject, how: str) -> None:
        """End something: a holder's release (of a granted lease), a waiter's cancel, or an
        operator's force-release (of anything, and of whatever the others cannot end)."""
        if how == "cancel" and self.model.queue():
            self.cancel(data)
        elif how == "release" and any(ml.state == "active" for ml in self.model.leases.values()):
            self.release(data)
        else:
            self.force_release(data)

    def release(self, data: st.DataObject) -> None:
        """Release with the lease's token; queued requests that now fit are granted."""
        live = sorted(i for i, ml in self.model.leases.items() if ml.state == "active")
        ml = self.model.leases[data.draw(st.sampled_from(live), label="id")]
        assert ml.token is not None
        expected = self.model.release(ml, force=False)
        self.boss.release(self._lease_obj(ml, ml.token))
        assert expected == "released"

    @precondition(lambda self: self.model.queue())
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        self.cancel(data)

    def cancel(self, data: st.DataObject, waiter: bool = True) -> None:
        """The cancel script: a waiter leaves the queue (mostly the head, which may hold back
        those behind it); a granted or ended one says so."""
        queue = self.model.queue()
        if waiter and queue:
            ml = self.model.leases[data.draw(st.sampled_from([w.id for w in queue]), label="waiter")]
        else:
            ml = self._pick(data, lambda ml: True)
        expected = self.model.cancel(ml)
        reply = self.boss.script("cancel", self.keys.script_keys(), [ml.id, HOLDER])
        code, fields = _core.parse_reply(reply, frozenset({"cancelled", "granted", "ended"}))
        assert code == expected
        self._check_reply(code, fields, ml)

    def force_release(self, data: st.DataObject) -> None:
        """Operator release, no token: ends a lease (mostly a granted one, so that waiters stay
        waiting) or a waiter, or tells how it ended."""
        ml = self._pick(data, lambda ml: ml.state == "active")
        self.model.release(ml, force=True)
        info = self.boss.force_release(ml.id, pool=POOL)
        assert (info.id, info.state, info.reason) == (ml.id, ml.state, ml.reason or None)

    def remove_device(self, name: str, force: bool, last: int) -> None:
        """Refused while leased unless forced; waiters that named it are cancelled, and every
        waiter once the pool is empty (which this does only now and then: an empty pool refuses
        every request; more often while requests wait, as they all end then)."""
        if set(self.model.devices) == {name} and last > (2 if self.model.queue() else 0):
            return
        expected, self.unordered = self.model.remove_device(name, force)
        with _raises(expected):
            self.boss.remove_device(name, pool=POOL, force=force)

    @precondition(lambda self: self.model.leases)
    @rule(
        data=st.data(),
        probe=st.sampled_from(PROBES),
    )
    def probe(self, data: st.DataObject, probe: str) -> None:
        """Calls that change nothing (bar a retry finding its device gone), checked for that."""
        if probe == "cancel":
            # Cancelling what is not waiting (any lease, or a waiter) answers granted or ended.
            self.cancel(data, waiter=False)
        elif probe == "force_unknown":
            with pytest.raises(LeaseNotFound):
                self.boss.force_release(self._new_id("x"), pool=POOL)
        elif probe == "retry":
            # The same request id again: its grant, its place in the queue, or how it ended.
            ml = self._pick(data, lambda ml: True)
            expected = self.model.acquire(ml.id, ml.mib, ml.priority, ml.want, wait=True)
            assert self._acquire_script(ml.id, ml.mib, ml.priority, ml.want, wait=True) == expected
        elif probe == "conflict":
            # A different request under a known id is refused.
            ml = self._pick(data, lambda ml: True)
            change = data.draw(st.sampled_from(("mib", "priority", "want", "ttl")), label="change")
            mib, priority = ml.mib + (change == "mib"), ml.priority + (change == "priority")
            want, ttl_ms = "other" if change == "want" else ml.want, TTL_MS + (change == "ttl")
            assert self.model.acquire(ml.id, mib, priority, want, True, ttl_ms) == "request_conflict"
            assert self._acquire_script(ml.id, mib, priority, want, True, ttl_ms) == "request_conflict"
        elif probe == "wrong_token":
            # Refused whatever the state (waiters have no token), and nothing changes.
            ml = self._pick(data, lambda ml: True)
            delta = data.draw(st.sampled_from((1, 2, 1000)), label="delta")
            with _raises("lease_not_held"):
                self.boss.release(self._lease_obj(ml, (ml.token or 0) + delta))
        elif probe == "foreign_cancel":
            # Another holder cannot cancel a request, whatever its state.
            ml = self._pick(data, lambda ml: ml.state == "queued")
            with _raises("lease_not_held"):
                reply = self.boss.script("cancel", self.keys.script_keys(), [ml.id, "other"])
                _core.parse_reply(reply, frozenset({"cancelled", "granted", "ended"}))
        elif probe == "release_again":
            # With its own token: a retry if it was released, else LeaseLost with its end state.
            ml = self._pick(data, lambda ml: not ml.live and ml.token is not None)
            if ml.token is None:
                return
            expected = self.model.release(ml, force=False)
            with _raises(expected, ended=LeaseLost) as lost:
                self.boss.release(self._lease_obj(ml, ml.token))
            if lost is not None:
                assert lost.value.details["state"] == ml.state
        else:
            # Renews a granted lease; an ended lease or a wrong token is lost.
            ml = self._pick(data, lambda ml: ml.state == "active")
            if ml.token is None:
                return
            wrong = data.draw(st.booleans(), label="wrong")
            lease = self._lease_obj(ml, ml.token + 1 if wrong else ml.token)
            expected = "lost" if wrong or not ml.live else "ok"
            with _raises(expected, lost=LeaseLost):
                info = self.boss.heartbeat(lease)
            assert lease.lost == (expected == "lost")
            if expected == "ok":
                assert (info.state, info.device, info.token) == ("active", ml.device, ml.token)

    # --- checks after every step ---------------------------------------------------------------

    @invariant()
    def devices_agree(self) -> None:
        m = self.model
        status = self.boss.status(POOL)[0]
        leases = self.boss.leases(POOL)
        granted: dict[str, int] = {}
        for info in leases:
            if info.state == "active":
                assert info.device is not None
                granted[info.device] = granted.get(info.device, 0) + info.mib
        got = {d.name: (d.total_mib, d.reserved_mib, d.used_mib, d.leases) for d in status.devices}
        want = {
            name: (total, reserved, m.used(name), sum(1 for ml in m.leases.values()
                                                      if ml.state == "active" and ml.device == name))
            for name, (total, reserved) in m.devices.items()
        }  # fmt: skip
        assert got == want
        for d in status.devices:
            assert granted.get(d.name, 0) == d.used_mib
            # A budget cut below the use of a device (an update) may leave it over; nothing more
            # is granted there until it is back within budget (the model checks every grant).
            assert d.used_mib <= d.budget_mib or d.name in m.over
        assert set(granted) <= set(got)
        live = [ml for ml in m.leases.values() if ml.live]
        assert (status.granted, status.queued) == (
            sum(ml.state == "active" for ml in live),
            sum(ml.state == "queued" for ml in live),
        )
        assert {i.id: (i.state, i.mib, i.priority, i.device, i.token) for i in leases} == {
            ml.id: (ml.state, ml.mib, ml.priority, ml.device or ml.want or None, ml.token) for ml in live
        }

    @invariant()
    def leases_agree(self) -> None:
        """Every lease hash, ended ones included, and every wake list, as modelled."""
        ids = sorted(self.model.leases)
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.keys.lease(i))
            pipe.lrange(self.keys.wake(i), 0, -1)
        out = pipe.execute()
        for n, i in enumerate(ids):
            h: dict[str, str] = out[2 * n]
            ml = self.model.leases[i]
            got = (h.get("state"), h.get("device"), h.get("token"), h.get("reason"), h.get("seq"))
            token = None if ml.token is None else str(ml.token)
            seq = None if ml.seq is None else str(ml.seq)
            assert got == (ml.state, ml.device, token, ml.reason, seq), i
            assert (int(h["mib"]), int(h["priority"]), h["want"]) == (ml.mib, ml.priority, ml.want)
            assert [_wake_fields(m) for m in out[2 * n + 1]] == self.model.wakes.get(i, []), i
        assert int(self.r.get(self.keys.seq) or 0) == self.model.seq

    @invariant()
    def events_agree(self) -> None:
        raw = cast(list[tuple[str, Event]], self.r.xrange(self.keys.events, min="(" + self.last_event))
        if raw:
            self.last_event = raw[-1][0]
        got = [self._norm(fields) for _, fields in raw]
        expected = [self._norm(e) for e in self.model.events]
        k = self.unordered
        key: Callable[[Event], str] = lambda e: e.get("lease", "")  # noqa: E731
        assert sorted(got[:k], key=key) == sorted(expected[:k], key=key)
        assert got[k:] == expected[k:]
        self.model.events.clear()
        self.unordered = 0
        for e in got:
            self._lifecycle(e)
        for ml in self.model.leases.values():
            terminal = [e for e in self.history.get(ml.id, []) if e["event"] in TERMINAL]
            assert len(terminal) == (0 if ml.live else 1), ml.id

    @staticmethod
    def _norm(e: Event) -> Event:
        return {k: str(int(v)) if k in NUMERIC else v for k, v in e.items()}

    def _lifecycle(self, e: Event) -> None:
        """Each lease: queued first if at all, granted at most once, one terminal event, last."""
        if "lease" not in e:
            return
        past = self.history.setdefault(e["lease"], [])
        names = [p["event"] for p in past]
        assert not any(n in TERMINAL for n in names), f"{e} after the end of {e['lease']}"
        name = e["event"]
        if name == "queued":
            assert not names
        elif name == "granted":
            assert names in ([], ["queued"])
            token = int(e["token"])
            assert token > self.max_token, "fencing tokens must strictly increase"
            self.max_token = token
        else:
            assert name in TERMINAL
            grants = [p for p in past if p["event"] == "granted"]
            if "device" in e:  # it ended holding memory: it was granted there
                assert [g["device"] for g in grants] == [e["device"]]
            else:  # it ended as a waiter
                assert names == ["queued"]
        past.append(e)


BASE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _machine(name: str, connect: Callable[[], redis.Redis]) -> type[LeaseMachine]:
    return type(name, (LeaseMachine,), {"connect": staticmethod(connect)})


# Shrinking a failure may take hypothesis up to five minutes: leave it the time to report one.
pytestmark = pytest.mark.timeout(420)


def test_model_fakeredis() -> None:
    server = fake_server()
    machine = _machine("FakeRedisLeases", lambda: fakeredis.FakeRedis(server=server, decode_responses=True))
    run_state_machine_as_test(machine, settings=settings(BASE, max_examples=100, stateful_step_count=30))


def test_model_redis(redis_url: str) -> None:
    machine = _machine("RedisLeases", lambda: redis.Redis.from_url(redis_url, decode_responses=True))
    run_state_machine_as_test(machine, settings=settings(BASE, max_examples=100, stateful_step_count=30))
