"""The Lua scripts, loaded as data.

In an installed wheel they live in ``gpuboss_client/lua``; in a checkout, in the repository's
top-level ``lua/`` folder. Each script is sent as ``_common.lua`` followed by the verb's file.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["NAMES", "script_shas", "source"]

NAMES = (
    "acquire",
    "add_device",
    "busy",
    "cancel",
    "configure_pool",
    "devices",
    "heartbeat",
    "idle",
    "leases",
    "measure",
    "note",
    "plan",
    "reap",
    "release",
    "remove_device",
)


def _lua_dir() -> Traversable:
    packaged = resources.files("gpuboss_client") / "lua"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "lua"


@cache
def source(name: str) -> str:
    """The full text sent to Redis for script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    folder = _lua_dir()
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


def script_shas() -> dict[str, str]:
    """SHA1 of every script as Redis knows it (what ``EVALSHA`` runs)."""
    return {name: hashlib.sha1(source(name).encode()).hexdigest() for name in NAMES}
