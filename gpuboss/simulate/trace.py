"""Workload traces: what a simulation replays, and the seeded generator of its jobs.

A trace is a YAML (or JSON) document::

    name: homelab                 # a label for tables and plots
    hours: 24                     # arrivals happen in [0, hours); utilisation is measured there
    drain_hours: 6                # afterwards, work already there may still finish (default 6)
    seed: 1                       # the default seed (``gpuboss simulate --seed`` overrides it)
    devices:                      # one entry per device, or `count` devices on each of `hosts`
      - {name: gpu0, vram: 24GiB, host: mrock}
      - {name: node, vram: 80GiB, count: 8, hosts: 8}   # node0-gpu0 ... node7-gpu7
    settings:
      aging_s: 300                # the pool's aging period (0: strict priority)
      min_residency_s: 60         # the pool's minimum residency (0: off)
      poll_s: 10                  # how often a waiter polls (aging acts on polls), and a retry's
                                  # period for a policy without a queue
      starvation_s: 600           # a wait longer than this counts as starved
    services:
      ollama:
        vram: 8GiB                # MiB as an int, or a size such as "8GiB"
        priority: normal          # low | normal | high | 0-100
        load_s: 6                 # time to load the model once granted (memory held meanwhile)
        unload_s: 2               # time to give the memory back
        keep_warm_s: 300          # stay resident (an idle lease) this long after the last request
        preemptible: false        # may a request of higher priority evict it while it runs?
        grace_s: 10               # a victim not unloaded by then is revoked
        mode: server              # server: one lease shared by concurrent requests;
                                  # job: a lease of its own per request (no keep-warm)
        arrivals: {per_hour: 30, hours: [[7, 23]]}    # Poisson, within these windows (hours);
                                                      # and/or at: [0, 90.5] (seconds)
        duration_s: {mean: 20, cv: 1.0}               # log-normal; or a plain number
    variants:                     # more gpuboss runs, each with some settings changed
      no-aging: {aging_s: 0}      # aging_s, min_residency_s: the pool's; keep_warm_s and
      cold: {keep_warm_s: 0}      # grace_s: every service's
    pipelines:                    # jobs that run phases one after another (GPU Manager V2)
      video:
        arrivals: {per_hour: 0.5, hours: [[9, 18]]}
        phases:
          - {service: vidi, duration_s: 120, gap_s: 300}   # gap_s: CPU work before the phase
          - {service: longcat, duration_s: {mean: 900, cv: 0.3}}

:func:`generate` draws the jobs: for a seed, the same list every time, and each service's or
pipeline's draws come from a generator of its own, so adding one leaves the others unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpuboss_client.errors import BadRequest
from gpuboss_client.units import parse_mib, parse_priority

__all__ = [
    "Arrivals",
    "DeviceSpec",
    "Dist",
    "Job",
    "Phase",
    "Pipeline",
    "Service",
    "Settings",
    "Step",
    "Trace",
    "TraceError",
    "apply_variant",
    "generate",
    "load_trace",
    "parse_trace",
]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
MODES = ("server", "job")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the field."""


@dataclass(frozen=True, slots=True)
class Dist:
    """A duration: log-normal with this mean and coefficient of variation (0: always the mean)."""

    mean: float
    cv: float = 0.0

    def draw(self, rng: random.Random) -> float:
        """One sample, in seconds."""
        if self.cv == 0:
            return self.mean
        sigma2 = math.log1p(self.cv * self.cv)
        return rng.lognormvariate(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))


@dataclass(frozen=True, slots=True)
class Arrivals:
    """A Poisson process of ``per_hour`` arrivals within ``windows`` (start, end hours), plus
    arrivals at fixed times ``at`` (seconds: hand-made traces)."""

    per_hour: float
    windows: tuple[tuple[float, float], ...]
    at: tuple[float, ...] = ()

    def times(self, rng: random.Random) -> list[float]:
        """Arrival times in seconds, ascending."""
        out: list[float] = list(self.at)
        rate = self.per_hour / 3600
        for start, end in self.windows:
            t = start * 3600
            while rate > 0:
                t += rng.expovariate(rate)
                if t >= end * 3600:
                    break
                out.append(t)
        return sorted(out)


@dataclass(frozen=True, slots=True)
class Service:
    """A GPU service of the trace (see the module's docstring for each field)."""

    name: str
    mib: int
    priority: int
    load_s: float
    unload_s: float
    keep_warm_s: float
    preemptible: bool
    grace_s: float
    mode: str
    arrivals: Arrivals | None
    duration: Dist


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of a pipeline: CPU work for ``gap_s``, then a request to ``service``."""

    service: str
    duration: Dist
    gap_s: float


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Jobs that run their phases one after another."""

    name: str
    arrivals: Arrivals
    phases: tuple[Phase, ...]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device: its name, budget in MiB and host."""

    name: str
    mib: int
    host: str


@dataclass(frozen=True, slots=True)
class Settings:
    """The pool's settings and the simulation's bounds (see the module's docstring)."""

    aging_s: float = 0.0
    min_residency_s: float = 0.0
    poll_s: float = 10.0
    starvation_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole trace, checked."""

    name: str
    hours: float
    drain_hours: float
    seed: int
    devices: tuple[DeviceSpec, ...]
    settings: Settings
    services: Mapping[str, Service]
    pipelines: tuple[Pipeline, ...]
    #: name -> settings to change for another gpuboss run (see :func:`apply_variant`)
    variants: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def capacity_mib(self) -> int:
        """The budget of every device together."""
        return sum(d.mib for d in self.devices)


@dataclass(frozen=True, slots=True)
class Step:
    """One request of a job: ``gap_s`` of CPU work after the previous step, then ``duration_s`` on
    ``service``."""

    service: str
    duration_s: float
    gap_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Job:
    """What arrives at ``arrival_s``: one request, or a pipeline's steps one after another."""

    id: str
    origin: str  # the service or pipeline it came from
    arrival_s: float
    steps: tuple[Step, ...]


# ---------------------------------------------------------------------------------------------
# Reading


def load_trace(path: str | Path) -> Trace:
    """Read and check the trace at ``path`` (YAML or JSON); raises :class:`TraceError`."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TraceError(f"trace {path} is not valid YAML: {exc}") from None
    return parse_trace(doc, str(path))


def parse_trace(doc: Any, where: str = "trace") -> Trace:
    """Check a trace document (already parsed); raises :class:`TraceError` naming the field."""
    top = _mapping(doc, where)
    _known(
        top,
        where,
        {"name", "hours", "drain_hours", "seed", "devices", "settings", "services", "pipelines", "variants"},
    )
    hours = _number(top.get("hours", 24), f"{where}.hours", low=0.001)
    services = {
        name: _service(name, spec, f"{where}.services.{name}", hours)
        for name, spec in _mapping(top.get("services"), f"{where}.services").items()
    }
    if not services:
        raise TraceError(f"{where}.services: a trace needs at least one service")
    pipelines = tuple(
        _pipeline(name, spec, f"{where}.pipelines.{name}", hours, services)
        for name, spec in _mapping(top.get("pipelines", {}), f"{where}.pipelines").items()
    )
    seed = top.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TraceError(f"{where}.seed must be an int, not {seed!r}")
    return Trace(
        name=_name(top.get("name", Path(where).stem), f"{where}.name"),
        hours=hours,
        drain_hours=_number(top.get("drain_hours", 6), f"{where}.drain_hours"),
        seed=seed,
        devices=_devices(top.get("devices"), f"{where}.devices"),
        settings=_settings(top.get("settings", {}), f"{where}.settings"),
        services=services,
        pipelines=pipelines,
        variants=_variants(top.get("variants", {}), f"{where}.variants"),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TraceError(f"{where} must be a mapping, not {value!r}")
    return value


def _known(spec: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise TraceError(f"{where} must be 1-40 of [A-Za-z0-9_.-], not {value!r}")
    return value


def _number(value: Any, where: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{where} must be a number, not {value!r}")
    if value < low:
        raise TraceError(f"{where} must be at least {low:g}, not {value!r}")
    return float(value)


def _mib(value: Any, where: str) -> int:
    try:
        return parse_mib(value)
    except BadRequest as exc:
        raise TraceError(f"{where}: {exc.message}") from None


def _dist(value: Any, where: str) -> Dist:
    if isinstance(value, dict):
        _known(value, where, {"mean", "cv"})
        return Dist(
            _number(value.get("mean"), f"{where}.mean", 0.001), _number(value.get("cv", 0), f"{where}.cv")
        )
    return Dist(_number(value, where, 0.001))


def _arrivals(value: Any, where: str, hours: float) -> Arrivals:
    spec = _mapping(value, where)
    _known(spec, where, {"per_hour", "hours", "at"})
    at = spec.get("at", [])
    if not isinstance(at, list):
        raise TraceError(f"{where}.at must be a list of times in seconds, not {at!r}")
    fixed = tuple(_number(t, f"{where}.at") for t in at)
    if any(t >= hours * 3600 for t in fixed):
        raise TraceError(f"{where}.at: every time must lie within the trace's {hours:g} hours")
    windows = spec.get("hours", [[0, hours]])
    if (
        not isinstance(windows, list)
        or not windows
        or not all(isinstance(w, list) and len(w) == 2 for w in windows)
    ):
        raise TraceError(f"{where}.hours must be a list of [start, end] hours, not {windows!r}")
    checked = []
    for start, end in windows:
        a, b = _number(start, f"{where}.hours"), _number(end, f"{where}.hours")
        if not a < b <= hours:
            raise TraceError(f"{where}.hours: window [{start}, {end}] must lie within [0, {hours:g}]")
        checked.append((a, b))
    return Arrivals(_number(spec.get("per_hour", 0), f"{where}.per_hour"), tuple(checked), fixed)


def _service(name: str, value: Any, where: str, hours: float) -> Service:
    spec = _mapping(value, where)
    fields = {"vram", "priority", "load_s", "unload_s", "keep_warm_s", "preemptible", "grace_s", "mode"}
    _known(spec, where, fields | {"arrivals", "duration_s"})
    try:
        priority = parse_priority(spec.get("priority", "normal"))
    except BadRequest as exc:
        raise TraceError(f"{where}.priority: {exc.message}") from None
    mode = spec.get("mode", "server")
    if mode not in MODES:
        raise TraceError(f"{where}.mode must be one of {', '.join(MODES)}, not {mode!r}")
    preemptible = spec.get("preemptible", False)
    if not isinstance(preemptible, bool):
        raise TraceError(f"{where}.preemptible must be true or false, not {preemptible!r}")
    arrivals = spec.get("arrivals")
    return Service(
        name=_name(name, where),
        mib=_mib(spec.get("vram"), f"{where}.vram"),
        priority=priority,
        load_s=_number(spec.get("load_s", 0), f"{where}.load_s"),
        unload_s=_number(spec.get("unload_s", 0), f"{where}.unload_s"),
        keep_warm_s=_number(spec.get("keep_warm_s", 0), f"{where}.keep_warm_s"),
        preemptible=preemptible,
        grace_s=_number(spec.get("grace_s", 10), f"{where}.grace_s", 0.001),
        mode=mode,
        arrivals=None if arrivals is None else _arrivals(arrivals, f"{where}.arrivals", hours),
        duration=_dist(spec.get("duration_s", 1), f"{where}.duration_s"),
    )


def _pipeline(name: str, value: Any, where: str, hours: float, services: Mapping[str, Service]) -> Pipeline:
    spec = _mapping(value, where)
    _known(spec, where, {"arrivals", "phases"})
    phases = spec.get("phases")
    if not isinstance(phases, list) or not phases:
        raise TraceError(f"{where}.phases must be a non-empty list")
    out = []
    for i, phase in enumerate(phases):
        at = f"{where}.phases[{i}]"
        p = _mapping(phase, at)
        _known(p, at, {"service", "duration_s", "gap_s"})
        if p.get("service") not in services:
            raise TraceError(f"{at}.service must name a service of the trace, not {p.get('service')!r}")
        out.append(
            Phase(
                p["service"],
                _dist(p.get("duration_s"), f"{at}.duration_s"),
                _number(p.get("gap_s", 0), f"{at}.gap_s"),
            )
        )
    return Pipeline(
        _name(name, where), _arrivals(spec.get("arrivals"), f"{where}.arrivals", hours), tuple(out)
    )


def _devices(value: Any, where: str) -> tuple[DeviceSpec, ...]:
    if not isinstance(value, list) or not value:
        raise TraceError(f"{where} must be a non-empty list of devices")
    out: list[DeviceSpec] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        spec = _mapping(entry, at)
        _known(spec, at, {"name", "vram", "host", "count", "hosts"})
        name, mib = _name(spec.get("name"), f"{at}.name"), _mib(spec.get("vram"), f"{at}.vram")
        if "count" not in spec and "hosts" not in spec:
            out.append(DeviceSpec(name, mib, _name(spec.get("host", "host0"), f"{at}.host")))
            continue
        count, hosts = (
            int(_number(spec.get("count", 1), f"{at}.count", 1)),
            int(_number(spec.get("hosts", 1), f"{at}.hosts", 1)),
        )
        out += [
            DeviceSpec(f"{name}{h}-gpu{g}", mib, f"{name}{h}") for h in range(hosts) for g in range(count)
        ]
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise TraceError(f"{where}: device names must be unique")
    return tuple(out)


def _settings(value: Any, where: str) -> Settings:
    spec = _mapping(value, where)
    _known(spec, where, {"aging_s", "min_residency_s", "poll_s", "starvation_s"})
    return Settings(
        aging_s=_number(spec.get("aging_s", 0), f"{where}.aging_s"),
        min_residency_s=_number(spec.get("min_residency_s", 0), f"{where}.min_residency_s"),
        poll_s=_number(spec.get("poll_s", 10), f"{where}.poll_s", 0.01),
        starvation_s=_number(spec.get("starvation_s", 600), f"{where}.starvation_s"),
    )


VARIANT_FIELDS = ("aging_s", "min_residency_s", "keep_warm_s", "grace_s")


def _variants(value: Any, where: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, spec in _mapping(value, where).items():
        at = f"{where}.{name}"
        fields = _mapping(spec, at)
        _known(fields, at, set(VARIANT_FIELDS))
        out[_name(name, at)] = {
            k: _number(v, f"{at}.{k}", 0.001 if k == "grace_s" else 0.0) for k, v in fields.items()
        }
    return out


def apply_variant(trace: Trace, name: str) -> Trace:
    """``trace`` with variant ``name``'s settings: the pool's aging and minimum residency, every
    service's keep-warm time and grace period."""
    change = trace.variants[name]
    settings = dataclasses.replace(
        trace.settings,
        aging_s=change.get("aging_s", trace.settings.aging_s),
        min_residency_s=change.get("min_residency_s", trace.settings.min_residency_s),
    )
    services = {
        key: dataclasses.replace(
            s,
            keep_warm_s=change.get("keep_warm_s", s.keep_warm_s),
            grace_s=change.get("grace_s", s.grace_s),
        )
        for key, s in trace.services.items()
    }
    return dataclasses.replace(trace, settings=settings, services=services)


# ---------------------------------------------------------------------------------------------
# The jobs


def generate(trace: Trace, seed: int) -> list[Job]:
    """Every job of the trace for ``seed``, in arrival order (ties by origin); the same every time."""
    jobs: list[tuple[float, str, tuple[Step, ...]]] = []
    for service in trace.services.values():
        if service.arrivals is None:
            continue
        rng = random.Random(f"{seed}:service:{service.name}")
        for t in service.arrivals.times(rng):
            jobs.append((t, service.name, (Step(service.name, service.duration.draw(rng)),)))
    for pipeline in trace.pipelines:
        rng = random.Random(f"{seed}:pipeline:{pipeline.name}")
        for t in pipeline.arrivals.times(rng):
            steps = tuple(Step(p.service, p.duration.draw(rng), p.gap_s) for p in pipeline.phases)
            jobs.append((t, pipeline.name, steps))
    jobs.sort(key=lambda j: (j[0], j[1]))
    return [Job(f"j{i}", origin, t, steps) for i, (t, origin, steps) in enumerate(jobs)]


def steps_of(jobs: Sequence[Job]) -> int:
    """How many requests the jobs make."""
    return sum(len(j.steps) for j in jobs)
