"""``gpuboss run`` (placeholder until it is built)."""

from __future__ import annotations

import typer

__all__ = ["run"]


def run() -> None:
    """Not built yet."""
    raise typer.Exit(1)
