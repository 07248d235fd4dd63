"""``gpuboss serve``: run the boss service (HTTP API, dashboard, metrics, reaper).

Flags override the ``GPUBOSS_*`` settings of :class:`gpuboss.settings.ServiceSettings`; a flag
left out keeps the setting's value. This is the one place the CLI reaches into the service
package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer

from gpuboss.settings import ServiceSettings
from gpuboss_client import BadRequest, GpubossError

from .common import exit_with

__all__ = ["serve"]

# The flag (and environment variable) that sets each field, for error messages.
_FLAGS = {
    "host": "--host",
    "port": "--port",
    "redis_url": "--redis-url",
    "devices": "--device",
    "pool": "--pool",
    "state_dir": "--state-dir",
    "log_level": "--log-level",
    "consumers": "--consumers",
    "fake_nvml": "--fake-nvml",
}


def _problem(error: Any) -> str:
    loc = [str(p) for p in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across fields, e.g. the refusal to listen in the open without tokens
        return message
    name = loc[0]
    where = f"GPUBOSS_{name.upper()}"
    if name in _FLAGS:
        where = f"{_FLAGS[name]} / {where}"
    return f"{where}: {message}"


def _settings(overrides: dict[str, Any]) -> ServiceSettings:
    try:
        return ServiceSettings(**overrides)
    except pydantic.ValidationError as exc:
        raise BadRequest("; ".join(_problem(e) for e in exc.errors())) from None


def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to listen on (default: 127.0.0.1; any other needs tokens)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port to listen on; 0 picks a free one (default: 8765).")
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            metavar="URL",
            help="Redis to use (default: $GPUBOSS_REDIS_URL, else an embedded one in --state-dir).",
        ),
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device",
            metavar="NAME=SIZE[:IDX]",
            help="A device to register at start, e.g. gpu0=24GiB:0 (repeatable; replaces $GPUBOSS_DEVICES).",
        ),
    ] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", "-p", help="The pool of the --device devices (default: default).")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            metavar="DIR",
            help="Data dir of the embedded Redis "
            "(default: $XDG_STATE_HOME/gpuboss or ~/.local/state/gpuboss).",
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning or error (default: info).")
    ] = None,
    consumers: Annotated[
        Path | None,
        typer.Option(
            "--consumers",
            metavar="FILE",
            help="The registry (YAML) of GPU services the boss manages; SIGHUP or "
            "`gpuboss consumers reload` reads it again.",
        ),
    ] = None,
    fake_nvml: Annotated[
        str | None,
        typer.Option(
            "--fake-nvml",
            metavar="SPEC",
            help="Demo: the agent reads fake GPUs instead of NVML ('24GiB', or '@state.json', "
            "re-read every pass).",
        ),
    ] = None,
) -> None:
    """Run the boss service: HTTP API, dashboard, metrics and reaper.

    With no Redis configured it runs its own: a durable redis-server child if one is installed,
    otherwise an in-memory fakeredis (with a warning: nothing persists). Tokens come from
    $GPUBOSS_TOKENS only, never from flags (command lines are visible to every user).
    """
    # `gpuboss --redis-url URL serve` and `gpuboss serve --redis-url URL` both work; the nearer wins.
    global_url = ctx.find_root().params.get("redis_url")
    flags: dict[str, Any] = {
        "host": host,
        "port": port,
        "redis_url": redis_url if redis_url is not None else global_url,
        "devices": device or None,
        "pool": pool,
        "state_dir": state_dir,
        "log_level": log_level.lower() if log_level is not None else None,
        "consumers": consumers,
        "fake_nvml": fake_nvml,
    }
    try:
        settings = _settings({k: v for k, v in flags.items() if v is not None})
        from gpuboss.server import serve as run_service

        run_service(settings)
    except GpubossError as err:
        exit_with(err)
