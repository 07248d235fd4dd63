"""The gated proxy end to end: the ``openai`` package and plain HTTP clients pointed at a real
``gpuboss serve``, which forwards to stand-in OpenAI-compatible engines in their own processes on
one fake GPU (``tests/engines.py openai``). The engines fail a load that does not fit, like a GPU."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from support import Rig, wait_for

from gpuboss_client import Boss

pytestmark = pytest.mark.usefixtures("real_redis")

ACTIONS = "load: {path: /load}, unload: {path: /unload}"


def base(http: httpx.Client) -> str:
    return str(http.base_url).rstrip("/")


def chat_rig(rig: Rig, **flags: object) -> tuple[str, httpx.Client]:
    rig.gpu("16GiB")
    url = rig.engine("openai", "m1=6GiB", **flags)
    http = rig.start(f"""
        consumers:
          - {{name: chat, url: "{url}", kinds: [llm], vram: 6GiB, serves: [m1], {ACTIONS}}}
    """)
    return url, http


def test_openai_client_through_the_boss(rig: Rig) -> None:
    url, http = chat_rig(rig)
    client = openai.OpenAI(base_url=f"{base(http)}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi there"}])
    assert reply.choices[0].message.content == "you said: hi there"
    stream = client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "stream it"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "you said: stream it"
    assert client.embeddings.create(model="m1", input="x").data[0].embedding == [0.25, 0.5, 0.75]
    heard = client.audio.transcriptions.create(model="m1", file=("a.wav", b"RIFF" + bytes(1000)))
    assert heard.text.endswith("bytes heard")
    assert [m.id for m in client.models.list()] == ["m1"]
    assert httpx.get(f"{url}/stats", timeout=5).json()["loads"] == 1  # loaded once, on the first
    with pytest.raises(openai.NotFoundError) as no:
        client.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "?"}])
    assert no.value.body is not None
    assert "no_consumer" in str(no.value.body)


def test_answers_say_which_consumer_served_them_and_how_long_they_waited(rig: Rig) -> None:
    _url, http = chat_rig(rig)
    body = {"model": "m1", "messages": [{"role": "user", "content": "a"}]}
    first = http.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["x-gpuboss-consumer"] == "chat"
    assert int(first.headers["x-gpuboss-wait-ms"]) >= 0
    by_name = http.post("/v1/consumers/chat/v1/chat/completions", json=body)
    by_kind = http.post("/v1/llm/v1/chat/completions", json=body)
    assert by_name.json()["choices"] == by_kind.json()["choices"] == first.json()["choices"]
    assert "transfer-encoding" not in {k.lower() for k in by_name.headers if k.lower() == "connection"}
    # The consumer is idle again once the answers are relayed.
    wait_for(
        "the consumer to be idle", lambda: http.get("/v1/consumers").json()["consumers"][0]["users"] == 0
    )
    assert http.get("/v1/consumers").json()["consumers"][0]["state"] == "idle"


def test_a_streamed_answer_starts_before_the_upstream_finishes(rig: Rig) -> None:
    _url, http = chat_rig(rig, token_delay=0.3)
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "one two three four"}]}
    http.post("/v1/consumers/chat/ensure", json={}).raise_for_status()  # loading is not the point here
    started = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        chunks = reply.iter_raw()
        next(chunks)
        first = time.monotonic() - started
        rest = b"".join(chunks)
    total = time.monotonic() - started
    assert rest.endswith(b"data: [DONE]\n\n")
    assert total >= 6 * 0.3  # six words, 0.3 s apart
    assert first < 0.3 * 2  # the first word came through on its own


def test_a_client_that_leaves_mid_stream_cancels_the_upstream_call(rig: Rig) -> None:
    url, http = chat_rig(rig, token_delay=0.2)
    http.post("/v1/consumers/chat/ensure", json={}).raise_for_status()
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "a b c d e f g h i j"}]}
    with (
        httpx.Client(base_url=base(http), timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        next(reply.iter_raw())
    # The upstream notices when its next write fails (well before its 12 words are out).
    wait_for("the upstream to see the client go", lambda: httpx.get(f"{url}/stats").json()["cancelled"] == 1)
    wait_for(
        "the consumer to be free", lambda: http.get("/v1/consumers").json()["consumers"][0]["users"] == 0
    )


def test_a_waiting_request_whose_client_leaves_leaves_the_queue(rig: Rig, redis_url: str) -> None:
    _url, http = chat_rig(rig)
    device = http.get("/v1/devices").json()["devices"][0]["name"]
    with Boss.from_url(redis_url, holder="hog") as boss:
        boss.acquire("12GiB", device=device, timeout=0)  # active, not preemptible: chat cannot fit
        host, port = base(http).removeprefix("http://").split(":")
        payload = b'{"model": "m1", "messages": [{"role": "user", "content": "x"}]}'
        with socket.create_connection((host, int(port))) as sock:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            wait_for("the request to queue", lambda: http.get("/v1/queue").json()["queue"] != [])
            [waiter] = http.get("/v1/queue").json()["queue"]
            assert (waiter["consumer"], waiter["position"], waiter["wait_reason"]) == ("chat", 0, "no_room")
        closed = time.monotonic()
        wait_for("it to leave the queue", lambda: http.get("/v1/queue").json()["queue"] == [])
        assert time.monotonic() - closed < 0.1
        assert http.get("/v1/consumers").json()["consumers"][0]["state"] == "unloaded"


def test_two_models_that_cannot_coexist_serve_many_clients_one_after_the_other(rig: Rig) -> None:
    rig.gpu("16GiB")
    a, b = rig.engine("openai", "ma=10GiB"), rig.engine("openai", "mb=10GiB")
    http = rig.start(f"""
        consumers:
          - {{name: a, url: "{a}", vram: 10GiB, serves: [ma], {ACTIONS}}}
          - {{name: b, url: "{b}", vram: 10GiB, serves: [mb], {ACTIONS}}}
    """)
    script = (
        "import sys, openai\n"
        "c = openai.OpenAI(base_url=sys.argv[1] + '/v1', api_key='x', max_retries=0, timeout=60)\n"
        "for model in sys.argv[2:]:\n"
        "    r = c.chat.completions.create(model=model, messages=[{'role': 'user', 'content': model}])\n"
        "    assert r.choices[0].message.content == 'you said: ' + model, r\n"
        "print('ok')\n"
    )
    orders = [["ma", "mb", "ma"], ["mb", "ma", "mb"], ["ma", "ma", "mb"], ["mb", "mb", "ma"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, base(http), *order], stdout=subprocess.PIPE, text=True
        )
        for order in orders
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["ok"] * 4, [p.returncode for p in procs]
    assert rig.ooms() == 0  # never both loaded
    served = [httpx.get(f"{u}/stats").json()["served"] for u in (a, b)]
    assert served == [6, 6]


def test_max_concurrent_lets_one_request_through_at_a_time(rig: Rig) -> None:
    rig.gpu("16GiB")
    url = rig.engine("openai", "m1=6GiB", token_delay=0.2)
    http = rig.start(f"""
        consumers:
          - {{name: chat, url: "{url}", vram: 6GiB, serves: [m1], max_concurrent: 1, {ACTIONS}}}
    """)
    http.post("/v1/consumers/chat/ensure", json={}).raise_for_status()
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    with (
        httpx.Client(base_url=base(http), timeout=30) as one,
        httpx.Client(base_url=base(http), timeout=30) as two,
        one.stream("POST", "/v1/chat/completions", json=body) as first,
    ):
        chunks = first.iter_raw()
        next(chunks)  # the first holds the one slot while it streams
        started = time.monotonic()
        second = two.post("/v1/chat/completions", json=body)
        waited = int(second.headers["x-gpuboss-wait-ms"])
        assert second.status_code == 200
        b"".join(chunks)
    # The second waited for the first to finish (5 chunks 0.2 s apart), not for a load.
    assert waited >= 500
    assert time.monotonic() - started >= waited / 1000
    assert first.headers["x-gpuboss-wait-ms"] != ""


def test_a_request_that_waits_too_long_gets_acquire_timeout_naming_its_consumer(
    rig: Rig, redis_url: str
) -> None:
    rig.gpu("16GiB")
    url = rig.engine("openai", "m1=6GiB")
    http = rig.start(
        f"""
        consumers:
          - {{name: chat, url: "{url}", vram: 6GiB, serves: [m1], {ACTIONS}}}
        """,
        max_wait_s="0.3",
    )
    device = http.get("/v1/devices").json()["devices"][0]["name"]
    with Boss.from_url(redis_url, holder="hog") as boss:
        boss.acquire("12GiB", device=device, timeout=0)
        reply = http.post("/v1/chat/completions", json={"model": "m1", "messages": []})
    assert reply.status_code == 503
    doc = reply.json()
    assert (doc["error"], doc["retryable"], doc["consumer"]) == ("acquire_timeout", True, "chat")
    assert reply.headers["Retry-After"] == "1"
    assert httpx.get(f"{url}/stats").json()["served"] == 0


def test_a_streamed_body_larger_than_the_api_cap_passes_through(rig: Rig) -> None:
    _url, http = chat_rig(rig)
    audio = b"RIFF" + bytes(3 * 1024 * 1024)  # far over the API's own 64 KiB cap
    files = {"file": ("a.wav", audio), "model": (None, "m1")}
    reply = http.post("/v1/audio/transcriptions", files=files)
    assert reply.status_code == 200, reply.text
    assert int(reply.json()["text"].split()[0]) > len(audio)
