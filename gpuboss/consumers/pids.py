"""Which processes on this host are a consumer, so the agent can measure its memory.

A consumer is found by what the boss knows of it: the child it started (``command``), the
container's main process (``docker inspect``), the unit's main process (``systemctl show``), or
the process that listens on the port of its URL when that URL names this host. The agent then
counts these processes and their descendants. Everything here reads ``/proc`` (Linux) or runs a
short command, so callers run it in a thread; none of it raises: a consumer whose processes
cannot be found is simply not measured.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .registry import Consumer

__all__ = ["consumer_pids", "is_local", "listener_pids", "locatable"]

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
#: seconds a docker or systemctl query may take
QUERY_TIMEOUT_S = 5.0


def is_local(host: str) -> bool:
    """Whether ``host`` (a URL's host) names this machine."""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return str(address) in mine


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listener_pids(port: int) -> set[int]:
    """The processes with a socket listening on TCP ``port`` (only those this user may look into)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return set()
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) in wanted:
                        found.add(int(entry.name))
                        break
                except OSError:
                    continue
    return found


def _query(argv: list[str]) -> int | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return int(text) if out.returncode == 0 and text.isdigit() and int(text) > 0 else None


def locatable(consumer: Consumer) -> bool:
    """Whether :func:`consumer_pids` finds the consumer's processes when it runs: it is a process,
    container or unit gpuboss manages, or it listens on this host."""
    host = urlsplit(consumer.url).hostname
    managed = consumer.command is not None or consumer.docker is not None or consumer.systemd is not None
    return managed or (host is not None and is_local(host))


def consumer_pids(consumer: Consumer, child: int | None = None) -> set[int]:
    """The processes that are ``consumer`` on this host: ``child`` (the process gpuboss started),
    the container's or unit's main process, or the listener on its URL's port; empty if none."""
    if child is not None:
        return {child}
    if consumer.docker is not None:
        pid = _query(["docker", "inspect", "--format", "{{.State.Pid}}", consumer.docker.container])
        if pid is not None:
            return {pid}
    if consumer.systemd is not None:
        user = ["--user"] if consumer.systemd.user else []
        pid = _query(["systemctl", *user, "show", "--property", "MainPID", "--value", consumer.systemd.unit])
        if pid is not None:
            return {pid}
    parts = urlsplit(consumer.url)
    if parts.hostname is None or not is_local(parts.hostname):
        return set()
    return listener_pids(parts.port or (443 if parts.scheme == "https" else 80))
