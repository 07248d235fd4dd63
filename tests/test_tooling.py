"""The repository passes its own format, lint and type checks (run with the venv's tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=110, check=False
    )
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_format() -> None:
    run("ruff", "format", "--check", ".")


def test_ruff_check() -> None:
    run("ruff", "check", ".")


def test_mypy() -> None:
    run("mypy")  # files and strictness come from pyproject.toml
