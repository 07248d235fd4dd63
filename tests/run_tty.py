"""Start a program with a pseudo-terminal as its controlling terminal: not a test module.

``python run_tty.py TTY PROGRAM [ARGS...]``, started as a session leader (``start_new_session``):
it opens the terminal ``TTY`` (the slave side of a pty), which becomes the session's controlling
terminal with this process group in the foreground, makes it stdin, stdout and stderr, and execs
``PROGRAM``. ``tests/test_run.py`` uses it to run ``gpuboss run`` as a terminal's foreground job.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios


def main() -> None:
    tty, program = sys.argv[1], sys.argv[2:]
    fd = os.open(tty, os.O_RDWR)
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
