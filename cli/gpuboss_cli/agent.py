"""``gpuboss agent``: register this host's GPUs and measure them (see :mod:`gpuboss.agent`)."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from gpuboss_client import BackendUnavailable, BadRequest, Boss, GpubossError, parse_mib

from .common import connect, exit_with
from .render import human_mib

if TYPE_CHECKING:
    from gpuboss.agent import PassReport

__all__ = ["agent"]


def _describe(report: PassReport, verbose: bool) -> list[str]:
    """Lines for a pass: everything with ``verbose``, else only what needs attention."""
    lines = [f"registered {name}" for name in report.registered]
    for d in report.devices:
        line = f"{d.device}: {d.state}"
        if d.state == "ok":
            line += f", in use {human_mib(d.seen_mib)}, unmanaged {human_mib(d.unmanaged_mib)}"
            line += f", {len(d.readings)} lease(s) measured"
            if d.leak_pids:
                line += f", {human_mib(d.leak_mib)} held by pids without a lease: "
                line += " ".join(map(str, d.leak_pids))
        if verbose or d.state != "ok" or d.leak_pids:
            lines.append(line)
    if report.events:
        lines.append(f"{report.events} finding(s) logged as events")
    if report.error:
        lines.append(f"cannot read the devices: {report.error}")
    return lines


def agent(
    ctx: typer.Context,
    pool: Annotated[str, typer.Option("--pool", "-p", help="Pool to register the devices in.")] = "default",
    interval: Annotated[float, typer.Option("--interval", help="Seconds between passes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Make one pass, print it and exit.")] = False,
    host: Annotated[str | None, typer.Option("--host", help="This host's name (default: hostname).")] = None,
    reserved: Annotated[
        str, typer.Option("--reserved", metavar="SIZE", help="Headroom of devices it adds, e.g. 1GiB.")
    ] = "0",
    smoothing: Annotated[
        float, typer.Option("--smoothing", help="Weight of a lower unmanaged reading, 0 < s <= 1 (1: none).")
    ] = 0.3,
    over_pct: Annotated[
        int, typer.Option("--over-pct", help="Over-use: a holder uses more than its lease by this %.")
    ] = 10,
    under_pct: Annotated[
        int, typer.Option("--under-pct", help="Under-use: a lease's peak stays below this % of it...")
    ] = 50,
    under_after: Annotated[
        float, typer.Option("--under-after", help="...once held this many seconds.")
    ] = 60.0,
    fake_nvml: Annotated[
        str | None,
        typer.Option(
            "--fake-nvml",
            metavar="SPEC",
            help="Demo: fake GPUs instead of NVML, e.g. '24GiB,NVIDIA A100=40GiB', or "
            "'@state.json' to read them (with processes) from a file on every pass.",
        ),
    ] = None,
) -> None:
    """Register this host's GPUs (NVML) and keep their budgets honest: memory used outside leases
    shrinks them, and over-use, under-use, leaks and lost devices are logged as events."""
    # Imported here: only this command needs the service package.
    from gpuboss.agent import Agent
    from gpuboss.fakenvml import fake_nvml as fake
    from gpuboss.probe import NvmlMissing, NvmlProbe, ProbeError

    try:
        reserved_mib = parse_mib(reserved, minimum=0)
        try:
            probe = NvmlProbe(None if fake_nvml is None else fake(fake_nvml))
        except NvmlMissing as err:
            raise BadRequest(err.message) from None
        except ProbeError as err:
            raise BackendUnavailable(err.message) from None
    except GpubossError as err:
        exit_with(err)
    try:
        with connect(ctx) as boss:
            if not isinstance(boss, Boss):
                raise BadRequest("gpuboss agent talks to Redis: give --redis-url or GPUBOSS_REDIS_URL")
            the_agent = Agent(
                boss, probe, pool, host, interval, smoothing, reserved_mib=reserved_mib, over_pct=over_pct,
                under_pct=under_pct, under_after_s=under_after,
            )  # fmt: skip
            if once:
                for line in _describe(the_agent.run_once(), verbose=True):
                    typer.echo(line)
                return
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            typer.echo(f"agent on {the_agent.host}: pool {pool}, a pass every {the_agent.interval_s:g} s")

            def show(report: PassReport) -> None:
                for line in _describe(report, verbose=False):
                    typer.echo(line)

            the_agent.run(stop, show)
    finally:
        probe.close()
