"""Parsing of sizes, priorities and durations as users write them."""

from __future__ import annotations

import math
import re

from .errors import BadRequest

__all__ = ["MAX_MIB", "MAX_TTL_MS", "PRIORITIES", "parse_mib", "parse_priority", "parse_ttl_ms"]

MAX_MIB = 1 << 24  # 16 TiB: more than any device has; larger is a mistake
MAX_TTL_MS = 86_400_000  # one day
PRIORITIES = {"low": 10, "normal": 50, "high": 90}

# Binary units throughout, as nvidia-smi and the GPU vendors count: "8G" and "8GB" mean 8 GiB.
_FACTORS = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}
_FACTORS |= {"t": 1 << 20, "tb": 1 << 20, "tib": 1 << 20}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_mib(vram: int | str | None = None, vram_gb: float | None = None, *, minimum: int = 1) -> int:
    """VRAM in MiB from ``vram`` (an int in MiB, or "8GiB", "8G", "512MiB") or ``vram_gb`` (GiB).

    Fractions round up to a whole MiB. Raises :class:`BadRequest` for anything else, or for less
    than ``minimum`` MiB.
    """
    if (vram is None) == (vram_gb is None):
        raise BadRequest("give exactly one of vram= and vram_gb=")
    if vram_gb is not None:
        if isinstance(vram_gb, bool) or not isinstance(vram_gb, int | float):
            raise BadRequest(f"vram_gb must be a number, not {vram_gb!r}")
        return _checked(_ceil(vram_gb * 1024), vram_gb, minimum)
    if isinstance(vram, bool):
        raise BadRequest(f"vram must be MiB or a size like '8GiB', not {vram!r}")
    if isinstance(vram, int):
        return _checked(vram, vram, minimum)
    if isinstance(vram, str):
        m = _SIZE.fullmatch(vram)
        factor = _FACTORS.get(m.group(2).lower()) if m else None
        if m is None or factor is None:
            raise BadRequest(f"cannot read size {vram!r}: write MiB as an int, or like '8GiB', '512MiB'")
        return _checked(_ceil(float(m.group(1)) * factor), vram, minimum)
    raise BadRequest(f"vram must be MiB or a size like '8GiB', not {vram!r}")


def _ceil(x: float) -> int:
    # Round away float noise first, so 4.03 s is 4030 ms and not 4031; -1 marks the unreadable.
    return math.ceil(round(x, 6)) if math.isfinite(x) else -1


def _checked(mib: int, given: object, minimum: int) -> int:
    if not minimum <= mib <= MAX_MIB:
        raise BadRequest(f"size {given!r} is out of range: {minimum} MiB to 16 TiB")
    return mib


def parse_priority(priority: int | str) -> int:
    """A priority 0-100 from an int, a numeric string or ``low``/``normal``/``high``."""
    if isinstance(priority, str):
        named = PRIORITIES.get(priority.strip().lower())
        if named is not None:
            return named
        if priority.strip().isascii() and priority.strip().isdigit():
            priority = int(priority)
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 100:
        return priority
    raise BadRequest(f"priority must be low, normal, high or an int 0-100, not {priority!r}")


def parse_ttl_ms(ttl: float, name: str = "ttl") -> int:
    """A duration in seconds (> 0, at most a day) as whole milliseconds, rounded up."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise BadRequest(f"{name} must be a number of seconds, not {ttl!r}")
    ms = _ceil(ttl * 1000)
    if ttl <= 0 or not 1 <= ms <= MAX_TTL_MS:
        raise BadRequest(f"{name} must be more than 0 and at most 86400 seconds, not {ttl!r}")
    return ms
