"""``gpuboss simulate``: replay a workload trace through the real scripts and the baselines.

It starts a private Redis of its own (never the one of ``GPUBOSS_REDIS_URL``), prints the summary
table and, with ``--out PREFIX``, writes the plots (``PREFIX-memory.png``, ``PREFIX-waits.png``,
and ``PREFIX-devices.png`` for several devices; matplotlib: the ``gpuboss[simulate]`` extra).
Exit codes: 2 for a bad trace, option or missing matplotlib, 12 when no Redis could be started.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from gpuboss_client import BadRequest, GpubossError

from .common import exit_with

__all__ = ["resolve_trace", "simulate"]


def resolve_trace(trace: str) -> Path:
    """A trace file: ``trace`` as a path, else the name of a shipped trace (``homelab``, ``fleet``)."""
    path = Path(trace)
    if path.exists() or path.suffix:
        return path
    shipped = resources.files("gpuboss.simulate").joinpath("traces", f"{trace}.yaml")
    return Path(str(shipped))


def simulate(
    trace: Annotated[
        str, typer.Argument(help="A trace file (YAML or JSON), or a shipped trace: homelab, fleet.")
    ],
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the arrivals (default: the trace's).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Write the plots as PREFIX-memory.png, PREFIX-waits.png, ...", metavar="PREFIX"
        ),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help="Only these policies (repeat): gpuboss, lock, tiers, fcfs."),
    ] = None,
    variants: Annotated[
        bool, typer.Option("--variants/--no-variants", help="Also run gpuboss under the trace's variants.")
    ] = True,
) -> None:
    """Replay a day of GPU work through gpuboss's own scripts (on a private Redis, with a virtual
    clock) and through the baselines, and print how well each used the memory."""
    # Imported here: only this command needs the simulator.
    from gpuboss.simulate import POLICIES, TraceError, load_trace
    from gpuboss.simulate import simulate as run_simulation
    from gpuboss.simulate.plots import PlotsUnavailable, require_matplotlib, write_plots

    try:
        try:
            if out is not None:
                require_matplotlib()  # before the simulation, not after it
            loaded = load_trace(resolve_trace(trace))
            started = time.monotonic()
            report = run_simulation(loaded, seed, policies=policy or POLICIES, variants=variants)
        except (TraceError, PlotsUnavailable) as exc:
            raise BadRequest(str(exc)) from None
        typer.echo(report.table())
        typer.echo(f"({time.monotonic() - started:.1f} s)")
        if out is not None:
            for path in write_plots(report, out):
                typer.echo(f"wrote {path}")
    except GpubossError as err:
        exit_with(err)
