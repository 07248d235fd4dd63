"""Write the blocking client (``gpuboss_client/sync.py``) from the asyncio one (``aio.py``).

The asyncio client is the source: its API, logic and docstrings exist once. This script removes
``async``/``await`` and renames what differs (``AsyncBoss`` -> ``Boss``, ``aclose`` -> ``close``,
the asyncio backend -> the threads backend). ``python client/unasync.py`` rewrites ``sync.py``;
``--check`` exits 1 if it is out of date (a test runs that).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "gpuboss_client"
SOURCE, TARGET = HERE / "aio.py", HERE / "sync.py"

#: (pattern, replacement), applied in order, each to the whole text
RULES: list[tuple[str, str]] = [
    (r'\A"""The asyncio client: :class:`AsyncBoss`\.', '"""The blocking client: :class:`Boss`.'),
    (
        r"\nThis file is the source of both clients: .*?threading events\.\n",
        "\nWritten by ``client/unasync.py`` from ``aio.py``, the source of both clients: edit that file,\n"
        "then run ``python client/unasync.py``.\n",
    ),
    (r"\bfrom \. import _backend_aio as backend\b", "from . import _backend_sync as backend"),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\bawait ", ""),
    (r"\bAsyncBoss\b", "Boss"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncLeaseContext\b", "LeaseContext"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\b", "close"),
]


def generate(text: str) -> str:
    """``sync.py``'s text from ``aio.py``'s, formatted by ruff as the project formats code."""
    for pattern, replacement in RULES:
        text, n = re.subn(pattern, replacement, text, flags=re.DOTALL)
        if n == 0:
            raise SystemExit(f"unasync: rule {pattern!r} matched nothing in {SOURCE.name}")
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("unasync: ruff is needed (pip install ruff)")
    for step in (["check", "--select", "I", "--fix", "--quiet"], ["format"]):  # imports sorted, formatted
        text = subprocess.run(
            [ruff, *step, "--stdin-filename", str(TARGET), "-"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return text


def main(argv: list[str]) -> int:
    text = generate(SOURCE.read_text())
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python client/unasync.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
