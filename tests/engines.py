"""Stand-ins for the GPU engines that managed consumers drive, each a real HTTP server in its own
process, behaving like the engine's documented API and writing the memory it holds into the
file-backed fake NVML (``gpuboss agent --fake-nvml @state.json``).

Not a test module: tests start it with the venv's python and read its first line,
``LISTENING <port>``. Usage::

    python tests/engines.py KIND --state state.json [--gpu 0] [--model NAME=SIZE ...]
                            [--delay SECONDS] [--port 0]

Kinds:

``ollama``   ``POST /api/generate {"model", "keep_alive"}`` loads the model (``keep_alive: 0``
             unloads it, answering ``done_reason: "unload"``); ``GET /api/ps`` lists the loaded
             models with ``size_vram`` in bytes; ``GET /api/version``.
``vllm``     the sleep mode: ``POST /sleep?level=1`` frees the weights' memory, ``POST /wake_up``
             takes it back, ``GET /is_sleeping``; ``GET /health``. It starts awake (loaded).
``comfyui``  lazy: ``POST /prompt`` loads the model on the first prompt; ``POST /free
             {"unload_models", "free_memory"}`` frees it; ``GET /system_stats``.
``plain``    ``POST /load``, ``POST /unload``, ``GET /health``.
``openai``   a plain engine that also speaks the OpenAI API for its model (once loaded, else 503):
             ``POST /v1/chat/completions`` (``stream: true`` sends server-sent events, a chunk
             every ``--token-delay`` seconds), ``/v1/embeddings``, ``/v1/audio/transcriptions``
             (multipart), ``GET /v1/models``. A client that goes away mid-stream is counted
             (``cancelled`` in ``/stats``).

Each load takes ``--delay`` seconds (an unload ``--unload-delay``, default the same) before the
memory changes, like a real engine. The engine's own process appears on GPU ``--gpu`` of the state
file with the MiB it holds (its entry goes when it holds nothing). Writers take a lock file beside
the state and replace it atomically, so several engines share one state file.

Like a real GPU, a load that does not fit (every process on the GPU, plus its ``other_mib``, over
its ``total``) fails: HTTP 500 "CUDA out of memory", and the GPU's ``ooms`` count in the state
file goes up. ``--loaded`` starts with every model loaded; ``--residual MIB`` is what it keeps once
unloaded (a CUDA context); ``--stubborn`` answers unloads but frees nothing. ``GET /stats`` says
how many loads and unloads it did.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gpuboss_client import parse_mib


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    with open(state.with_suffix(state.suffix + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OutOfMemory(Exception):
    """The GPU has no room for what a load asks."""


def set_usage(state: Path, gpu: int, pid: int, mib: int) -> None:
    """Record that process ``pid`` holds ``mib`` on GPU ``gpu`` of the state file; raises
    :class:`OutOfMemory` (and counts an OOM in the file) if that would not fit on the GPU."""
    with _locked(state):
        doc = json.loads(state.read_text(encoding="utf-8"))
        card = doc["gpus"][gpu]
        procs = [p for p in card.setdefault("processes", []) if p["pid"] != pid]
        mine = next((p["mib"] for p in card["processes"] if p["pid"] == pid), 0)
        others = sum(p["mib"] for p in procs) + int(card.get("other_mib", 0))
        if mib > mine and others + mib > parse_mib(card["total"]):
            card["ooms"] = int(card.get("ooms", 0)) + 1
            mib = mine  # nothing changes, but the OOM is on record
            error: OutOfMemory | None = OutOfMemory(
                f"CUDA out of memory: {others} MiB in use of {card['total']}"
            )
        else:
            error = None
        if mib > 0:
            procs.append({"pid": pid, "mib": mib})
        card["processes"] = procs
        tmp = state.with_suffix(state.suffix + f".{pid}.tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, state)
    if error is not None:
        raise error


class Engine:
    """The models an engine holds, and the memory they take on its GPU."""

    def __init__(
        self,
        kind: str,
        state: Path,
        gpu: int,
        models: dict[str, int],
        delay: float,
        *,
        unload_delay: float | None = None,
        loaded: bool = False,
        residual: int = 0,
        stubborn: bool = False,
    ) -> None:
        self.kind, self.state, self.gpu, self.models, self.delay = kind, state, gpu, models, delay
        self.unload_delay = delay if unload_delay is None else unload_delay
        self.residual, self.stubborn = residual, stubborn
        self.loaded: dict[str, int] = {}
        self.sleeping = False
        self.loads = self.unloads = 0
        self.cancelled = self.served = 0
        self.token_delay = 0.05
        self.lock = threading.Lock()
        if loaded or kind == "vllm":  # a vLLM server holds its model from the start
            self.loaded = dict(models)
        self._write()

    def _write(self, loaded: dict[str, int] | None = None) -> None:
        loaded = self.loaded if loaded is None else loaded
        set_usage(self.state, self.gpu, os.getpid(), self.residual + sum(loaded.values()))

    def load(self, name: str) -> None:
        with self.lock:
            if name in self.loaded:
                return
            time.sleep(self.delay)  # loading the weights
            self._write(self.loaded | {name: self.models[name]})  # raises OutOfMemory
            self.loaded[name] = self.models[name]
            self.loads += 1

    def unload(self, name: str | None = None) -> None:
        with self.lock:
            names = [name] if name is not None else list(self.loaded)
            if not any(n in self.loaded for n in names):
                return
            time.sleep(self.unload_delay)  # freeing the memory
            self.unloads += 1
            if self.stubborn:
                return
            for n in names:
                self.loaded.pop(n, None)
            self._write()


def handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    only = next(iter(engine.models))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> tuple[bytes, dict[str, Any]]:
            """The raw body, and its JSON object ({} if it is none)."""
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                doc = json.loads(raw or b"{}")
            except ValueError:
                doc = {}
            return raw, doc if isinstance(doc, dict) else {}

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if engine.kind == "ollama" and path == "/api/ps":
                models = [
                    {"name": n, "model": n, "size_vram": mib * 2**20} for n, mib in engine.loaded.items()
                ]
                return self._reply(200, {"models": models})
            if engine.kind == "ollama" and path == "/api/version":
                return self._reply(200, {"version": "0.0.0-fake"})
            if engine.kind == "vllm" and path == "/is_sleeping":
                return self._reply(200, {"is_sleeping": engine.sleeping})
            if engine.kind == "comfyui" and path == "/system_stats":
                return self._reply(200, {"system": {}, "devices": []})
            if path == "/health":
                return self._reply(200, {"status": "ok"})
            if path == "/stats":
                doc = {"loads": engine.loads, "unloads": engine.unloads, "loaded": engine.loaded}
                if engine.kind == "openai":
                    doc |= {"served": engine.served, "cancelled": engine.cancelled}
                return self._reply(200, doc)
            if engine.kind == "openai" and path == "/v1/models":
                models = [{"id": n, "object": "model", "owned_by": "fake"} for n in engine.loaded]
                return self._reply(200, {"object": "list", "data": models})
            return self._reply(404, {"error": f"no {path}"})

        def do_POST(self) -> None:
            try:
                self._post()
            except OutOfMemory as exc:
                self._reply(500, {"error": str(exc)})

        def _post(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            raw, body = self._body()
            if engine.kind == "ollama" and path == "/api/generate":
                model = str(body.get("model", ""))
                if model not in engine.models:
                    return self._reply(404, {"error": f"model '{model}' not found"})
                if body.get("keep_alive") in (0, "0", "0s", "0m"):
                    engine.unload(model)
                    return self._reply(
                        200, {"model": model, "response": "", "done": True, "done_reason": "unload"}
                    )
                engine.load(model)
                return self._reply(
                    200, {"model": model, "response": "ok", "done": True, "done_reason": "stop"}
                )
            if engine.kind == "vllm" and path == "/sleep":
                if query.get("level", ["1"])[0] not in ("1", "2"):
                    return self._reply(400, {"error": "level must be 1 or 2"})
                engine.unload()
                engine.sleeping = True
                return self._reply(200, {})
            if engine.kind == "vllm" and path == "/wake_up":
                engine.load(only)
                engine.sleeping = False
                return self._reply(200, {})
            if engine.kind == "comfyui" and path == "/prompt":
                engine.load(only)
                return self._reply(200, {"prompt_id": f"p{time.monotonic_ns()}", "number": 0})
            if engine.kind == "comfyui" and path == "/free":
                if body.get("unload_models") or body.get("free_memory"):
                    engine.unload()
                return self._reply(200, {})
            if engine.kind == "openai" and path.startswith("/v1/"):
                return self._openai(path, raw, body)
            if engine.kind in ("plain", "openai") and path == "/load":
                engine.load(only)
                return self._reply(200, {"loaded": True})
            if engine.kind in ("plain", "openai") and path == "/unload":
                engine.unload()
                return self._reply(200, {"loaded": False})
            return self._reply(404, {"error": f"no {path}"})

        def _openai(self, path: str, raw: bytes, body: dict[str, Any]) -> None:
            if only not in engine.loaded:
                return self._reply(503, {"error": {"message": f"model {only} is not loaded"}})
            engine.served += 1
            if path == "/v1/audio/transcriptions":
                return self._reply(200, {"text": f"{len(raw)} bytes heard"})
            if path == "/v1/embeddings":
                data = [{"object": "embedding", "index": 0, "embedding": [0.25, 0.5, 0.75]}]
                usage = {"prompt_tokens": 1, "total_tokens": 1}
                return self._reply(200, {"object": "list", "data": data, "model": only, "usage": usage})
            if path != "/v1/chat/completions":
                return self._reply(404, {"error": {"message": f"no {path}"}})
            said = str(body.get("messages", [{}])[-1].get("content", ""))
            words = f"you said: {said}".split()
            if not body.get("stream"):
                message = {"role": "assistant", "content": " ".join(words)}
                return self._reply(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": only,
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {
                            "prompt_tokens": 1,
                            "completion_tokens": len(words),
                            "total_tokens": 1 + len(words),
                        },
                    },
                )
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for i, word in enumerate(words):
                    delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
                    chunk = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": only,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(engine.token_delay)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                engine.cancelled += 1

    return Handler


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("kind", choices=("ollama", "vllm", "comfyui", "plain", "openai"))
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--model", action="append", default=[], metavar="NAME=SIZE")
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--unload-delay", type=float, default=None)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--loaded", action="store_true", help="start with every model loaded")
    p.add_argument("--residual", type=parse_mib, default=0, help="MiB kept while unloaded")
    p.add_argument("--stubborn", action="store_true", help="answer unloads, free nothing")
    p.add_argument("--token-delay", type=float, default=0.05, help="seconds between streamed chunks")
    args = p.parse_args(argv)
    models = {}
    for spec in args.model or ["model=1GiB"]:
        name, _, size = spec.rpartition("=")
        models[name or "model"] = parse_mib(size)
    engine = Engine(
        args.kind, args.state, args.gpu, models, args.delay, unload_delay=args.unload_delay,
        loaded=args.loaded, residual=args.residual, stubborn=args.stubborn,
    )  # fmt: skip
    engine.token_delay = args.token_delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(engine))
    print("LISTENING", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
