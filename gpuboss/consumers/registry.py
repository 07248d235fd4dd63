"""The consumer registry: a YAML file that declares the GPU services the boss manages.

.. code-block:: yaml

    consumers:
      - name: mvoice
        url: http://127.0.0.1:8101
        kinds: [tts]
        vram: 2345MiB
        priority: normal
        keep_warm: 300          # seconds idle before it gives its memory back; -1: until evicted
        health: {path: /health}
        load: {path: /load}
        unload: {path: /unload}
      - name: comfyui
        preset: comfyui         # unload: POST /free; lazy: nothing resident before the first prompt
        url: http://127.0.0.1:8188
        kinds: [image]
        vram: 13GiB

Each consumer loads and unloads in one way: HTTP ``load``/``unload`` actions, a ``command``
gpuboss starts and stops, a ``docker`` container, a ``systemd`` unit, or ``self_managed`` (the
engine manages its own memory: leased at its declared size, never evicted). A ``preset`` fills in
the actions of a known engine. Every error names the file, the consumer and the field, and a file
with errors changes nothing: :func:`load_registry` either returns the whole new registry or raises.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from gpuboss_client import BadRequest, parse_mib, parse_priority
from gpuboss_client.keys import valid_name, valid_pool

__all__ = ["PRESETS", "Consumer", "Registry", "load_registry"]

PRESETS = ("plain", "ollama", "vllm", "comfyui", "llamacpp")

Seconds = Annotated[float, Field(gt=0, le=86_400)]


def _mib(size: Any) -> int:
    try:
        return parse_mib(size)
    except BadRequest as exc:
        raise ValueError(exc.message) from None


def _priority(priority: Any) -> int:
    try:
        return parse_priority(priority)
    except BadRequest as exc:
        raise ValueError(exc.message) from None


def _name(name: str) -> str:
    if not valid_name(name):
        raise ValueError(f"must be 1-64 of [A-Za-z0-9_.:-], not {name!r}")
    return name


#: a consumer, kind or device name
Name = Annotated[str, AfterValidator(_name)]
#: MiB, given as an int or a size like "8GiB"
Mib = Annotated[int, BeforeValidator(_mib)]
#: 0-100, or low/normal/high
Priority = Annotated[int, BeforeValidator(_priority)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Health(_Spec):
    """How to tell that a consumer is up: ``GET path`` answers ``status`` within ``timeout``.

    After a load it must pass within ``start`` seconds; while loaded it is checked every
    ``interval`` seconds (a failing consumer is ``unhealthy`` until it passes again).
    """

    path: str = "/health"
    status: int = Field(default=200, ge=100, le=599)
    timeout: Seconds = 5.0
    interval: Seconds = 10.0
    start: Seconds = 120.0


class HttpAction(_Spec):
    """One HTTP call that loads or unloads a consumer's model(s)."""

    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    path: str
    body: dict[str, Any] | None = None
    timeout: Seconds = 120.0

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must start with /, not {path!r}")
        return path


class Command(_Spec):
    """A process gpuboss starts to load the consumer and stops to unload it."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    stop_signal: str = "SIGTERM"
    stop_timeout: Seconds = 10.0

    @field_validator("stop_signal")
    @classmethod
    def _signal(cls, name: str) -> str:
        if name not in signal.Signals.__members__:
            raise ValueError(f"not a signal name: {name!r}")
        return name


class Docker(_Spec):
    """A container gpuboss starts (``docker start``) and stops (``docker stop``)."""

    container: str = Field(min_length=1, max_length=255)
    stop_timeout: Seconds = 10.0


class Systemd(_Spec):
    """A unit gpuboss starts and stops (``systemctl [--user] start|stop``)."""

    unit: str = Field(min_length=1, max_length=255)
    user: bool = False


# Engine-native actions of the presets (see each engine's documented API).
_PRESET_ACTIONS: dict[str, dict[str, HttpAction]] = {
    # vLLM's sleep mode: level 1 offloads the weights to CPU memory and frees the GPU's.
    "vllm": {"load": HttpAction(path="/wake_up"), "unload": HttpAction(path="/sleep?level=1")},
    # ComfyUI frees models on /free; it loads lazily, on the first prompt.
    "comfyui": {"unload": HttpAction(path="/free", body={"unload_models": True, "free_memory": True})},
    # Ollama unloads a model on a generate request with keep_alive 0 (per model: see models).
    "ollama": {"unload": HttpAction(path="/api/generate", body={"keep_alive": 0})},
}
_PRESET_HEALTH = {
    "ollama": "/api/version",
    "vllm": "/health",
    "comfyui": "/system_stats",
    "llamacpp": "/health",
}


class Consumer(_Spec):
    """One GPU service the boss manages (see the module docstring)."""

    name: Name
    url: str
    preset: Literal["plain", "ollama", "vllm", "comfyui", "llamacpp"] = "plain"
    kinds: list[Name] = Field(default_factory=list)
    vram: Mib | None = None
    #: per model, for multi-model engines (Ollama: a lease per loaded model)
    models: dict[str, Mib] = Field(default_factory=dict)
    #: the OpenAI model ids a single-model consumer answers to (the gated proxy routes by them)
    serves: list[str] = Field(default_factory=list)
    #: requests the gated proxy lets through to it at once (None: no limit)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    priority: Priority = 50
    device: Name | None = None
    pool: str = "default"
    preemptible: bool = False
    #: seconds idle before it gives its memory back by itself; -1 keeps it until evicted; 0 at once
    keep_warm: float = Field(default=-1, ge=-1, le=86_400)
    #: seconds it has to give its memory back (unload and be measured free) once evicted or released
    grace: Seconds = 30.0
    #: MiB it keeps while unloaded (a CUDA context, vLLM asleep); counted as unmanaged memory then
    residual: Mib = 0
    health: Health | None = None
    load: HttpAction | None = None
    unload: HttpAction | None = None
    command: Command | None = None
    docker: Docker | None = None
    systemd: Systemd | None = None
    self_managed: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, not {url!r}")
        try:
            parts.port  # noqa: B018 (it raises for a port out of range)
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}") from exc
        return url.rstrip("/")

    @field_validator("pool")
    @classmethod
    def _pool(cls, pool: str) -> str:
        if not valid_pool(pool):
            raise ValueError(f"must be 1-64 of [A-Za-z0-9_.-], not {pool!r}")
        return pool

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """Fill in what the preset knows, unless the file says otherwise."""
        if not isinstance(data, Mapping):
            return data
        preset = data.get("preset", "plain")
        out = dict(data)
        for verb, action in _PRESET_ACTIONS.get(preset, {}).items():
            out.setdefault(verb, action)
        if preset in _PRESET_HEALTH:
            out.setdefault("health", Health(path=_PRESET_HEALTH[preset]))
        return out

    @model_validator(mode="after")
    def _one_way(self) -> Consumer:
        ways = [w for w in ("http", "command", "docker", "systemd", "self_managed") if self._uses(w)]
        if len(ways) > 1:
            raise ValueError(f"loads and unloads in one way only, not {' and '.join(ways)}")
        if self.vram is None and not self.models:
            raise ValueError("needs vram (or models, with a size per model)")
        if self.vram is not None and self.models:
            raise ValueError("give vram or models, not both")
        if self.preset == "llamacpp" and self.command is None:
            raise ValueError("the llamacpp preset runs llama-server: give its command")
        if self.serves and self.models:
            raise ValueError("a consumer with models is routed by them: give serves or models, not both")
        if self.self_managed and self.preemptible:
            raise ValueError("a self-managed consumer is never evicted: it cannot be preemptible")
        return self

    def _uses(self, way: str) -> bool:
        if way == "http":
            return self.load is not None or self.unload is not None
        return bool(getattr(self, way))

    @property
    def resident_at_start(self) -> bool:
        """Whether the boss counts the consumer as loaded when it starts (before any measurement):
        self-managed, load and unload, a systemd unit, or nothing declared: loaded; unload only
        (lazy, like ComfyUI), or a process or container gpuboss starts: not loaded. This is the
        rule whose absence let ComfyUI load FLUX on top of a resident TTS model (seed 000)."""
        if self.command is not None or self.docker is not None:
            return False
        return not (self.unload is not None and self.load is None)

    @property
    def sizes(self) -> dict[str, int]:
        """MiB to lease: per model, or ``{"": vram}`` for a single-model consumer."""
        return dict(self.models) if self.models else {"": self.vram or 0}


class Registry(BaseModel):
    """Every consumer of a registry file, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consumers: list[Consumer] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        seen: set[str] = set()
        for consumer in self.consumers:
            if consumer.name in seen:
                raise ValueError(f"two consumers are named {consumer.name!r}")
            seen.add(consumer.name)
        return self

    def get(self, name: str) -> Consumer | None:
        """The consumer named ``name``, if there is one."""
        return next((c for c in self.consumers if c.name == name), None)

    def serving(self, kind: str) -> list[Consumer]:
        """The consumers that serve ``kind`` (e.g. ``tts``), in file order."""
        return [c for c in self.consumers if kind in c.kinds]

    @functools.cached_property
    def model_ids(self) -> dict[str, tuple[Consumer, str]]:
        """Every OpenAI model id the consumers answer to: the consumer, and the model of it to
        load (``""`` for a single-model consumer). The first consumer in the file wins a tie."""
        out: dict[str, tuple[Consumer, str]] = {}
        for c in self.consumers:
            for model in c.models:
                out.setdefault(model, (c, model))
            for model in c.serves:
                out.setdefault(model, (c, ""))
        return out


def load_registry(path: str | Path) -> Registry:
    """Read and check a registry file. Raises :class:`BadRequest` whose message names the file,
    the consumer and the field of every problem; nothing is half-loaded."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read the consumer registry: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise BadRequest(f"{path}: expected a mapping with a list under 'consumers'")
    try:
        return Registry.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise BadRequest(f"{path}: " + "; ".join(_problem(doc, e) for e in exc.errors())) from None


def _problem(doc: Mapping[str, Any], error: Any) -> str:
    """One validation error as "consumer 'name': field 'x': message"."""
    loc = list(error["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "consumers" and isinstance(loc[1], int):
        entries = doc.get("consumers") or []
        entry = entries[loc[1]] if loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, Mapping) else None
        where = f"consumer {name!r}: " if name else f"consumer #{loc[1] + 1}: "
        loc = loc[2:]
    fields = ".".join(str(p) for p in loc if not str(p).startswith(("function-", "literal[")))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}field {fields!r}: {message}" if fields else f"{where}{message}"
