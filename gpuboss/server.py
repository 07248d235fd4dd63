"""Run the boss service: ``gpuboss serve``.

:func:`serve` resolves Redis (the configured URL, or the embedded default of
:mod:`gpuboss.embedded`), binds the listening socket itself (so ``port=0`` works and the real port
is known), serves the app of :func:`gpuboss.api.create_app` under uvicorn, and prints where
everything is once the app has started. SIGINT and SIGTERM stop it gracefully: uvicorn drains
the HTTP side, then the embedded Redis (if any) is shut down, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import logging.config
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import redis
import uvicorn
import uvicorn.config
from fastapi import FastAPI
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpuboss_client import BackendUnavailable, BadRequest, Boss, DeviceInfo, GpubossError
from gpuboss_client.urls import redact

from . import __version__
from .agent import background_agent
from .api import create_app
from .consumers.registry import load_registry
from .embedded import Embedded, embedded_redis
from .fakenvml import fake_nvml
from .probe import DeviceProbe, NvmlProbe
from .settings import ServiceSettings

__all__ = ["bind_socket", "check_redis", "serve"]

log = logging.getLogger("gpuboss.server")

#: seconds uvicorn waits for open requests (long-polls, event streams) at shutdown before cancelling them
SHUTDOWN_GRACE_S = 5
NO_DEVICES = "no devices: add one with --device gpu0=24GiB or `gpuboss devices add gpu0 --vram 24GiB`"
#: who checks that Redis answers before the service starts (it leases nothing)
CHECK_HOLDER = "gpuboss-serve"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (``port=0``: the kernel picks one).

    Raises :class:`BadRequest` if the address cannot be used (unknown host, port taken, ...).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadRequest(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _name, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restart must not wait out the previous run's TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BadRequest(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return sock


def check_redis(url: str, timeout_s: float) -> None:
    """PING the deployment ``url`` names, once; raise :class:`BadRequest` for a malformed URL,
    :class:`BackendUnavailable` if it does not answer (password masked in the message)."""
    boss = Boss.from_url(
        url, holder=CHECK_HOLDER, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    try:
        boss.redis.ping()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        boss.close()


def _logging_config(level: str) -> dict[str, Any]:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for name in ("gpuboss", "gpuboss_client"):
        config["loggers"][name] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


class _Stopped(BaseException):
    """A stop signal arrived before the HTTP server took over signal handling.

    A BaseException, like KeyboardInterrupt, so that code which handles errors (logging's
    handlers, for one) lets it through and only clean-up code sees it.
    """


class _Signals:
    """SIGINT/SIGTERM handling around uvicorn's own.

    Before serving, a signal aborts start-up (so the embedded Redis is stopped on the way out).
    While serving, uvicorn handles them; when it is done it re-raises the signal it caught
    against the handler it found, which is this one, disarmed by then: it only notes it, so the
    embedded Redis is still shut down and the process exits 0 instead of dying of the signal.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.armed = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.armed:
            self.armed = False
            raise _Stopped(signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only; whoever runs us there handles them
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _size(mib: int) -> str:
    return f"{mib / 1024:g} GiB" if mib % 1024 == 0 or mib >= 10240 else f"{mib} MiB"


def _device_line(d: DeviceInfo) -> str:
    cuda = f", CUDA index {d.cuda_index}" if d.cuda_index is not None else ""
    return (
        f"{d.name} in pool {d.pool}: {_size(d.total_mib)} total, {_size(d.budget_mib)} budget, "
        f"{_size(d.free_mib)} free, {d.leases} leases{cuda}"
    )


def _redis_lines(url: str, embedded: Embedded | None) -> list[str]:
    lines = [f"GPUBOSS_REDIS_URL={redact(url)}"]
    if embedded is None:
        lines.append("external Redis (durable as that server is configured)")
    elif embedded.durable:
        lines.append(
            f"embedded redis-server (pid {embedded.pid}), durable: append-only file in {embedded.data_dir}"
        )
    else:
        lines.append("embedded in-process fakeredis, NOT durable: everything is lost when this stops")
    return lines


def _auth_line(settings: ServiceSettings) -> str:
    if settings.auth:
        names = ", ".join(f"{t.name} ({t.scope})" for t in settings.tokens)
        return f"on: bearer tokens {names}"
    return "off: no tokens, every caller is an operator (allowed on a loopback address only)"


class _Server(uvicorn.Server):
    """uvicorn's server, printing where everything is once the app has started."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        app: FastAPI,
        settings: ServiceSettings,
        redis_url: str,
        embedded: Embedded | None,
        signals: _Signals,
    ) -> None:
        super().__init__(config)
        self._app, self._settings, self._redis_url = app, settings, redis_url
        self._embedded, self._signals = embedded, signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._signals.received:  # arrived between disarming and uvicorn taking over
            self.should_exit = True
            return
        if sockets:
            await self._announce(sockets[0])

    async def _announce(self, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        base = f"http://{_url_host(str(host))}:{port}"
        where = " (all interfaces)" if host in ("0.0.0.0", "::") else ""
        try:
            devices = await self._app.state.boss.devices()
            device_lines = [_device_line(d) for d in devices] or [NO_DEVICES]
        except GpubossError as exc:
            device_lines = [f"could not list them: {exc.message}"]
        docs = f"  (OpenAPI: {base}{self._app.docs_url})" if self._app.docs_url else ""
        redis_lines = _redis_lines(self._redis_url, self._embedded)
        out = [
            f"gpuboss {__version__} is serving on {base}{where}",
            f"  dashboard: {base}/",
            f"  API:       {base}/v1{docs}",
            f"  redis:     {redis_lines[0]}",
            *(f"             {line}" for line in redis_lines[1:]),
            f"  devices:   {device_lines[0]}",
            *(f"             {line}" for line in device_lines[1:]),
            f"  auth:      {_auth_line(self._settings)}",
            "Stop with Ctrl-C (or SIGTERM).",
        ]
        print("\n".join(out), flush=True)


def _fake_probe(spec: str) -> Callable[[], DeviceProbe]:
    fake = fake_nvml(spec)  # read now: a bad spec or file stops the start with its message
    return lambda: NvmlProbe(fake)


def serve(settings: ServiceSettings) -> None:
    """Run the boss service for ``settings`` until SIGINT or SIGTERM; then return normally.

    Raises :class:`BadRequest` (address unusable, Redis URL malformed),
    :class:`BackendUnavailable` (Redis unreachable, embedded Redis failed to start or already
    running on this state dir) or :class:`GpubossError` if the app fails to start.
    """
    logging.config.dictConfig(_logging_config(settings.log_level))
    signals = _Signals()
    with signals.installed():
        try:
            _serve(settings, signals)
        except _Stopped as stop:
            log.info("stopped by %s before the service started", stop)


def _serve(settings: ServiceSettings, signals: _Signals) -> None:
    with contextlib.ExitStack() as stack:
        try:
            if settings.consumers is not None:  # a registry with errors stops the start, naming the field
                load_registry(settings.consumers)
            # The address first: a port in use is found before any Redis is started.
            sock = stack.enter_context(contextlib.closing(bind_socket(settings.host, settings.port)))
            embedded: Embedded | None = None
            if settings.redis_url is None:
                embedded = stack.enter_context(
                    embedded_redis(settings.state_dir, timeout_s=max(settings.redis_timeout_s, 10.0))
                )
                url = embedded.url
            else:
                url = settings.redis_url
                check_redis(url, settings.redis_timeout_s)
            agent = stack.enter_context(
                background_agent(
                    settings.agent,
                    url,
                    pool=settings.pool,
                    interval_s=settings.agent_interval_s,
                    probe_factory=_fake_probe(settings.fake_nvml) if settings.fake_nvml else None,
                )
            )
            app = create_app(settings, url, agent=agent)
            config = uvicorn.Config(
                app,
                log_config=None,  # configured above, with gpuboss's own loggers
                log_level=settings.log_level,
                # The dashboard polls: request lines only when debugging.
                access_log=settings.log_level == "debug",
                lifespan="on",
                server_header=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            )
            server = _Server(
                config, app=app, settings=settings, redis_url=url, embedded=embedded, signals=signals
            )
        finally:
            # From here on a signal is only noted: uvicorn handles it while serving, and nothing
            # may cut short the shutdown of the embedded Redis.
            signals.armed = False
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn's way of saying the app's start-up failed
            raise GpubossError(
                f"the service did not start (uvicorn exit {exc.code}): see the log above"
            ) from None
        if not server.started and not signals.received:
            raise GpubossError("the service did not start: see the log above")
        if embedded is not None:
            log.info("HTTP side stopped; stopping the embedded Redis")
