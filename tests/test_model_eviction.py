"""Model-based test of eviction: the real Lua scripts, driven through ``Boss``, checked by invariants.

A hypothesis state machine on one pool (two devices on one host, for gangs, and maybe a third on
another) acquires at once (preemptible or not, gangs of two), queues waiters (the acquire script
with wait=1, which may evict), marks leases idle and busy (or every active lease idle, for a big
job that then queues), releases, heartbeats, force-releases, cancels waiters, lets victims that
ignore their notice run past their (short) grace deadline and reaps them, and knocks on revoked
leases with their old token. It does not predict which victims the engine picks; instead a
ledger replays the event stream and after every step checks:

* the events of each lease follow its life (queued, granted, idle/busy, evicting, one terminal
  event, nothing after it); fencing tokens strictly increase; a gang is granted all its devices on
  one host at once;
* every grant fitted: on each of its devices, memory that evictions promised to another waiter
  was not given away (only the claimant, or a lease that fits beside the claim, gets it);
* every ``evicting`` event: the victim was idle, or active, preemptible and of strictly lower
  priority than the requester; the requester was a single-device waiter (a try-once request or a
  gang evicts nobody) that fitted on no device the waiters ahead of it left free, without evicting;
* a victim is only ever released, revoked, expired or force-released, and only a victim is revoked;
* Redis agrees with the ledger: lease states, each device's ``used_mib`` (gangs count on every
  device) within its budget, its ``claimed_mib`` the sum of its waiters' claims;
* a revoked lease is fenced: its token neither releases, renews, idles nor wakes it, and nothing
  changes when it tries;
* the holder fences itself in time: each granted lease has its client-side :class:`Lease`, built
  the way its holder has it (from ``acquire``'s grant, or a waiter's wake message, on a local clock
  skewed from Redis's), and told of its eviction the way the holder learns it (the notice, i.e.
  the ``evicting`` event's deadline, for holders that listen, else only a heartbeat/idle/busy
  reply). Whenever Redis TIME is at or past a told deadline (the moment the server may revoke),
  ``lease.lost`` is true and ``check()`` raises LeaseEvicted, also at the very first millisecond of
  each deadline (checked there by ``ignore_notices``); a revoked lease whose holder listens was
  told, and is lost; a told lease is not fenced while its deadline is still far off. A holder's own
  lease that it knows lost refuses ``busy`` itself, sending nothing. The tests count these checks
  and fail if a run made none.

Most TTLs are long, so those leases never expire of themselves; some are short (150 ms) and run
out unless renewed. Grace periods are 1 to 50 ms (or long). The server revokes a victim once Redis
TIME has passed its deadline, which is its grace from the eviction but never before its expiry (its
holder may not have heard the notice): so the victims revoked in a run are those of a short TTL.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import ClassVar, cast

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, event, settings
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
    AcquireTimeout,
    GpubossError,
    InsufficientVram,
    LeaseEvicted,
    LeaseLost,
)
from gpuboss_client.keys import PoolKeys

POOL = "evict"
HOLDER, HOST, PID = "svc", "h1", 4242
TTL_S = 600.0
TTL_MS = 600_000
#: a short TTL, for some leases: the server revokes a victim no earlier than its expiry (its holder
#: may not have heard the notice), so these are the ones revoked within a run
SHORT_TTL_MS = 150
TTLS_MS = (TTL_MS, SHORT_TTL_MS, SHORT_TTL_MS)  # short ones mostly: the revocations
TOTALS = (4, 8, 12)
SIZES = (1, 2, 3, 4, 6, 8)
PRIORITIES = (10, 50, 50, 90)
GRACES_MS = (1, 20, 50, 600_000)  # short ones are revoked in a run; the long one never is
TERMINAL = frozenset({"released", "expired", "revoked", "force_released", "cancelled", "abandoned"})
HELD = frozenset({"active", "idle", "evicting"})  # granted and not ended
VICTIM_ENDS = frozenset({"released", "revoked", "expired", "force_released"})
#: the holders' local clock is time.monotonic() plus one of these (s): the fence must not care
SKEWS_S = (0.0, -86_400.0, 3_600.25)
#: how many leases' fences were checked at or past their deadline, by kind (see ``_check_fences``)
FENCED: Counter[str] = Counter()

Event = dict[str, str]
Hash = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Request:
    """What the machine asked for under one lease id."""

    id: str
    mib: int
    priority: int
    preemptible: bool
    gang: int
    waits: bool  # queued with wait=1 (may evict) rather than tried once
    grace_ms: int
    hears: bool  # its holder hears eviction notices (else only heartbeat/idle/busy replies tell it)
    ttl_ms: int = TTL_MS  # a short one expires unless renewed, between steps too


class Ledger:
    """Lease states, device use and claims, replayed from the event stream, with the checks."""

    def __init__(self, budget: dict[str, int], host: dict[str, str], requests: dict[str, Request]) -> None:
        self.budget, self.host, self.requests = budget, host, requests
        self.used = dict.fromkeys(budget, 0)
        self.claims: dict[str, tuple[str, int]] = {}  # waiter -> (device, MiB) promised to it
        self.state: dict[str, str] = {}
        self.devices: dict[str, tuple[str, ...]] = {}
        self.seq: dict[str, int] = {}  # queue arrival order of waiters
        self.max_token = 0
        self.evicted: set[str] = set()

    def claimed(self, device: str, but: str | None = None) -> int:
        return sum(mib for w, (d, mib) in self.claims.items() if d == device and w != but)

    def apply(self, e: Event, seq_of: Callable[[str], int]) -> None:
        if "lease" not in e:
            return
        name, lid = e["event"], e["lease"]
        req = self.requests[lid]
        was = self.state.get(lid)
        assert was not in TERMINAL, f"{e} after {lid} ended ({was})"
        if name == "queued":
            assert was is None, e
            assert req.waits, e
            self.state[lid], self.seq[lid] = "queued", seq_of(lid)
        elif name == "granted":
            self.grant(e, req, was)
        elif name == "idle":
            assert was == "active", e
            self.state[lid] = "idle"
        elif name == "busy":
            assert was == "idle", e
            self.state[lid] = "active"
        elif name == "evicting":
            self.evict(e, req, was)
        else:
            assert name in TERMINAL, e
            if was == "queued":
                assert "device" not in e, e
                assert name != "revoked", e
                self.claims.pop(lid, None)
            else:
                assert was in HELD, e
                assert e.get("device") == ",".join(self.devices[lid]), e
                for d in self.devices[lid]:
                    self.used[d] -= req.mib
            if was == "evicting":
                assert name in VICTIM_ENDS, f"victim {lid} ended as {name}"
            assert name != "revoked" or was == "evicting", f"{lid} revoked while {was}"
            self.state[lid] = name

    def grant(self, e: Event, req: Request, was: str | None) -> None:
        lid = req.id
        assert was in (None, "queued"), e
        devices = tuple(e["device"].split(","))
        # A gang gets all its devices at once, distinct and on one host.
        assert len(devices) == len(set(devices)) == req.gang, e
        assert len({self.host[d] for d in devices}) == 1, e
        token = int(e["token"])
        assert token > self.max_token, "fencing tokens must strictly increase"
        self.max_token = token
        for d in devices:
            # Within budget, and memory promised to other waiters is not handed out.
            room = self.budget[d] - self.used[d] - self.claimed(d, but=lid)
            assert room >= req.mib, f"{lid} granted {req.mib} MiB on {d} with {room} MiB unpromised"
            self.used[d] += req.mib
        self.claims.pop(lid, None)
        self.state[lid], self.devices[lid] = "active", devices

    def evict(self, e: Event, victim: Request, was: str | None) -> None:
        r = self.requests[e["for"]]
        device = e["device"]
        # The victim was idle, or active, preemptible and of strictly lower priority.
        assert was == "idle" or (was == "active" and victim.preemptible and victim.priority < r.priority), (
            f"{victim} evicted while {was} for {r}"
        )
        assert device in self.devices[victim.id], e
        assert (int(e["priority"]), int(e["mib"])) == (victim.priority, victim.mib), e
        # Only a queued single-device waiter evicts, in one batch on one device.
        assert (r.waits, r.gang, self.state.get(r.id)) == (True, 1, "queued"), f"{r} evicted {victim}"
        if r.id in self.claims:
            assert self.claims[r.id] == (device, r.mib), e
        else:
            self.no_room(r)
            self.claims[r.id] = (device, r.mib)
        self.state[victim.id] = "evicting"
        self.evicted.add(victim.id)

    def no_room(self, r: Request) -> None:
        """Nothing is evicted when free memory suffices: the requester fits on no device that the
        waiters ahead of it (still queued, so they did not fit either) leave to it. A waiter whose
        memory is promised (it has a claim) holds back nothing."""
        mine = (-r.priority, self.seq[r.id])
        blocked: set[str] = set()
        for w, state in self.state.items():
            if state == "queued" and w != r.id and w not in self.claims:
                ahead = self.requests[w]
                if (-ahead.priority, self.seq[w]) < mine:
                    blocked |= {d for d, b in self.budget.items() if b >= ahead.mib}
        for d, b in self.budget.items():
            if b >= r.mib and d not in blocked:
                room = b - self.used[d] - self.claimed(d)
                assert room < r.mib, f"{r.id} evicted though {d} had {room} MiB free and unpromised"


def _info(
    lease_id: str, state: str, req: Request, device: str, token: int, expires_at: int | None
) -> LeaseInfo:
    return LeaseInfo(
        id=lease_id, pool=POOL, state=state, holder=HOLDER, holder_host=HOST, holder_pid=PID,
        mib=req.mib, priority=req.priority, device=device, token=token, cuda_indexes=(),
        device_host=None, ttl_ms=req.ttl_ms, expires_at_ms=expires_at, requested_at_ms=None,
        granted_at_ms=None, ended_at_ms=None, reason=None,
    )  # fmt: skip


def _lease_obj(h: Hash, req: Request) -> Lease:
    """A token-only client-side lease object for a lease hash (any process could rebuild one; it
    has no idea of time, so it never counts as lost by itself)."""
    info = _info(req.id, h["state"], req, h["device"], int(h["token"]), None)
    return Lease(info, deadline=math.inf, clock=time.monotonic)


def _lost_cls(state: str) -> type[LeaseLost]:
    """What a held-lease call raises for a lease that ended in ``state``."""
    return LeaseEvicted if state == "revoked" else LeaseLost


class EvictionMachine(RuleBasedStateMachine):
    """Drives the scripts; subclasses say how to connect."""

    connect: ClassVar[Callable[[], redis.Redis]]

    def __init__(self) -> None:
        super().__init__()
        self.r = type(self).connect()
        self.r.flushdb()
        self.skew = 0.0  # drawn in start(), before anything reads the clock
        self.boss = Boss(self.r, holder=HOLDER, host=HOST, pid=PID, clock=self.clock)
        self.keys = PoolKeys(POOL)
        self.requests: dict[str, Request] = {}
        self.ledger = Ledger({}, {}, self.requests)
        self.n = 0
        self.last_event = "0-0"
        self.step: list[Event] = []  # events of the last step
        # The holders' side: each granted lease's Lease object, as its holder has it.
        self.held: dict[str, Lease] = {}
        self.sent: dict[str, float] = {}  # waiter -> local time its holder began waiting
        self.deadlines: dict[str, int] = {}  # victim -> its eviction deadline (Redis ms)
        self.fenced: set[tuple[str, str]] = set()  # (kind, lease) checked past its deadline

    def clock(self) -> float:
        """The holders' local clock: monotonic, and off from Redis's by whatever."""
        return time.monotonic() + self.skew

    def teardown(self) -> None:
        self.boss.close()

    # --- helpers -----------------------------------------------------------------------------

    def _new(
        self,
        mib: int,
        priority: int,
        preemptible: bool,
        gang: int,
        waits: bool,
        grace_ms: int,
        hears: bool,
        ttl_ms: int = TTL_MS,
    ) -> Request:
        self.n += 1
        lid = f"{'w' if waits else 'a'}{self.n}"
        req = Request(lid, mib, priority, preemptible, gang, waits, grace_ms, hears, ttl_ms)
        self.requests[req.id] = req
        return req

    def _hold(self, lid: str, device: str, token: int, now_ms: int, expires_at: int) -> None:
        """The waiter's holder learns of its grant (sent at Redis time ``now_ms``; it began waiting
        at ``self.sent[lid]`` on its clock) and builds its lease, as ``acquire`` does."""
        req = self.requests[lid]
        info = _info(lid, "active", req, device, token, expires_at)
        lease = Lease(info, deadline=0.0, clock=self.clock, grace_ms=req.grace_ms)
        lease._renewed(self.sent.pop(lid), info, now_ms)
        # (a short TTL counts from when it queued, and may have run out while it waited)
        assert not lease.lost or req.ttl_ms == SHORT_TTL_MS
        assert not lease.evicting
        self.held[lid] = lease

    def _check_fences(self, now_ms: int, kind: str) -> None:
        """The holders' promise, at Redis time ``now_ms`` (read before the local clock is): a lease
        told to give its memory back by a deadline that Redis has reached counts as lost."""
        for lid, lease in self.held.items():
            deadline = lease.evict_deadline_ms
            if deadline is None:
                continue
            assert deadline == self.deadlines[lid], (lid, deadline, self.deadlines[lid])
            if now_ms >= deadline:
                assert lease.lost, (
                    f"{lid} (grace {self.requests[lid].grace_ms} ms) not lost at Redis time {now_ms}, "
                    f"{now_ms - deadline} ms past its eviction deadline: its fence is "
                    f"{(cast(float, lease.evict_deadline) - self.clock()) * 1e6:.0f} us ahead on its clock"
                )
                with pytest.raises(LeaseEvicted):
                    lease.check()
                if (kind, lid) not in self.fenced:  # count each lease once per kind
                    self.fenced.add((kind, lid))
                    FENCED[kind] += 1
                    event(f"fence checked: {kind}")
            elif (
                deadline - now_ms > 3000
                and lease.lost_reason == "not given back before the eviction deadline"
            ):
                # (the margin is at most 2 s): not fenced absurdly early either
                raise AssertionError(f"{lid} fenced {deadline - now_ms} ms before its deadline")

    def _hash(self, lease_id: str) -> Hash:
        return cast(Hash, self.r.hgetall(self.keys.lease(lease_id)))

    def _pick(self, data: st.DataObject, waiters: bool = False) -> str:
        """Any request made so far (mostly a waiter if ``waiters``). The draw never depends on
        lease states: those hang on timing (a victim past its deadline is revoked by whichever call
        comes next), and hypothesis needs the same draws to replay an example."""
        ids = sorted(self.requests, key=lambda i: int(i[1:]))
        if waiters and any(i.startswith("w") for i in ids) and data.draw(st.booleans(), label="waiter"):
            ids = [i for i in ids if i.startswith("w")]
        return data.draw(st.sampled_from(ids), label="id")

    def _fits_ever(self, mib: int, gang: int) -> bool:
        hosts: dict[str, int] = {}
        for d, b in self.ledger.budget.items():
            if b >= mib:
                hosts[self.ledger.host[d]] = hosts.get(self.ledger.host[d], 0) + 1
        return any(n >= gang for n in hosts.values())

    def _redis_ms(self) -> int:
        secs, micros = self.r.time()
        return int(secs) * 1000 + int(micros) // 1000

    # --- rules -------------------------------------------------------------------------------

    @initialize(
        totals=st.lists(st.sampled_from(TOTALS), min_size=2, max_size=3), skew=st.sampled_from(SKEWS_S)
    )
    def start(self, totals: list[int], skew: float) -> None:
        """g0 and g1 on one host (gangs of two fit there), g2 alone on another."""
        self.skew = skew
        for i, total in enumerate(totals):
            name, host = f"g{i}", "h1" if i < 2 else "h2"
            assert self.boss.add_device(name, total, pool=POOL, host=host)
            self.ledger.budget[name], self.ledger.host[name] = total, host
            self.ledger.used[name] = 0

    @rule(
        mib=st.sampled_from(SIZES),
        priority=st.sampled_from(PRIORITIES),
        preemptible=st.booleans(),
        grace_ms=st.sampled_from(GRACES_MS),
        gang=st.sampled_from((1, 1, 2)),
        ttl_ms=st.sampled_from(TTLS_MS),
    )
    def acquire_now(
        self, mib: int, priority: int, preemptible: bool, grace_ms: int, gang: int, ttl_ms: int
    ) -> None:
        """``timeout=0``: granted at once or AcquireTimeout, and never evicts. The holder is this
        client, which hears its notices (and ``use`` renews it: no heartbeat worker)."""
        req = self._new(
            mib, priority, preemptible, gang, waits=False, grace_ms=grace_ms, hears=True, ttl_ms=ttl_ms
        )
        try:
            lease = self.boss.acquire(
                mib, priority=priority, pool=POOL, ttl=ttl_ms / 1000, timeout=0, request_id=req.id,
                preemptible=preemptible, grace=grace_ms / 1000, devices=gang, keepalive=False,
            )  # fmt: skip
        except InsufficientVram:
            assert not self._fits_ever(mib, gang)
            assert self._hash(req.id) == {}
            return
        except AcquireTimeout:
            assert self._fits_ever(mib, gang)
            assert self._hash(req.id) == {}, "a busy try-once request leaves nothing behind"
            return
        h = self._hash(req.id)
        assert (h["state"], h["device"], int(h["token"])) == ("active", ",".join(lease.devices), lease.token)
        assert not lease.lost
        assert not lease.evicting
        self.held[req.id] = lease

    @rule(
        mib=st.sampled_from(SIZES),
        priority=st.sampled_from(PRIORITIES),
        preemptible=st.booleans(),
        grace_ms=st.sampled_from(GRACES_MS),
        gang=st.sampled_from((1, 1, 1, 2)),
        hears=st.booleans(),
        ttl_ms=st.sampled_from(TTLS_MS),
    )
    def enqueue(
        self,
        mib: int,
        priority: int,
        preemptible: bool,
        grace_ms: int,
        gang: int,
        hears: bool,
        ttl_ms: int = TTL_MS,
    ) -> None:
        """The acquire script with wait=1, as a blocking acquire sends it: granted, or queued
        (having maybe asked victims to make room). Its holder learns of a later grant from its wake
        message, and may or may not hear eviction notices."""
        req = self._new(
            mib, priority, preemptible, gang, waits=True, grace_ms=grace_ms, hears=hears, ttl_ms=ttl_ms
        )
        if not self._fits_ever(mib, gang):
            return
        self.sent[req.id] = self.clock()
        args: list[str | int] = [
            req.id, HOLDER, HOST, PID, mib, priority, "", ttl_ms, "{}", 1,
            int(preemptible), grace_ms, "", 0, gang,
        ]  # fmt: skip
        reply = self.boss.script("acquire", self.keys.script_keys(), args)
        code, fields = _core.parse_reply(reply, frozenset({"granted", "queued"}))
        if code == "queued":
            self.sent[req.id] = self.clock()  # it blocks on its wake list from now on
        self._sync()
        if code == "queued":
            evicting = [e for e in self.step if e["event"] == "evicting" and e["for"] == req.id]
            assert int(fields["evicting"]) == len(evicting)
        elif req.id not in self.held:  # granted in its own call: the reply says so
            now, expires_at = int(fields["now"]), int(fields["expires_at"])
            self._hold(req.id, fields["device"], int(fields["token"]), now, expires_at)
        assert self.ledger.state[req.id] == ("queued" if code == "queued" else "active")

    @precondition(lambda self: self.requests)
    @rule(
        data=st.data(),
        verb=st.sampled_from(("idle", "idle", "busy", "release", "heartbeat")),
        own=st.booleans(),
    )
    def use(self, data: st.DataObject, verb: str, own: bool) -> None:
        """A holder's call with the lease's token, whatever became of the lease: a held one
        moves on, an ended one refuses (a revoked one with LeaseEvicted) and nothing changes.
        The call goes through the holder's own lease object (which learns from the reply, and
        refuses ``busy`` itself once it knows the lease lost) or, if not ``own``, a token-only one."""
        lid = self._pick(data)
        h = self._hash(lid)
        if "token" not in h:  # never granted: there is no token to call with
            return
        before = self.ledger.state[lid]
        lease = self.held[lid] if own else _lease_obj(h, self.requests[lid])
        error: GpubossError | None = None
        info: LeaseInfo | None = None
        try:
            if verb == "idle":
                self.boss.idle(lease)
            elif verb == "busy":
                self.boss.busy(lease)
            elif verb == "release":
                self.boss.release(lease)
            else:
                info = self.boss.heartbeat(lease)
        except GpubossError as exc:
            error = exc
        self._sync()
        after = self.ledger.state[lid]
        if before in TERMINAL:
            # Fenced: refused (a release of a released lease is a retry), and nothing changes.
            if verb == "release" and before == "released":
                assert error is None, error
            elif own and verb == "busy" and error is not None and "state" not in error.details:
                # Refused here, unsent: the holder knows (it released it, or its deadline passed).
                assert lease.lost, error
                assert type(error) is (LeaseEvicted if lease.evicting else LeaseLost), error
            else:
                assert type(error) is _lost_cls(before), error
                assert error.details.get("state") == before, error
            assert self._hash(lid) == h
            assert all(e.get("lease") != lid for e in self.step)
            return
        if own and isinstance(error, LeaseLost) and lease.lost and self.requests[lid].ttl_ms == SHORT_TTL_MS:
            return  # a short TTL not renewed in time: its holder's own fence passed, it knows
        if after in TERMINAL and not (verb == "release" and after == "released"):
            # Only a victim whose deadline passed meanwhile, or a lease of a short TTL that ran
            # out, ends other than by its own release.
            if (before, after) == ("evicting", "revoked"):
                assert type(error) is LeaseEvicted, error
            else:
                assert (after, self.requests[lid].ttl_ms) == ("expired", SHORT_TTL_MS), (lid, before, after)
                assert isinstance(error, LeaseLost), error
            return
        if verb == "busy" and after == "evicting":
            assert type(error) is LeaseEvicted, error
            return
        assert error is None, error
        if verb == "idle":
            assert after in ("idle", "evicting")
        elif verb == "busy":
            assert after == "active"
        elif verb == "release":
            assert after == "released"
        else:
            assert info is not None
            assert info.state == after
            assert after == before or after == "evicting"

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def force_release(self, data: st.DataObject) -> None:
        """Operator release, no token: ends a lease or a waiter (or tells how it ended)."""
        lid = self._pick(data)
        if lid not in self.ledger.state:  # a try-once request that was refused: no such lease
            return
        info = self.boss.force_release(lid, pool=POOL)
        self._sync()
        assert info.state == self.ledger.state[lid]
        assert info.state in TERMINAL

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A waiter gives up: its claim goes, and those behind it may be granted at once. Cancelling
        anything else answers how it stands and changes nothing of it."""
        lid = self._pick(data, waiters=True)
        before = self.ledger.state.get(lid)
        if before is None:
            return
        reply = self.boss.script("cancel", self.keys.script_keys(), [lid, HOLDER])
        code, fields = _core.parse_reply(reply, frozenset({"cancelled", "granted", "ended"}))
        self._sync()
        after = self.ledger.state[lid]
        if before == "queued":
            assert code == "cancelled"
            assert after == "cancelled"
        elif after in TERMINAL:
            assert code == "ended"
            assert fields["state"] == after
        else:
            assert code == "granted"
            assert fields["state"] == after

    @rule(
        device=st.integers(0, 2),
        priority=st.sampled_from(PRIORITIES),
        grace_ms=st.sampled_from(GRACES_MS),
        hears=st.booleans(),
        ignored=st.booleans(),
    )
    def make_room(self, device: int, priority: int, grace_ms: int, hears: bool, ignored: bool) -> None:
        """The holders keep their active leases warm (idle, each through its own lease object) for
        a big job, as large as a whole device, that then queues: it evicts them if it fits nowhere
        else (and the victims may ignore their notices at once)."""
        names = sorted(self.ledger.budget)
        mib = self.ledger.budget[names[device % len(names)]]
        for lid in sorted(self.ledger.state):
            if self.ledger.state[lid] == "active":  # as of now: each idle may let a waiter evict
                try:
                    self.boss.idle(self.held[lid])
                except LeaseLost:  # a short TTL that ran out since: nothing to keep warm
                    assert self.requests[lid].ttl_ms == SHORT_TTL_MS, lid
                self._sync()
        self.enqueue(mib, priority, preemptible=False, grace_ms=grace_ms, gang=1, hears=hears)
        if ignored:
            self.ignore_notices()

    @rule()
    def ignore_notices(self) -> None:
        """Victims that do not give their memory back are revoked once their deadline passes."""
        deadlines = {
            i: int(self._hash(i)["evict_deadline"]) for i, s in self.ledger.state.items() if s == "evicting"
        }
        soon = sorted({d for d in deadlines.values() if d - self._redis_ms() < 1000})
        if not soon:
            return
        due = soon[-1]
        for deadline in soon:
            # The first millisecond at which the server may revoke: told holders count as lost.
            while (now := self._redis_ms()) < deadline:  # Redis TIME is the clock the scripts go by
                pass
            self._check_fences(now, "at the deadline")
        while self._redis_ms() <= due:
            pass
        self.boss.reap(POOL)
        self._sync()
        for i, d in deadlines.items():
            if d <= due:
                assert self.ledger.state[i] == "revoked", i
        now = self._redis_ms()
        for i, s in self.ledger.state.items():
            if s == "evicting":
                assert int(self._hash(i)["evict_deadline"]) > due, f"{i} outlived its deadline"
        assert now > due

    # --- checks after every step ---------------------------------------------------------------

    def _sync(self, raw: list[tuple[str, Event]] | None = None) -> None:
        """Feed the new events (read now, or ``raw``) to the ledger, which checks each of them."""
        if raw is None:
            raw = cast(list[tuple[str, Event]], self.r.xrange(self.keys.events, min="(" + self.last_event))
        if raw:
            self.last_event = raw[-1][0]
        self.step = [fields for _, fields in raw]

        def seq_of(lease_id: str) -> int:
            return int(cast(str, self.r.hget(self.keys.lease(lease_id), "seq")))

        for e in self.step:
            self.ledger.apply(e, seq_of)
            lid = e.get("lease")
            if lid is None:
                continue
            req = self.requests[lid]
            if e["event"] == "granted" and req.waits and lid in self.sent:
                # What the release that granted it pushed to its wake list (none if it was granted
                # in its own acquire call: enqueue builds that one from the reply).
                for msg in cast(list[str], self.r.lrange(self.keys.wake(lid), 0, -1)):
                    parts = msg.split(" ")
                    if parts[0] == "granted":
                        assert (parts[2], parts[3]) == (e["device"], e["token"]), (msg, e)
                        self._hold(lid, parts[2], int(parts[3]), int(parts[1]), int(parts[4]))
                        break
            elif e["event"] == "evicting":
                self.deadlines[lid] = int(e["deadline"])
                if req.hears:  # the notice (pub/sub) reaches the holder at once
                    self.held[lid]._evict_notice(int(e["deadline"]))

    @invariant()
    def holders_fenced(self) -> None:
        """Every granted lease has its holder's object; a told holder is lost once Redis reaches its
        deadline; a revoked lease whose holder listens was told, and is lost."""
        self._sync()
        now = self._redis_ms()
        assert set(self.held) == set(self.ledger.devices)
        self._check_fences(now, "after a step")
        for lid, state in self.ledger.state.items():
            if state == "revoked" and self.requests[lid].hears:
                lease = self.held[lid]
                assert lease.evict_deadline_ms is not None, lid
                assert now >= lease.evict_deadline_ms, (lid, now, lease.evict_deadline_ms)
                assert lease.lost, lid
                if ("revoked", lid) not in self.fenced:
                    self.fenced.add(("revoked", lid))
                    FENCED["revoked"] += 1

    @invariant()
    def redis_agrees(self) -> None:
        self._sync()
        # Listing may itself reap a victim past its deadline (and settle the queue), so the
        # listing is compared only with a snapshot that no event separates from it.
        infos = self.boss.leases(POOL)
        devices = self.boss.devices(POOL)
        ids = sorted(self.requests)
        names = sorted(self.ledger.budget)
        pipe = self.r.pipeline(transaction=True)
        pipe.xrange(self.keys.events, min="(" + self.last_event)
        for i in ids:
            pipe.hgetall(self.keys.lease(i))
        for d in names:
            pipe.hgetall(self.keys.device(d))
        pipe.hgetall(self.keys.leases)
        out = pipe.execute()
        raw = cast(list[tuple[str, Event]], out[0])
        hashes: dict[str, Hash] = dict(zip(ids, out[1 : 1 + len(ids)], strict=True))
        dev_hashes: dict[str, Hash] = dict(zip(names, out[1 + len(ids) : -1], strict=True))
        live = cast(Hash, out[-1])
        self._sync(raw)
        ledger = self.ledger
        for i, h in hashes.items():
            assert h.get("state") == ledger.state.get(i), (i, h, ledger.state.get(i))
            if h.get("state") == "evicting":
                # (it stays evicting even if the request it makes room for gives up meanwhile)
                assert int(h["evict_deadline"]) > 0, h
                assert h.get("evicted_for") in self.requests, h
        # The operators' hash lists exactly the granted leases, with their devices and state.
        assert {i: line.split()[-3:-1] for i, line in live.items()} == {
            i: [h["device"], h["state"]] for i, h in hashes.items() if h.get("state") in HELD
        }
        claims: dict[str, int] = {}
        held: dict[str, int] = {}
        for h in hashes.values():
            if h.get("state") == "queued" and int(h.get("claim_mib", 0)) > 0:
                claims[h["claim_device"]] = claims.get(h["claim_device"], 0) + int(h["claim_mib"])
            if h.get("state") in HELD:
                for d in h["device"].split(","):  # a gang counts on each of its devices
                    held[d] = held.get(d, 0) + int(h["mib"])
        for name, dh in dev_hashes.items():
            used, claimed = int(dh["used_mib"]), int(dh.get("claimed_mib", 0))
            assert used == held.get(name, 0) == ledger.used[name], (name, used, held, ledger.used)
            assert used <= ledger.budget[name], (name, used)
            assert 0 <= claimed == claims.get(name, 0) == ledger.claimed(name), (name, claimed, claims)
        assert {d.name: d.budget_mib for d in devices} == ledger.budget
        if not raw:  # the listings saw the same state as the snapshot
            assert {i.id: (i.state, i.mib, i.token) for i in infos} == {
                i: (h["state"], int(h["mib"]), int(h["token"]) if "token" in h else None)
                for i, h in hashes.items()
                if h and h["state"] not in TERMINAL
            }
            assert {d.name: d.used_mib for d in devices} == {
                n: int(h["used_mib"]) for n, h in dev_hashes.items()
            }


BASE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _machine(name: str, connect: Callable[[], redis.Redis]) -> type[EvictionMachine]:
    return type(name, (EvictionMachine,), {"connect": staticmethod(connect)})


def _run(machine: type[EvictionMachine], max_examples: int) -> None:
    """Run the machine; the holders' fence must have been checked past deadlines (not vacuously)."""
    FENCED.clear()
    run_state_machine_as_test(
        # A fixed seed: the same runs every time, so that the fences are checked (revocations need
        # a short TTL, a victim and its deadline passing within one example) in every run.
        machine,
        settings=settings(BASE, max_examples=max_examples, stateful_step_count=25, derandomize=True),
    )
    print(f"{machine.__name__}: fence checks {dict(FENCED)}")
    assert FENCED["after a step"] > 0, FENCED
    assert FENCED["at the deadline"] > 0, FENCED
    assert FENCED["revoked"] > 0, FENCED


def test_eviction_model_fakeredis() -> None:
    server = fake_server()
    _run(
        _machine("FakeRedisEviction", lambda: fakeredis.FakeRedis(server=server, decode_responses=True)), 100
    )


def test_eviction_model_redis(redis_url: str) -> None:
    _run(_machine("RedisEviction", lambda: redis.Redis.from_url(redis_url, decode_responses=True)), 80)


def test_busy_does_not_revive_a_lease_evicted_by_the_same_call(boss: Boss) -> None:
    """What the machine's lifecycle check forbids (``busy`` after ``evicting``), pinned down: a victim
    revoked in passing lets the head waiter in, and the waiter behind it evicts the idle lease
    being taken back, in the same call."""
    keys = PoolKeys("p")
    boss.add_device("g0", 8, pool="p")
    warm = boss.acquire(4, priority=90, pool="p", timeout=0, ttl=TTL_S)
    batch = boss.acquire(
        4, priority=10, pool="p", timeout=0, ttl=SHORT_TTL_MS / 1000, preemptible=True, grace=0.2
    )
    boss.idle(warm)
    for waiter in ("w1", "w2"):  # w1 evicts batch; w2, behind it, waits
        args: list[str | int] = [waiter, HOLDER, HOST, PID, 4, 50, "", TTL_MS, "{}", 1, 0, 10000, "", 0, 1]
        boss.script("acquire", keys.script_keys(), args)
    deadline = int(cast(str, boss.redis.hget(keys.lease(batch.id), "evict_deadline")))
    while True:  # Redis TIME past batch's deadline: the next call revokes it in passing
        secs, micros = boss.redis.time()
        if int(secs) * 1000 + int(micros) // 1000 > deadline:
            break
    with pytest.raises(LeaseEvicted):  # w2 evicts warm in the same call: it must not be busy again
        boss.busy(warm)
    assert boss.redis.hget(keys.lease(warm.id), "state") == "evicting"
