"""The stand-in engines of ``tests/engines.py``: real HTTP servers in their own processes that
behave like Ollama, vLLM, ComfyUI and a plain load/unload service, and whose memory shows up in
the file-backed fake NVML. (The managed-consumer tests drive them; these check the stand-ins.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support import Child

from gpuboss.fakenvml import FakeNvml
from gpuboss.probe import NvmlProbe

ENGINES = Path(__file__).with_name("engines.py")
GiB = 1024


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"gpus": [{"total": "24GiB"}, {"total": "24GiB"}]}), encoding="utf-8")
    return path


def start(children: list[Child], state: Path, *args: str) -> httpx.Client:
    child = Child(ENGINES, "", *args, "--state", str(state), "--delay", "0.05")
    children.append(child)
    port = child.expect("LISTENING")[1]
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)


def used(state: Path) -> list[int]:
    """MiB in use per GPU, as the agent's probe reads the state file."""
    return [d.used_mib for d in NvmlProbe(FakeNvml.from_file(state)).devices()]


def test_ollama_loads_on_generate_unloads_with_keep_alive_0_and_lists_sizes(
    state: Path, children: list[Child]
) -> None:
    ollama = start(children, state, "ollama", "--model", "llama3.1:8b=6GiB", "--model", "qwen2.5:14b=10GiB")
    assert used(state) == [0, 0]
    assert ollama.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}).json()["done"]
    assert ollama.post("/api/generate", json={"model": "qwen2.5:14b", "prompt": "hi"}).status_code == 200
    assert used(state) == [16 * GiB, 0]
    ps = ollama.get("/api/ps").json()["models"]
    assert {(m["name"], m["size_vram"]) for m in ps} == {
        ("llama3.1:8b", 6 * 2**30),
        ("qwen2.5:14b", 10 * 2**30),
    }
    reply = ollama.post("/api/generate", json={"model": "llama3.1:8b", "keep_alive": 0}).json()
    assert reply["done_reason"] == "unload"
    assert used(state) == [10 * GiB, 0]
    assert ollama.post("/api/generate", json={"model": "nope"}).status_code == 404


def test_vllm_sleeps_and_wakes(state: Path, children: list[Child]) -> None:
    vllm = start(children, state, "vllm", "--gpu", "1", "--model", "m=20GiB")
    assert used(state) == [0, 20 * GiB]
    assert vllm.get("/is_sleeping").json() == {"is_sleeping": False}
    assert vllm.post("/sleep", params={"level": 1}).status_code == 200
    assert vllm.get("/is_sleeping").json() == {"is_sleeping": True}
    assert used(state) == [0, 0]
    assert vllm.post("/wake_up").status_code == 200
    assert used(state) == [0, 20 * GiB]
    assert vllm.get("/health").status_code == 200


def test_comfyui_loads_lazily_and_frees(state: Path, children: list[Child]) -> None:
    comfy = start(children, state, "comfyui", "--model", "flux=13GiB")
    assert used(state) == [0, 0]  # nothing resident before the first prompt
    assert "prompt_id" in comfy.post("/prompt", json={"prompt": {}}).json()
    assert used(state) == [13 * GiB, 0]
    assert comfy.post("/free", json={"unload_models": True, "free_memory": True}).status_code == 200
    assert used(state) == [0, 0]


def test_engines_share_one_state_file(state: Path, children: list[Child]) -> None:
    tts = start(children, state, "plain", "--model", "mvoice=2345MiB")
    image = start(children, state, "comfyui", "--model", "flux=13GiB")
    tts.post("/load")
    image.post("/prompt", json={})
    assert used(state) == [2345 + 13 * GiB, 0]
    tts.post("/unload")
    assert used(state) == [13 * GiB, 0]
    pids = {p["pid"] for p in json.loads(state.read_text())["gpus"][0]["processes"]}
    assert pids == {children[1].proc.pid}
