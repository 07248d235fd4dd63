"""Settings of the boss service, from ``GPUBOSS_*`` environment variables (CLI flags override).

Lists are comma-separated in the environment: ``GPUBOSS_DEVICES="gpu0=24GiB,gpu1=16GiB:1"``,
``GPUBOSS_TOKENS="alice:operator:<secret>,tts:holder:<secret>"``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpuboss_client import BadRequest, parse_mib
from gpuboss_client.keys import valid_name, valid_pool

__all__ = ["DeviceSpec", "ServiceSettings", "Token", "default_state_dir", "is_loopback"]

Scope = Literal["holder", "operator"]
_TOKEN = re.compile(r"([A-Za-z0-9_.:-]{1,64}):(holder|operator):(\S{16,})")
_DEVICE = re.compile(r"([A-Za-z0-9_.:-]{1,64})=([^:]+)(?::(\d+))?")


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token: who presents it (``name``) and what it may do (``scope``).

    ``holder`` may acquire and act on its own leases (recorded under ``name``) and read status;
    ``operator`` may also do everything else: other holders' leases, devices, force-release, reap.
    """

    name: str
    scope: Scope
    secret: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Token:
        m = _TOKEN.fullmatch(text.strip())
        if m is None:
            raise ValueError("a token is NAME:holder|operator:SECRET, the secret at least 16 characters")
        return cls(m.group(1), m.group(2), m.group(3))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device from configuration: ``NAME=SIZE`` or ``NAME=SIZE:CUDA_INDEX`` (``gpu0=24GiB:0``)."""

    name: str
    mib: int
    cuda_index: int | None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        m = _DEVICE.fullmatch(text.strip())
        if m is None or not valid_name(m.group(1)):
            raise ValueError(f"a device is NAME=SIZE[:CUDA_INDEX] (like gpu0=24GiB:0), not {text!r}")
        try:
            mib = parse_mib(m.group(2).strip())
        except BadRequest as exc:
            raise ValueError(exc.message) from exc
        return cls(m.group(1), mib, int(m.group(3)) if m.group(3) else None)


def default_state_dir() -> Path:
    """Where the embedded Redis keeps its data: ``$XDG_STATE_HOME/gpuboss`` or ``~/.local/state/gpuboss``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpuboss"


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


class ServiceSettings(BaseSettings):
    """Everything ``gpuboss serve`` can be told; see the README's table of settings."""

    model_config = SettingsConfigDict(env_prefix="GPUBOSS_", extra="ignore")

    #: Redis to use; None brings up the embedded default (a redis-server child, else fakeredis)
    redis_url: str | None = None
    redis_timeout_s: float = Field(default=5.0, gt=0, le=300)
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    #: the embedded Redis's data directory (default: the user's state dir)
    state_dir: Path = Field(default_factory=default_state_dir)
    #: devices to register at start, in ``pool``
    devices: Annotated[list[DeviceSpec], NoDecode] = []
    pool: str = "default"
    #: bearer tokens; none means no authentication, which is allowed on loopback only
    tokens: Annotated[list[Token], NoDecode] = []
    #: seconds between reaper passes (memory of dead holders returns within TTL plus this)
    reap_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: the longest an HTTP acquire waits (its ``timeout_s`` is capped to this)
    max_wait_s: float = Field(default=60.0, ge=0, le=3600)
    #: the most waiters a pool's queue takes from HTTP before answering ``queue_full``
    max_queue: int = Field(default=1000, ge=1, le=1_000_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: the NVML agent beside the service: "auto" when NVML works here, "on" (required), "off"
    agent: Literal["auto", "on", "off"] = "auto"
    agent_interval_s: float = Field(default=2.0, gt=0, le=3600)
    #: the agent reads fake GPUs instead of NVML: a spec like "24GiB", or "@state.json" (re-read every pass)
    fake_nvml: str | None = None
    #: the consumer registry (YAML) of the services the boss manages; SIGHUP reads it again
    consumers: Path | None = None

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        return [DeviceSpec.parse(v) if isinstance(v, str) else v for v in _split(value)]

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        return [Token.parse(v) if isinstance(v, str) else v for v in _split(value)]

    @field_validator("pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        if not valid_pool(value):
            raise ValueError("a pool is 1-64 of [A-Za-z0-9_.-]")
        return value

    @model_validator(mode="after")
    def _secure(self) -> ServiceSettings:
        if not self.tokens and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without tokens: anyone who can reach it could take "
                "or free GPU memory. Set GPUBOSS_TOKENS (NAME:operator:SECRET,...) or bind to 127.0.0.1"
            )
        names = [t.name for t in self.tokens]
        if len(names) != len(set(names)) or len({t.secret for t in self.tokens}) != len(self.tokens):
            raise ValueError("token names and secrets must be unique")
        return self

    @property
    def auth(self) -> bool:
        """Whether requests must carry a bearer token."""
        return bool(self.tokens)
