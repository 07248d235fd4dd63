"""Loading and unloading a consumer through its own mechanism, and checking its health.

:class:`Actions` runs what a :class:`~gpuboss.consumers.registry.Consumer` declares: its HTTP
``load``/``unload`` calls (an Ollama consumer per model: ``/api/generate`` with the model, and
``keep_alive: 0`` to unload), the process gpuboss starts and stops (``command``), or the
``docker``/``systemd`` commands that start and stop it. A ``self_managed`` consumer has nothing to
run. Failures raise :class:`~gpuboss_client.BackendUnavailable` (the engine said no, or did not
answer) with what was tried, or :class:`~gpuboss_client.BadRequest` for a model the consumer does not
serve; nothing here touches leases.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence

import httpx

from gpuboss_client import BackendUnavailable, BadRequest

from .registry import Consumer, HttpAction

__all__ = ["Actions", "service_command"]


def service_command(consumer: Consumer, verb: str) -> list[str] | None:
    """The command that starts (``verb="start"``) or stops a docker or systemd consumer, if it is one."""
    if consumer.docker is not None:
        if verb == "stop":
            return ["docker", "stop", "-t", str(int(consumer.docker.stop_timeout)), consumer.docker.container]
        return ["docker", "start", consumer.docker.container]
    if consumer.systemd is not None:
        return ["systemctl", *(["--user"] if consumer.systemd.user else []), verb, consumer.systemd.unit]
    return None


class Actions:
    """Runs one consumer's load, unload and health check (one instance per consumer)."""

    def __init__(self, consumer: Consumer, client: httpx.AsyncClient | None = None) -> None:
        self.consumer = consumer
        self._client = client or httpx.AsyncClient(base_url=consumer.url)
        self._process: asyncio.subprocess.Process | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def child_pid(self) -> int | None:
        """The pid of the process this consumer runs as, if gpuboss started it and it runs."""
        proc = self._process
        return proc.pid if proc is not None and proc.returncode is None else None

    async def loaded_models(self) -> dict[str, int] | None:
        """What an Ollama consumer has loaded now, MiB by model (``GET /api/ps``); None for any
        other consumer, or when the engine does not answer."""
        if self.consumer.preset != "ollama":
            return None
        try:
            reply = await self._client.get("/api/ps", timeout=5.0)
            models = reply.json()["models"] if reply.status_code == 200 else None
            return {str(m["name"]): int(m.get("size_vram", 0)) // 2**20 for m in models or ()}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def load(self, model: str | None = None, env: Mapping[str, str] | None = None) -> None:
        """Make the consumer (or one model of it) resident. A process gpuboss starts gets ``env``
        on top of its own (the lease's ``CUDA_VISIBLE_DEVICES``)."""
        c = self.consumer
        if c.command is not None:
            await self._start(env or {})
        elif (argv := service_command(c, "start")) is not None:
            await self._run(argv)
        elif c.preset == "ollama":
            await self._http(HttpAction(path="/api/generate"), {"model": self._model(model), "prompt": ""})
        elif c.load is not None:
            await self._http(c.load, c.load.body)

    async def unload(self, model: str | None = None) -> None:
        """Give the consumer's (or one model's) memory back by the engine's own means."""
        c = self.consumer
        if c.command is not None:
            await self._stop()
        elif (argv := service_command(c, "stop")) is not None:
            await self._run(argv)
        elif c.unload is not None:
            body = dict(c.unload.body or {})
            if c.preset == "ollama":
                body["model"] = self._model(model)
            await self._http(c.unload, body or None)

    async def healthy(self) -> bool:
        """Whether the health check passes now (True where none is declared)."""
        health = self.consumer.health
        if health is None:
            return True
        try:
            reply = await self._client.get(health.path, timeout=health.timeout)
        except httpx.HTTPError:
            return False
        return reply.status_code == health.status

    def _model(self, model: str | None) -> str:
        if model is None:
            if len(self.consumer.models) != 1:
                raise BadRequest(
                    f"consumer {self.consumer.name}: which model? ({', '.join(self.consumer.models)})"
                )
            return next(iter(self.consumer.models))
        if model not in self.consumer.models:
            raise BadRequest(f"consumer {self.consumer.name} has no model {model!r}")
        return model

    async def _http(self, action: HttpAction, body: object) -> None:
        what = f"consumer {self.consumer.name}: {action.method} {self.consumer.url}{action.path}"
        try:
            reply = await self._client.request(
                action.method, action.path, json=body if body is not None else None, timeout=action.timeout
            )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{what} failed: {exc!r}") from None
        if reply.status_code >= 300:
            raise BackendUnavailable(f"{what} answered {reply.status_code}: {reply.text[:200]}")

    async def _run(self, argv: Sequence[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise BackendUnavailable(
                f"consumer {self.consumer.name}: cannot run {argv[0]}: {exc.strerror}"
            ) from None
        _, err = await proc.communicate()
        if proc.returncode != 0:
            said = err.decode(errors="replace")[:200]
            raise BackendUnavailable(
                f"consumer {self.consumer.name}: {' '.join(argv)} exited {proc.returncode}: {said}"
            )

    async def _start(self, env: Mapping[str, str]) -> None:
        command = self.consumer.command
        assert command is not None
        if self._process is not None and self._process.returncode is None:
            return
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command.argv,
                env={**os.environ, **env, **command.env},
                cwd=command.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendUnavailable(
                f"consumer {self.consumer.name}: cannot start {command.argv[0]}: {exc.strerror}"
            ) from None

    async def _stop(self) -> None:
        command, proc = self.consumer.command, self._process
        assert command is not None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.Signals[command.stop_signal])
        try:
            await asyncio.wait_for(proc.wait(), command.stop_timeout)
        except TimeoutError:
            proc.kill()  # it did not stop in time
            await proc.wait()
