"""A command that ``tests/test_run.py`` runs under ``gpuboss run``: not a test module.

It prints one line per fact, flushed at once, on its stdout (which is the wrapper's):

- ``START <pid> <pgid>`` first;
- ``ENV <NAME>=<value>`` for each ``--env NAME`` (``<unset>`` if it is not set);
- ``GRANDCHILD <pid>`` with ``--grandchild``: it started a child of its own that ignores SIGTERM
  (and prints this once that child runs with SIGTERM ignored);
- ``READY`` with ``--wait``, once its signal handlers are in place; then, with ``--read``, it reads
  one line from stdin and prints ``READ <line>``;
- ``SIG <NAME>`` for each signal it receives, in order (every delivery, through the wakeup fd).

Without ``--wait`` it exits with ``--code`` at once (or, with ``--kill-self NAME``, kills itself with
that signal, default action restored). With ``--wait`` it waits for signals, and exits with
``--code`` when one named by ``--exit-on`` arrives. ``--ignore-term`` ignores SIGTERM altogether.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

HANDLED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
GRANDCHILD = (
    "import signal, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--kill-self", default=None)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--read", action="store_true")
    parser.add_argument("--exit-on", action="append", default=[])
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    args = parser.parse_args()

    say("START", os.getpid(), os.getpgrp())
    for name in args.env:
        say(f"ENV {name}={os.environ.get(name, '<unset>')}")
    if args.grandchild:
        grandchild = subprocess.Popen(
            [sys.executable, "-c", GRANDCHILD], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert grandchild.stdout is not None
        assert grandchild.stdout.readline() == "up\n"
        say("GRANDCHILD", grandchild.pid)
    if args.kill_self is not None:
        sig = signal.Signals[args.kill_self]
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    if not args.wait:
        return int(args.code)

    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for name in HANDLED:
        if name == "SIGTERM" and args.ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.Signals[name], lambda *_: None)
    say("READY")
    if args.read:
        say("READ", sys.stdin.readline().strip())
    while True:
        for byte in os.read(r, 64):
            name = signal.Signals(byte).name
            say("SIG", name)
            if name in args.exit_on:
                return int(args.code)


if __name__ == "__main__":
    sys.exit(main())
