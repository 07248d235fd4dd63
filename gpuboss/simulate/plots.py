"""The plots of a simulation (PNG), drawn with matplotlib's Agg backend.

matplotlib is the ``gpuboss[simulate]`` extra: it is imported here only, when plotting, and a
missing one raises :class:`PlotsUnavailable` saying how to install it.

- ``<prefix>-memory.png``: for gpuboss and each baseline, the memory held over the day, stacked
  by service (on the one device of a single-GPU trace, else summed over the pool), with the
  offline bound on busy memory;
- ``<prefix>-waits.png``: per priority, the distribution of waits per policy (the share of
  requests that started within a given wait; requests that never started keep it below 1);
- ``<prefix>-devices.png`` (traces of several devices): gpuboss's memory per device, stacked by
  service, for the first eight devices.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .metrics import bin_memory
from .run import Report

__all__ = ["PlotsUnavailable", "require_matplotlib", "write_plots"]

DPI = 72
MIN_WAIT_S = 0.1  # waits are drawn on a log axis: shorter ones (0: warm) sit here


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotsUnavailable` now if matplotlib is missing (before a long simulation)."""
    _pyplot()


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise PlotsUnavailable(
            "plotting needs matplotlib: pip install 'gpuboss[simulate]' (or leave out --out)"
        ) from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_plots(report: Report, prefix: str | Path) -> list[Path]:
    """Write the plots of ``report`` next to ``prefix`` (``<prefix>-memory.png``, ...); returns
    the files written."""
    plt = _pyplot()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    colours = _colours(plt, report)
    written = [_memory(plt, report, colours, prefix), _waits(plt, report, prefix)]
    if len(report.trace.devices) > 1:
        written.append(_devices(plt, report, colours, prefix))
    return written


def _colours(plt: Any, report: Report) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(sorted(report.trace.services))}


def _hours(report: Report) -> list[float]:
    return [(i + 0.5) * report.bin_s / 3600 for i in range(len(report.bound_series))]


def _stack(ax: Any, report: Report, rows: dict[str, list[float]], colours: dict[str, Any]) -> None:
    names = list(rows)
    if names:
        ax.stackplot(
            _hours(report),
            [[m / 1024 for m in rows[n]] for n in names],
            labels=names,
            colors=[colours[n] for n in names],
            linewidth=0,
        )
    ax.set_xlim(0, report.trace.hours)
    ax.grid(alpha=0.3)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _memory(plt: Any, report: Report, colours: dict[str, Any], prefix: Path) -> Path:
    trace, horizon = report.trace, report.trace.hours * 3600
    # gpuboss as configured and the baselines; the variants differ in the summary and the waits
    shown = [(o, s) for o, s in zip(report.outcomes, report.summaries, strict=True) if "/" not in o.policy]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.6 * len(shown) + 0.8), sharex=True, squeeze=False)
    capacity = trace.capacity_mib / 1024
    where = trace.devices[0].name if len(trace.devices) == 1 else f"all {len(trace.devices)} devices"
    for ax, (outcome, summary) in zip(axes[:, 0], shown, strict=True):
        _stack(ax, report, bin_memory(outcome.segments, report.bin_s, horizon), colours)
        ax.plot(_hours(report), [m / 1024 for m in report.bound_series], "k--", linewidth=0.8)
        ax.axhline(capacity, color="grey", linewidth=0.8)
        ax.set_ylim(0, capacity * 1.05)
        ax.set_ylabel("GiB")
        ax.set_title(
            f"{outcome.policy}: busy {summary.busy:.0%}, held {summary.held:.0%}, "
            f"{summary.evictions} evictions, {summary.starved} starved",
            fontsize=9,
            loc="left",
        )
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4, framealpha=0.8)
    axes[-1, 0].set_xlabel(f"hour ({where}; dashed: offline bound on busy memory)")
    fig.suptitle(f"{trace.name}: memory held by service, seed {report.seed}", fontsize=11)
    fig.tight_layout()
    return _save(plt, fig, prefix.with_name(prefix.name + "-memory.png"))


def _waits(plt: Any, report: Report, prefix: Path) -> Path:
    priorities = sorted({r.priority for o in report.outcomes for r in o.requests}, reverse=True)
    fig, axes = plt.subplots(1, len(priorities), figsize=(3.2 * len(priorities) + 0.6, 3.4), squeeze=False)
    bound = report.trace.settings.starvation_s
    for ax, priority in zip(axes[0], priorities, strict=True):
        for outcome in report.outcomes:
            reqs = [r for r in outcome.requests if r.priority == priority]
            waits = sorted(max(MIN_WAIT_S, r.wait) for r in reqs if r.wait is not None)
            if not reqs:
                continue
            ys = [(i + 1) / len(reqs) for i in range(len(waits))]
            ax.step(waits or [MIN_WAIT_S], ys or [0.0], where="post", label=outcome.policy, linewidth=1)
        ax.axvline(bound, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"priority {priority}", fontsize=9)
        ax.set_xlabel("wait (s)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("share of requests started")
    axes[0, -1].legend(loc="lower right", fontsize=6)
    fig.suptitle(f"{report.trace.name}: waits per priority (dotted: starvation bound)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, prefix.with_name(prefix.name + "-waits.png"))


def _devices(plt: Any, report: Report, colours: dict[str, Any], prefix: Path) -> Path:
    trace, horizon = report.trace, report.trace.hours * 3600
    outcome = report.outcomes[0]
    shown = trace.devices[:8]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 0.9 * len(shown) + 1), sharex=True, squeeze=False)
    for ax, device in zip(axes[:, 0], shown, strict=True):
        _stack(ax, report, bin_memory(outcome.segments, report.bin_s, horizon, {device.name}), colours)
        ax.set_ylim(0, device.mib / 1024 * 1.05)
        ax.set_ylabel(device.name, fontsize=7, rotation=0, ha="right")
    axes[0, 0].legend(loc="upper left", fontsize=6, ncol=8, framealpha=0.8)
    axes[-1, 0].set_xlabel("hour")
    fig.suptitle(f"{trace.name}: {outcome.policy}, memory per device (GiB), first {len(shown)}", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, prefix.with_name(prefix.name + "-devices.png"))
