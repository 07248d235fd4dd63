"""``GET /metrics``: the pools, devices and lease counters in the Prometheus text format.

Every scrape reads the state fresh from Redis (the boss keeps no copy of it) through the
:class:`~gpuboss_client.AsyncBoss` at ``app.state.boss``, and the event counters the event hub at
``app.state.hub`` keeps since the service started. Sizes are in bytes and times in seconds; no
metric carries a lease id or a holder, so the number of series grows with devices and pools (and
the lease labels the agent keeps peaks of, which its script bounds) only.

The managed consumers (``app.state.consumers``, a
:class:`~gpuboss.consumers.manager.ConsumerManager`) are read from the boss's memory, not Redis:
each consumer's state (every state reported, 1 for the current one), the memory the agent measures
its processes use, its load, unload and eviction counters, and histograms of load and unload
times. A service with no consumers (or no manager) reports none of them.

When Redis cannot be read the route still answers 200, with ``gpuboss_redis_up 0``, the event
counters, the consumer metrics and no device or pool gauges (rather than stale ones): a 503 would
make Prometheus drop the whole scrape, counters included, and only say "down" without why.

The reading is async but a prometheus_client collector is not, so the route first takes a
:class:`Snapshot` and then renders it through a collector over a registry of its own (never the
process-wide default registry, which would mix in whatever else registered there).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gpuboss.consumers.manager import BUCKETS, STATES, ConsumerManager, Timings
from gpuboss_client import AsyncBoss, GpubossError, LeaseInfo, PoolStatus, __version__
from gpuboss_client.ops import Findings

__all__ = [
    "CONTENT_TYPE",
    "COUNTERS",
    "ConsumerSample",
    "Consumers",
    "Durations",
    "Snapshot",
    "SnapshotCollector",
    "consumers_of",
    "render",
    "router",
    "take_snapshot",
]

log = logging.getLogger("gpuboss.metrics")

#: what ``/metrics`` answers with: the Prometheus text format 0.0.4
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MIB = 1024 * 1024

#: (event name, counter name without ``_total``, help): one counter per lease event, per pool
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("granted", "gpuboss_grants", "Leases granted, at once or to a waiter, since the service started."),
    ("queued", "gpuboss_waits", "Requests that did not fit at once and waited in the queue."),
    ("released", "gpuboss_releases", "Leases released by their holders."),
    ("expired", "gpuboss_expiries", "Leases that expired because their holder stopped heartbeating."),
    ("evicting", "gpuboss_evictions", "Leases asked to give their memory back for another request."),
    ("revoked", "gpuboss_revocations", "Evicted leases revoked for missing their grace deadline."),
    ("force_released", "gpuboss_force_releases", "Leases and waiters ended by an operator."),
    ("cancelled", "gpuboss_cancellations", "Waiters that gave up (timed out) and left the queue."),
    ("abandoned", "gpuboss_abandoned_waits", "Waiters dropped from the queue after they stopped polling."),
)
#: the states of a granted lease, each reported even when no lease is in it
GRANTED_STATES = ("active", "idle", "evicting")
#: what the NVML agent may find about a lease, each reported even when no lease has it
LEASE_FINDINGS = ("over_use", "under_use")


@dataclass(frozen=True, slots=True)
class ConsumerSample:
    """One consumer (for a multi-model consumer: one model of it) as a scrape found it."""

    name: str
    model: str  # "" for a consumer with a single lease
    state: str
    #: MiB the agent measures the consumer's processes use (all its models together); None: not measured
    measured_mib: int | None
    loads: int
    unloads: int
    evictions: int


@dataclass(frozen=True, slots=True)
class Durations:
    """A histogram of durations in seconds: ``counts[i]`` observations took at most ``bounds[i]``
    (cumulative, as Prometheus buckets them); ``n`` observations in all, summing to ``total``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    n: int

    @classmethod
    def of(cls, timings: Timings) -> Durations:
        """A copy of the manager's :class:`~gpuboss.consumers.manager.Timings` (whose
        ``observe`` counts an observation in every bucket it fits: cumulative already)."""
        return cls(BUCKETS, tuple(timings.counts), timings.total, timings.n)


@dataclass(frozen=True, slots=True)
class Consumers:
    """The managed consumers as a scrape found them."""

    units: list[ConsumerSample]
    load_seconds: Durations
    unload_seconds: Durations


def consumers_of(manager: ConsumerManager) -> Consumers:
    """What ``/metrics`` reports of ``manager``'s consumers, now."""
    units = [
        ConsumerSample(
            name=u.consumer.name,
            model=u.model,
            state=u.state,
            measured_mib=u.runtime.measured_mib,
            loads=u.loads,
            unloads=u.unloads,
            evictions=u.evictions,
        )
        for u in manager.units()
    ]
    return Consumers(units, Durations.of(manager.load_seconds), Durations.of(manager.unload_seconds))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reports: the state read from Redis (``pools`` is None when it could not be
    read, ``error`` says why), the event counts since start, and the managed consumers (None: no
    consumer manager)."""

    pools: list[PoolStatus] | None
    leases: list[LeaseInfo]
    counts: Mapping[tuple[str, str], int]
    duration_s: float
    error: str | None = None
    version: str = field(default=__version__)
    findings: list[Findings] = field(default_factory=list)
    consumers: Consumers | None = None


async def take_snapshot(
    boss: AsyncBoss, counts: Mapping[tuple[str, str], int], consumers: Consumers | None = None
) -> Snapshot:
    """Read every pool's status and leases now; a Redis failure gives a snapshot with ``pools=None``
    (``consumers``, read from the boss's memory, is in it either way)."""
    started = time.perf_counter()
    counts = dict(counts)  # the hub keeps counting while this scrape renders
    try:
        pools = await boss.status()
        leases = await boss.leases()
        findings = await boss.findings(None)
    except GpubossError as exc:
        log.warning("metrics: cannot read the state from Redis: %s", exc)
        return Snapshot(
            None, [], counts, time.perf_counter() - started, error=exc.message, consumers=consumers
        )
    return Snapshot(
        pools, leases, counts, time.perf_counter() - started, findings=findings, consumers=consumers
    )


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class SnapshotCollector:
    """A prometheus_client collector over one :class:`Snapshot` (register it on a fresh registry)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Every metric of the snapshot; see the README's table of metrics."""
        snap = self.snapshot
        info = _gauge(
            "gpuboss_build_info", "The gpuboss version serving these metrics (always 1).", ["version"]
        )
        info.add_metric([snap.version], 1)
        yield info
        up = GaugeMetricFamily(
            "gpuboss_redis_up",
            "1 if this scrape read the state from Redis; 0 if it could not (device and pool gauges absent).",
            value=0 if snap.pools is None else 1,
        )
        yield up
        yield GaugeMetricFamily(
            "gpuboss_scrape_duration_seconds",
            "Seconds this scrape took to read Redis.",
            value=snap.duration_s,
        )
        if snap.pools is not None:
            yield from self._devices(snap.pools, snap.leases)
            yield from self._pools(snap.pools, snap.leases)
            yield from self._findings(snap.findings)
        yield from self._counters(snap)
        if snap.consumers is not None and (
            snap.consumers.units or snap.consumers.load_seconds.n or snap.consumers.unload_seconds.n
        ):
            yield from self._consumers(snap.consumers)

    def _devices(self, pools: list[PoolStatus], leases: list[LeaseInfo]) -> Iterator[Metric]:
        labels = ["pool", "device", "host"]
        docs = {
            "total": "Memory of the device.",
            "reserved": "Headroom of the device that is never leased.",
            "unmanaged": "Memory used on the device by processes that hold no lease.",
            "budget": "Memory that may be leased: total - reserved - unmanaged.",
            "leased": "Memory held by leases (every state: active, idle, evicting).",
            "idle": "Memory held by idle leases: kept warm, evictable at once.",
            "evicting": "Memory held by leases asked to give it back.",
            "free": "Budget not leased (negative when unmanaged use grew past the budget).",
        }
        gauges = {k: _gauge(f"gpuboss_device_{k}_bytes", doc, labels) for k, doc in docs.items()}
        count = _gauge("gpuboss_device_leases", "Leases held on the device.", labels)
        by_state: Counter[tuple[str, str, str]] = Counter()
        for x in leases:
            for name in x.devices:  # a gang lease holds its size on each of its devices
                by_state[(x.pool, name, x.state)] += x.mib
        for s in pools:
            for d in s.devices:
                key = [s.pool, d.name, d.host]
                values = {
                    "total": d.total_mib,
                    "reserved": d.reserved_mib,
                    "unmanaged": d.unmanaged_mib,
                    "budget": d.budget_mib,
                    "leased": d.used_mib,
                    "idle": by_state[(s.pool, d.name, "idle")],
                    "evicting": by_state[(s.pool, d.name, "evicting")],
                    "free": d.free_mib,
                }
                for k, mib in values.items():
                    gauges[k].add_metric(key, mib * MIB)
                count.add_metric(key, d.leases)
        yield from gauges.values()
        yield count

    def _pools(self, pools: list[PoolStatus], leases: list[LeaseInfo]) -> Iterator[Metric]:
        by_state = _gauge("gpuboss_leases", "Granted leases by state.", ["pool", "state"])
        depth = _gauge("gpuboss_queue_depth", "Requests waiting in the queue.", ["pool"])
        oldest = _gauge(
            "gpuboss_queue_oldest_wait_seconds", "How long the longest waiter has waited (0: none).", ["pool"]
        )
        devices = _gauge("gpuboss_pool_devices", "Devices registered in the pool.", ["pool"])
        for s in pools:
            mine = [x for x in leases if x.pool == s.pool]
            states = Counter(x.state for x in mine)
            for state in GRANTED_STATES:
                by_state.add_metric([s.pool, state], states[state])
            depth.add_metric([s.pool], s.queued)
            asked = [x.requested_at_ms for x in mine if x.state == "queued" and x.requested_at_ms]
            oldest.add_metric([s.pool], max(0, s.now_ms - min(asked)) / 1000 if asked else 0.0)
            devices.add_metric([s.pool], len(s.devices))
        yield from (by_state, depth, oldest, devices)

    def _findings(self, findings: list[Findings]) -> Iterator[Metric]:
        labels = ["pool", "device", "host"]
        up = _gauge("gpuboss_device_up", "1 if the NVML agent reads the device, 0 if it is lost.", labels)
        seen = _gauge(
            "gpuboss_device_seen_bytes", "Memory in use on the device as the NVML agent last read it.", labels
        )
        leak = _gauge(
            "gpuboss_device_leak_bytes", "Memory held on the device by processes of no lease.", labels
        )
        age = _gauge(
            "gpuboss_device_measurement_age_seconds",
            "Seconds since the NVML agent last read the device.",
            labels,
        )
        with_finding = _gauge(
            "gpuboss_leases_with_finding",
            "Live leases whose measured use is over (over_use) or far under (under_use) their size.",
            ["pool", "finding"],
        )
        peaks = _gauge(
            "gpuboss_label_peak_bytes",
            'Peak measured use of a lease with the label (label="key=value").',
            ["pool", "label"],
        )
        for f in findings:
            for d in f.devices:
                if d.state == "unmeasured":  # no agent reads it: nothing to say, rather than "down"
                    continue
                key = [f.pool, d.name, d.agent_host or ""]
                up.add_metric(key, 1 if d.state == "ok" else 0)
                if d.seen_mib is not None:
                    seen.add_metric(key, d.seen_mib * MIB)
                leak.add_metric(key, d.leak_mib * MIB)
                if d.measured_at_ms is not None:
                    age.add_metric(key, max(0, f.now_ms - d.measured_at_ms) / 1000)
            found = Counter(x.finding for x in f.leases)
            for name in LEASE_FINDINGS:
                with_finding.add_metric([f.pool, name], found[name])
            for label, mib in sorted(f.label_peaks.items()):
                peaks.add_metric([f.pool, label], mib * MIB)
        yield from (up, seen, leak, age, with_finding, peaks)

    def _counters(self, snap: Snapshot) -> Iterator[Metric]:
        pools = sorted({p for p, _ in snap.counts} | {s.pool for s in snap.pools or []})
        for event, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["pool"])
            for pool in pools:  # zero from the start, so rate() works from the first event
                family.add_metric([pool], snap.counts.get((pool, event), 0))
            yield family
        every = CounterMetricFamily(
            "gpuboss_events",
            "Events of the pools' event streams seen since start, by name.",
            labels=["pool", "event"],
        )
        for (pool, event), n in sorted(snap.counts.items()):
            every.add_metric([pool, event], n)
        yield every

    def _consumers(self, consumers: Consumers) -> Iterator[Metric]:
        labels = ["consumer", "model"]
        state = _gauge(
            "gpuboss_consumer_state",
            f"1 for the state the consumer is in, 0 for the others ({', '.join(STATES)}).",
            [*labels, "state"],
        )
        measured = _gauge(
            "gpuboss_consumer_measured_bytes",
            "Memory the agent measures the consumer's processes use, all its models together "
            '(model=""); absent when not measured.',
            labels,
        )
        counters = {
            "loads": CounterMetricFamily(
                "gpuboss_consumer_loads", "Loads of the consumer that turned healthy.", labels=labels
            ),
            "unloads": CounterMetricFamily(
                "gpuboss_consumer_unloads",
                "Times the consumer gave its memory back (freed or stuck).",
                labels=labels,
            ),
            "evictions": CounterMetricFamily(
                "gpuboss_consumer_evictions",
                "Times the consumer was asked to leave for another request.",
                labels=labels,
            ),
        }
        measured_of: dict[str, int] = {}
        for u in consumers.units:
            key = [u.name, u.model]
            for name in STATES:
                state.add_metric([*key, name], 1 if u.state == name else 0)
            if u.measured_mib is not None:
                measured_of[u.name] = u.measured_mib  # one figure per consumer, whatever its models
            counters["loads"].add_metric(key, u.loads)
            counters["unloads"].add_metric(key, u.unloads)
            counters["evictions"].add_metric(key, u.evictions)
        for name, mib in measured_of.items():
            measured.add_metric([name, ""], mib * MIB)
        yield state
        yield measured
        yield from counters.values()
        yield _histogram(
            "gpuboss_consumer_load_seconds",
            "Seconds from a consumer's load action to its passing health check.",
            consumers.load_seconds,
        )
        yield _histogram(
            "gpuboss_consumer_unload_seconds",
            "Seconds from a consumer's unload to its lease's end (measured free, or stuck).",
            consumers.unload_seconds,
        )


def _histogram(name: str, doc: str, durations: Durations) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = [
        (str(float(bound)), count) for bound, count in zip(durations.bounds, durations.counts, strict=True)
    ]
    buckets.append(("+Inf", durations.n))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=durations.total)


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


router = APIRouter()


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    tags=["health"],
    summary="Prometheus metrics",
    responses={200: {"description": "The Prometheus text format, version 0.0.4."}},
)
async def metrics(request: Request) -> Response:
    """Devices, pools and lease counters in the Prometheus text format (no token needed).

    Answers 200 even when Redis is down: ``gpuboss_redis_up`` is then 0 and only the counters and
    the gpuboss gauges about the scrape itself are present.
    """
    state: Any = request.app.state
    hub = getattr(state, "hub", None)
    counts: Mapping[tuple[str, str], int] = getattr(hub, "counts", {})
    manager = getattr(state, "consumers", None)
    consumers = consumers_of(manager) if isinstance(manager, ConsumerManager) else None
    snapshot = await take_snapshot(state.boss, counts, consumers)
    return Response(render(snapshot), media_type=CONTENT_TYPE)
