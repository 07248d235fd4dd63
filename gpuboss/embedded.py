"""The embedded default Redis: what ``gpuboss serve`` runs when no Redis URL is configured.

With ``redis-server`` on ``PATH`` it starts one as a child process, durable (append-only file,
fsynced every second) in ``<state_dir>/redis``, reachable only through a unix socket that only this
user may open. Without it, it runs an in-process fakeredis server on a free loopback port and warns
loudly that nothing persists.

The pieces are small functions so that each can be tested on its own: :func:`start_redis_server` /
:meth:`RedisChild.stop`, :func:`start_fakeredis` / :meth:`FakeRedisThread.stop`, and the context
manager :func:`embedded_redis` that picks one and always stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpuboss_client import BackendUnavailable
from gpuboss_client.scripts import NAMES, source

__all__ = [
    "NO_PERSISTENCE_WARNING",
    "SUN_PATH_MAX",
    "Embedded",
    "FakeRedisThread",
    "RedisChild",
    "embedded_redis",
    "find_redis_server",
    "redis_config",
    "socket_path_for",
    "start_fakeredis",
    "start_redis_server",
]

log = logging.getLogger("gpuboss.embedded")

#: the longest unix socket path the kernel takes (``sun_path`` is 108 bytes with its NUL)
SUN_PATH_MAX = 107
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOCK_NAME = "embedded.pid"
LOCK_WAIT_S = 2.0
# Polls with their own deadline: redis-py's default retries would sleep seconds inside one PING.
_NO_RETRY = Retry(NoBackoff(), 0)

NO_PERSISTENCE_WARNING = """\
WARNING: no redis-server on PATH, so gpuboss runs on an in-memory fakeredis server.
NOTHING PERSISTS: every device, lease and event is lost when this process stops, and only
processes on this machine can reach it. It is fine for a try-out, not for real work. To fix it:
  - install Redis (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)
    and start gpuboss serve again: it then runs a durable redis-server of its own, or
  - point gpuboss at a Redis you run: GPUBOSS_REDIS_URL=redis://HOST:6379/0 (or --redis-url)."""


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on ``PATH``, or None."""
    return shutil.which("redis-server")


# ---------------------------------------------------------------------------------------------
# Where the socket goes


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= SUN_PATH_MAX


def _private_dir(path: Path) -> bool:
    """Create ``path`` 0700 or accept it if it is already ours, a real directory, and private."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    # A shared temp dir: anyone could have made this name first, or planted a symlink there.
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def socket_path_for(state_dir: Path) -> Path | None:
    """The unix socket of the embedded Redis of ``state_dir``, or None if none fits.

    ``<state_dir>/redis.sock`` when its path fits in ``sun_path`` (107 bytes); otherwise a short
    name derived from the state dir, so it stays the same from one start to the next:
    ``$XDG_RUNTIME_DIR/gpuboss-<hash>.sock``, else ``<tmp>/gpuboss-<uid>/<hash>.sock`` in a
    directory only this user may enter. None means: listen on a loopback port instead.
    """
    state_dir = state_dir.absolute()
    first = state_dir / "redis.sock"
    if _fits(first):
        return first
    tag = hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:16]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute() and Path(runtime).is_dir():
        candidate = Path(runtime) / f"gpuboss-{tag}.sock"
        if _fits(candidate):
            return candidate
    for tmp in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        private = Path(tmp) / f"gpuboss-{os.getuid()}"
        candidate = private / f"{tag}.sock"
        if _fits(candidate) and Path(tmp).is_dir():
            try:
                if _private_dir(private):
                    return candidate
            except OSError:
                continue
    return None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# redis-server as a child process


def _quote(value: str) -> str:
    """A redis.conf argument: double-quoted, so paths with spaces or quotes survive."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def redis_config(data_dir: Path, *, unix_socket: Path | None, port: int = 0) -> str:
    """The ``redis.conf`` of the embedded server.

    Durable (AOF, fsync every second), never evicts keys (a lost lease key would corrupt the
    accounting), and expires keys 100 times a second. With ``unix_socket`` it has no TCP port at
    all and only this user may connect; otherwise it listens on ``127.0.0.1:<port>``.
    """
    lines = [
        "# Written by gpuboss serve at every start: edits here are overwritten.",
        f"dir {_quote(str(data_dir))}",
        "daemonize no",
        'logfile ""',
        "loglevel notice",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory-policy noeviction",
        "hz 100",
        "protected-mode yes",
    ]
    if unix_socket is not None:
        lines += ["port 0", f"unixsocket {_quote(str(unix_socket))}", "unixsocketperm 700"]
    else:
        lines += ["bind 127.0.0.1", f"port {port}"]
    return "\n".join(lines) + "\n"


class _StateLock:
    """An exclusive ``flock`` on ``<data_dir>/embedded.pid``: one embedded Redis per state dir.

    The lock's descriptor is also handed to the redis-server child, so the lock stays held for as
    long as either process lives: a server left running by a killed parent still blocks a second
    one from opening the same append-only file.
    """

    def __init__(self, data_dir: Path, wait_s: float = LOCK_WAIT_S) -> None:
        self.path = data_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A Redis that just stopped may leave a forked child (an AOF rewrite) holding the lock for
        # a moment after it exits: wait that out, briefly, before calling it a conflict.
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() > deadline:
                os.close(fd)
                pids = self.path.read_text(errors="replace").split()
                who = f" (gpuboss serve pid {pids[0]}, redis-server pid {pids[1]})" if len(pids) == 2 else ""
                raise BackendUnavailable(
                    f"another embedded Redis already runs on {data_dir.parent}{who}: stop that gpuboss "
                    "serve first, or give this one its own --state-dir (GPUBOSS_STATE_DIR)"
                ) from None
            time.sleep(0.02)  # another process holds it: flock has no timed wait to block on
        self.fd = fd
        self.write(os.getpid())

    def write(self, *pids: int) -> None:
        """Record who holds the lock (for the message a second server prints)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (" ".join(str(p) for p in pids) + "\n").encode(), 0)

    def release(self) -> None:
        """Let the next server start. The file stays: unlinking a lock file races its next taker."""
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies, if available.

    Without it a ``kill -9`` of ``gpuboss serve`` would leave its Redis running with nobody to
    stop it. The C function is looked up here, before the fork, so the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


@dataclass
class RedisChild:
    """A running redis-server child: its URL, data dir and process; :meth:`stop` ends it."""

    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    socket_path: Path | None
    _lock: _StateLock = field(repr=False)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (Redis then fsyncs the AOF and exits), wait, SIGKILL if it hangs; its exit code.

        Idempotent; the state dir's lock is released once the child is gone.
        """
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.error(
                        "redis-server (pid %d) ignored SIGTERM for %.0f s: killing it", self.pid, timeout_s
                    )
                    self.process.kill()
                    self.process.wait()
        finally:
            if self._lock.fd >= 0:
                self._lock.release()
                self._lock.fd = -1
        return self.process.returncode


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_for_ping(client: redis.Redis, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    pause = 0.005
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or loading the AOF
            if process.poll() is not None or time.monotonic() > deadline:
                raise
        # An external process coming up: nothing to block on but polling, with a deadline.
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def start_redis_server(
    state_dir: Path,
    *,
    binary: str = "redis-server",
    timeout_s: float = START_TIMEOUT_S,
    lock_wait_s: float = LOCK_WAIT_S,
) -> RedisChild:
    """Start ``binary`` on ``<state_dir>/redis`` and return once it answers PING.

    Raises :class:`BackendUnavailable` if another embedded Redis holds this state dir (after
    waiting up to ``lock_wait_s`` for it to let go), or if the server does not come up within
    ``timeout_s`` (the message carries the end of its log).
    """
    state_dir = state_dir.absolute()
    data_dir = state_dir / "redis"
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
        data_dir.chmod(0o700)  # leases name hosts and pids: not for other users to read
    except OSError as exc:
        raise BackendUnavailable(f"cannot create the embedded Redis's data dir {data_dir}: {exc}") from exc
    lock = _StateLock(data_dir, lock_wait_s)
    try:
        sock = socket_path_for(state_dir)
        if sock is not None:
            # We hold the lock, so a socket file left here is a dead server's.
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            url = f"unix://{sock}?db=0"
            client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1.0, retry=_NO_RETRY)
            conf = redis_config(data_dir, unix_socket=sock)
        else:
            port = _free_loopback_port()
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, retry=_NO_RETRY)
            conf = redis_config(data_dir, unix_socket=None, port=port)
        conf_path = data_dir / "redis.conf"
        conf_path.write_text(conf)
        log_path = data_dir / "redis.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [binary, str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(lock.fd,),
                # Its own process group: a Ctrl-C at the terminal reaches gpuboss serve only, which
                # stops the HTTP side first and this server last.
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        lock.write(os.getpid(), process.pid)
        log.info("started %s (pid %d) on %s; waiting for it to answer", binary, process.pid, data_dir)
    except BaseException:
        lock.release()
        raise
    child = RedisChild(url=url, data_dir=data_dir, process=process, socket_path=sock, _lock=lock)
    try:
        with client:
            _wait_for_ping(client, process, timeout_s)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        running = process.poll() is None
        code = child.stop(timeout_s=2.0)
        why = f"did not answer PING within {timeout_s:g} s ({exc})" if running else f"exited {code}"
        raise BackendUnavailable(
            f"the embedded redis-server ({binary}) did not start: it {why}. "
            f"The end of its log, {log_path}:\n{_log_tail(log_path)}"
        ) from None
    except BaseException:
        child.stop(timeout_s=2.0)
        raise
    return child


# ---------------------------------------------------------------------------------------------
# fakeredis in a thread


@dataclass
class FakeRedisThread:
    """An in-process fakeredis server on a loopback port, served by a thread; :meth:`stop` ends it."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        """Stop serving, close every connection and wait for the threads. Idempotent."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()


def _self_test(url: str, timeout_s: float) -> None:
    """Check that the server runs Lua through EVALSHA and delivers pub/sub (gpuboss needs both),
    and load gpuboss's scripts into it.

    fakeredis's TCP server closes a connection after any error reply, NOSCRIPT included, where
    Redis keeps it open; with every script loaded up front, EVALSHA never meets NOSCRIPT.
    """
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, retry=_NO_RETRY)
    try:
        try:
            sha = client.script_load("return ARGV[1]")
            ok = client.evalsha(sha, 0, "ok")
        except redis.ResponseError as exc:
            raise BackendUnavailable(
                f"fakeredis cannot run Lua ({exc}): install it with Lua, pip install 'fakeredis[lua]'"
            ) from None
        if ok != b"ok":
            raise BackendUnavailable(f"fakeredis ran a Lua script wrong: {ok!r}")
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            channel = f"gpuboss-selftest-{os.getpid()}"
            pubsub.subscribe(channel)
            if pubsub.get_message(timeout=timeout_s) is None:
                raise BackendUnavailable("fakeredis did not confirm a SUBSCRIBE")
            client.publish(channel, "ping")
            message = pubsub.get_message(timeout=timeout_s)
            if message is None or message.get("data") != b"ping":
                raise BackendUnavailable(f"fakeredis did not deliver a published message: {message!r}")
        finally:
            pubsub.close()
        for name in NAMES:
            client.script_load(source(name))
    finally:
        client.close()


def start_fakeredis(timeout_s: float = START_TIMEOUT_S) -> FakeRedisThread:
    """Serve a fresh in-memory fakeredis on a free ``127.0.0.1`` port and check it is usable.

    Raises :class:`BackendUnavailable` if fakeredis (with Lua) is not installed or fails its check.
    """
    try:
        import fakeredis
    except ImportError:
        raise BackendUnavailable(
            "no Redis to use: GPUBOSS_REDIS_URL is not set, there is no redis-server on PATH, and "
            "fakeredis is not installed. Install redis-server (apt-get install redis-server) or set "
            "GPUBOSS_REDIS_URL (or --redis-url)"
        ) from None
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0))
    port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="gpuboss-fakeredis", daemon=True
    )
    thread.start()
    fake = FakeRedisThread(url=f"redis://127.0.0.1:{port}/0", server=server, thread=thread)
    try:
        _self_test(fake.url, timeout_s)
    except BaseException:
        fake.stop()
        raise
    return fake


# ---------------------------------------------------------------------------------------------
# The choice


@dataclass(frozen=True, slots=True)
class Embedded:
    """What :func:`embedded_redis` brought up."""

    #: what clients should use (``GPUBOSS_REDIS_URL``)
    url: str
    kind: Literal["redis-server", "fakeredis"]
    #: whether state survives a restart
    durable: bool
    #: the data dir of a redis-server child (None for fakeredis)
    data_dir: Path | None
    #: the redis-server child's pid (None for fakeredis)
    pid: int | None


@contextlib.contextmanager
def embedded_redis(
    state_dir: Path,
    *,
    redis_server: str | None = None,
    use_path: bool = True,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Embedded]:
    """Bring up the embedded Redis for ``state_dir`` and stop it on exit, exceptions included.

    ``redis_server`` names the binary; by default it is looked up on ``PATH`` (``use_path=False``
    skips that and goes straight to fakeredis). Without a binary, fakeredis serves, and a loud
    warning goes to the log and to stderr.
    """
    binary = redis_server or (find_redis_server() if use_path else None)
    if binary is not None:
        child = start_redis_server(state_dir, binary=binary, timeout_s=timeout_s)
        log.info("embedded redis-server (pid %d) on %s, data in %s", child.pid, child.url, child.data_dir)
        try:
            yield Embedded(child.url, "redis-server", True, child.data_dir, child.pid)
        finally:
            code = child.stop()
            if code != 0:
                log.warning(
                    "embedded redis-server exited %d; its log is %s", code, child.data_dir / "redis.log"
                )
        return
    fake = start_fakeredis(timeout_s)
    log.warning("no redis-server on PATH: running on in-memory fakeredis at %s; NOTHING PERSISTS", fake.url)
    print(NO_PERSISTENCE_WARNING, file=sys.stderr, flush=True)
    try:
        yield Embedded(fake.url, "fakeredis", False, None, None)
    finally:
        fake.stop()
