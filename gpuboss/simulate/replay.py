"""The replay: services and their requests, as discrete events on a virtual clock, over any policy.

The service model, the same for every policy:

- A ``server`` service holds one lease while it is loaded, shared by all its requests. A request
  that finds it unloaded makes it acquire; once granted, it loads (``load_s``, memory held), then
  runs every request that waits for it, and more as they come. When the last one ends, it keeps
  the lease warm (``idle``) for ``keep_warm_s`` and is used again (``busy``) by the next request,
  or unloads (``unload_s``) and releases.
- A ``job`` service takes a lease of its own for each request: load, run, unload, release.
- A lease asked back (evicted) unloads and releases; the requests it was running go back to wait
  (a preemption) and run the rest of their time after a new grant and load. A victim whose
  ``unload_s`` exceeds its ``grace_s`` misses its deadline: its lease is revoked at the deadline.
- A pipeline's next phase arrives when the previous one ends, after its CPU time (``gap_s``).

Every lease's memory is recorded as :class:`Segment` s by phase: ``loading``, ``running``,
``warm`` and ``unloading``; every request as a :class:`RequestRecord`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .policy import Allocator, Ask, Notice
from .trace import Job, Service, Trace

__all__ = ["Outcome", "RequestRecord", "Segment", "replay"]


@dataclass(frozen=True, slots=True)
class Segment:
    """``mib`` of ``service`` held on ``device`` from ``start`` to ``end`` (s), in ``phase``."""

    device: str
    service: str
    phase: str
    mib: int
    start: float
    end: float


@dataclass(eq=False, slots=True)
class RequestRecord:
    """One request: when it arrived, first ran and finished (None: never), and what befell it."""

    id: str
    service: str
    priority: int
    arrival: float
    started: float | None = None
    finished: float | None = None
    preempted: int = 0
    never_fits: bool = False
    remaining: float = 0.0
    run_from: float = 0.0
    token: int = 0

    @property
    def wait(self) -> float | None:
        """Seconds from arrival to the start of its first run (load included), if it ran."""
        return None if self.started is None else self.started - self.arrival


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a replay recorded, for :mod:`.metrics`."""

    policy: str
    segments: list[Segment]
    requests: list[RequestRecord]
    evictions: int
    revoked: int
    preemptions: int
    end: float


@dataclass(eq=False, slots=True)
class _Instance:
    service: Service
    key: str
    state: str = "off"  # off | waiting | loading | ready | warm | unloading
    lease: str = ""
    device: str = ""
    gen: int = 0  # bumped to cancel the timers of an earlier state
    leases: int = 0
    pending: list[RequestRecord] = field(default_factory=list)
    running: dict[str, RequestRecord] = field(default_factory=dict)
    phase: str = ""
    since: float = 0.0


class _Replay:
    def __init__(self, trace: Trace, jobs: Sequence[Job], allocator: Allocator) -> None:
        self.trace, self.jobs, self.alloc = trace, jobs, allocator
        self.now = 0.0
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.servers: dict[str, _Instance] = {}
        self.by_lease: dict[str, _Instance] = {}
        self.segments: list[Segment] = []
        self.requests: list[RequestRecord] = []
        self.evictions = self.revoked = self.preemptions = 0
        self.next_step: dict[str, tuple[Job, int]] = {}  # request id -> its job and the step after it

    # -- the loop

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, action))

    def run(self) -> Outcome:
        for job in self.jobs:
            self.schedule(job, 0, job.arrival_s)
        end = (self.trace.hours + self.trace.drain_hours) * 3600
        while True:
            next_event = self.heap[0][0] if self.heap else None
            due = self.alloc.due()
            if next_event is None and due is None:
                break
            if due is not None and (next_event is None or due <= next_event):
                if due > end:
                    break
                self.now = max(self.now, due)
                self.alloc.tick(self.now)
            else:
                assert next_event is not None
                if next_event > end:
                    break
                self.now, _, action = heapq.heappop(self.heap)
                action()
            self.handle_notices()
        for inst in self.by_lease.values():
            self.set_phase(inst, "")
        return Outcome(
            self.alloc.name,
            self.segments,
            self.requests,
            self.evictions,
            self.revoked,
            self.preemptions,
            self.now,
        )

    def handle_notices(self) -> None:
        while notices := self.alloc.notices():
            for notice in notices:
                self.on_notice(notice)

    def on_notice(self, notice: Notice) -> None:
        inst = self.by_lease.get(notice.lease)
        if inst is None or inst.lease != notice.lease:
            return
        if notice.kind == "granted":
            self.granted(inst, notice.device)
        elif notice.kind == "evict":
            self.evicted(inst)
        else:
            self.never(inst)

    # -- requests

    def arrive(self, job: Job, index: int) -> None:
        step = job.steps[index]
        service = self.trace.services[step.service]
        req = RequestRecord(
            f"{job.id}.{index}", service.name, service.priority, self.now, remaining=step.duration_s
        )
        self.requests.append(req)
        if service.mode == "server":
            inst = self.servers.setdefault(service.name, _Instance(service, service.name))
        else:
            inst = _Instance(service, f"{service.name}.{req.id}")
        inst.pending.append(req)
        self.next_step[req.id] = (job, index + 1)
        self.kick(inst)

    def schedule(self, job: Job, index: int, after: float) -> None:
        """Step ``index`` of ``job`` arrives after its CPU time, counted from ``after``."""
        self.at(after + job.steps[index].gap_s, lambda: self.arrive(job, index))

    def start(self, inst: _Instance, req: RequestRecord) -> None:
        if req.started is None:
            req.started = self.now
        req.run_from, req.token = self.now, req.token + 1
        inst.running[req.id] = req
        token = req.token
        self.at(self.now + req.remaining, lambda: self.finish(inst, req, token))

    def finish(self, inst: _Instance, req: RequestRecord, token: int) -> None:
        if req.token != token or req.id not in inst.running:
            return  # preempted meanwhile
        del inst.running[req.id]
        req.finished, req.remaining = self.now, 0.0
        job, index = self.next_step.pop(req.id)
        if index < len(job.steps):
            self.schedule(job, index, self.now)
        if not inst.running:
            self.done_running(inst)

    # -- a service's life

    def kick(self, inst: _Instance) -> None:
        """Get the instance's waiting requests going, as far as its state allows."""
        if not inst.pending:
            return
        if inst.state == "off":
            inst.leases += 1
            inst.lease, inst.state = f"{inst.key}.{inst.leases}", "waiting"
            self.by_lease[inst.lease] = inst
            s = inst.service
            self.alloc.acquire(Ask(inst.lease, s.name, s.mib, s.priority, s.preemptible, s.grace_s), self.now)
        elif inst.state == "warm":
            if self.alloc.busy(inst.lease, self.now):
                inst.state, inst.gen = "ready", inst.gen + 1
                self.run_pending(inst)
            else:
                self.evicted(inst)
        elif inst.state == "ready":
            self.run_pending(inst)

    def run_pending(self, inst: _Instance) -> None:
        self.set_phase(inst, "running")
        pending, inst.pending = inst.pending, []
        for req in pending:
            self.start(inst, req)

    def granted(self, inst: _Instance, device: str) -> None:
        inst.state, inst.device = "loading", device
        self.set_phase(inst, "loading")
        gen = inst.gen = inst.gen + 1
        self.at(self.now + inst.service.load_s, lambda: self.loaded(inst, gen))

    def loaded(self, inst: _Instance, gen: int) -> None:
        if inst.gen != gen:
            return
        inst.state = "ready"
        self.alloc.loaded(inst.lease, self.now)
        self.run_pending(inst)
        if not inst.running:
            self.done_running(inst)

    def done_running(self, inst: _Instance) -> None:
        s = inst.service
        if s.mode == "server" and s.keep_warm_s > 0:
            inst.state, inst.gen = "warm", inst.gen + 1
            self.set_phase(inst, "warm")
            gen = inst.gen
            self.at(self.now + s.keep_warm_s, lambda: self.cooled(inst, gen))
            self.alloc.idle(inst.lease, self.now)
        else:
            self.unload(inst, evicted=False)

    def cooled(self, inst: _Instance, gen: int) -> None:
        if inst.state == "warm" and inst.gen == gen:
            self.unload(inst, evicted=False)

    def evicted(self, inst: _Instance) -> None:
        if inst.state not in ("loading", "ready", "warm"):
            return  # unloading already (or not holding memory)
        self.evictions += 1
        for req in inst.running.values():
            req.remaining -= self.now - req.run_from
            req.token += 1
            req.preempted += 1
            self.preemptions += 1
        inst.pending = list(inst.running.values()) + inst.pending
        inst.running.clear()
        self.unload(inst, evicted=True)

    def unload(self, inst: _Instance, *, evicted: bool) -> None:
        inst.state, inst.gen = "unloading", inst.gen + 1
        self.set_phase(inst, "unloading")
        gen, s = inst.gen, inst.service
        if evicted and s.unload_s > s.grace_s:
            self.revoked += 1
            self.at(self.now + s.grace_s, lambda: self.gone(inst, gen, revoke=True))
        else:
            self.at(self.now + s.unload_s, lambda: self.gone(inst, gen, revoke=False))

    def gone(self, inst: _Instance, gen: int, *, revoke: bool) -> None:
        if inst.gen != gen:
            return
        self.set_phase(inst, "")
        lease = inst.lease
        del self.by_lease[lease]
        inst.state, inst.lease = "off", ""
        (self.alloc.revoke if revoke else self.alloc.release)(lease, self.now)
        self.kick(inst)

    def never(self, inst: _Instance) -> None:
        for req in inst.pending:
            req.never_fits = True
            self.next_step.pop(req.id, None)
        inst.pending.clear()
        del self.by_lease[inst.lease]
        inst.state, inst.lease = "off", ""

    def set_phase(self, inst: _Instance, phase: str) -> None:
        """End the instance's current memory segment now and start one in ``phase`` ("" for none)."""
        if inst.phase and self.now > inst.since:
            s = inst.service
            self.segments.append(Segment(inst.device, s.name, inst.phase, s.mib, inst.since, self.now))
        inst.phase, inst.since = phase, self.now


def replay(trace: Trace, jobs: Sequence[Job], allocator: Allocator) -> Outcome:
    """Replay ``jobs`` of ``trace`` over ``allocator``; stops when nothing is left to do or the
    drain time has passed (requests that never started are left with ``started`` None)."""
    return _Replay(trace, jobs, allocator).run()
