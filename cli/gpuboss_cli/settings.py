"""CLI settings, read from ``GPUBOSS_*`` environment variables."""

from __future__ import annotations

import re

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HOLDER", "Settings", "redact"]

HOLDER = "gpuboss-cli"
"""The holder name the CLI's actions are recorded under."""


class Settings(BaseSettings):
    """``GPUBOSS_REDIS_URL`` and ``GPUBOSS_REDIS_TIMEOUT_S``; the ``--redis-url`` option wins."""

    model_config = SettingsConfigDict(env_prefix="GPUBOSS_", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_s: float = Field(default=5.0, gt=0, le=300)


_PASSWORD = re.compile(r"(?<=://)([^:@/]*):[^@/]*@")


def redact(url: str) -> str:
    """``url`` with any password masked, fit to print in an error message."""
    return _PASSWORD.sub(r"\1:***@", url)
