"""``gpuboss agent`` (placeholder until it is built)."""

from __future__ import annotations

import typer

__all__ = ["agent"]


def agent() -> None:
    """Not built yet."""
    raise typer.Exit(1)
