"""Managed consumers end to end: ``gpuboss serve --consumers FILE --fake-nvml @state.json`` in its
own process, stand-in engines (``tests/engines.py``) as real HTTP servers in theirs, all on one
fake GPU whose memory the engines write and the boss's agent measures.

The engines fail a load that does not fit like a real GPU does (HTTP 500 "CUDA out of memory",
counted in the state file), so "never hands memory over before it is really free" is checked by
the engines themselves: a test that would overcommit the GPU sees an OOM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import redis
from support import CALL_S, Rig, wait_for

from gpuboss.fakenvml import fake_uuid

DEVICE = fake_uuid(0)
#: a plain engine's load and unload actions, in YAML flow style
ACTIONS = "load: {path: /load}, unload: {path: /unload}"

pytestmark = pytest.mark.usefixtures("real_redis")


def consumers(http: httpx.Client) -> dict[str, dict[str, Any]]:
    reply = http.get("/v1/consumers")
    assert reply.status_code == 200, reply.text
    return {
        (c["name"] if c["model"] is None else f"{c['name']}/{c['model']}"): c
        for c in reply.json()["consumers"]
    }


def ensure(http: httpx.Client, name: str, **body: Any) -> httpx.Response:
    return http.post(f"/v1/consumers/{name}/ensure", json={"timeout_s": CALL_S} | body)


def ensured(http: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    reply = ensure(http, name, **body)
    assert reply.status_code == 200, reply.text
    doc: dict[str, Any] = reply.json()
    return doc


def events(http: httpx.Client, *names: str) -> list[tuple[str, dict[str, str]]]:
    reply = http.get("/v1/events", params={"count": 1000})
    assert reply.status_code == 200, reply.text
    out = [(e["event"], e["fields"]) for e in reply.json()["events"]]
    return [e for e in out if not names or e[0] in names]


def stats(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{url}/stats", timeout=5).json()
    return doc


def lease_mib(r: redis.Redis) -> dict[str, int]:
    """Live leases by holder: MiB (from the operators' hash)."""
    out: dict[str, int] = {}
    for line in r.hgetall("gpuboss:{default}:v1:leases").values():
        words = (line.decode() if isinstance(line, bytes) else line).split()
        out[words[0]] = out.get(words[0], 0) + int(words[2].removesuffix("MiB"))
    return out


# --- the seed 000 incident ------------------------------------------------------------------------


SEED_000 = """
consumers:
  - name: mvoice
    url: {tts}
    kinds: [tts]
    vram: 2345MiB
    residual: 16MiB
    load: {{path: /load}}
    unload: {{path: /unload}}
    health: {{path: /health}}
  - name: comfyui
    preset: comfyui
    url: {image}
    kinds: [image]
    vram: 13GiB
"""


def seed_000(rig: Rig) -> tuple[str, str]:
    """16 GiB with 1 GiB used by others; mvoice resident (2345 MiB, keeps 9 MiB when unloaded);
    ComfyUI lazy, FLUX 13 GiB on the first prompt. mvoice plus FLUX do not fit."""
    rig.gpu("16GiB", other_mib=1024)
    tts = rig.engine("plain", "voice=2336MiB", loaded=True, residual="9MiB")
    image = rig.engine("comfyui", "flux=13GiB")
    return tts, image


def test_seed_000_an_image_request_unloads_the_resident_tts_first(rig: Rig) -> None:
    tts, image = seed_000(rig)
    http = rig.start(SEED_000.format(tts=tts, image=image))
    before = consumers(http)
    # Residency at start: measured, not assumed. mvoice is resident and leased; ComfyUI is lazy.
    assert before["mvoice"]["state"] == "idle"
    assert before["mvoice"]["measured_mib"] == 2345
    assert before["comfyui"]["state"] == "unloaded"
    assert before["comfyui"]["lease"] is None

    doc = ensured(http, "comfyui")
    assert doc["state"] == "idle"
    # The first prompt loads FLUX: it fits, because mvoice was unloaded and measured free first.
    prompt = httpx.post(f"{image}/prompt", json={"prompt": {}}, timeout=10)
    assert prompt.status_code == 200, prompt.text
    assert rig.ooms() == 0
    after = consumers(http)
    assert after["mvoice"]["state"] == "unloaded"
    assert after["mvoice"]["evictions"] == 1
    assert stats(tts)["unloads"] == 1
    names = [name for name, f in events(http, "consumer_evicting", "consumer_unloaded", "granted")]
    # mvoice was asked, unloaded (measured), and only then was ComfyUI's lease granted.
    seq = [
        (n, f.get("consumer") or f.get("holder"))
        for n, f in events(http)
        if n.startswith(("consumer_", "granted"))
    ]
    assert seq.index(("consumer_unloaded", "mvoice")) < seq.index(("granted", "comfyui")), seq
    assert "consumer_evicting" in names


def test_seed_000_without_the_boss_flux_ooms(rig: Rig) -> None:
    """The control: the same GPU and engines, the prompt sent straight to ComfyUI."""
    _tts, image = seed_000(rig)
    prompt = httpx.post(f"{image}/prompt", json={"prompt": {}}, timeout=10)
    assert prompt.status_code == 500
    assert "out of memory" in prompt.text
    assert rig.ooms() == 1


# --- the GPU Manager V2 pipeline (seed 003) --------------------------------------------------------


SEED_003 = """
consumers:
  - name: ollama
    preset: ollama
    url: {ollama}
    kinds: [llm]
    models: {{qwen: 18GiB}}
    priority: 10
  - name: vidi
    url: {vidi}
    kinds: [analysis]
    vram: 4GiB
    priority: 40
    load: {{path: /load}}
    unload: {{path: /unload}}
  - name: cosyvoice
    url: {tts}
    kinds: [tts]
    vram: 4GiB
    priority: 50
    load: {{path: /load}}
    unload: {{path: /unload}}
  - name: comfyui
    preset: comfyui
    url: {video}
    kinds: [video]
    vram: 20GiB
    priority: 100
"""


def test_seed_003_pipeline_phases_on_24_gib(rig: Rig, real_redis: redis.Redis) -> None:
    rig.gpu("24GiB")
    urls = {
        "ollama": rig.engine("ollama", "qwen=18GiB", loaded=True),
        "vidi": rig.engine("plain", "vidi=4GiB"),
        "tts": rig.engine("plain", "cosy=4GiB"),
        "video": rig.engine("comfyui", "wan=20GiB"),
    }
    http = rig.start(SEED_003.format(**urls))
    assert consumers(http)["ollama/qwen"]["state"] == "idle"  # resident at start, read from /api/ps

    # Analysis: Vidi fits beside Ollama.
    assert ensured(http, "vidi")["state"] == "idle"
    assert consumers(http)["ollama/qwen"]["state"] == "idle"
    # TTS: no room for CosyVoice beside both; Ollama (priority 10) is the cheapest victim.
    assert ensured(http, "cosyvoice")["state"] == "idle"
    now = consumers(http)
    assert now["ollama/qwen"]["state"] == "unloaded"
    assert now["vidi"]["state"] == "idle"
    # Video: ComfyUI needs 20 GiB; the idle analysis service goes.
    assert ensured(http, "comfyui")["state"] == "idle"
    assert httpx.post(f"{urls['video']}/prompt", json={}, timeout=10).status_code == 200
    now = consumers(http)
    assert now["vidi"]["state"] == "unloaded"
    assert now["cosyvoice"]["state"] == "idle"
    assert rig.ooms() == 0
    assert rig.used() == 24 * 1024
    # Render: everything back, measured, within 5 s.
    started = time.monotonic()
    reply = http.post("/v1/consumers/release-all")
    assert reply.status_code == 200, reply.text
    assert time.monotonic() - started < 5.0
    assert rig.used() == 0
    assert lease_mib(real_redis) == {}
    assert {c["state"] for c in consumers(http).values()} == {"unloaded"}


# --- the failure cases -----------------------------------------------------------------------------


def test_an_unload_that_times_out_leaves_the_consumer_stuck_and_its_memory_unmanaged(
    rig: Rig, real_redis: redis.Redis
) -> None:
    rig.gpu("16GiB")
    slow = rig.engine("plain", "m=10GiB", loaded=True, unload_delay=30)
    other = rig.engine("plain", "n=10GiB")
    http = rig.start(f"""
        consumers:
          - {{name: slow, url: "{slow}", vram: 10GiB, grace: 1, {ACTIONS}}}
          - {{name: other, url: "{other}", vram: 10GiB, {ACTIONS}}}
    """)
    reply = http.post("/v1/consumers/slow/release", json={})
    assert reply.status_code == 200, reply.text
    assert reply.json()[0]["state"] == "stuck"
    assert ("consumer_stuck", "slow") in [(n, f["consumer"]) for n, f in events(http, "consumer_stuck")]
    # Its 10 GiB are unmanaged now: the other 10 GiB cannot be granted on top of them.
    device = http.get("/v1/devices").json()["devices"][0]
    assert device["unmanaged_mib"] >= 10 * 1024
    refused = ensure(http, "other", timeout_s=0)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "insufficient_vram"
    assert rig.ooms() == 0
    assert stats(other)["loads"] == 0


def test_a_consumer_that_never_frees_its_memory_is_stuck(rig: Rig) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=6GiB", loaded=True, stubborn=True)
    http = rig.start(f"""
        consumers:
          - {{name: stubborn, url: "{url}", vram: 6GiB, grace: 1, {ACTIONS}}}
    """)
    doc = http.post("/v1/consumers/stubborn/release", json={}).json()[0]
    assert doc["state"] == "stuck"
    assert doc["lease"] is None
    assert doc["measured_mib"] == 6 * 1024
    assert "6144 MiB" in doc["error"]
    device = http.get("/v1/devices").json()["devices"][0]
    assert device["unmanaged_mib"] >= 6 * 1024
    assert device["free_mib"] <= 10 * 1024


def test_an_unreachable_consumer_fails_its_ensure_and_gives_the_lease_back(
    rig: Rig, real_redis: redis.Redis
) -> None:
    rig.gpu("16GiB")
    http = rig.start("""
        consumers:
          - {name: gone, url: "http://127.0.0.1:9", vram: 4GiB, load: {path: /load}, unload: {path: /unload}}
    """)
    reply = ensure(http, "gone")
    assert reply.status_code == 502
    assert reply.json()["error"] == "consumer_unreachable"
    assert reply.json()["consumer"] == "gone"
    assert "127.0.0.1:9" in reply.json()["message"]
    assert consumers(http)["gone"]["state"] == "unloaded"
    assert lease_mib(real_redis) == {}


def test_a_health_check_that_never_passes_gives_the_memory_back(rig: Rig, real_redis: redis.Redis) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=4GiB")
    http = rig.start(f"""
        consumers:
          - name: sick
            url: "{url}"
            vram: 4GiB
            load: {{path: /load}}
            unload: {{path: /unload}}
            health: {{path: /never, start: 1}}
    """)
    reply = ensure(http, "sick")
    assert reply.status_code == 503
    assert reply.json()["error"] == "consumer_unhealthy"
    assert "/never" in reply.json()["message"]
    doc = consumers(http)["sick"]
    assert doc["state"] == "unhealthy"
    assert doc["lease"] is None
    assert stats(url) == {"loads": 1, "unloads": 1, "loaded": {}}
    assert lease_mib(real_redis) == {}


def test_bad_url_in_the_registry_stops_the_start_naming_the_field(rig: Rig) -> None:
    rig.gpu("16GiB")
    rig.registry.write_text("consumers:\n  - {name: x, url: 'ftp://host', vram: 1GiB}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    cmd = [sys.executable, "-c", "from gpuboss_cli.main import main; main()", "serve", "--port", "0"]
    done = subprocess.run(
        [*cmd, "--redis-url", rig.redis_url, "--consumers", str(rig.registry)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "consumer 'x': field 'url'" in done.stderr
    assert "ftp://host" in done.stderr


TWO_BIG = """
consumers:
  - {{name: a, url: "{a}", vram: 10GiB, load: {{path: /load}}, unload: {{path: /unload}}}}
  - {{name: b, url: "{b}", vram: 10GiB, load: {{path: /load}}, unload: {{path: /unload}}}}
"""


def test_two_consumers_that_cannot_coexist_asked_at_once_from_two_processes(rig: Rig) -> None:
    rig.gpu("16GiB")
    a, b = rig.engine("plain", "a=10GiB"), rig.engine("plain", "b=10GiB")
    http = rig.start(TWO_BIG.format(a=a, b=b))
    base = str(http.base_url)
    script = (
        "import sys, httpx; r = httpx.post(sys.argv[1] + '/v1/consumers/' + sys.argv[2] + '/ensure', "
        "json={'timeout_s': 30}, timeout=60); print(r.status_code, r.json()['state'])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, base, name], stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [o[0] for o in outs] == ["200", "200"]
    # Both were loaded in turn, never together: the engines saw no OOM, and one is resident now.
    assert rig.ooms() == 0
    assert stats(a)["loads"] == 1
    assert stats(b)["loads"] == 1
    states = sorted(c["state"] for c in consumers(http).values())
    assert states == ["idle", "unloaded"]
    assert rig.used() == 10 * 1024


def test_concurrent_ensures_of_one_consumer_share_one_load(rig: Rig) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=4GiB", delay=1.0)
    http = rig.start(f"""
        consumers:
          - {{name: m, url: "{url}", vram: 4GiB, load: {{path: /load}}, unload: {{path: /unload}}}}
    """)
    base = str(http.base_url)
    script = "import sys, httpx; print(httpx.post(sys.argv[1], json={}, timeout=60).status_code)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"{base}/v1/consumers/m/ensure"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    assert [p.communicate(timeout=60)[0].strip() for p in procs] == ["200"] * 4
    assert stats(url)["loads"] == 1
    assert consumers(http)["m"]["loads"] == 1


def test_a_restarted_boss_adopts_resident_consumers_without_reloading(
    rig: Rig, real_redis: redis.Redis
) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=4GiB")
    registry = f"""
        consumers:
          - {{name: m, url: "{url}", vram: 4GiB, load: {{path: /load}}, unload: {{path: /unload}}}}
    """
    http = rig.start(registry)
    lease = ensured(http, "m")["lease"]
    assert rig.boss is not None
    assert rig.boss.stop() == 0
    assert lease_mib(real_redis) == {"m": 4096}  # left for the next boss, not released

    http = rig.start()
    doc = consumers(http)["m"]
    assert doc["state"] == "idle"
    assert doc["lease"] == lease
    assert stats(url)["loads"] == 1  # not loaded again
    assert lease_mib(real_redis) == {"m": 4096}  # and not counted twice


def test_a_registry_with_errors_is_refused_on_reload_and_changes_nothing(rig: Rig) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=4GiB")
    http = rig.start(f"""
        consumers:
          - {{name: m, url: "{url}", vram: 4GiB, load: {{path: /load}}, unload: {{path: /unload}}}}
    """)
    ensured(http, "m")
    second = rig.engine("plain", "n=1GiB")
    rig.registry.write_text(f"consumers:\n  - {{name: m, url: '{url}', vram: -3}}\n", encoding="utf-8")
    reply = http.post("/v1/consumers/reload")
    assert reply.status_code == 400
    assert "consumer 'm': field 'vram'" in reply.json()["message"]
    assert consumers(http)["m"]["state"] == "idle"
    # A good file adds a consumer and keeps the loaded one loaded; SIGHUP reads it too.
    rig.registry.write_text(
        f"consumers:\n  - {{name: m, url: '{url}', vram: 4GiB, {ACTIONS}}}\n"
        f"  - {{name: n, url: '{second}', vram: 1GiB, {ACTIONS}}}\n",
        encoding="utf-8",
    )
    assert rig.boss is not None
    rig.boss.proc.send_signal(signal.SIGHUP)
    wait_for("the reload to add n", lambda: "n" in consumers(http))
    now = consumers(http)
    assert now["m"]["state"] == "idle"
    assert now["n"]["state"] == "unloaded"  # measured: nothing of it resident
    assert ensured(http, "n")["state"] == "idle"


def test_an_idle_consumer_unloads_by_itself_after_keep_warm(rig: Rig) -> None:
    rig.gpu("16GiB")
    url = rig.engine("plain", "m=4GiB")
    http = rig.start(f"""
        consumers:
          - {{name: m, url: "{url}", vram: 4GiB, keep_warm: 0.5, {ACTIONS}}}
    """)
    loaded = ensured(http, "m")
    assert loaded["state"] == "idle"
    wait_for("keep_warm to unload it", lambda: consumers(http)["m"]["state"] == "unloaded")
    assert stats(url)["unloads"] == 1
    assert rig.used() == 0
    names = [(n, f.get("why")) for n, f in events(http, "consumer_unloaded")]
    assert names == [("consumer_unloaded", "keep_warm")]


def test_vllm_sleeps_to_give_memory_back_and_wakes_on_ensure(rig: Rig, real_redis: redis.Redis) -> None:
    rig.gpu("24GiB")
    url = rig.engine("vllm", "llama=20GiB")
    http = rig.start(f"""
        consumers:
          - {{name: vllm, preset: vllm, url: "{url}", vram: 20GiB}}
    """)
    assert consumers(http)["vllm"]["state"] == "idle"  # awake at start: measured resident
    released = http.post("/v1/consumers/vllm/release", json={})
    assert released.status_code == 200, released.text
    assert released.json()[0]["state"] == "unloaded"
    assert httpx.get(f"{url}/is_sleeping", timeout=5).json() == {"is_sleeping": True}
    assert lease_mib(real_redis) == {}
    assert ensured(http, "vllm")["state"] == "idle"
    assert httpx.get(f"{url}/is_sleeping", timeout=5).json() == {"is_sleeping": False}
    assert lease_mib(real_redis) == {"vllm": 20 * 1024}


def test_ensure_streams_its_progress_as_server_sent_events(rig: Rig) -> None:
    rig.gpu("16GiB")
    a, b = rig.engine("plain", "a=10GiB"), rig.engine("plain", "b=10GiB", delay=0.5)
    http = rig.start(TWO_BIG.format(a=a, b=b))
    ensured(http, "a")
    events: list[tuple[str, dict[str, Any]]] = []
    headers = {"Accept": "text/event-stream"}
    with http.stream("POST", "/v1/consumers/b/ensure", json={"timeout_s": CALL_S}, headers=headers) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    names = [n for n, _ in events]
    assert names[-1] == "ready"
    assert events[-1][1]["state"] == "idle"
    progress = [doc for n, doc in events if n == "progress"]
    assert "loading" in [doc["state"] for doc in progress]
    # It waited while a unloaded for it, and said so, then it was idle.
    assert any(doc["waiting"] and doc["waiting"]["reason"] == "evicting" for doc in progress)
    assert progress[-1]["state"] == "idle"
    # An unknown consumer is a plain 404, not a stream.
    assert http.post("/v1/consumers/nosuch/ensure", json={}, headers=headers).status_code == 404
