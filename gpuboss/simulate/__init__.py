"""``gpuboss simulate``: replay a day of GPU work through the real scripts and the alternatives.

A trace (:mod:`.trace`) declares devices, services and pipelines; a seeded generator draws its
jobs. The replay (:mod:`.replay`) models the services (load, run, keep warm, unload, get evicted)
on a virtual clock, over any policy (:mod:`.policy`): gpuboss's own Lua scripts on a private
Redis (:mod:`.engine`), or a baseline (:mod:`.baselines`). :mod:`.metrics` sums up utilisation,
waits, evictions, churn and starvation, next to an offline bound; :mod:`.plots` draws them
(matplotlib, the ``gpuboss[simulate]`` extra, imported only there).
"""

from __future__ import annotations

from .metrics import PolicySummary
from .run import POLICIES, Report, simulate
from .trace import Trace, TraceError, generate, load_trace, parse_trace

__all__ = [
    "POLICIES",
    "PolicySummary",
    "Report",
    "Trace",
    "TraceError",
    "generate",
    "load_trace",
    "parse_trace",
    "simulate",
]
