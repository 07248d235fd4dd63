"""The Lua scripts, loaded as data, in the two forms Redis runs them.

In an installed wheel they live in ``gpuboss_client/lua``; in a checkout, in the repository's
top-level ``lua/`` folder. ``_common.lua`` holds the helpers, and each verb has a file of its own.

- **A function library** (Redis 7 and Valkey: ``FUNCTION LOAD``, then ``FCALL``): :func:`library`
  is ``_common.lua`` once, then each verb's file as the body of a function registered as
  ``<library>_<verb>``. The helpers are defined once, when the library loads, instead of on every
  call. The library's name carries a hash of its text (:data:`LIBRARY`), so clients of different
  versions keep their own functions side by side in one Redis.
- **Scripts** (``EVALSHA``), where a server has no functions: :func:`source` is ``_common.lua``
  followed by the verb's file, run whole on every call.

Both bind the pool's keys first thing in a call (``bind`` in ``_common.lua``) and then run the same
text, so they behave alike; the tests run both.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["LIBRARY", "NAMES", "function_name", "library", "script_shas", "source"]

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


#: flags of the functions that must run while Redis is full: they end leases or keep them alive
#: (scripts reach the same with ``writes_even_when_full`` in ``_common.lua``), or read what the
#: others left (reaping in passing only deletes)
_ALLOW_OOM = frozenset({"release", "heartbeat", "cancel", "reap", "devices", "leases", "plan"})


def _text(name: str) -> str:
    return (_lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The full text sent to Redis for script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return _text("_common") + "\nbind(KEYS)\n" + _text(name)


@cache
def _library_body() -> str:
    parts = [_text("_common")]
    for name in NAMES:
        flags = "'allow-oom'" if name in _ALLOW_OOM else ""
        parts.append(
            f"redis.register_function{{function_name = '@_{name}', flags = {{{flags}}},\n"
            f"  callback = function(KEYS, ARGV)\nbind(KEYS, true)\n{_text(name)}\nend}}\n"
        )
    return "\n".join(parts)


#: the library's name: ``gpuboss_`` and the start of its text's SHA1
LIBRARY = "gpuboss_" + hashlib.sha1(_library_body().encode()).hexdigest()[:16]


def function_name(name: str) -> str:
    """The name ``FCALL`` calls verb ``name`` by."""
    if name not in NAMES:
        raise KeyError(name)
    return f"{LIBRARY}_{name}"


@cache
def library() -> str:
    """The text ``FUNCTION LOAD`` takes: every verb as a function of library :data:`LIBRARY`."""
    return f"#!lua name={LIBRARY}\n" + _library_body().replace("'@_", f"'{LIBRARY}_")


def script_shas() -> dict[str, str]:
    """SHA1 of every script as Redis knows it (what ``EVALSHA`` runs)."""
    return {name: hashlib.sha1(source(name).encode()).hexdigest() for name in NAMES}
