"""``gpuboss run`` with real child processes against the real Redis.

Each test runs the installed ``gpuboss`` console script as its own process, in a session of its
own (no controlling terminal, so the command gets a process group of its own), with
``tests/run_child.py`` or a ``python -c`` program as the command, and reads what the command
prints on the wrapper's stdout. One test runs it as the foreground job of a pseudo-terminal
(``tests/run_tty.py``). The claims:

- the wrapper's exit status is the command's (128+N when signal N killed it), 127 / 126 when it
  cannot be started, 11 when the lease was not granted in time, 14 when an eviction stopped the
  command, 7 when a lost lease did; it prints nothing on stdout;
- the command sees the lease's environment (CUDA_VISIBLE_DEVICES of the leased device);
- signals sent to the wrapper reach the command; an eviction sends SIGTERM, and SIGKILL (to the
  command's whole process group) before the deadline; the memory goes to the new request;
- the lease is released on every path, a wrapper killed outright takes its command with it and its
  lease expires after the TTL; a request interrupted while waiting leaves the queue.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis
from support import LINE_WAIT_S, Events, state, used, wait_for
from typer.testing import CliRunner

from gpuboss_cli.main import app
from gpuboss_client import Boss, PoolKeys

pytestmark = pytest.mark.slow

GPUBOSS = Path(sys.executable).parent / "gpuboss"
CHILD = Path(__file__).with_name("run_child.py")
TTY = Path(__file__).with_name("run_tty.py")
DEVICE_MIB = 8192
CUDA_INDEX = 3
PY = Path(sys.executable).name  # the default holder name: the command's basename
WAIT_S = 20.0  # generous bound for a wrapper to finish on a loaded machine


def child(*args: str) -> list[str]:
    """``-- python run_child.py ARGS``: the command part of a ``gpuboss run`` command line."""
    return ["--", sys.executable, str(CHILD), *args]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it holds no memory any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Lines:
    """Lines of a stream, read by a thread, waited for with a bound."""

    def __init__(self, chunks: Iterable[str]) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(chunks,), daemon=True)
        self._thread.start()

    def _read(self, chunks: Iterable[str]) -> None:
        for line in chunks:
            self._q.put(line.rstrip("\r\n"))
        self._q.put(None)

    def expect(self, prefix: str, timeout: float = LINE_WAIT_S) -> list[str]:
        """Block until a line starting with ``prefix``; return its words."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout} s; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"the stream ended before {prefix!r}; got {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line.split()

    def rest(self) -> list[str]:
        """Every line, once the stream has ended."""
        self._thread.join(WAIT_S)
        while (line := self._q.get_nowait()) is not None:
            self.seen.append(line)
        return self.seen


def _env(redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    return env | {"GPUBOSS_REDIS_URL": redis_url} | (extra or {})


class Wrapper:
    """``gpuboss run ARGS`` in a session of its own, its stdout and stderr read line by line."""

    def __init__(self, redis_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(GPUBOSS), "run", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, start_new_session=True, env=_env(redis_url, env),
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def expect(self, prefix: str) -> list[str]:
        """The words of the command's next line starting with ``prefix``."""
        return self.out.expect(prefix)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def finish(self) -> tuple[int, list[str], list[str]]:
        """Wait for the wrapper to exit: its exit status, stdout lines and stderr lines."""
        code = self.proc.wait(WAIT_S)
        return code, self.out.rest(), self.err.rest()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


@pytest.fixture
def wrappers() -> Iterator[list[Wrapper]]:
    """Wrappers a test starts; any still running is killed with its group afterwards."""
    started: list[Wrapper] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def admin(real_redis: redis.Redis) -> Iterator[Boss]:
    """The test's own client, with one device of 8 GiB (CUDA index 3) in the ``default`` pool."""
    boss = Boss(real_redis, holder="test")
    boss.add_device("gpu0", DEVICE_MIB, cuda_index=CUDA_INDEX)
    yield boss
    boss.close()


def start(wrappers: list[Wrapper], redis_url: str, *args: str, env: dict[str, str] | None = None) -> Wrapper:
    w = Wrapper(redis_url, *args, env=env)
    wrappers.append(w)
    return w


def assert_nothing_held(admin: Boss) -> None:
    assert admin.leases() == []
    assert admin.devices()[0].used_mib == 0


def lease_events(r: redis.Redis, lease_id: str) -> list[str]:
    entries: list[tuple[str, dict[str, str]]] = r.xrange(PoolKeys("default").events)  # type: ignore[assignment]
    return [f["event"] for _, f in entries if f.get("lease") == lease_id]


# -- exit status and environment


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--code", "0"], 0),
        (["--code", "3"], 3),
        (["--kill-self", "SIGUSR1"], 128 + signal.SIGUSR1),
        (["--kill-self", "SIGKILL"], 128 + signal.SIGKILL),
    ],
)
def test_exit_status_passes_through(
    args: list[str],
    expected: int,
    admin: Boss,
    real_redis: redis.Redis,
    redis_url: str,
    wrappers: list[Wrapper],
) -> None:
    w = start(wrappers, redis_url, "--quiet", "--vram", "1GiB", *child("--env", "GPUBOSS_LEASE_ID", *args))
    code, out, err = w.finish()
    assert code == expected, (out, err)
    assert err == []  # --quiet, and nothing went wrong
    assert len(out) == 2  # stdout is the command's alone
    assert out[0].startswith("START ")
    lease_id = out[1].removeprefix("ENV GPUBOSS_LEASE_ID=")
    assert state(real_redis, lease_id) == "released"
    assert lease_events(real_redis, lease_id) == ["granted", "released"]
    assert_nothing_held(admin)


def test_the_command_gets_the_lease_environment(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    names = ["CUDA_VISIBLE_DEVICES", "GPUBOSS_LEASE_ID", "GPUBOSS_LEASE_TOKEN", "GPUBOSS_DEVICE"]
    args = ["--vram", "2GiB", "--label", "model=tiny", "--label", "stage=test"]
    cmd = child("--wait", "--exit-on", "SIGTERM", *[a for n in names for a in ("--env", n)])
    # An inherited CUDA_VISIBLE_DEVICES is replaced by the leased device's.
    w = start(wrappers, redis_url, *args, *cmd, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    _, pid, pgid = w.expect("START")
    env = dict(w.expect(f"ENV {n}=")[1].split("=", 1) for n in names)
    w.expect("READY")

    (lease,) = admin.leases()
    assert env == {
        "CUDA_VISIBLE_DEVICES": str(CUDA_INDEX),
        "GPUBOSS_LEASE_ID": lease.id,
        "GPUBOSS_LEASE_TOKEN": str(lease.token),
        "GPUBOSS_DEVICE": "gpu0",
    }
    assert (lease.state, lease.mib, lease.device) == ("active", 2048, "gpu0")
    assert (lease.holder, lease.holder_pid) == (PY, w.proc.pid)
    assert lease.labels == {"model": "tiny", "stage": "test"}
    # No terminal: the command leads a process group of its own.
    assert int(pgid) == int(pid) != os.getpgid(w.proc.pid)

    w.signal(signal.SIGTERM)
    code, _, err = w.finish()
    assert code == 0
    assert err == [f"gpuboss run: lease {lease.id}: 2.0 GiB on default/gpu0 (CUDA_VISIBLE_DEVICES=3)"]
    assert state(real_redis, lease.id) == "released"
    assert_nothing_held(admin)


def test_holder_name_and_a_device_without_cuda_index(
    admin: Boss, redis_url: str, wrappers: list[Wrapper]
) -> None:
    admin.add_device("cpu0", 1024, pool="plain")
    args = ["--vram", "1GiB", "--pool", "plain", "--holder", "trainer"]
    w = start(
        wrappers, redis_url, *args, *child("--wait", "--exit-on", "SIGTERM", "--env", "CUDA_VISIBLE_DEVICES")
    )
    assert w.expect("ENV") == ["ENV", "CUDA_VISIBLE_DEVICES=<unset>"]
    w.expect("READY")
    (lease,) = admin.leases("plain")
    assert lease.holder == "trainer"
    w.signal(signal.SIGTERM)
    code, _, err = w.finish()
    assert code == 0
    assert "plain/cpu0 has no CUDA index: CUDA_VISIBLE_DEVICES is left as it was" in err[1]
    assert admin.leases("plain") == []


# -- signals


def test_signals_reach_the_command(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    w = start(
        wrappers, redis_url, "-q", "--vram", "1GiB", *child("--wait", "--exit-on", "SIGTERM", "--code", "5")
    )
    w.expect("READY")
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT):
        w.signal(sig)
        assert w.expect("SIG") == ["SIG", sig.name]  # one at a time, each exactly once
    w.signal(signal.SIGTERM)
    assert w.expect("SIG") == ["SIG", "SIGTERM"]
    code, out, err = w.finish()
    assert code == 5
    assert (out[-6:], err) == (
        [f"SIG {s}" for s in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGINT", "SIGTERM")],
        [],
    )
    assert_nothing_held(admin)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_that_kills_the_command_ends_the_wrapper_like_a_shell(
    sig: signal.Signals, admin: Boss, redis_url: str, wrappers: list[Wrapper]
) -> None:
    program = "import signal; print('READY', flush=True); signal.pause()"
    w = start(wrappers, redis_url, "-q", "--vram", "1GiB", "--", sys.executable, "-c", program)
    w.expect("READY")
    assert len(admin.leases()) == 1
    w.signal(sig)
    code, _, err = w.finish()
    assert code == 128 + sig  # Python dies of SIGINT after KeyboardInterrupt, and of SIGTERM
    # Nothing from the wrapper (-q); the KeyboardInterrupt traceback is the command's.
    assert err[-1:] == (["KeyboardInterrupt"] if sig == signal.SIGINT else [])
    assert_nothing_held(admin)


# -- eviction and loss


@pytest.mark.parametrize(
    ("flags", "requester_priority"),
    [(["--preemptible", "--priority", "low"], "high"), (["--idle-ok"], "normal")],
    ids=["preemptible", "idle-ok"],
)
def test_eviction_stops_the_command_and_hands_the_memory_over(
    flags: list[str],
    requester_priority: str,
    admin: Boss,
    real_redis: redis.Redis,
    redis_url: str,
    wrappers: list[Wrapper],
) -> None:
    args = ["--vram", "8GiB", "--grace", "5", *flags]
    w = start(
        wrappers, redis_url, *args, *child("--wait", "--exit-on", "SIGTERM", "--env", "GPUBOSS_LEASE_ID")
    )
    victim = w.expect("ENV GPUBOSS_LEASE_ID=")[1].split("=")[1]
    w.expect("READY")
    assert state(real_redis, victim) == ("idle" if "--idle-ok" in flags else "active")

    asked = time.monotonic()
    lease = admin.acquire(DEVICE_MIB, priority=requester_priority, timeout=10)
    waited = time.monotonic() - asked
    assert w.expect("SIG") == ["SIG", "SIGTERM"]
    code, _, err = w.finish()
    print(f"\nrequester held the device {waited * 1000:.0f} ms after asking")
    assert code == 14  # lease_evicted: gpuboss stopped the command
    assert waited < 3  # the command stopped on SIGTERM, long before the 5 s deadline
    assert state(real_redis, victim) == "released"  # given back, not revoked
    assert lease_events(real_redis, victim)[-2:] == ["evicting", "released"]
    assert any("is being evicted" in line and "SIGTERM" in line for line in err)
    assert err[-1] == f"gpuboss run: lease {victim} was evicted: {sys.executable} exited with 0"
    assert [x.id for x in admin.leases()] == [lease.id]
    assert admin.devices()[0].used_mib == DEVICE_MIB
    admin.release(lease)


@pytest.mark.parametrize("who_ignores", ["command", "grandchild"])
def test_what_ignores_sigterm_is_killed_before_the_deadline(
    who_ignores: str, admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    grace = 1.5
    ignore = ["--ignore-term"] if who_ignores == "command" else ["--exit-on", "SIGTERM"]
    cmd = child("--wait", "--grandchild", "--env", "GPUBOSS_LEASE_ID", *ignore)
    w = start(
        wrappers,
        redis_url,
        "--vram",
        "8GiB",
        "--preemptible",
        "--priority",
        "low",
        "--grace",
        str(grace),
        "--ttl",
        "1.0",  # below the grace: the deadline is the grace's, not the lease's expiry
        *cmd,
    )
    victim = w.expect("ENV GPUBOSS_LEASE_ID=")[1].split("=")[1]
    grandchild = int(w.expect("GRANDCHILD")[1])
    w.expect("READY")

    asked = time.monotonic()
    lease = admin.acquire(DEVICE_MIB, priority="high", timeout=10)
    waited = time.monotonic() - asked
    code, _, err = w.finish()
    print(f"\n{who_ignores} ignores SIGTERM: requester held the device {waited * 1000:.0f} ms after asking")
    assert code == 14
    assert not alive(grandchild)  # the whole group was killed, not only the command
    # Killed a little (0.3 s) before the deadline, and released, so the memory was handed over
    # before the deadline would have revoked the lease.
    assert grace - 0.3 - 0.2 < waited < grace
    assert state(real_redis, victim) == "released"
    assert any("SIGKILL" in line for line in err)
    assert [x.id for x in admin.leases()] == [lease.id]
    admin.release(lease)


def test_a_lost_lease_stops_the_command(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    args = ["--vram", "1GiB", "--ttl", "0.6", "--grace", "5"]
    w = start(
        wrappers, redis_url, *args, *child("--wait", "--exit-on", "SIGTERM", "--env", "GPUBOSS_LEASE_ID")
    )
    lease_id = w.expect("ENV GPUBOSS_LEASE_ID=")[1].split("=")[1]
    w.expect("READY")
    admin.force_release(lease_id)  # an operator takes it away: the next heartbeat finds it ended
    assert w.expect("SIG") == ["SIG", "SIGTERM"]
    code, _, err = w.finish()
    assert code == 7  # lease_lost
    assert any(f"lease {lease_id} was lost" in line for line in err), err
    assert state(real_redis, lease_id) == "force_released"
    assert_nothing_held(admin)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own (that it may stop), and its URL."""
    server = shutil.which("redis-server")
    assert server is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for("the private redis-server to listen", ready, WAIT_S)
        yield proc, url
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_losing_redis_stops_the_command_before_the_lease_expires(
    own_redis: tuple[subprocess.Popen[bytes], str], wrappers: list[Wrapper]
) -> None:
    server, url = own_redis
    with Boss.from_url(url, holder="test") as boss:
        boss.add_device("gpu0", DEVICE_MIB)
    ttl = 1.5
    w = start(wrappers, url, "--vram", "1GiB", "--ttl", str(ttl), *child("--wait", "--exit-on", "SIGTERM"))
    w.expect("READY")
    server.kill()  # the wrapper can renew nothing from now on
    gone = time.monotonic()
    assert w.expect("SIG") == ["SIG", "SIGTERM"]
    stopped = time.monotonic() - gone
    code, _, err = w.finish()
    print(f"\nthe command got SIGTERM {stopped * 1000:.0f} ms after Redis went away (ttl {ttl} s)")
    assert code == 7
    assert stopped < ttl  # before the server could have let the lease expire
    assert any("not renewed before the local deadline" in line for line in err), err


def test_a_killed_wrapper_takes_its_command_along_and_the_lease_expires(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    ttl = 1.0
    args = ["-q", "--vram", "8GiB", "--ttl", str(ttl)]
    w = start(wrappers, redis_url, *args, *child("--wait", "--env", "GPUBOSS_LEASE_ID"))
    pid = int(w.expect("START")[1])
    victim = w.expect("ENV GPUBOSS_LEASE_ID=")[1].split("=")[1]
    w.expect("READY")

    w.proc.kill()  # the wrapper only: its command is in a group of its own
    killed = time.monotonic()
    assert w.proc.wait(WAIT_S) == -signal.SIGKILL
    wait_for("the command to die with its wrapper", lambda: not alive(pid))
    lease = admin.acquire(DEVICE_MIB, timeout=ttl + 5)  # a waiter gets the memory once it expires
    waited = time.monotonic() - killed
    print(f"\nthe waiter held the device {waited * 1000:.0f} ms after the wrapper was killed")
    assert waited < ttl + 1
    assert state(real_redis, victim) == "expired"
    admin.release(lease)


# -- cannot start, not granted, interrupted, bad input


def test_command_not_found_asks_for_nothing(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    events = Events(real_redis)
    w = start(wrappers, redis_url, "--vram", "1GiB", "--", "gpuboss-no-such-command", "--flag")
    code, out, err = w.finish()
    assert (code, out, err) == (127, [], ["gpuboss run: gpuboss-no-such-command: command not found"])
    assert events.new() == []  # it never asked Redis for anything


def test_command_not_executable_is_126_and_releases(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper], tmp_path: Path
) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho never\n")
    script.chmod(0o644)
    events = Events(real_redis)
    w = start(wrappers, redis_url, "-q", "--vram", "1GiB", "--", str(script))
    code, out, err = w.finish()
    assert (code, out) == (126, [])
    assert err == [f"gpuboss run: {script}: cannot execute: Permission denied"]
    assert [e["event"] for e in events.new()] == ["granted", "released"]
    assert_nothing_held(admin)


def test_acquire_timeout_exits_11_and_leaves_nothing(
    admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    mine = admin.acquire(DEVICE_MIB, ttl=60, keepalive=False)  # no renewal moves the estimate
    w = start(wrappers, redis_url, "--vram", "1GiB", "--timeout", "0.3", *child("--code", "0"))
    code, out, err = w.finish()
    assert (code, out) == (11, [])  # the command never ran
    assert len(err) == 2, err
    assert err[0].startswith("gpuboss run: waiting in pool default: no device has room"), err
    assert err[1].startswith("error[acquire_timeout]: 1024 MiB not granted"), err
    assert [x.id for x in admin.leases()] == [mine.id]  # no waiter left behind
    assert used(real_redis) == DEVICE_MIB
    admin.release(mine)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_while_waiting_leaves_the_queue(
    sig: signal.Signals, admin: Boss, real_redis: redis.Redis, redis_url: str, wrappers: list[Wrapper]
) -> None:
    mine = admin.acquire(DEVICE_MIB)
    w = start(wrappers, redis_url, "--vram", "1GiB", *child("--code", "0"))
    wait_for("the wrapper to queue", lambda: any(x.state == "queued" for x in admin.leases()), WAIT_S)
    (waiter,) = [x for x in admin.leases() if x.state == "queued"]
    w.signal(sig)
    code, out, err = w.finish()
    assert (code, out) == (128 + sig, [])
    # How the wait stood (nothing fits; the estimate is the holder's expiry), then why it ended.
    assert err[0].startswith("gpuboss run: waiting in pool default: no device has room (about "), err
    assert err[1:] == [f"gpuboss run: {sig.name} while waiting for the lease: gave up the request"]
    assert [x.id for x in admin.leases()] == [mine.id]
    assert state(real_redis, waiter.id) == "force_released"
    admin.release(mine)


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command to run"),
        (["--vram", "lots", "--", "true"], "cannot read size 'lots'"),
        (["--vram", "1GiB", "--vram-gb", "1", "--", "true"], "exactly one of vram= and vram_gb="),
        (["--vram", "1GiB", "--priority", "urgent", "--", "true"], "priority must be"),
        (["--vram", "1GiB", "--label", "novalue", "--", "true"], "--label must be KEY=VALUE"),
        (["--vram", "1GiB", "--grace", "0", "--", "true"], "grace must be more than 0"),
        (["--vram", "1GiB", "--pool", "a/b", "--", "true"], "pool must be"),
    ],
)
def test_bad_input_changes_nothing(
    args: list[str], message: str, admin: Boss, real_redis: redis.Redis, redis_url: str
) -> None:
    before = Events(real_redis)
    result = runner.invoke(app, ["--redis-url", redis_url, "run", *args])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: "), result.stderr
    assert message in result.stderr
    assert result.stdout == ""
    assert before.new() == []
    assert_nothing_held(admin)


def test_a_boss_service_url_is_refused(admin: Boss) -> None:
    result = runner.invoke(app, ["--boss-url", "http://127.0.0.1:9", "run", "--vram", "1GiB", "--", "true"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: gpuboss run holds its lease through Redis")


def test_options_after_the_command_are_the_commands(
    admin: Boss, redis_url: str, wrappers: list[Wrapper]
) -> None:
    program = "import sys; print('ARGS', *sys.argv[1:])"
    w = start(
        wrappers, redis_url, "-q", "--vram", "1GiB", sys.executable, "-c", program, "-q", "--pool", "x", "--"
    )
    code, out, err = w.finish()
    assert (code, out, err) == (0, ["ARGS -q --pool x --"], [])


# -- a terminal's foreground job


def test_as_a_terminals_foreground_job(admin: Boss, redis_url: str) -> None:
    """In a terminal, the command shares the wrapper's process group: it reads the terminal, and
    gets Ctrl-C from the terminal itself, once; a SIGINT sent to the wrapper alone is passed on."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO  # lflag: what the test types is not echoed among the lines
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    args = [str(GPUBOSS), "run", "-q", "--vram", "1GiB"]
    cmd = child("--wait", "--read", "--exit-on", "SIGUSR2", "--code", "0")
    proc = subprocess.Popen(
        [sys.executable, str(TTY), os.ttyname(slave), *args, *cmd],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=_env(redis_url),
    )  # fmt: skip
    lines = Lines(_pty_lines(master))
    try:
        _, _, pgid = lines.expect("START")
        os.close(slave)  # now that the wrapper has it: reading ends when its processes end
        assert int(pgid) == proc.pid  # the wrapper's group: the terminal's foreground job
        lines.expect("READY")
        os.write(master, b"hello\n")
        assert lines.expect("READ") == ["READ", "hello"]  # it may read the terminal

        os.kill(proc.pid, signal.SIGINT)  # to the wrapper alone: passed on
        assert lines.expect("SIG") == ["SIG", "SIGINT"]
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        assert lines.expect("SIG") == ["SIG", "SIGINT"]
        # Had the wrapper passed the terminal's SIGINT on, the command would get it again before
        # this SIGUSR2, which the wrapper takes after it (pending signals go lowest first).
        os.kill(proc.pid, signal.SIGUSR2)
        assert lines.expect("SIG") == ["SIG", "SIGUSR2"]
        assert proc.wait(WAIT_S) == 0
        assert [line for line in lines.rest() if line.startswith("SIG")] == ["SIG SIGINT"] * 2 + [
            "SIG SIGUSR2"
        ]
        assert_nothing_held(admin)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(master)


def _pty_lines(master: int) -> Iterator[str]:
    """Lines written to a pty, until every process has closed its terminal side."""
    buffer = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: nobody has the terminal open any more
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line.decode(errors="replace") for line in complete)
    if buffer:
        yield buffer.decode(errors="replace")
