"""Tables and JSON documents of devices, leases and the queue.

Tables show sizes human-readable; JSON documents keep raw MiB and Redis milliseconds, and their
shape is stable for scripts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from gpuboss_client import PRIORITIES, DeviceInfo, LeaseInfo

__all__ = [
    "devices_table",
    "human_mib",
    "leases_table",
    "queue_table",
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
