"""Finding a consumer's processes on this host (``gpuboss.consumers.pids``), with real listening
sockets and child processes, and docker and systemctl as executables on PATH that answer like the
real ones."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuboss.consumers.pids import consumer_pids, is_local, listener_pids, locatable
from gpuboss.consumers.registry import Consumer


@pytest.fixture
def listener() -> Iterator[int]:
    """A port this process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_the_listener_on_a_port_is_found(listener: int) -> None:
    assert listener_pids(listener) == {os.getpid()}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening
        assert listener_pids(port) == set()


def test_a_listener_in_another_process_is_found() -> None:
    code = "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
    code += "print(s.getsockname()[1], flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        found = consumer_pids(Consumer(name="engine", url=f"http://localhost:{port}", vram=1))
        assert found == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_remote_urls_are_not_looked_for(listener: int) -> None:
    remote = Consumer(name="far", url=f"http://192.0.2.7:{listener}", vram=1)
    assert not is_local("192.0.2.7")
    assert not locatable(remote)
    assert consumer_pids(remote) == set()
    assert is_local("127.0.0.1")
    assert is_local("localhost")
    assert is_local("::1")


def _tool(folder: Path, name: str, out: str, code: int = 0) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{out}'\nexit {code}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_containers_and_units_are_found_by_their_main_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tool(tmp_path, "docker", "4242")
    _tool(tmp_path, "systemctl", "31337")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    docker = Consumer(name="c", url="http://192.0.2.7:1", vram=1, docker={"container": "c"})
    unit = Consumer(name="u", url="http://192.0.2.7:1", vram=1, systemd={"unit": "u.service"})
    assert locatable(docker)
    assert consumer_pids(docker) == {4242}
    assert consumer_pids(unit) == {31337}
    # A stopped container (pid 0) or a failing tool: nothing found.
    _tool(tmp_path, "docker", "0")
    _tool(tmp_path, "systemctl", "", code=1)
    assert consumer_pids(docker) == set()
    assert consumer_pids(unit) == set()


def test_the_child_gpuboss_started_is_the_consumer() -> None:
    consumer = Consumer(name="c", url="http://192.0.2.7:1", vram=1, command={"argv": ["sleep", "1"]})
    assert consumer_pids(consumer, child=1234) == {1234}
