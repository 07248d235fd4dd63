"""Tables and JSON documents of devices, leases and the queue; event lines; the watch frame.

Tables show sizes human-readable; JSON documents keep raw MiB and Redis milliseconds, and their
shape is stable for scripts. Everything here is a pure function of the data it is given, so tests
check what a command shows without running it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gpuboss_client import PRIORITIES, DeviceInfo, Event, LeaseInfo, PoolStatus, split_queue
from gpuboss_client.ops import Findings

__all__ = [
    "consumers_table",
    "devices_table",
    "event_line",
    "findings_block",
    "human_mib",
    "leases_table",
    "queue_table",
    "usage_bar",
    "watch_frame",
]

_PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


def human_mib(mib: int) -> str:
    """``24576`` -> ``"24.0 GiB"``; below a GiB in MiB (``"512 MiB"``)."""
    if abs(mib) < 1024:
        return f"{mib} MiB"
    if abs(mib) < 1 << 20:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib / (1 << 20):.1f} TiB"


def _priority(priority: int) -> str:
    name = _PRIORITY_NAMES.get(priority)
    return f"{priority} ({name})" if name else str(priority)


def _expires_in(lease: LeaseInfo, now_ms: int | None) -> str:
    if lease.expires_at_ms is None or now_ms is None:
        return "-"
    return f"{(lease.expires_at_ms - now_ms) / 1000:.1f}"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], right: set[str]) -> Table:
    table = Table(title=Text(title), title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=col != "labels")
    for row in rows:
        # Text cells: names and labels are data, never rich markup.
        table.add_row(*(Text(cell) for cell in row))
    return table


_SIZES = {"total", "reserved", "unmanaged", "budget", "used", "free", "vram"}


def devices_table(title: str, devices: Sequence[DeviceInfo], *, show_pool: bool = False) -> Table:
    """One row per device, sizes human-readable."""
    columns = ["device", "host", "cuda", "total", "reserved", "unmanaged", "budget", "used", "free"]
    columns = [*(["pool"] if show_pool else []), *columns, "leases"]
    rows = [
        [
            *([d.pool] if show_pool else []),
            d.name,
            d.host,
            "-" if d.cuda_index is None else str(d.cuda_index),
            *(human_mib(v) for v in (d.total_mib, d.reserved_mib, d.unmanaged_mib, d.budget_mib)),
            human_mib(d.used_mib),
            human_mib(d.free_mib),
            str(d.leases),
        ]
        for d in devices
    ]
    return _table(title, columns, rows, _SIZES | {"cuda", "leases"})


def leases_table(title: str, leases: Sequence[LeaseInfo], now_ms: dict[str, int]) -> Table:
    """One row per lease (or waiter): who holds what where, and when it expires."""
    columns = ["id", "holder", "host:pid", "device", "vram", "priority", "state", "expires in s", "labels"]
    rows = [
        [
            x.id,
            x.holder,
            f"{x.holder_host}:{x.holder_pid}",
            x.device or "(any)",
            human_mib(x.mib),
            _priority(x.priority),
            x.state,
            _expires_in(x, now_ms.get(x.pool)),
            _labels(x.labels),
        ]
        for x in leases
    ]
    return _table(title, columns, rows, {"vram", "priority", "expires in s"})


def queue_table(title: str, waiters: Sequence[LeaseInfo], now_ms: int) -> Table:
    """The waiters in queue order (priority first, then arrival)."""
    columns = ["#", "id", "holder", "host:pid", "wants", "vram", "priority", "waiting s", "expires in s"]
    rows = [
        [
            str(i),
            x.id,
            x.holder,
            f"{x.holder_host}:{x.holder_pid}",
            x.device or "(any)",
            human_mib(x.mib),
            _priority(x.priority),
            "-" if x.requested_at_ms is None else f"{(now_ms - x.requested_at_ms) / 1000:.1f}",
            _expires_in(x, now_ms),
        ]
        for i, x in enumerate(waiters, 1)
    ]
    return _table(title, columns, rows, {"#", "vram", "priority", "waiting s", "expires in s"})


#: how each consumer state shows: resident and healthy green, on the way yellow, in trouble red
CONSUMER_STYLES = {
    "ready": "green",
    "idle": "green",
    "loading": "yellow",
    "unloading": "yellow",
    "stuck": "red",
    "unhealthy": "red",
}


def _opt_mib(value: Any) -> str:
    return human_mib(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def consumers_table(title: str, consumers: Sequence[Mapping[str, Any]]) -> Table:
    """One row per managed consumer (per model, for a consumer with a lease per model), from the
    boss's documents: name[/model], state, device, MiB leased (only while it holds its lease) and
    measured, priority, and the last error."""
    table = Table(title=Text(title), title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for col in ("consumer", "state", "device", "leased", "measured", "priority", "error"):
        table.add_column(
            col,
            justify="right" if col in ("leased", "measured", "priority") else "left",
            no_wrap=col != "error",
        )
    for c in consumers:
        name = str(c.get("name"))
        if c.get("model"):
            name += f"/{c['model']}"
        state = str(c.get("state"))
        priority = c.get("priority")
        table.add_row(
            Text(name),
            Text(state, style=CONSUMER_STYLES.get(state, "")),
            Text(str(c.get("device") or "-")),
            _opt_mib(c.get("vram_mib")) if c.get("lease") else "-",
            _opt_mib(c.get("measured_mib")),
            _priority(priority) if isinstance(priority, int) else "-",
            Text(str(c.get("error") or ""), style="red"),
        )
    return table


def findings_block(findings: Findings) -> RenderableType:
    """What the NVML agent found in one pool: lost devices (red), leaks, leases using more or less
    than they leased, and the peak measured use per lease label."""
    lines: list[RenderableType] = [Text(f"findings in pool {findings.pool}", style="bold")]
    for d in findings.devices:
        if d.state == "lost":
            where = f" on {d.agent_host}" if d.agent_host else ""
            lines.append(Text(f"{d.name}: lost{where} (nothing is granted on it)", style="red"))
    for d in findings.devices:
        if d.leak_mib > 0:
            pids = " ".join(str(p) for p in d.leak_pids)
            lines.append(
                Text(f"{d.name}: {human_mib(d.leak_mib)} held by pids {pids} without a lease", style="yellow")
            )
    for x in findings.leases:
        if x.finding is not None:
            who = ", ".join(part for part in (x.holder, _labels(x.labels)) if part)
            lines.append(
                Text(
                    f"lease {x.id} ({who}) uses {human_mib(x.measured_mib)} of {human_mib(x.mib)} "
                    f"leased: {x.finding.replace('_', '-')}",
                    style="yellow",
                )
            )
    if findings.label_peaks:
        peaks = ", ".join(f"{k} {human_mib(v)}" for k, v in sorted(findings.label_peaks.items()))
        lines.append(Text(f"peaks by label: {peaks}"))
    if len(lines) == 1:
        lines.append(Text("nothing found"))
    return Group(*lines)


def event_line(event: Event) -> str:
    """One event on one line: local time, pool, event, then lease, holder, device, size and the
    rest of its fields as ``key=value`` (sizes human-readable)."""
    when = datetime.fromtimestamp(event.time_ms / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    fields = {k: v for k, v in event.fields.items() if v != ""}
    parts = [when, f"{event.pool:<10}", f"{event.name:<14}"]
    parts += [f"{key}={fields.pop(key)}" for key in ("lease", "holder", "device") if key in fields]
    for key in [k for k in fields if k == "mib" or k.endswith("_mib")]:
        value = fields.pop(key)
        size = human_mib(int(value)) if value.lstrip("-").isdigit() else value
        parts.append(size if key == "mib" else f"{key.removesuffix('_mib')}={size}")
    parts += [f"{k}={v}" for k, v in sorted(fields.items())]
    return " ".join(parts)


# The bar's segments, in order: what is not the budget, leased in use, leased but kept warm, free.
BAR_STYLES = {"outside": "bright_black", "active": "red", "idle": "yellow", "free": "green"}
_BAR_CHARS = {"outside": "▒", "active": "█", "idle": "▓", "free": "░"}


def usage_bar(device: DeviceInfo, idle_mib: int, width: int = 30) -> Text:
    """The device's memory as a bar ``width`` cells wide: reserved and unmanaged (grey), leased and
    in use (red), leased but idle (yellow), free (green); every non-empty part gets a cell."""
    idle = max(0, min(idle_mib, device.used_mib))
    parts = {
        "outside": device.reserved_mib + device.unmanaged_mib,
        "active": device.used_mib - idle,
        "idle": idle,
        "free": max(device.free_mib, 0),
    }
    cells = _shares(parts, width)
    bar = Text()
    for k, n in cells.items():
        bar.append(_BAR_CHARS[k] * n, style=BAR_STYLES[k])
    return bar


def _shares(parts: dict[str, int], width: int) -> dict[str, int]:
    """``width`` cells split in proportion to ``parts`` (largest remainders get the spare cells);
    a part that is not empty gets at least one cell while the width allows."""
    total = sum(max(v, 0) for v in parts.values()) or 1
    exact = {k: width * max(v, 0) / total for k, v in parts.items()}
    cells = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - cells[k], reverse=True)[: width - sum(cells.values())]:
        cells[k] += 1
    for k, v in parts.items():
        if v > 0 and cells[k] == 0:
            biggest = max(cells, key=lambda j: cells[j])
            if cells[biggest] > 1:
                cells[biggest] -= 1
                cells[k] = 1
    return cells


def _idle_mib(pool: str, device: str, leases: Sequence[LeaseInfo]) -> int:
    return sum(x.mib for x in leases if x.pool == pool and x.state == "idle" and device in x.devices)


def _usage_table(title: str, status: PoolStatus, leases: Sequence[LeaseInfo], bar_width: int) -> Table:
    table = Table(title=Text(title), title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for col in ("device", "host", "cuda", "memory", "used", "idle", "free", "budget", "leases"):
        table.add_column(
            col, justify="left" if col in ("device", "host", "memory") else "right", no_wrap=True
        )
    for d in status.devices:
        idle = _idle_mib(status.pool, d.name, leases)
        table.add_row(
            Text(d.name),
            Text(d.host),
            "-" if d.cuda_index is None else str(d.cuda_index),
            usage_bar(d, idle, bar_width),
            human_mib(d.used_mib - idle),
            human_mib(idle),
            Text(human_mib(d.free_mib), style="red" if d.free_mib < 0 else ""),
            human_mib(d.budget_mib),
            str(d.leases),
        )
    return table


def watch_frame(
    pools: Sequence[PoolStatus],
    leases: Sequence[LeaseInfo],
    *,
    header: str,
    error: str | None = None,
    bar_width: int = 30,
) -> RenderableType:
    """One frame of ``gpuboss watch``: a header line, then per pool its devices as bars of
    used / idle / free memory, its leases and its queue. ``error`` (the last refresh failed) shows
    in red under the header, above the last data that could be read."""
    parts: list[RenderableType] = [Text(header, style="bold")]
    if error is not None:
        parts.append(Text(error, style="red"))
    legend = Text("memory: ")
    for k, label in (
        ("outside", "reserved+unmanaged"),
        ("active", "in use"),
        ("idle", "idle"),
        ("free", "free"),
    ):
        legend.append(_BAR_CHARS[k] * 2, style=BAR_STYLES[k]).append(f" {label}  ")
    parts.append(legend)
    if not pools:
        parts.append(Text("No devices. Add one with: gpuboss devices add NAME --vram 24GiB", style="yellow"))
    for s in pools:
        granted, waiters = split_queue(x for x in leases if x.pool == s.pool)
        n = len(s.devices)
        title = f"pool {s.pool}: {n} device{'' if n == 1 else 's'}, {s.granted} granted, {s.queued} queued"
        parts.append(Text())
        if s.devices:
            parts.append(_usage_table(title, s, granted, bar_width))
        else:
            parts.append(Text(title, style="bold"))
        if granted:
            parts.append(leases_table(f"leases in pool {s.pool}", granted, {s.pool: s.now_ms}))
        else:
            parts.append(Text(f"No leases in pool {s.pool}."))
        if waiters:
            parts.append(queue_table(f"queue of pool {s.pool}", waiters, s.now_ms))
        else:
            parts.append(Text(f"Queue of pool {s.pool} is empty."))
    return Group(*parts)
