"""``gpuboss run``: run any command under a VRAM lease.

The wrapper acquires the lease, starts the command with the lease's environment
(``CUDA_VISIBLE_DEVICES``, ``GPUBOSS_LEASE_ID``, ``GPUBOSS_LEASE_TOKEN``, ``GPUBOSS_DEVICE``),
heartbeats while it runs, forwards signals to it, stops it when the lease is evicted or lost, and
releases the lease on every way out. It exits like a shell would: with the command's exit status,
``128 + N`` if the command died of signal ``N``, 127 if it was not found and 126 if it could not be
executed. Its own exit codes are those of the error table: 11 (the lease was not granted within
``--timeout``), 14 (the lease was evicted and gpuboss stopped the command), 7 (the lease was lost
and gpuboss stopped the command), 2 (bad input), 12 (Redis unreachable).

Process groups. When the wrapper is the foreground job of a terminal, the command stays in the
wrapper's process group, so that it can read the terminal and the terminal's Ctrl-C, Ctrl-\\ and
hang-up reach it directly, once, as they would without the wrapper; the wrapper passes on only the
signals sent to it alone (``kill PID``), not those the terminal sent (the kernel's, by their
``si_code``). Otherwise (no terminal, a background job, a service) the command gets a process group
of its own, and every forwarded or stopping signal goes to that whole group, so that the command's
own children hear it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from gpuboss_client import (
    BadRequest,
    Boss,
    GpubossError,
    Lease,
    LeaseContext,
    LeaseEvicted,
    LeaseLost,
    WaitState,
)
from gpuboss_client.ops import DEFAULT_TTL

from .common import connect, exit_with
from .render import human_mib

__all__ = ["run"]

#: signals sent to the wrapper that it passes on to the command
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: signals a terminal sends to its whole foreground process group
TERMINAL = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGHUP})
#: while waiting for the lease, these end the wait (no command runs yet to hear them)
ABORTS_WAIT = TERMINAL | {signal.SIGTERM}
NOT_FOUND, NOT_EXECUTABLE = 127, 126
#: the longest a lost lease's command gets between SIGTERM and SIGKILL: well inside the margin the
#: client keeps between its local deadline and the server's expiry, so the command is gone before
#: the memory can be granted to anyone else
LOST_KILL_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

SI_KERNEL = 0x80  # si_code of a signal the kernel sent (a terminal's, for one): asm-generic/siginfo.h

log = logging.getLogger("gpuboss_client")


class _Interrupted(Exception):
    """A signal ended the wait for the lease."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Say:
    """Diagnostics on stderr, one short line each; ``--quiet`` keeps only the problems."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, line: str) -> None:
        if not self.quiet:
            self.problem(line)

    def problem(self, line: str) -> None:
        typer.echo(f"gpuboss run: {line}", err=True)

    def waiting(self, state: WaitState) -> None:
        """How the wait for the lease stands, each time it changes."""
        self.info(state.describe(time.monotonic()))


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _status(returncode: int) -> str:
    return f"died of {_signame(-returncode)}" if returncode < 0 else f"exited with {returncode}"


def _shell_code(returncode: int) -> int:
    """A shell's exit status for a child's ``returncode`` (``-N``: killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _labels(given: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in given or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"--label must be KEY=VALUE, not {item!r}")
        labels[key] = value
    return labels


def _foreground_job() -> bool:
    """Whether this process's group is the foreground job of its controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _child_setup(mask: set[int]) -> Callable[[], None]:
    """The command's ``preexec_fn``: the signal mask the wrapper started with and, on Linux, a
    SIGKILL from the kernel should the wrapper die.

    Only a wrapper killed outright (SIGKILL, the OOM killer) dies before its command; nobody would
    fence the command then, and its lease expires after the TTL while it still holds the memory.
    ``prctl`` is resolved here, before the fork, so that the child only makes system calls.
    """
    prctl: Callable[..., int] | None = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, option, kill = os.getpid(), _PR_SET_PDEATHSIG, int(signal.SIGKILL)

    def preexec() -> None:
        if prctl is not None:
            prctl(option, kill)
            if os.getppid() != parent:  # the wrapper died before the request was in place
                os.kill(os.getpid(), kill)
        # Signals that came for the command while it was being started are delivered now, with
        # their default action, as they would have been without the wrapper.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    return preexec


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs.

    Zombies do not count: they hold no memory, and one whose new parent never reaps it (some
    container inits do not) would otherwise look alive for ever. On Linux that takes reading
    ``/proc``; elsewhere ``killpg(pgid, 0)`` counts them.
    """
    if os.path.isdir("/proc/self/task"):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:  # it ended while we looked
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: it exists
        return True
    return True


@contextlib.contextmanager
def _entered(lease_ctx: LeaseContext) -> Iterator[None]:
    """Leave a lease context that was entered elsewhere: release, or raise LeaseLost."""
    try:
        yield
    except BaseException as exc:
        lease_ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    lease_ctx.__exit__(None, None, None)


@contextlib.contextmanager
def _client_logging(quiet: bool) -> Iterator[None]:
    """The client's warnings (failed heartbeats, a lost lease) as ``gpuboss run:`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpuboss run: %(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


class _Runner:
    """One run: the lease, the command, and the three threads that may stop it.

    The main thread takes the signals, starts the command, waits for it and releases (a thread
    of its own waits for the lease meanwhile). The client's eviction thread calls
    :meth:`_on_evict`, and a watcher thread checks that the lease is not lost; either stops the
    command through :meth:`stop`, which returns only once the command is gone, so that the memory
    is given back only after it is free.
    """

    def __init__(
        self,
        boss: Boss,
        argv: list[str],
        say: _Say,
        *,
        pool: str,
        grace: float,
        idle_ok: bool,
        own_group: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.boss = boss
        self.argv = argv
        self.name = argv[0]
        self.say = say
        self.pool = pool
        self.grace = grace
        self.idle_ok = idle_ok
        self.own_group = own_group
        self.clock = clock
        self.request_id = secrets.token_hex(8)
        self.waited: set[int] = set()  # the signals this run receives (blocked, then dequeued)
        self.child_mask: set[int] = set()  # the signal mask the command starts with
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()  # orders starting the command against stopping it
        self.reason: str | None = None  # why gpuboss stopped the command: "evicted" | "lost"
        self.gone = threading.Event()  # the command has exited, or will never start
        self.settled = threading.Event()  # no stop is under way
        self.settled.set()
        self.done = threading.Event()  # the wrapper is finishing: the watcher ends
        self.evict_thread: threading.Thread | None = None

    # -- the main thread

    def main(self, lease: Callable[..., LeaseContext]) -> int:
        """Run everything; returns the exit code.

        The forwarded signals (and SIGCHLD) are blocked in this thread from the start, so every
        thread started from now on (the client's heartbeat, notice and eviction threads included)
        has them blocked too, and this thread alone takes them, with ``sigtimedwait``, in order
        and with their origin. Signal handlers would not do: the kernel may hand a signal to any
        thread, and the handler then waits for the main thread to leave whatever call it is in.
        """
        forwarded = {s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN}  # keep ignoring
        self.waited = forwarded | {signal.SIGCHLD}
        sigint = signal.getsignal(signal.SIGINT)
        if signal.SIGINT in forwarded:  # Python's handler: the command should start with the default
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.child_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.waited)
        try:
            return self._main(lease)
        except _Interrupted as stop:
            self.say.info(f"{_signame(stop.signum)} while waiting for the lease: gave up the request")
            return 128 + stop.signum
        finally:
            while signal.sigtimedwait(self.waited, 0) is not None:
                pass  # signals that came after the command ended: nothing is left to hear them
            signal.pthread_sigmask(signal.SIG_SETMASK, self.child_mask)
            if signal.SIGINT in forwarded:
                signal.signal(signal.SIGINT, sigint if sigint is not None else signal.SIG_DFL)

    def _main(self, lease: Callable[..., LeaseContext]) -> int:
        lease_ctx = lease(request_id=self.request_id, on_evict=self._on_evict)
        code: int | None = None
        try:
            held = self._acquire(lease_ctx)
            with _entered(lease_ctx):
                code = self._hold(held)
        except LeaseLost as err:  # on leaving the lease's context, or before the command started
            if code is None:
                raise
            if self.reason is None:  # the command had ended by itself meanwhile: its status stands
                self.say.problem(err.message)
        finally:
            if self.evict_thread is not None:  # it releases the lease after _on_evict returns
                self.evict_thread.join(30)
        return code

    def _acquire(self, lease_ctx: LeaseContext) -> Lease:
        """Enter the lease's context in a thread of its own, while this one takes signals: a
        signal that ends the wait gives the request up."""
        outcome: list[Lease | BaseException] = []
        main = threading.get_ident()

        def acquire() -> None:
            try:
                outcome.append(lease_ctx.__enter__())
            except BaseException as exc:
                outcome.append(exc)
            finally:
                signal.pthread_kill(main, signal.SIGCHLD)  # wake the main thread

        threading.Thread(target=acquire, name="gpuboss-run-acquire", daemon=True).start()
        while not outcome:
            info = signal.sigtimedwait(self.waited, 1.0)
            if info is not None and info.si_signo in ABORTS_WAIT:
                # Leave the queue, or give the lease back if it was granted meanwhile; the
                # blocked acquire then finds its request ended.
                with contextlib.suppress(GpubossError):
                    self.boss.force_release(self.request_id, self.pool)
                raise _Interrupted(info.si_signo)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _hold(self, lease: Lease) -> int:
        watcher: threading.Thread | None = None
        returncode: int | None = None
        try:
            if self.idle_ok:
                lease.idle()
            self._announce(lease)
            watcher = threading.Thread(
                target=self._watch, args=(lease,), name="gpuboss-run-watch", daemon=True
            )
            watcher.start()
            failed = self._start({**os.environ, **lease.env})
            if failed is not None:
                return failed
            if self.proc is not None:
                returncode = self._wait()
        finally:
            self.done.set()
            if watcher is not None:
                watcher.join()
            self.settled.wait()  # a stop under way finishes (the command's group is cleared)
        if self.reason == "evicted":
            what = "was not started" if returncode is None else _status(returncode)
            self.say.info(f"lease {lease.id} was evicted: {self.name} {what}")
            return LeaseEvicted.exit_code
        if self.reason == "lost":
            what = "was not started" if returncode is None else _status(returncode)
            self.say.problem(f"lease {lease.id} was lost: {self.name} {what}")
            return LeaseLost.exit_code
        assert returncode is not None
        return _shell_code(returncode)

    def _announce(self, lease: Lease) -> None:
        where = f"{lease.pool}/{','.join(lease.devices)}"
        cuda = lease.env.get("CUDA_VISIBLE_DEVICES")
        how = f"CUDA_VISIBLE_DEVICES={cuda}" if cuda is not None else "no CUDA index known"
        idle = ", idle" if self.idle_ok else ""
        self.say.info(f"lease {lease.id}: {human_mib(lease.mib)} on {where} ({how}{idle})")
        if cuda is None:
            self.say.info(f"{where} has no CUDA index: CUDA_VISIBLE_DEVICES is left as it was")
        host = lease.info.device_host
        if host and host != socket.gethostname():
            self.say.problem(f"{where} is on host {host}, not on this one ({socket.gethostname()})")

    def _start(self, env: dict[str, str]) -> int | None:
        """Start the command; None, or the shell's exit code if it cannot be started."""
        with self.lock:
            if self.reason is not None:  # evicted or lost before it started: it never will
                self.gone.set()
                return None
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    env=env,
                    process_group=0 if self.own_group else None,
                    preexec_fn=_child_setup(self.child_mask),
                )
            except FileNotFoundError as exc:
                self.gone.set()
                # Like a shell: 127 if there is no such command, 126 if it is there but its
                # interpreter is not ("bad interpreter").
                path = env.get("PATH", os.defpath)
                found = os.path.exists(self.name) if "/" in self.name else shutil.which(self.name, path=path)
                if found:
                    self.say.problem(f"{self.name}: cannot execute: {exc.strerror}")
                    return NOT_EXECUTABLE
                self.say.problem(f"{self.name}: command not found")
                return NOT_FOUND
            except OSError as exc:  # permission denied, a directory, not an executable format
                self.gone.set()
                self.say.problem(f"{self.name}: cannot execute: {exc.strerror}")
                return NOT_EXECUTABLE
        return None

    def _wait(self) -> int:
        """Pass signals on until the command exits (SIGCHLD wakes this thread); its returncode."""
        assert self.proc is not None
        while (returncode := self.proc.poll()) is None:
            info = signal.sigtimedwait(self.waited, 1.0)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            # A terminal sends its signals to its whole foreground job, and so to a command
            # that shares our group: passing those on would deliver them twice.
            if not self.own_group and info.si_signo in TERMINAL and info.si_code == SI_KERNEL:
                continue
            self._signal(info.si_signo)
        self.gone.set()
        return returncode

    def _signal(self, signum: int) -> None:
        """Send ``signum`` to the command (its whole group when it has one of its own)."""
        proc = self.proc
        if proc is None or self.gone.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)

    # -- the other threads

    def _on_evict(self, lease: Lease) -> None:
        """The client's eviction callback: stop the command by the deadline, then return (the
        client releases the lease next)."""
        self.evict_thread = threading.current_thread()
        margin = min(0.5, 0.2 * self.grace)  # SIGKILL that much before the deadline
        start = self.clock()
        kill_at = start + self.grace - margin
        if lease.evict_deadline_ms is not None:
            # The deadline is Redis time: map it to our clock through Redis's TIME, read after
            # `start`, so the estimate errs early (the notice itself may have come late).
            with contextlib.suppress(GpubossError, IndexError):
                now_ms = self.boss.status(lease.pool)[0].now_ms
                kill_at = start + (lease.evict_deadline_ms - now_ms) / 1000 - margin
        self.stop("evicted", kill_at, f"lease {lease.id} is being evicted (its memory is needed)")

    def _watch(self, lease: Lease) -> None:
        """Stop the command as soon as the lease is lost (not renewed in time, or ended)."""
        ttl = lease.ttl_ms / 1000
        while not self.done.is_set():
            reason = lease.lost_reason
            if reason is not None:
                kill_at = self.clock() + min(self.grace, 0.1 * ttl, LOST_KILL_S)
                self.stop("lost", kill_at, f"lease {lease.id} is lost ({reason})")
                return
            # Wake at the local deadline, and a few times a second for a loss Redis reported.
            self.done.wait(min(0.25, max(0.001, lease.deadline - self.clock())))

    def stop(self, reason: str, kill_at: float, why: str) -> None:
        """Stop the command: SIGTERM now, SIGKILL at ``kill_at`` (clock time) if it still runs.

        The first caller does it; any caller returns once no stop is under way and the command is
        gone (or will never start).
        """
        with self.lock:
            first = self.reason is None and not self.gone.is_set()
            if first:
                self.reason = reason
                self.settled.clear()
            proc = self.proc
        if first:
            try:
                if proc is not None:
                    self._terminate(proc.pid, kill_at, why)
            finally:
                self.settled.set()
        self.settled.wait()

    def _terminate(self, pid: int, kill_at: float, why: str) -> None:
        left = max(0.0, kill_at - self.clock())
        self.say.info(f"{why}: SIGTERM to {self.name}, SIGKILL in {left:.1f} s")
        self._signal(signal.SIGTERM)
        if not self.gone.wait(left):
            self.say.info(f"{self.name} still runs: SIGKILL")
            self._signal(signal.SIGKILL)
            self.gone.wait()
        if self.own_group:
            self._clear_group(pid, kill_at)

    def _clear_group(self, pgid: int, kill_at: float) -> None:
        """What the command left in its group got the SIGTERM too; SIGKILL it at ``kill_at``."""
        # Nothing to wait on for processes that are not our children: poll, until the deadline.
        while _group_alive(pgid) and self.clock() < kill_at:
            time.sleep(0.02)
        if _group_alive(pgid):
            self.say.info(f"processes left in the group of {self.name}: SIGKILL")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            give_up = self.clock() + 1.0
            while _group_alive(pgid) and self.clock() < give_up:
                time.sleep(0.02)


def run(
    ctx: typer.Context,
    vram: Annotated[
        str | None, typer.Option("--vram", metavar="SIZE", help="Memory to lease, e.g. 8GiB or 8192 (MiB).")
    ] = None,
    vram_gb: Annotated[
        float | None, typer.Option("--vram-gb", metavar="GIB", help="Memory to lease in GiB (or --vram).")
    ] = None,
    priority: Annotated[str, typer.Option("--priority", help="low, normal, high or 0-100.")] = "normal",
    pool: Annotated[str, typer.Option("--pool", "-p", help="The pool to lease from.")] = "default",
    device: Annotated[str | None, typer.Option("--device", help="A device (default: best fit).")] = None,
    devices: Annotated[int, typer.Option("--devices", help="A gang of this many devices.")] = 1,
    exclusive: Annotated[bool, typer.Option("--exclusive", help="Ask for the whole device.")] = False,
    preemptible: Annotated[
        bool,
        typer.Option("--preemptible", help="A request of strictly higher priority may evict the lease."),
    ] = False,
    idle_ok: Annotated[
        bool,
        typer.Option(
            "--idle-ok",
            help="Hold the lease idle: any request that needs the room may evict it (CMD is then "
            "stopped). Implies --preemptible.",
        ),
    ] = False,
    grace: Annotated[
        float, typer.Option("--grace", metavar="SECONDS", help="On eviction: from SIGTERM to SIGKILL.")
    ] = 10.0,
    ttl: Annotated[
        float, typer.Option("--ttl", metavar="SECONDS", help="The lease expires this long after a crash.")
    ] = DEFAULT_TTL,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", help="Give up waiting for the lease (default: wait)."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label (repeatable).")
    ] = None,
    holder: Annotated[
        str | None, typer.Option("--holder", help="Holder name (default: the command's name).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Say nothing unless something fails.")] = False,
) -> None:
    """Run CMD under a VRAM lease: gpuboss run --vram 8GiB -- CMD [ARGS...]

    CMD gets CUDA_VISIBLE_DEVICES of the leased device; the lease heartbeats while CMD runs.

    Signals reach CMD; an eviction stops it (SIGTERM, SIGKILL by the deadline); the lease ends with it.

    Exits with CMD's status: 128+N if signal N killed it, 127 or 126 if it could not start.

    gpuboss's own: 11 not granted in time, 14 evicted (CMD was stopped), 7 lease lost (CMD was stopped).
    """
    argv = list(ctx.args)
    if not argv:
        exit_with(BadRequest("no command to run: gpuboss run --vram SIZE -- CMD [ARGS...]"))
    if argv[0].startswith("-"):
        exit_with(BadRequest(f"no such option: {argv[0]} (put the command after --)"))
    say = _Say(quiet)
    if ("/" in argv[0] and not os.path.lexists(argv[0])) or (
        "/" not in argv[0] and not shutil.which(argv[0])
    ):
        say.problem(f"{argv[0]}: command not found")  # before asking for any memory
        raise typer.Exit(NOT_FOUND)
    with _client_logging(quiet), connect(ctx) as cli_boss:
        if not isinstance(cli_boss, Boss):
            raise BadRequest(
                "gpuboss run holds its lease through Redis, not through a boss service: "
                "give --redis-url (or GPUBOSS_REDIS_URL)"
            )
        labels = _labels(label)
        name = holder if holder is not None else os.path.basename(argv[0])
        boss = Boss(cli_boss.redis, holder=name, confirm=cli_boss.confirm)
        runner = _Runner(
            boss, argv, say, pool=pool, grace=grace, idle_ok=idle_ok, own_group=not _foreground_job()
        )
        lease = functools.partial(
            boss.lease, vram, vram_gb=vram_gb, priority=priority, device=device, pool=pool, ttl=ttl,
            timeout=timeout, labels=labels, preemptible=preemptible or idle_ok, grace=grace,
            exclusive=exclusive, devices=devices, on_wait=say.waiting,
        )  # fmt: skip
        try:
            code = runner.main(lease)
        finally:
            boss.close()
    raise typer.Exit(code)
