"""What a replay says: utilisation, waits per priority, evictions, churn, starvation, and the bound.

All figures cover the trace's arrival window ``[0, hours)``:

- ``busy``: memory-seconds of leases whose service is running requests, over the capacity's;
- ``held``: memory-seconds leased at all (loading, running, warm, unloading), over the capacity's;
- ``churn``: memory-seconds spent loading and unloading (GiB-hours);
- waits: from a request's arrival to the start of its first run (the model loaded), per priority;
- ``starved``: requests that waited longer than ``starvation_s``, or had waited that long when
  the replay ended; ``never``: requests that never ran (cannot fit anywhere, or still waiting when
  the drain time ran out).

:func:`offline_bound` is an upper bound on ``busy`` that no policy can beat: the same requests,
served by one fluid pool of all the memory (no devices to pack, no loading), which works off any
backlog as fast as the capacity allows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .replay import Outcome, RequestRecord, Segment
from .trace import Job, Trace

__all__ = ["PolicySummary", "bin_memory", "format_table", "offline_bound", "percentile", "summarise"]

BUSY_PHASES = frozenset({"running"})
CHURN_PHASES = frozenset({"loading", "unloading"})


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """One policy's figures (see the module's docstring); waits in seconds."""

    policy: str
    busy: float
    held: float
    churn_gib_h: float
    evictions: int
    preemptions: int
    revoked: int
    requests: int
    starved: int
    never: int
    #: priority -> (count, p50, p99, max) of the waits of requests that ran
    waits: dict[int, tuple[int, float, float, float]]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _overlap(seg: Segment, start: float, end: float) -> float:
    return max(0.0, min(seg.end, end) - max(seg.start, start))


def _mib_seconds(segments: Iterable[Segment], phases: frozenset[str] | None, horizon: float) -> float:
    return sum(s.mib * _overlap(s, 0.0, horizon) for s in segments if phases is None or s.phase in phases)


def _starved(req: RequestRecord, bound: float, end: float) -> bool:
    waited = req.wait if req.wait is not None else end - req.arrival
    return not req.never_fits and waited > bound


def summarise(trace: Trace, outcome: Outcome) -> PolicySummary:
    """The figures of one replay."""
    horizon = trace.hours * 3600
    capacity = trace.capacity_mib * horizon
    by_priority: dict[int, list[float]] = defaultdict(list)
    for req in outcome.requests:
        if req.wait is not None:
            by_priority[req.priority].append(req.wait)
    waits = {
        p: (len(w), percentile(w, 0.5), percentile(w, 0.99), max(w)) for p, w in sorted(by_priority.items())
    }
    bound = trace.settings.starvation_s
    return PolicySummary(
        policy=outcome.policy,
        busy=_mib_seconds(outcome.segments, BUSY_PHASES, horizon) / capacity,
        held=_mib_seconds(outcome.segments, None, horizon) / capacity,
        churn_gib_h=_mib_seconds(outcome.segments, CHURN_PHASES, horizon) / 1024 / 3600,
        evictions=outcome.evictions,
        preemptions=outcome.preemptions,
        revoked=outcome.revoked,
        requests=len(outcome.requests),
        starved=sum(_starved(r, bound, outcome.end) for r in outcome.requests),
        never=sum(r.started is None for r in outcome.requests),
        waits=waits,
    )


def _demand(trace: Trace, jobs: Sequence[Job]) -> list[tuple[float, float, int]]:
    """(start, end, MiB) of what the jobs would run if nothing ever waited or loaded: a server
    service's overlapping requests share its memory, so they merge into one interval."""
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    out: list[tuple[float, float, int]] = []
    for job in jobs:
        t = job.arrival_s
        for step in job.steps:
            t += step.gap_s
            service = trace.services[step.service]
            if service.mode == "server":
                runs[service.name].append((t, t + step.duration_s))
            else:
                out.append((t, t + step.duration_s, service.mib))
            t += step.duration_s
    for name, spans in runs.items():
        mib = trace.services[name].mib
        spans.sort()
        start, end = spans[0]
        for a, b in spans[1:]:
            if a > end:
                out.append((start, end, mib))
                start, end = a, b
            else:
                end = max(end, b)
        out.append((start, end, mib))
    return out


def offline_bound(trace: Trace, jobs: Sequence[Job], bin_s: float) -> tuple[list[float], float]:
    """The fluid bound: MiB in use per bin of ``bin_s`` over the arrival window, and the busy
    utilisation it adds up to."""
    horizon = trace.hours * 3600
    nbins = math.ceil(horizon / bin_s)
    work = [0.0] * nbins  # MiB-seconds arriving per bin
    budget = max(d.mib for d in trace.devices)
    for start, end, mib in _demand(trace, jobs):
        if mib > budget:
            continue  # can never run anywhere
        for b in range(int(start // bin_s), min(nbins, int(end // bin_s) + 1)):
            work[b] += mib * max(0.0, min(end, (b + 1) * bin_s) - max(start, b * bin_s))
    capacity = trace.capacity_mib
    served, backlog = [], 0.0
    for b in range(nbins):
        width = min(bin_s, horizon - b * bin_s)
        backlog += work[b]
        done = min(backlog, capacity * width)
        backlog -= done
        served.append(done / width)
    total = sum(m * min(bin_s, horizon - b * bin_s) for b, m in enumerate(served))
    return served, total / (capacity * horizon)


def bin_memory(
    segments: Iterable[Segment], bin_s: float, horizon: float, devices: set[str] | None = None
) -> dict[str, list[float]]:
    """Mean MiB held per bin of ``bin_s``, per service (on ``devices``, or every device)."""
    nbins = math.ceil(horizon / bin_s)
    out: dict[str, list[float]] = {}
    for seg in segments:
        if devices is not None and seg.device not in devices:
            continue
        row = out.setdefault(seg.service, [0.0] * nbins)
        for b in range(int(seg.start // bin_s), min(nbins, int(seg.end // bin_s) + 1)):
            row[b] += seg.mib * _overlap(seg, b * bin_s, (b + 1) * bin_s) / bin_s
    return dict(sorted(out.items()))


def _fmt_s(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f}s"
    if seconds < 6000:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_table(trace: Trace, rows: Sequence[PolicySummary], bound: float) -> str:
    """The text summary: one line per policy, then the waits per priority."""
    head = f"{'policy':<22}{'busy':>7}{'held':>7}{'churn':>11}{'evict':>7}{'preempt':>8}"
    head += f"{'revoked':>8}{'starved':>8}{'never':>7}"
    lines = [
        f"trace {trace.name}: {len(trace.devices)} device(s), {trace.capacity_mib / 1024:g} GiB, "
        f"{trace.hours:g} h, {rows[0].requests if rows else 0} requests; "
        f"starved = waited > {_fmt_s(trace.settings.starvation_s)}",
        head,
    ]
    for r in rows:
        lines.append(
            f"{r.policy:<22}{r.busy:>7.1%}{r.held:>7.1%}{r.churn_gib_h:>9.1f}Gh{r.evictions:>7}"
            f"{r.preemptions:>8}{r.revoked:>8}{r.starved:>8}{r.never:>7}"
        )
    lines.append(f"{'offline bound':<22}{bound:>7.1%}")
    lines.append("")
    lines.append(f"{'wait p50/p99/max':<22}" + "".join(f"{f'priority {p}':>24}" for p in _priorities(rows)))
    for r in rows:
        cells = []
        for p in _priorities(rows):
            w = r.waits.get(p)
            cells.append("-" if w is None else f"{_fmt_s(w[1])}/{_fmt_s(w[2])}/{_fmt_s(w[3])}")
        lines.append(f"{r.policy:<22}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _priorities(rows: Sequence[PolicySummary]) -> list[int]:
    return sorted({p for r in rows for p in r.waits}, reverse=True)
