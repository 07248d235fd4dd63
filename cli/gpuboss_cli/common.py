"""What every command shares: the connection to the backend and the way a command ends on an error.

:func:`connect` gives a :class:`gpuboss_client.Boss` for the configured Redis, or, pointed at a boss
service (``--boss-url`` or ``GPUBOSS_BOSS_URL``), an :class:`gpuboss_cli.http.HttpBoss`, which has the
same methods and results. Errors from either end the command through :func:`exit_with`: a red
``error[<code>]: <message>`` line on stderr, and the error's own exit code.

:mod:`gpuboss_cli.main` and the modules of the commands that live apart from it (``agent``, ``run``,
``serve``) import from here; this module imports none of them, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn, Protocol

import pydantic
import typer
from rich.console import Console
from rich.text import Text

from gpuboss_client import (
    BackendUnavailable,
    BadRequest,
    Boss,
    DeviceInfo,
    Event,
    GpubossError,
    LeaseInfo,
    Plan,
    PoolStatus,
    Unauthorized,
)
from gpuboss_client.ops import Findings

from .http import HttpBoss, is_http_url
from .settings import HOLDER, Settings, redact

__all__ = ["Backend", "Options", "connect", "exit_with", "load_settings", "target"]


@dataclass(frozen=True, slots=True)
class Options:
    """The global options (``gpuboss --redis-url ... COMMAND``), kept in the click context."""

    redis_url: str | None
    boss_url: str | None = None
    token: str | None = None


class Backend(Protocol):
    """What the commands need: :class:`gpuboss_client.Boss` (Redis) and :class:`HttpBoss` both are."""

    def status(self, pool: str | None = None) -> list[PoolStatus]: ...
    def leases(self, pool: str | None = None) -> list[LeaseInfo]: ...
    def devices(self, pool: str | None = None) -> list[DeviceInfo]: ...
    def events(self, pool: str | None = None, *, count: int = 100) -> list[Event]: ...
    def findings(self, pool: str | None = None) -> list[Findings]: ...
    def reap(self, pool: str | None = None) -> int: ...
    def force_release(self, lease_id: str, pool: str | None = None) -> LeaseInfo: ...
    def remove_device(self, name: str, *, pool: str = ..., force: bool = False) -> None: ...
    def configure_pool(self, pool: str = ..., *, min_residency: float = 0, aging: float = 0) -> None: ...

    def plan(
        self,
        vram: int | str | None = None,
        *,
        vram_gb: float | None = None,
        priority: int | str = "normal",
        device: str | None = None,
        pool: str = ...,
        exclusive: bool = False,
        devices: int = 1,
    ) -> Plan: ...

    def add_device(
        self,
        name: str,
        vram: int | str,
        *,
        reserved: int | str = 0,
        pool: str = ...,
        host: str | None = None,
        cuda_index: int | None = None,
    ) -> bool: ...


def exit_with(err: GpubossError, url: str | None = None) -> NoReturn:
    """End the command for ``err``: one red line on stderr, exit with ``err.exit_code``.

    ``url`` is where the command was sent: a Redis URL, or a boss service's ``http(s)://`` URL. A
    :class:`BackendUnavailable` names it (password masked): "cannot reach Redis at URL"; over HTTP
    :class:`HttpBoss` already words it, "cannot reach the boss at URL" or "the boss at URL cannot
    reach Redis".
    """
    message = err.message
    over_http = url is not None and is_http_url(url)
    if isinstance(err, BackendUnavailable) and url is not None and not over_http:
        message = f"cannot reach Redis at {redact(url)}: {message}"
    elif isinstance(err, Unauthorized) and over_http:
        message += " (give the boss's token with --token or GPUBOSS_TOKEN)"
    line = " ".join(f"error[{err.code}]: {message}".split())
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(line, style="red"))
    raise typer.Exit(err.exit_code)


def load_settings() -> Settings:
    """The ``GPUBOSS_*`` settings; a bad one is a :class:`BadRequest`."""
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"GPUBOSS_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"bad setting: {problems}") from exc


def target(ctx: typer.Context, settings: Settings) -> tuple[str, bool]:
    """(URL, whether it is a boss service): the options win over the environment, and a boss
    URL in the environment wins over a Redis URL there."""
    opts = ctx.find_object(Options) or Options(None)
    if opts.redis_url is not None and opts.boss_url is not None:
        raise BadRequest("give --redis-url or --boss-url, not both")
    if opts.boss_url is not None:
        return opts.boss_url, True
    if opts.redis_url is not None:
        return opts.redis_url, False
    if settings.boss_url:
        return settings.boss_url, True
    return settings.redis_url, False


@contextmanager
def connect(ctx: typer.Context, *, block_s: float = 0.0) -> Iterator[Backend]:
    """A :class:`Boss` for the configured Redis, or an :class:`HttpBoss` for the configured boss
    service; any GpubossError inside ends the command. ``block_s``: the longest a command blocks
    in Redis (BLPOP), added to the read timeout."""
    url: str | None = None
    try:
        settings = load_settings()
        url, over_http = target(ctx, settings)
        if over_http:
            opts = ctx.find_object(Options)
            token = opts.token if opts is not None and opts.token is not None else settings.token
            with HttpBoss(url, token=token, timeout=settings.boss_timeout_s) as http:
                yield http
            return
        timeout = settings.redis_timeout_s
        try:
            boss = Boss.from_url(
                url, holder=HOLDER, socket_connect_timeout=timeout, socket_timeout=timeout + block_s
            )
        except ValueError as exc:  # redis-py's complaint about the URL itself
            raise BadRequest(f"bad Redis URL {redact(url)}: {exc}") from exc
        with boss:
            yield boss
    except GpubossError as err:
        exit_with(err, url)
