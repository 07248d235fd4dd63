"""One simulation: a trace's jobs for a seed, replayed over every policy, with the summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .baselines import BASELINES
from .engine import ScriptPool, connect, private_redis
from .metrics import PolicySummary, format_table, offline_bound, summarise
from .replay import Outcome, replay
from .trace import Job, Trace, TraceError, apply_variant, generate

__all__ = ["POLICIES", "Report", "simulate"]

#: the policies, in the order of tables: gpuboss (the scripts) and the baselines
POLICIES = ("gpuboss", *BASELINES)
#: bins per arrival window in the plots and the bound's series
BINS = 288


@dataclass(frozen=True, slots=True)
class Report:
    """A simulation's results: per policy the replay and its figures, and the offline bound."""

    trace: Trace
    seed: int
    jobs: list[Job]
    outcomes: list[Outcome]
    summaries: list[PolicySummary]
    bound: float
    bound_series: list[float]
    bin_s: float

    def table(self) -> str:
        """The text summary table."""
        return f"seed {self.seed}\n" + format_table(self.trace, self.summaries, self.bound)


def simulate(
    trace: Trace,
    seed: int | None = None,
    *,
    policies: Sequence[str] = POLICIES,
    variants: bool = True,
) -> Report:
    """Replay ``trace``'s jobs for ``seed`` (default: the trace's) over ``policies`` and, with
    ``variants``, gpuboss again under each of the trace's variants.

    gpuboss runs on a private Redis started here, each run in a pool of its own. The same seed
    gives the same report.
    """
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise TraceError(f"unknown policy {', '.join(unknown)}: choose from {', '.join(POLICIES)}")
    seed = trace.seed if seed is None else seed
    jobs = generate(trace, seed)
    outcomes: list[Outcome] = []
    runs = [("gpuboss", trace)] if "gpuboss" in policies else []
    if runs and variants:
        runs += [(f"gpuboss/{name}", apply_variant(trace, name)) for name in trace.variants]
    if runs:
        with private_redis() as url:
            boss = connect(url)
            try:
                for i, (name, variant) in enumerate(runs):
                    pool = f"simulate-{i}"
                    outcomes.append(replay(variant, jobs, ScriptPool(boss, pool, variant, name)))
            finally:
                boss.close()
    for name in policies:
        if name in BASELINES:
            outcomes.append(replay(trace, jobs, BASELINES[name](trace.devices, trace.settings)))
    bin_s = trace.hours * 3600 / BINS
    series, bound = offline_bound(trace, jobs, bin_s)
    summaries = [summarise(trace, o) for o in outcomes]
    return Report(trace, seed, jobs, outcomes, summaries, bound, series, bin_s)
