"""CLI settings, read from ``GPUBOSS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpuboss_client.urls import redact

__all__ = ["HOLDER", "Settings", "redact"]

HOLDER = "gpuboss-cli"
"""The holder name the CLI's actions are recorded under."""


class Settings(BaseSettings):
    """Where the CLI sends its commands: Redis directly, or a boss service over HTTP.

    ``GPUBOSS_REDIS_URL`` and ``GPUBOSS_REDIS_TIMEOUT_S`` for Redis; ``GPUBOSS_BOSS_URL`` (which, when
    set, wins over the Redis URL), ``GPUBOSS_TOKEN`` and ``GPUBOSS_BOSS_TIMEOUT_S`` for the boss. The
    ``--redis-url``, ``--boss-url`` and ``--token`` options win over all of them.
    """

    model_config = SettingsConfigDict(env_prefix="GPUBOSS_", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: the boss service (``http://host:8765``); when set, commands go over HTTP instead of Redis
    boss_url: str | None = None
    #: bearer token for the boss service (a holder's or an operator's secret)
    token: str | None = Field(default=None, repr=False)
    boss_timeout_s: float = Field(default=10.0, gt=0, le=300)
