"""``gpuboss watch`` and ``gpuboss events`` against the real Redis.

The frame and the event lines are pure functions, checked on their own; ``watch --once`` and
``events`` run in-process; the live views run as real processes: ``watch`` in a pseudo-terminal
(it redraws, reads q, and must restore the terminal), ``events --follow`` on a pipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console
from support import wait_for
from typer.testing import CliRunner, Result

from gpuboss_cli.main import app
from gpuboss_cli.render import event_line, usage_bar, watch_frame
from gpuboss_client import BadRequest, Boss, DeviceInfo, Event, LeaseInfo, PoolStatus

runner = CliRunner()
CLEAN_ENV: dict[str, str | None] = {
    "GPUBOSS_REDIS_URL": None,
    "GPUBOSS_BOSS_URL": None,
    "GPUBOSS_TOKEN": None,
    "COLUMNS": None,
}
SCRIPT = Path(sys.executable).parent / "gpuboss"
WAIT_S = 15.0  # generous: a process on a loaded machine may take seconds to start


def gb(url: str, *args: str) -> Result:
    return runner.invoke(app, ["--redis-url", url, *args], env=CLEAN_ENV)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result.stdout


def squeeze(text: str) -> list[str]:
    """The lines of ``text`` with runs of blanks made one space."""
    return [" ".join(line.split()) for line in text.splitlines()]


@pytest.fixture
def admin(real_redis: redis.Redis, redis_url: str) -> Iterator[Boss]:
    """A client of the flushed real Redis, holder "svc"."""
    with Boss.from_url(redis_url, holder="svc") as boss:
        yield boss


def child_env(redis_url: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_") and k not in ("COLUMNS", "LINES")
    }
    return env | {"GPUBOSS_REDIS_URL": redis_url, "TERM": "xterm-256color"}


# --- pure rendering ---------------------------------------------------------------------------


def device(
    name: str = "gpu0", total: int = 16384, reserved: int = 0, unmanaged: int = 0, used: int = 0
) -> DeviceInfo:
    return DeviceInfo(name, "default", "h1", 0, total, reserved, unmanaged, used, 1 if used else 0)


def lease(
    id: str, mib: int, state: str = "active", dev: str | None = "gpu0", priority: int = 50
) -> LeaseInfo:
    queued = state == "queued"
    return LeaseInfo(
        id=id, pool="default", state=state, holder="tts", holder_host="h1", holder_pid=7, mib=mib,
        priority=priority, device=dev, token=None if queued else 1, cuda_indexes=() if queued else (0,),
        device_host=None if queued else "h1", ttl_ms=10_000, expires_at_ms=1_010_000, requested_at_ms=995_000,
        granted_at_ms=None if queued else 995_000, ended_at_ms=None, reason=None, labels={"model": "m"},
    )  # fmt: skip


def cells(bar: str) -> dict[str, int]:
    return {ch: bar.count(ch) for ch in "▒█▓░"}


@pytest.mark.parametrize(
    ("dev", "idle", "width", "want"),
    [
        (device(used=8192 + 4096), 4096, 32, {"▒": 0, "█": 16, "▓": 8, "░": 8}),
        (device(total=24576, reserved=1024, used=0), 0, 24, {"▒": 1, "█": 0, "▓": 0, "░": 23}),
        (
            device(total=24576, reserved=1024, unmanaged=2048, used=21504),
            0,
            24,
            {"▒": 3, "█": 21, "▓": 0, "░": 0},
        ),
        # 1 MiB leased of 80 GiB still shows: every part that is not empty gets a cell
        (device(total=81920, used=1), 0, 30, {"▒": 0, "█": 1, "▓": 0, "░": 29}),
        # unmanaged use grew past the budget: the bar still fits its width
        (device(total=8192, unmanaged=8192, used=4096), 0, 20, {"▒": 13, "█": 7, "▓": 0, "░": 0}),
    ],
)
def test_usage_bar_splits_the_width_in_proportion(
    dev: DeviceInfo, idle: int, width: int, want: dict[str, int]
) -> None:
    bar = usage_bar(dev, idle, width)
    assert cells(bar.plain) == want
    assert len(bar.plain) == width
    assert bar.plain == "".join(ch * n for ch, n in want.items())  # grey, in use, idle, free


def render(renderable: object, width: int = 200) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
    console.print(renderable)
    console.file.close()
    return console.export_text()


def test_watch_frame_shows_bars_leases_and_queue() -> None:
    pools = [
        PoolStatus("default", 1_000_000, [device(used=12288), device("gpu1", 8192)], 2, 1),
        PoolStatus("big", 1_000_000, [], 0, 0),
    ]
    leases = [
        lease("a1", 8192),
        lease("i1", 4096, "idle"),
        lease("w1", 6144, "queued", dev=None, priority=90),
    ]
    text = render(watch_frame(pools, leases, header="gpuboss watch: here at 12:00:00"))
    lines = squeeze(text)
    assert lines[0] == "gpuboss watch: here at 12:00:00"
    assert "pool default: 2 devices, 2 granted, 1 queued" in lines
    gpu0 = next(line for line in lines if line.startswith("gpu0 "))
    # device, host, cuda, bar (15 in use, 8 idle, 7 free of 30), in use, idle, free, budget, leases
    assert gpu0 == f"gpu0 h1 0 {'█' * 15}{'▓' * 8}{'░' * 7} 8.0 GiB 4.0 GiB 4.0 GiB 16.0 GiB 1"
    gpu1 = next(line for line in lines if line.startswith("gpu1 "))
    assert gpu1 == f"gpu1 h1 0 {'░' * 30} 0 MiB 0 MiB 8.0 GiB 8.0 GiB 0"
    a1 = next(line for line in lines if line.startswith("a1 "))
    assert a1 == "a1 tts h1:7 gpu0 8.0 GiB 50 (normal) active 10.0 model=m"
    assert next(line for line in lines if line.startswith("i1 ")).split()[-3] == "idle"
    w1 = next(line for line in lines if line.startswith("1 w1 "))
    assert w1 == "1 w1 tts h1:7 (any) 6.0 GiB 90 (high) 5.0 10.0"
    assert "pool big: 0 devices, 0 granted, 0 queued" in lines
    assert "No leases in pool big." in lines
    assert "Queue of pool big is empty." in lines
    assert text.index("pool default") < text.index("pool big")


def test_watch_frame_without_devices_and_with_an_error() -> None:
    lines = squeeze(
        render(watch_frame([], [], header="h", error="refresh failed: error[backend_unavailable]: x"))
    )
    assert lines[:2] == ["h", "refresh failed: error[backend_unavailable]: x"]
    assert "No devices. Add one with: gpuboss devices add NAME --vram 24GiB" in lines


def test_event_line() -> None:
    ms = 1_700_000_000_123
    when = datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S.123")
    granted = Event("default", f"{ms}-0", "granted", {"lease": "a1", "holder": "tts", "device": "gpu0",
                    "mib": "8192", "priority": "90", "token": "3"})  # fmt: skip
    assert (
        event_line(granted)
        == f"{when} default    granted        lease=a1 holder=tts device=gpu0 8.0 GiB priority=90 token=3"
    )
    added = Event(
        "big",
        f"{ms}-1",
        "device_added",
        {"device": "b0", "total_mib": "81920", "reserved_mib": "0", "host": "h2"},
    )
    assert (
        event_line(added)
        == f"{when} big        device_added   device=b0 total=80.0 GiB reserved=0 MiB host=h2"
    )
    queued = Event("default", f"{ms}-2", "queued", {"lease": "w", "holder": "x", "mib": "512", "want": ""})
    assert event_line(queued).endswith("queued         lease=w holder=x 512 MiB")


# --- watch --once and events, in-process -------------------------------------------------------


def test_watch_once(admin: Boss, redis_url: str) -> None:
    assert "No devices. Add one with" in ok(gb(redis_url, "watch", "--once"))
    admin.add_device("gpu0", "24GiB", reserved="1GiB", host="h1", cuda_index=0)
    admin.add_device("b0", "8GiB", pool="big", host="h2")
    held = admin.acquire("16GiB", labels={"model": "llama"}, ttl=60)
    warm = admin.acquire("4GiB", ttl=60)
    admin.idle(warm)
    out = ok(gb(redis_url, "watch", "--once"))
    lines = squeeze(out)
    assert lines[0].startswith(f"gpuboss watch: {redis_url} at ")
    assert "q quits" not in out
    gpu0 = next(line for line in lines if line.startswith("gpu0 "))
    assert gpu0.split()[:3] == ["gpu0", "h1", "0"]
    bar = gpu0.split()[3]
    assert cells(bar) == {"▒": 1, "█": 20, "▓": 5, "░": 4}  # 1 reserved, 16 in use, 4 idle, 3 free GiB of 24
    assert gpu0.split()[4:] == ["16.0", "GiB", "4.0", "GiB", "3.0", "GiB", "23.0", "GiB", "2"]
    for x in (held, warm):
        assert any(line.startswith(f"{x.id} svc ") for line in lines)
    assert "pool big: 1 device, 0 granted, 0 queued" in lines
    only_big = ok(gb(redis_url, "watch", "--once", "--pool", "big"))
    assert "b0" in only_big
    assert "gpu0" not in only_big
    assert f"{redis_url}, pool big at" in only_big


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "1e9"])
def test_watch_bad_interval_is_a_bad_request(admin: Boss, redis_url: str, interval: str) -> None:
    result = gb(redis_url, "watch", "--interval", interval)
    assert result.exit_code == BadRequest.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: --interval must be"), result.stderr


def test_events_recent_text_and_json(admin: Boss, redis_url: str) -> None:
    assert ok(gb(redis_url, "events")) == "No events.\n"
    assert ok(gb(redis_url, "events", "--json")) == ""
    admin.add_device("gpu0", "8GiB")
    admin.add_device("b0", "8GiB", pool="big")
    lease_ = admin.acquire("2GiB", ttl=60)
    admin.release(lease_)
    want = admin.events()
    assert [e.name for e in want] == ["device_added", "device_added", "granted", "released"]

    assert ok(gb(redis_url, "events")).splitlines() == [event_line(e) for e in want]
    lines = ok(gb(redis_url, "events", "--json")).splitlines()
    assert [json.loads(line) for line in lines] == [e.to_dict() for e in want]
    assert ok(gb(redis_url, "events", "-n", "2")).splitlines() == [event_line(e) for e in want[-2:]]
    only_big = ok(gb(redis_url, "events", "--pool", "big", "--json")).splitlines()
    assert [json.loads(line)["fields"]["device"] for line in only_big] == ["b0"]
    assert ok(gb(redis_url, "events", "--pool", "none")) == "No events in pool none.\n"

    for bad in (["-n", "0"], ["-n", "1001"], ["--pool", "a/b"]):
        result = gb(redis_url, "events", *bad)
        assert result.exit_code == BadRequest.exit_code, (bad, result.stderr)
        assert result.stderr.startswith("error[bad_request]: ")


# --- events --follow as a process ------------------------------------------------------------


class Lines:
    """A process's stdout, line by line, read by a thread; :meth:`expect` waits with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait(self, what: str, pred: Callable[[list[str]], bool], timeout: float = WAIT_S) -> list[str]:
        """Block until ``pred(lines)`` holds; return the lines."""
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.lines) or self._done, timeout) or not pred(
                self.lines
            ):
                raise AssertionError(f"no {what} within {timeout} s (exit {self.proc.poll()}): {self.lines}")
            return list(self.lines)

    def expect(self, n: int, timeout: float = WAIT_S) -> list[str]:
        """Block until ``n`` lines were printed; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.lines) >= n or self._done, timeout):
                raise AssertionError(f"only {len(self.lines)} of {n} lines within {timeout} s: {self.lines}")
            assert len(self.lines) >= n, f"exited ({self.proc.poll()}) after {self.lines}"
            return list(self.lines)


@contextlib.contextmanager
def follow(env: dict[str, str], *args: str) -> Iterator[Lines]:
    proc = subprocess.Popen(
        [str(SCRIPT), "events", "--follow", "--json", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        yield Lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def by_pool(docs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Event documents per pool, in the order given.

    Order holds within a pool; across pools, events of the same millisecond have no order (each
    stream numbers its own entries), so a reader may show them either way.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["pool"], []).append(doc)
    return out


def stop_with_ctrl_c(lines: Lines) -> None:
    lines.proc.send_signal(signal.SIGINT)
    assert lines.proc.wait(WAIT_S) == 0
    assert lines.proc.stderr is not None
    assert lines.proc.stderr.read() == ""


@pytest.mark.slow
def test_events_follow_prints_new_events_until_ctrl_c(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "8GiB")
    first = admin.acquire("1GiB", ttl=60)
    with follow(child_env(redis_url), "--count", "1") as out:
        [line] = out.expect(1)
        assert json.loads(line) == admin.events(count=1)[0].to_dict()  # the recent one: granted
        second = admin.acquire("2GiB", request_id="second", ttl=60)
        admin.release(first)
        # a pool that appears while following is picked up too
        admin.add_device("b0", "8GiB", pool="later")
        docs = by_pool(json.loads(x) for x in out.expect(4)[1:])
        assert {pool: [(d["event"], d["fields"].get("lease")) for d in x] for pool, x in docs.items()} == {
            "default": [("granted", second.id), ("released", first.id)],
            "later": [("device_added", None)],
        }
        assert docs == by_pool(e.to_dict() for e in admin.events(count=4)[1:])
        stop_with_ctrl_c(out)
    assert len(out.lines) == 4  # nothing twice


def blocked_on_xread(r: redis.Redis) -> bool:
    return any(c["cmd"] == "xread" for c in r.client_list())


@pytest.mark.slow
def test_events_follow_one_pool_from_now(admin: Boss, redis_url: str, real_redis: redis.Redis) -> None:
    admin.add_device("gpu0", "8GiB")
    admin.add_device("b0", "8GiB", pool="big")
    with follow(child_env(redis_url), "--pool", "big", "--count", "0") as out:
        # --count 0 prints nothing first: wait until it blocks reading the stream, cursor taken
        wait_for("the follower to block on XREAD", lambda: blocked_on_xread(real_redis), WAIT_S)
        admin.acquire("1GiB", ttl=60)  # default pool: not shown
        big = admin.acquire("1GiB", pool="big", ttl=60)
        [line] = out.expect(1)
        doc = json.loads(line)
        assert (doc["pool"], doc["event"], doc["fields"]["lease"]) == ("big", "granted", big.id)
        stop_with_ctrl_c(out)
    assert len(out.lines) == 1


@pytest.mark.slow
def test_watch_to_a_pipe_prints_frame_after_frame(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "24GiB")
    proc = subprocess.Popen(
        [str(SCRIPT), "watch", "--interval", "0.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(redis_url),
    )  # fmt: skip
    try:
        out = Lines(proc)
        out.wait("a frame", lambda lines: "Queue of pool default is empty." in lines)
        admin.acquire("1GiB", request_id="piped", ttl=60)
        lines = out.wait("the new lease", lambda lines: any(x.split()[:1] == ["piped"] for x in lines))
        assert sum(x.startswith("gpuboss watch: ") for x in lines) >= 2  # it came in a later frame
        assert "\x1b" not in "".join(lines)  # no cursor movement or colours on a pipe
        stop_with_ctrl_c(out)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


# --- watch in a pseudo-terminal ----------------------------------------------------------------

# Run the command as the session leader with the pty as its controlling terminal, so that Ctrl-C
# typed into the pty reaches it as SIGINT, as in a real terminal.
LAUNCH = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


class Terminal:
    """A process in a pseudo-terminal of 200x60; a thread collects what it draws."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
        self.modes = termios.tcgetattr(slave)
        self.slave = slave
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *argv],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        self.raw = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the slave has closed it
                data = b""
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                self.raw += data.decode(errors="replace")
                self._cond.notify_all()

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def expect(self, pattern: str, timeout: float = WAIT_S, start: int = 0) -> int:
        """Block until ``pattern`` shows after ``start`` (in the text without escape codes)."""
        with self._cond:
            if not self._cond.wait_for(lambda: pattern in self.text[start:], timeout):
                raise AssertionError(f"{pattern!r} not shown within {timeout} s: {self.text[-3000:]!r}")
            return self.text.index(pattern, start)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)
        os.close(self.slave)
        self._thread.join(WAIT_S)
        os.close(self.master)


@contextlib.contextmanager
def watch_in_terminal(redis_url: str) -> Iterator[Terminal]:
    term = Terminal([str(SCRIPT), "watch", "--interval", "0.2"], child_env(redis_url))
    try:
        yield term
    finally:
        term.close()


@pytest.mark.slow
def test_watch_shows_a_new_lease_live_and_ctrl_c_ends_it(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "24GiB", host="h1", cuda_index=0)
    with watch_in_terminal(redis_url) as term:
        start = term.expect("pool default: 1 device, 0 granted, 0 queued")
        assert ALT_SCREEN_ON in term.raw  # a full-screen view, like top
        lease_ = admin.acquire("6GiB", request_id="appears-live", labels={"model": "tts"}, ttl=60)
        term.expect("pool default: 1 device, 1 granted, 0 queued", start=start)
        term.expect("appears-live", start=start)
        admin.release(lease_)
        term.expect("No leases in pool default.", start=term.text.index("appears-live"))
        term.type(b"\x03")  # Ctrl-C
        assert term.proc.wait(WAIT_S) == 0
        assert term.raw.rindex(ALT_SCREEN_OFF) > term.raw.rindex(ALT_SCREEN_ON)  # screen given back
        assert "Traceback" not in term.text
        assert "Aborted" not in term.text
        assert termios.tcgetattr(term.slave) == term.modes  # echo and line mode restored


@pytest.mark.slow
def test_watch_quits_on_q(admin: Boss, redis_url: str) -> None:
    admin.add_device("gpu0", "24GiB")
    with watch_in_terminal(redis_url) as term:
        term.expect("pool default: 1 device")
        assert termios.tcgetattr(term.slave) != term.modes  # cbreak: keys arrive at once, unechoed
        term.type(b"q")
        assert term.proc.wait(WAIT_S) == 0
        assert term.raw.rindex(ALT_SCREEN_OFF) > term.raw.rindex(ALT_SCREEN_ON)
        assert termios.tcgetattr(term.slave) == term.modes
