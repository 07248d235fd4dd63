"""``gpuboss serve`` (placeholder until it is built)."""

from __future__ import annotations

import typer

__all__ = ["serve"]


def serve() -> None:
    """Not built yet."""
    raise typer.Exit(1)
