"""gpuboss client: lease GPU memory through Redis from any Python process.

>>> boss = Boss.from_url("redis://localhost:6379/0", holder="tts")
>>> with boss.lease(vram="8GiB", priority="high", timeout=30) as lease:
...     os.environ.update(lease.env)
"""

from ._core import (
    AcquireOptions,
    Beat,
    DeviceHealth,
    DeviceInfo,
    Event,
    Findings,
    Lease,
    LeaseInfo,
    LeaseRef,
    LeaseUsage,
    Plan,
    PoolStatus,
    WaitState,
    split_queue,
    status_document,
)
from .aio import AsyncBoss, AsyncLeaseContext
from .errors import (
    ERRORS,
    AcquireTimeout,
    BackendUnavailable,
    BadRequest,
    ConsumerNotFound,
    ConsumerUnhealthy,
    ConsumerUnreachable,
    DeviceBusy,
    DeviceNotFound,
    Forbidden,
    GpubossError,
    InsufficientVram,
    LeaseEvicted,
    LeaseLost,
    LeaseNotFound,
    LeaseNotHeld,
    NoConsumer,
    NotFound,
    PoolNotFound,
    ProtocolError,
    QueueFull,
    RequestConflict,
    Unauthorized,
)
from .keys import PoolKeys
from .scripts import script_shas
from .sync import Boss, LeaseContext
from .units import PRIORITIES, parse_mib, parse_priority

__version__ = "0.1.0"

__all__ = [
    "ERRORS",
    "PRIORITIES",
    "AcquireOptions",
    "AcquireTimeout",
    "AsyncBoss",
    "AsyncLeaseContext",
    "BackendUnavailable",
    "BadRequest",
    "Beat",
    "Boss",
    "ConsumerNotFound",
    "ConsumerUnhealthy",
    "ConsumerUnreachable",
    "DeviceBusy",
    "DeviceHealth",
    "DeviceInfo",
    "DeviceNotFound",
    "Event",
    "Findings",
    "Forbidden",
    "GpubossError",
    "InsufficientVram",
    "Lease",
    "LeaseContext",
    "LeaseEvicted",
    "LeaseInfo",
    "LeaseLost",
    "LeaseNotFound",
    "LeaseNotHeld",
    "LeaseRef",
    "LeaseUsage",
    "NoConsumer",
    "NotFound",
    "Plan",
    "PoolKeys",
    "PoolNotFound",
    "PoolStatus",
    "ProtocolError",
    "QueueFull",
    "RequestConflict",
    "Unauthorized",
    "WaitState",
    "parse_mib",
    "parse_priority",
    "script_shas",
    "split_queue",
    "status_document",
]
