"""A consumer's load, unload and health check, run against the stand-in engines of
``tests/engines.py`` (real HTTP servers in their own processes) and real child processes; docker
and systemd as the commands they run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Child

from gpuboss.consumers.actions import Actions, service_command
from gpuboss.consumers.registry import Consumer
from gpuboss.fakenvml import FakeNvml
from gpuboss.probe import NvmlProbe
from gpuboss_client import BackendUnavailable, BadRequest

ENGINES = Path(__file__).with_name("engines.py")
GiB = 1024


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"gpus": [{"total": "24GiB"}]}), encoding="utf-8")
    return path


def engine(children: list[Child], state: Path, *args: str) -> str:
    child = Child(ENGINES, "", *args, "--state", str(state), "--delay", "0.05")
    children.append(child)
    return f"http://127.0.0.1:{child.expect('LISTENING')[1]}"


def used(state: Path) -> int:
    return NvmlProbe(FakeNvml.from_file(state)).devices()[0].used_mib


def run(consumer: Consumer, *steps: tuple[str, Any]) -> list[Any]:
    """Run ``(method, argument)`` steps of one :class:`Actions` in one event loop; their results."""

    async def main() -> list[Any]:
        actions = Actions(consumer)
        try:
            out = []
            for name, arg in steps:
                method = getattr(actions, name)
                out.append(await (method() if arg is None else method(arg)))
            return out
        finally:
            await actions.aclose()

    return asyncio.run(main())


def test_ollama_loads_and_unloads_one_model_at_a_time(state: Path, children: list[Child]) -> None:
    url = engine(children, state, "ollama", "--model", "llama3.1:8b=6GiB", "--model", "qwen2.5:14b=10GiB")
    c = Consumer(
        name="ollama", preset="ollama", url=url, models={"llama3.1:8b": "6GiB", "qwen2.5:14b": "10GiB"}
    )
    run(c, ("load", "llama3.1:8b"), ("load", "qwen2.5:14b"))
    assert used(state) == 16 * GiB
    run(c, ("unload", "llama3.1:8b"))
    assert used(state) == 10 * GiB
    assert run(c, ("healthy", None)) == [True]  # the preset's /api/version
    with pytest.raises(BadRequest, match="has no model 'nope'"):
        run(c, ("load", "nope"))
    with pytest.raises(BadRequest, match="which model"):
        run(c, ("load", None))


def test_vllm_sleeps_on_unload_and_wakes_on_load(state: Path, children: list[Child]) -> None:
    url = engine(children, state, "vllm", "--model", "m=20GiB")
    c = Consumer(name="vllm", preset="vllm", url=url, vram="20GiB")
    assert used(state) == 20 * GiB
    run(c, ("unload", None))
    assert used(state) == 0
    run(c, ("load", None))
    assert used(state) == 20 * GiB


def test_comfyui_is_lazy_and_frees_on_unload(state: Path, children: list[Child]) -> None:
    url = engine(children, state, "comfyui", "--model", "flux=13GiB")
    c = Consumer(name="comfyui", preset="comfyui", url=url, vram="13GiB")
    run(c, ("load", None))  # nothing to load ahead: it loads on the first prompt
    assert used(state) == 0
    httpx.post(f"{url}/prompt", json={}, timeout=10).raise_for_status()  # a user's first prompt
    assert used(state) == 13 * GiB
    run(c, ("unload", None))
    assert used(state) == 0


def test_plain_http_actions_and_a_refusal(state: Path, children: list[Child]) -> None:
    url = engine(children, state, "plain", "--model", "mvoice=2345MiB")
    c = Consumer(name="mvoice", url=url, vram="2345MiB", load={"path": "/load"}, unload={"path": "/unload"})
    run(c, ("load", None))
    assert used(state) == 2345
    run(c, ("unload", None))
    assert used(state) == 0
    wrong = Consumer(name="mvoice", url=url, vram=1, load={"path": "/nowhere"})
    with pytest.raises(BackendUnavailable, match="answered 404"):
        run(wrong, ("load", None))


def test_an_unreachable_consumer_fails_and_is_unhealthy() -> None:
    c = Consumer(
        name="gone", url="http://127.0.0.1:9", vram=1, load={"path": "/load", "timeout": 2}, health={}
    )
    with pytest.raises(
        BackendUnavailable, match=re.escape("consumer gone: POST http://127.0.0.1:9/load failed")
    ):
        run(c, ("load", None))
    assert run(c, ("healthy", None)) == [False]


def test_a_command_consumer_is_a_child_process_stopped_by_its_signal(tmp_path: Path) -> None:
    """gpuboss starts the process on load and stops it on unload: with its stop signal, and with
    SIGKILL if it does not stop within stop_timeout."""
    ready = tmp_path / "ready"
    script = (
        "import pathlib, signal, sys, time\n"
        f"if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r} + sys.argv[1]).write_text('')\n"
        "while True: time.sleep(1)\n"
    )
    for mode in ("polite", "stubborn"):
        c = Consumer(
            name="llama-server", preset="llamacpp", url="http://127.0.0.1:8080", vram="5GiB",
            command={"argv": [sys.executable, "-c", script, mode], "stop_timeout": 0.5},
        )  # fmt: skip

        async def main(c: Consumer = c, mode: str = mode) -> int | None:
            actions = Actions(c)
            await actions.load()
            proc = actions._process
            assert proc is not None
            while not Path(f"{ready}{mode}").exists():  # the child says it is up: nothing to block on
                await asyncio.sleep(0.01)
            await actions.unload()
            await actions.aclose()
            return proc.returncode

        assert asyncio.run(main()) == (-15 if mode == "polite" else -9)


def test_docker_and_systemd_run_their_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls"
    for tool in ("docker", "systemctl"):
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n[ "$2" != "broken.service" ]\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    docker = Consumer(name="cosyvoice", url="http://h:1", vram=1, docker={"container": "cosyvoice"})
    unit = Consumer(name="vidi", url="http://h:1", vram=1, systemd={"unit": "vidi.service", "user": True})
    run(docker, ("load", None), ("unload", None))
    run(unit, ("load", None), ("unload", None))
    assert log.read_text().splitlines() == [
        "docker start cosyvoice", "docker stop -t 10 cosyvoice",
        "systemctl --user start vidi.service", "systemctl --user stop vidi.service",
    ]  # fmt: skip
    broken = Consumer(name="b", url="http://h:1", vram=1, systemd={"unit": "broken.service"})
    assert service_command(broken, "start") == ["systemctl", "start", "broken.service"]
    with pytest.raises(BackendUnavailable, match=re.escape("systemctl start broken.service exited 1")):
        run(broken, ("load", None))
