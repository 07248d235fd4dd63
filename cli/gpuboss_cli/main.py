"""``gpuboss``: the operator's command line.

Every command talks to Redis through :mod:`gpuboss_client`, never directly. Errors from the client
end the command through one helper, :func:`exit_with`: a red ``error[<code>]: <message>`` line on
stderr, and the error's own exit code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, NoReturn

import pydantic
import typer
from rich.console import Console
from rich.text import Text

import gpuboss_client
from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    Boss,
    GpubossError,
    LeaseNotHeld,
    split_queue,
    status_document,
)

from . import agent as agent_cmd
from . import run as run_cmd
from . import serve as serve_cmd
from .render import devices_table, human_mib, leases_table, queue_table
from .settings import HOLDER, Settings, redact

__all__ = ["app", "exit_with", "main"]

DEFAULT_POOL = "default"
PIPE_WIDTH = 250
ADD_HINT = "gpuboss devices add NAME --vram 24GiB"

app = typer.Typer(
    name="gpuboss",
    help="Operate gpuboss: devices, leases and the queue of a Redis-backed VRAM lease coordinator.",
    no_args_is_help=True,
    add_completion=False,
)
devices_app = typer.Typer(help="Add, list and remove devices.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
pool_app = typer.Typer(help="Pool settings.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

PoolOpt = Annotated[str | None, typer.Option("--pool", "-p", help="Only this pool (default: every pool).")]
OnePoolOpt = Annotated[str, typer.Option("--pool", "-p", help="The device's pool.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of tables.")]


@dataclass(frozen=True, slots=True)
class _Options:
    redis_url: str | None


def exit_with(err: GpubossError, url: str | None = None) -> NoReturn:
    """End the command for ``err``: one red line on stderr, exit with ``err.exit_code``.

    A :class:`BackendUnavailable` names the Redis URL tried (password masked).
    """
    message = err.message
    if isinstance(err, BackendUnavailable) and url is not None:
        message = f"cannot reach Redis at {redact(url)}: {message}"
    line = " ".join(f"error[{err.code}]: {message}".split())
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(line, style="red"))
    raise typer.Exit(err.exit_code)


def _settings() -> Settings:
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"GPUBOSS_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"bad setting: {problems}") from exc


@contextmanager
def connect(ctx: typer.Context) -> Iterator[Boss]:
    """A :class:`Boss` for the configured Redis; any GpubossError inside ends the command."""
    url: str | None = None
    try:
        settings = _settings()
        opts = ctx.find_object(_Options)
        url = opts.redis_url if opts is not None and opts.redis_url is not None else settings.redis_url
        timeout = settings.redis_timeout_s
        try:
            boss = Boss.from_url(url, holder=HOLDER, socket_connect_timeout=timeout, socket_timeout=timeout)
        except ValueError as exc:  # redis-py's complaint about the URL itself
            raise BadRequest(f"bad Redis URL {redact(url)}: {exc}") from exc
        with boss:
            yield boss
    except GpubossError as err:
        exit_with(err, url)


def _console() -> Console:
    # Made per command, so the width follows COLUMNS at the time it runs. Piped output is not cut
    # to 80 columns: tables only take the width they need.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _say(console: Console, line: str, style: str | None = None) -> None:
    console.print(Text(line, style=style or ""), soft_wrap=True)


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2))


def _no_devices(console: Console, pool: str | None) -> None:
    where = f" in pool {pool}" if pool is not None else ""
    hint = ADD_HINT + (f" --pool {pool}" if pool not in (None, DEFAULT_POOL) else "")
    _say(console, f"No devices{where}. Add one with: {hint}", "yellow")


@app.callback()
def _global(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            metavar="URL",
            help="Redis to use (default: $GPUBOSS_REDIS_URL, else redis://localhost:6379/0).",
        ),
    ] = None,
) -> None:
    """Operate gpuboss: devices, leases and the queue of a Redis-backed VRAM lease coordinator."""
    ctx.obj = _Options(redis_url)


@app.command()
def status(ctx: typer.Context, pool: PoolOpt = None, as_json: JsonOpt = False) -> None:
    """Devices with their budgets and usage, the leases, and the queue, per pool."""
    with connect(ctx) as boss:
        pools = boss.status(pool)
        leases = boss.leases(pool)
    if as_json:
        _print_json(status_document(pools, leases))
        return
    console = _console()
    if not any(s.devices for s in pools) and not leases:
        _no_devices(console, pool)
        return
    for i, s in enumerate(pools):
        if i:
            console.print()
        granted, waiters = split_queue(x for x in leases if x.pool == s.pool)
        title = f"pool {s.pool}: {_plural(len(s.devices), 'device')}, {s.granted} granted, {s.queued} queued"
        if s.devices:
            console.print(devices_table(title, s.devices))
        else:
            _say(console, title, "bold")
            _no_devices(console, s.pool)
        if granted:
            console.print(leases_table(f"leases in pool {s.pool}", granted, {s.pool: s.now_ms}))
        else:
            _say(console, f"No leases in pool {s.pool}.")
        if waiters:
            console.print(queue_table(f"queue of pool {s.pool}", waiters, s.now_ms))
        else:
            _say(console, f"Queue of pool {s.pool} is empty.")


@app.command("leases")
def leases_cmd(ctx: typer.Context, pool: PoolOpt = None, as_json: JsonOpt = False) -> None:
    """Live leases and waiting requests, soonest expiry first."""
    with connect(ctx) as boss:
        leases = boss.leases(pool)
        now_ms = {s.pool: s.now_ms for s in boss.status(pool)} if leases and not as_json else {}
    if as_json:
        _print_json({"leases": [x.to_dict() for x in leases]})
        return
    console = _console()
    if not leases:
        _say(console, "No leases" + (f" in pool {pool}." if pool is not None else "."))
        return
    console.print(leases_table(_plural(len(leases), "lease"), leases, now_ms))


@app.command()
def release(
    ctx: typer.Context,
    lease_id: Annotated[str, typer.Argument(metavar="ID", help="The lease (or waiting request) to end.")],
    force: Annotated[
        bool, typer.Option("--force", help="Force-release it without its token: its holder loses it.")
    ] = False,
    pool: Annotated[
        str | None, typer.Option("--pool", "-p", help="The lease's pool (default: search every pool).")
    ] = None,
) -> None:
    """Force-release a lease, e.g. one whose holder is stuck."""
    if not force:
        exit_with(
            LeaseNotHeld(
                f"the CLI does not hold lease {lease_id} (only its holder has the token), so it can "
                "only force-release it: run again with --force",
                lease=lease_id,
            )
        )
    with connect(ctx) as boss:
        info = boss.force_release(lease_id, pool)
    where = f"{info.pool}/{info.device}" if info.device else f"pool {info.pool}"
    how = f"{info.state}" + (f" ({info.reason})" if info.reason else "")
    if info.state != "force_released":
        how = f"had already ended: {how}"
    _say(
        _console(),
        f"lease {info.id} of {info.holder} ({info.holder_host}:{info.holder_pid}), "
        f"{human_mib(info.mib)} on {where}: {how}",
    )


@app.command()
def reap(ctx: typer.Context, pool: PoolOpt = None) -> None:
    """End expired leases and abandoned waiters now (every command also does this in passing)."""
    with connect(ctx) as boss:
        n = boss.reap(pool)
    where = f" in pool {pool}" if pool is not None else ""
    _say(_console(), f"reaped {n} expired leases and abandoned waiters{where}")


@app.command()
def plan(
    ctx: typer.Context,
    vram: Annotated[str, typer.Option("--vram", metavar="SIZE", help="Memory to ask for, e.g. 8GiB.")],
    priority: Annotated[str, typer.Option("--priority", help="low, normal, high or 0-100.")] = "normal",
    device: Annotated[str | None, typer.Option("--device", help="A device (default: best fit).")] = None,
    pool: OnePoolOpt = DEFAULT_POOL,
    exclusive: Annotated[bool, typer.Option("--exclusive", help="Ask for the whole device.")] = False,
    devices: Annotated[int, typer.Option("--devices", help="A gang of this many devices.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Say what would happen to a request right now, changing nothing: granted on a device, would
    evict these leases, would wait behind N, or can never fit."""
    with connect(ctx) as boss:
        outcome = boss.plan(
            vram, priority=priority, device=device, pool=pool, exclusive=exclusive, devices=devices
        )
    if as_json:
        _print_json(
            {
                "outcome": outcome.outcome,
                "device": outcome.device,
                "victims": list(outcome.victims),
                "ahead": outcome.ahead,
                "largest_mib": outcome.largest_mib,
            }
        )
    else:
        _say(_console(), str(outcome))


@pool_app.command("configure")
def pool_configure(
    ctx: typer.Context,
    pool: OnePoolOpt = DEFAULT_POOL,
    min_residency: Annotated[
        float,
        typer.Option(
            "--min-residency", help="Seconds: a younger lease is evicted only if nothing else fits."
        ),
    ] = 0,
    aging: Annotated[
        float,
        typer.Option("--aging", help="Seconds per priority level (10) a waiter rises; 0: strict priority."),
    ] = 0,
) -> None:
    """Set a pool's minimum residency and aging (0 turns either off)."""
    with connect(ctx) as boss:
        boss.configure_pool(pool, min_residency=min_residency, aging=aging)
    _say(_console(), f"pool {pool}: min residency {min_residency:g} s, aging {aging:g} s")


@app.command("version")
def version_cmd() -> None:
    """Print the versions of the CLI and of the client library."""
    try:
        cli = version("gpuboss")
    except PackageNotFoundError:  # running from a source tree that was never installed
        cli = "unknown"
    typer.echo(f"gpuboss {cli} (gpuboss-client {gpuboss_client.__version__})")


@devices_app.command("add")
def devices_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Device id: an NVML UUID or a declared name.")],
    vram: Annotated[
        str, typer.Option("--vram", metavar="SIZE", help="Total memory, e.g. 24GiB or 24576 (MiB).")
    ],
    reserved: Annotated[
        str, typer.Option("--reserved", metavar="SIZE", help="Headroom never leased, e.g. 1GiB.")
    ] = "0",
    pool: OnePoolOpt = DEFAULT_POOL,
    host: Annotated[str | None, typer.Option("--host", help="Its host (default: this one).")] = None,
    cuda_index: Annotated[
        int | None, typer.Option("--cuda-index", help="Its CUDA index on that host.")
    ] = None,
) -> None:
    """Add a device to a pool, or update it if it is there."""
    with connect(ctx) as boss:
        created = boss.add_device(name, vram, reserved=reserved, pool=pool, host=host, cuda_index=cuda_index)
        dev = next((d for d in boss.devices(pool) if d.name == name), None)
    line = f"{'added' if created else 'updated'} device {name} in pool {pool}"
    if dev is not None:
        line += (
            f": total {human_mib(dev.total_mib)}, reserved {human_mib(dev.reserved_mib)}, "
            f"budget {human_mib(dev.budget_mib)}"
        )
    _say(_console(), line)


@devices_app.command("list")
def devices_list(ctx: typer.Context, pool: PoolOpt = None, as_json: JsonOpt = False) -> None:
    """Devices with their budgets and usage."""
    with connect(ctx) as boss:
        devices = boss.devices(pool)
    if as_json:
        _print_json({"devices": [d.to_dict() for d in devices]})
        return
    console = _console()
    if not devices:
        _no_devices(console, pool)
        return
    console.print(devices_table(_plural(len(devices), "device"), devices, show_pool=True))


@devices_app.command("remove")
def devices_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The device to remove.")],
    pool: OnePoolOpt = DEFAULT_POOL,
    force: Annotated[
        bool, typer.Option("--force", help="Also force-release its leases (refused otherwise).")
    ] = False,
) -> None:
    """Remove a device; refused while it has leases, unless --force."""
    with connect(ctx) as boss:
        boss.remove_device(name, pool=pool, force=force)
    _say(_console(), f"removed device {name} from pool {pool}")


# Commands that live in modules of their own.
app.command("serve")(serve_cmd.serve)
app.command("agent")(agent_cmd.agent)
app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(run_cmd.run)


def main() -> None:
    """Entry point of the ``gpuboss`` console script."""
    app(prog_name="gpuboss")
