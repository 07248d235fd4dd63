"""The consumer registry file: what it accepts, what presets fill in, the residency rule of seed 000,
and errors that name the file, the consumer and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuboss.consumers import PRESETS, Registry, load_registry
from gpuboss_client import BadRequest

HOME_LAB = """
consumers:
  - name: mvoice
    url: http://127.0.0.1:8101/
    kinds: [tts]
    vram: 2345MiB
    keep_warm: 300
    health: {path: /health}
    load: {path: /load}
    unload: {path: /unload, timeout: 30}
  - name: whisper-server
    url: http://127.0.0.1:8102
    kinds: [stt]
    vram: 6538
    self_managed: true
  - name: comfyui
    preset: comfyui
    url: http://127.0.0.1:8188
    kinds: [image]
    vram: 13GiB
    priority: high
  - name: ollama
    preset: ollama
    url: http://127.0.0.1:11434
    kinds: [llm]
    models: {llama3.1:8b: 6GiB, qwen2.5:14b: 10GiB}
    priority: low
    preemptible: true
  - name: vllm
    preset: vllm
    url: http://127.0.0.1:8000
    kinds: [llm]
    vram: 40GiB
    device: gpu1
  - name: llama-server
    preset: llamacpp
    url: http://127.0.0.1:8080
    vram: 5GiB
    command: {argv: [llama-server, -m, model.gguf, --port, "8080"], stop_signal: SIGINT}
  - name: cosyvoice
    url: http://127.0.0.1:50000
    kinds: [tts]
    vram: 4GiB
    docker: {container: cosyvoice}
  - name: vidi
    url: http://127.0.0.1:8200
    vram: 4GiB
    systemd: {unit: vidi.service, user: true}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consumers.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_home_lab_registry_loads_with_presets_filled_in(tmp_path: Path) -> None:
    reg = load_registry(write(tmp_path, HOME_LAB))
    assert [c.name for c in reg.consumers] == [
        "mvoice", "whisper-server", "comfyui", "ollama", "vllm", "llama-server", "cosyvoice", "vidi",
    ]  # fmt: skip
    mvoice = reg.get("mvoice")
    assert mvoice is not None
    assert (mvoice.url, mvoice.vram, mvoice.priority, mvoice.keep_warm) == (
        "http://127.0.0.1:8101",
        2345,
        50,
        300,
    )
    assert mvoice.unload is not None
    assert (mvoice.unload.method, mvoice.unload.path, mvoice.unload.timeout) == ("POST", "/unload", 30)
    comfy = reg.get("comfyui")
    assert comfy is not None
    assert comfy.unload is not None
    assert (comfy.unload.path, comfy.unload.body) == ("/free", {"unload_models": True, "free_memory": True})
    assert (comfy.load, comfy.priority, comfy.vram) == (None, 90, 13 * 1024)
    vllm = reg.get("vllm")
    assert vllm is not None
    assert vllm.load is not None
    assert vllm.unload is not None
    assert (vllm.load.path, vllm.unload.path, vllm.device) == ("/wake_up", "/sleep?level=1", "gpu1")
    ollama = reg.get("ollama")
    assert ollama is not None
    assert ollama.sizes == {"llama3.1:8b": 6 * 1024, "qwen2.5:14b": 10 * 1024}
    assert ollama.unload is not None
    assert ollama.unload.body == {"keep_alive": 0}
    assert [c.name for c in reg.serving("tts")] == ["mvoice", "cosyvoice"]
    assert set(PRESETS) == {"plain", "ollama", "vllm", "comfyui", "llamacpp"}


def test_what_is_resident_at_start_follows_the_seed_000_rule(tmp_path: Path) -> None:
    """self-managed: loaded; load and unload: loaded; unload only: lazy; a systemd unit only:
    loaded; a process or container gpuboss starts: not loaded; nothing declared: loaded."""
    reg = load_registry(write(tmp_path, HOME_LAB + "  - {name: plain, url: 'http://h:1', vram: 1}\n"))
    resident = {c.name: c.resident_at_start for c in reg.consumers}
    assert resident == {
        "mvoice": True, "whisper-server": True, "comfyui": False, "ollama": False, "vllm": True,
        "llama-server": False, "cosyvoice": False, "vidi": True, "plain": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{name: tts, url: 'http://h:1'}", "consumer 'tts': needs vram"),
        ("{name: tts, url: 'ftp://h', vram: 1}", "consumer 'tts': field 'url': must be an http(s) URL"),
        ("{name: tts, url: 'http://h:99999', vram: 1}", "consumer 'tts': field 'url': bad port"),
        ("{name: tts, url: 'http://h', vram: -3}", "consumer 'tts': field 'vram':"),
        ("{name: tts, url: 'http://h', vram: lots}", "consumer 'tts': field 'vram':"),
        ("{name: tts, url: 'http://h', vram: 1, priority: urgent}", "consumer 'tts': field 'priority':"),
        ("{name: tts, url: 'http://h', vram: 1, keep_warm: -2}", "consumer 'tts': field 'keep_warm':"),
        ("{name: tts, url: 'http://h', vram: 1, vrma: 2}", "consumer 'tts': field 'vrma': Extra inputs"),
        ("{name: 'a b', url: 'http://h', vram: 1}", "consumer 'a b': field 'name': must be 1-64"),
        ("{url: 'http://h', vram: 1}", "consumer #1: field 'name': Field required"),
        (
            "{name: tts, url: 'http://h', vram: 1, unload: {path: free}}",
            "field 'unload.path': must start with /",
        ),
        (
            "{name: tts, url: 'http://h', vram: 1, command: {argv: [x], stop_signal: SIGNOPE}}",
            "field 'command.stop_signal': not a signal name",
        ),
        (
            "{name: tts, url: 'http://h', vram: 1, load: {path: /l}, docker: {container: c}}",
            "loads and unloads in one way only, not http and docker",
        ),
        ("{name: tts, url: 'http://h', vram: 1, preset: tgi}", "consumer 'tts': field 'preset':"),
        ("{name: l, preset: llamacpp, url: 'http://h', vram: 1}", "give its command"),
        (
            "{name: s, url: 'http://h', vram: 1, self_managed: true, preemptible: true}",
            "cannot be preemptible",
        ),
        ("{name: m, url: 'http://h', vram: 1, models: {a: 1}}", "give vram or models, not both"),
    ],
)
def test_errors_name_the_file_the_consumer_and_the_field(tmp_path: Path, entry: str, message: str) -> None:
    path = write(tmp_path, f"consumers:\n  - {entry}\n")
    with pytest.raises(BadRequest) as err:
        load_registry(path)
    assert err.value.message.startswith(f"{path}: ")
    assert message in err.value.message


def test_file_level_errors(tmp_path: Path) -> None:
    cases = {
        "consumers:\n  - {name: a, url: 'http://h', vram: 1}\n  - {name: a, url: 'http://h', vram: 1}\n": (
            "two consumers are named 'a'"
        ),
        "consumers: [\n": "not valid YAML",
        "- a\n- b\n": "expected a mapping",
        "consumer: []\n": "field 'consumer': Extra inputs",
    }
    for text, message in cases.items():
        with pytest.raises(BadRequest, match=r"consumers\.yaml: ") as err:
            load_registry(write(tmp_path, text))
        assert message in err.value.message, text
    with pytest.raises(BadRequest, match="cannot read the consumer registry"):
        load_registry(tmp_path / "missing.yaml")
    assert load_registry(write(tmp_path, "")) == Registry()
