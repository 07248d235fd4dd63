"""``gpuboss``: the operator's command line.

Every command talks to Redis through :mod:`gpuboss_client`, never directly, or, pointed at a boss
service (``--boss-url`` or ``GPUBOSS_BOSS_URL``), to its HTTP API through
:class:`gpuboss_cli.http.HttpBoss`, which has the same methods and results. Errors from either end
the command through one helper, :func:`exit_with`: a red ``error[<code>]: <message>`` line on
stderr, and the error's own exit code. Both helpers live in :mod:`gpuboss_cli.common`, shared with
the commands that have modules of their own (``agent``, ``run``, ``serve``), which this module
registers.

``gpuboss consumers`` drives the boss's managed consumers (GPU services it loads and unloads, from
``gpuboss serve --consumers FILE``). They live in the service, not in Redis, so these commands need
its URL (``--boss-url`` or ``GPUBOSS_BOSS_URL``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

import gpuboss_client
from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    Boss,
    Event,
    GpubossError,
    LeaseInfo,
    LeaseNotHeld,
    PoolNotFound,
    PoolStatus,
    split_queue,
    status_document,
)
from gpuboss_client.ops import Findings

from . import agent as agent_cmd
from . import run as run_cmd
from . import serve as serve_cmd
from . import simulate as simulate_cmd
from .common import Backend, Options, connect, exit_with, load_settings, target
from .http import HttpBoss
from .render import (
    consumers_table,
    devices_table,
    event_line,
    findings_block,
    human_mib,
    leases_table,
    queue_table,
    watch_frame,
)
from .settings import redact

__all__ = ["Backend", "app", "connect", "exit_with", "main"]

DEFAULT_POOL = "default"
PIPE_WIDTH = 250
FOLLOW_BLOCK_S = 0.5  # how long one read of --follow blocks; new pools are looked for in between
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.05, 3600.0
ADD_HINT = "gpuboss devices add NAME --vram 24GiB"

app = typer.Typer(
    name="gpuboss",
    help="Operate gpuboss: devices, leases and the queue of a Redis-backed VRAM lease coordinator, "
    "through Redis directly or through a boss service (--boss-url).",
    no_args_is_help=True,
    add_completion=False,
)
devices_app = typer.Typer(help="Add, list and remove devices.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
pool_app = typer.Typer(help="Pool settings.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
consumers_app = typer.Typer(
    help="The boss's managed consumers (GPU services it loads and unloads): list, ensure, release, "
    "reload. They live in the boss service: give --boss-url (or set GPUBOSS_BOSS_URL).",
)
app.add_typer(consumers_app, name="consumers")

PoolOpt = Annotated[str | None, typer.Option("--pool", "-p", help="Only this pool (default: every pool).")]
OnePoolOpt = Annotated[str, typer.Option("--pool", "-p", help="The device's pool.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of tables.")]


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
    boss_url: Annotated[
        str | None,
        typer.Option(
            "--boss-url",
            metavar="URL",
            help="Send commands to this boss service (http://host:8765) instead of Redis "
            "(default: $GPUBOSS_BOSS_URL when set).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="SECRET",
            help="Bearer token for the boss service (default: $GPUBOSS_TOKEN, which keeps it out of "
            "the process list).",
        ),
    ] = None,
) -> None:
    """Operate gpuboss: devices, leases and the queue of a Redis-backed VRAM lease coordinator,
    through Redis directly or through a boss service (--boss-url)."""
    ctx.obj = Options(redis_url, boss_url, token)


def _known_pool(boss: Backend, pool: str | None) -> None:
    """A ``--pool`` with no devices is ``pool_not_found`` (exit 5), as the service answers 404."""
    if pool is not None and not boss.devices(pool):
        hint = f"add one with `gpuboss devices add NAME --vram 24GiB --pool {pool}`"
        raise PoolNotFound(f"pool {pool!r} has no devices: {hint}", pool=pool)


@app.command()
def status(ctx: typer.Context, pool: PoolOpt = None, as_json: JsonOpt = False) -> None:
    """Devices with their budgets and usage, the leases, and the queue, per pool."""
    with connect(ctx) as boss:
        _known_pool(boss, pool)
        pools = boss.status(pool)
        leases = boss.leases(pool)
        findings = {f.pool: f for f in boss.findings(pool) if _measured(f)}
        # the managed consumers live in the boss service: only over HTTP
        consumers = boss.consumers() if isinstance(boss, HttpBoss) else []
    if pool is not None:
        consumers = [c for c in consumers if c.get("pool") == pool]
    if as_json:
        doc = status_document(pools, leases)
        if findings:
            doc["findings"] = {name: f.to_dict() for name, f in findings.items()}
        if consumers:
            doc["consumers"] = consumers
        _print_json(doc)
        return
    console = _console()
    if not any(s.devices for s in pools) and not leases:
        _no_devices(console, pool)
    else:
        _pools(console, pools, leases, findings)
    if consumers:
        console.print()
        console.print(consumers_table("consumers", consumers))


def _pools(
    console: Console, pools: list[PoolStatus], leases: list[LeaseInfo], findings: dict[str, Findings]
) -> None:
    """Per pool: its devices, leases, queue and findings, as ``gpuboss status`` shows them."""
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
        if s.pool in findings:
            console.print(findings_block(findings[s.pool]))


def _measured(f: Findings) -> bool:
    """Whether an agent measured anything in the pool (else there is nothing to show)."""
    return bool(f.leases or f.label_peaks or any(d.state != "unmeasured" for d in f.devices))


@app.command("leases")
def leases_cmd(ctx: typer.Context, pool: PoolOpt = None, as_json: JsonOpt = False) -> None:
    """Live leases and waiting requests, soonest expiry first."""
    with connect(ctx) as boss:
        _known_pool(boss, pool)
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
    """Say what would happen to a request right now, changing nothing.

    Granted on a device, would evict these leases, would wait behind N, or can never fit.
    """
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
    host: Annotated[
        str | None, typer.Option("--host", help="Its host (default: this one; over HTTP, the boss's).")
    ] = None,
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
        _known_pool(boss, pool)
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


# --- managed consumers ----------------------------------------------------------------------------

NO_BOSS = (
    "the managed consumers live in the boss service, not in Redis: give --boss-url URL "
    "(or set GPUBOSS_BOSS_URL) of the gpuboss serve that manages them"
)
ConsumerArg = Annotated[str, typer.Argument(metavar="NAME", help="The consumer, as its registry names it.")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="One model of a consumer with a lease per model (e.g. Ollama's)."),
]


@contextmanager
def _service(ctx: typer.Context) -> Iterator[HttpBoss]:
    """The boss service the command is pointed at (``--boss-url`` or ``GPUBOSS_BOSS_URL``); without
    one the command ends with a :class:`BadRequest`: consumers are not in Redis."""
    try:
        _, over_http = target(ctx, load_settings())
    except GpubossError as err:
        exit_with(err)
    if not over_http:
        exit_with(BadRequest(NO_BOSS))
    with connect(ctx) as boss:
        if not isinstance(boss, HttpBoss):  # target() said HTTP, so connect() gave HttpBoss
            raise TypeError(f"expected the boss service, not {boss!r}")
        yield boss


def _consumer_name(doc: dict[str, Any]) -> str:
    return f"{doc['name']}/{doc['model']}" if doc.get("model") else str(doc["name"])


def _consumer_line(doc: dict[str, Any]) -> str:
    """``consumer NAME[/MODEL]: STATE[ on DEVICE, SIZE leased (lease ID)][: ERROR]``."""
    line = f"consumer {_consumer_name(doc)}: {doc['state']}"
    if doc.get("lease"):
        line += f" on {doc.get('device') or '?'}, {human_mib(int(doc.get('vram_mib') or 0))} leased"
        line += f" (lease {doc['lease']})"
    if doc.get("error"):
        line += f": {doc['error']}"
    return line


def _consumers_out(docs: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        _print_json({"consumers": docs})
        return
    console = _console()
    if not docs:
        _say(console, "No managed consumers (start the boss with: gpuboss serve --consumers FILE).", "yellow")
        return
    console.print(consumers_table(title, docs))


@consumers_app.callback(invoke_without_command=True)
def consumers_main(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The boss's managed consumers; without a command, list them (as ``consumers list``)."""
    if ctx.invoked_subcommand is None:
        consumers_list(ctx, as_json)


@consumers_app.command("list")
def consumers_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every managed consumer: state, device, memory leased and measured, priority, last error."""
    with _service(ctx) as boss:
        docs = boss.consumers()
    _consumers_out(docs, _plural(len(docs), "consumer"), as_json)


@consumers_app.command("ensure")
def consumers_ensure(
    ctx: typer.Context,
    name: ConsumerArg,
    model: ModelOpt = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", metavar="S", help="Seconds to wait for its memory (the load itself comes on top)."
        ),
    ] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Load a consumer and wait until it is healthy.

    Its memory is leased like any request's: it may queue, or evict idle and preemptible holders.
    """
    if not timeout >= 0:
        exit_with(BadRequest(f"--timeout must be 0 or more seconds, not {timeout:g}"))
    with _service(ctx) as boss:
        doc = boss.ensure(name, model, timeout)
    if as_json:
        _print_json(doc)
    else:
        _say(_console(), _consumer_line(doc))


@consumers_app.command("release")
def consumers_release(
    ctx: typer.Context, name: ConsumerArg, model: ModelOpt = None, as_json: JsonOpt = False
) -> None:
    """Give a consumer's memory back (unloading it the engine's way); ends once it is measured free."""
    with _service(ctx) as boss:
        docs = boss.release_consumer(name, model)
    if as_json:
        _print_json({"consumers": docs})
        return
    console = _console()
    for doc in docs:
        _say(console, _consumer_line(doc))


@consumers_app.command("release-all")
def consumers_release_all(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Operator: unload every consumer that holds memory and can be unloaded; list those released."""
    with _service(ctx) as boss:
        docs = boss.release_all_consumers()
    if not docs and not as_json:
        _say(_console(), "released no consumers: none held memory that could be given back")
        return
    _consumers_out(docs, f"released: {_plural(len(docs), 'consumer')}", as_json)


@consumers_app.command("reload")
def consumers_reload(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Operator: have the boss read its registry file again (a file with errors changes nothing)."""
    with _service(ctx) as boss:
        changes = boss.reload_consumers()
    if as_json:
        _print_json({"changes": changes})
        return
    console = _console()
    if not changes:
        _say(console, "reloaded the consumer registry: no changes")
    for change in changes:
        _say(console, f"reloaded: {change}")


def _event_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _tail(boss: Boss, pool: str | None, count: int, block: float) -> Iterator[Event]:
    """The last ``count`` events, then new ones for ever, each exactly once, read from Redis.

    Every pool's cursor is taken first and the recent events are cut at it, so nothing is shown
    twice or lost in between. Without ``pool``, pools that appear later are followed too.
    """
    cursors = boss.event_cursors(pool)
    recent = boss.events(pool, count=count) if count else []
    cut = {name: _event_id(cursor) for name, cursor in cursors.items()}
    yield from (e for e in recent if _event_id(e.id) <= cut.get(e.pool, cut["*"]))
    yield from boss.follow(pool, after=cursors, block=block)


def _follow(boss: Backend, pool: str | None, count: int, block: float) -> Iterator[Event]:
    """The last ``count`` events, then new ones as they happen: the boss's event stream over
    HTTP, or blocking reads of the pools' Redis streams."""
    if isinstance(boss, HttpBoss):
        return boss.stream(pool, last=count)
    if not isinstance(boss, Boss):
        raise TypeError(f"cannot follow events of {boss!r}")
    return _tail(boss, pool, count, block)


@app.command("events")
def events_cmd(
    ctx: typer.Context,
    pool: PoolOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then print new events as they happen, until Ctrl-C.")
    ] = False,
    count: Annotated[
        int,
        typer.Option(
            "--count", "-n", metavar="N", help="How many recent events to print (1-1000; 0 with --follow)."
        ),
    ] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per event and line, instead of text.")
    ] = False,
) -> None:
    """Recent events, oldest first; with --follow, then new ones as they happen.

    Grants, waits, releases, expiries, evictions, device and pool changes, one a line: time, pool,
    event, lease, holder, device, size, then the event's other fields. Ctrl-C ends --follow.
    """
    console = _console()

    def show(event: Event) -> None:
        if as_json:
            typer.echo(json.dumps(event.to_dict()))
        else:
            _say(console, event_line(event))

    try:
        with connect(ctx) as boss:
            if follow:
                # a blocking read must end well within the Redis socket timeout
                block = min(FOLLOW_BLOCK_S, load_settings().redis_timeout_s / 2)
                feed: Iterator[Event] = _follow(boss, pool, count, block)
            else:
                recent = boss.events(pool, count=count)
                if not recent and not as_json:
                    _say(console, "No events" + (f" in pool {pool}." if pool is not None else "."))
                feed = iter(recent)
            for event in feed:
                show(event)
    except KeyboardInterrupt:  # the way to stop --follow
        return


def _keys() -> Any:
    """A context manager giving ``wait(seconds) -> bool``: waits, but returns True at once when q
    is pressed. Meanwhile a terminal on stdin is in cbreak mode (keys arrive unbuffered, unechoed;
    Ctrl-C still interrupts), restored on exit."""
    return _cbreak_keys() if sys.stdin.isatty() else _no_keys()


@contextmanager
def _no_keys() -> Iterator[Callable[[float], bool]]:
    pause = threading.Event()
    yield pause.wait  # never set: waits the whole time, False


@contextmanager
def _cbreak_keys() -> Iterator[Callable[[float], bool]]:
    import select
    import termios
    import time
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    closed = threading.Event()

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not closed.is_set() and (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 64)
                if not data:  # stdin closed: no more keys, only Ctrl-C
                    closed.set()
                elif b"q" in data.lower():
                    return True
        closed.wait(max(0.0, deadline - time.monotonic()))
        return False

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@app.command()
def watch(
    ctx: typer.Context,
    pool: PoolOpt = None,
    interval: Annotated[
        float, typer.Option("--interval", "-i", metavar="S", help="Seconds between refreshes.")
    ] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame and exit (for scripts and tests).")
    ] = False,
) -> None:
    """A live view of devices, leases and the queue, like top; q or Ctrl-C quits.

    Devices show as bars of memory in use, idle (kept warm, evictable) and free; the view is
    redrawn every --interval seconds. --once prints a single frame.
    """
    if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        exit_with(
            BadRequest(
                f"--interval must be {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds, not {interval:g}"
            )
        )
    console = _console()
    try:
        with connect(ctx) as boss:
            url, _ = target(ctx, load_settings())
            where = redact(url) + (f", pool {pool}" if pool is not None else "")

            def fetch() -> tuple[list[PoolStatus], list[LeaseInfo]]:
                return boss.status(pool), boss.leases(pool)

            last = fetch()  # an error here ends the command at once

            def frame(error: str | None = None) -> RenderableType:
                when = datetime.now().strftime("%H:%M:%S")
                header = f"gpuboss watch: {where} at {when}"
                header += "" if once else f", every {interval:g} s, q quits"
                return watch_frame(*last, header=header, error=error)

            def refreshed() -> RenderableType:
                nonlocal last
                try:
                    last = fetch()
                except BackendUnavailable as err:  # keep watching: show the last data, and why
                    return frame(f"refresh failed: error[{err.code}]: {err.message}")
                return frame()

            if once:
                console.print(frame())
                return
            _live(console, frame(), refreshed, interval)
    except KeyboardInterrupt:  # Ctrl-C: a clean stop
        return


def _live(
    console: Console, first: RenderableType, refreshed: Callable[[], RenderableType], interval: float
) -> None:
    """Show ``first``, then ``refreshed()`` every ``interval`` seconds, until q (or Ctrl-C).

    On a terminal, in its alternate screen like top, restored on exit; printed to a pipe, one frame
    after another.
    """
    with _keys() as wait:
        if not console.is_terminal:
            frame = first
            while True:
                console.print(frame)
                console.print()
                if wait(interval):
                    return
                frame = refreshed()
        with Live(first, console=console, screen=True, auto_refresh=False) as live:
            while not wait(interval):
                live.update(refreshed(), refresh=True)


# Commands that live in modules of their own.
app.command("serve")(serve_cmd.serve)
app.command("agent")(agent_cmd.agent)
app.command("simulate")(simulate_cmd.simulate)
# Everything from the command's name on is the command's: its options are not run's.
app.command(
    "run",
    context_settings={"allow_extra_args": True, "allow_interspersed_args": False},
    options_metavar="[OPTIONS] [--] CMD [ARGS]...",
)(run_cmd.run)


def main() -> None:
    """Entry point of the ``gpuboss`` console script."""
    app(prog_name="gpuboss")
