"""The wire protocol between the operations and Redis, free of I/O.

An operation (see :mod:`._ops`) is a generator that yields steps: :class:`Call` (run a Lua script)
or :class:`Command` (one plain Redis command), receives each reply, and finally returns its
result (:data:`Op`). This module holds the steps, the reply codes each script answers with,
:func:`parse_reply` and the small helpers that read replies' text and numbers, and :func:`drive`,
which runs an operation with blocking I/O. It imports nothing else of the client but its errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from .errors import ProtocolError, error_for

T = TypeVar("T")
Clock: TypeAlias = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Call:
    """Run the Lua script ``script`` with the pool's keys and ``args``."""

    script: str
    keys: list[str]
    args: list[str | int]


@dataclass(frozen=True, slots=True)
class Command:
    """Run one plain Redis command (e.g. ``BLPOP`` on a wake list)."""

    args: tuple[str | int | float, ...]


Step: TypeAlias = Call | Command
Op: TypeAlias = Generator[Step, Any, T]


_ACQUIRE = frozenset({"granted", "queued", "busy", "ended"})
_CANCEL = frozenset({"cancelled", "granted", "ended"})
_RELEASE = frozenset({"released", "ended"})
_BEAT = frozenset({"ok", "ended"})
_OK = frozenset({"ok"})
_MARK = frozenset({"ok", "evicting", "ended"})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_reply(reply: Any, expected: frozenset[str]) -> tuple[str, dict[str, Any]]:
    """Split ``{code, field, value, ...}``; raise the error a code names, or ProtocolError."""
    if not isinstance(reply, list) or len(reply) % 2 != 1:
        raise ProtocolError(f"malformed script reply: {reply!r}")
    code = _text(reply[0])
    fields = {
        _text(k): v if isinstance(v, list | int) else _text(v)
        for k, v in zip(reply[1::2], reply[2::2], strict=False)
    }
    if code in expected:
        return code, fields
    raise error_for(code, _text(fields.get("message", f"unexpected reply {code!r}")))


def _pairs(flat: Sequence[Any] | Mapping[Any, Any]) -> dict[str, str]:
    if isinstance(flat, Mapping):  # redis-py parses some replies (XRANGE entries) into dicts
        return {_text(k): _text(v) for k, v in flat.items()}
    return {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=False)}


def _opt_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _ints(value: str | None) -> tuple[int, ...]:
    """CUDA indexes of a lease: one, or a gang's joined by commas (unknown ones left out)."""
    return tuple(int(x) for x in (value or "").split(",") if x != "")


def _from_doc(cls: type[T], doc: Mapping[str, Any], what: str, **convert: Callable[[Any], Any]) -> T:
    """A dataclass from its JSON (every field by name; ``convert`` turns lists back into tuples...)."""
    try:
        fields = {f.name: doc[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**(fields | {name: fn(fields[name]) for name, fn in convert.items()}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {what} document: {dict(doc)!r}") from exc


def drive(op: Op[T], step: Callable[[Step], Any]) -> T:
    """Run ``op`` to its end, answering each step with ``step(step)`` (blocking I/O)."""
    reply: Any = None
    try:
        while True:
            reply = step(op.send(reply))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
