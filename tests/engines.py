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

Each load or unload takes ``--delay`` seconds before the memory changes, like a real engine.
The engine's own process appears on GPU ``--gpu`` of the state file with the MiB it holds (its
entry goes when it holds nothing). Writers take a lock file beside the state and replace it
atomically, so several engines share one state file.
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


def set_usage(state: Path, gpu: int, pid: int, mib: int) -> None:
    """Record that process ``pid`` holds ``mib`` on GPU ``gpu`` of the state file."""
    with _locked(state):
        doc = json.loads(state.read_text(encoding="utf-8"))
        procs = [p for p in doc["gpus"][gpu].setdefault("processes", []) if p["pid"] != pid]
        if mib > 0:
            procs.append({"pid": pid, "mib": mib})
        doc["gpus"][gpu]["processes"] = procs
        tmp = state.with_suffix(state.suffix + f".{pid}.tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, state)


class Engine:
    """The models an engine holds, and the memory they take on its GPU."""

    def __init__(self, kind: str, state: Path, gpu: int, models: dict[str, int], delay: float) -> None:
        self.kind, self.state, self.gpu, self.models, self.delay = kind, state, gpu, models, delay
        self.loaded: dict[str, int] = {}
        self.sleeping = False
        self.lock = threading.Lock()
        if kind == "vllm":  # a vLLM server holds its model from the start
            self.loaded = dict(models)
            self._write()

    def _write(self) -> None:
        set_usage(self.state, self.gpu, os.getpid(), sum(self.loaded.values()))

    def load(self, name: str) -> None:
        with self.lock:
            if name in self.loaded:
                return
            time.sleep(self.delay)  # loading the weights
            self.loaded[name] = self.models[name]
            self._write()

    def unload(self, name: str | None = None) -> None:
        with self.lock:
            names = [name] if name is not None else list(self.loaded)
            if not any(n in self.loaded for n in names):
                return
            time.sleep(self.delay)  # freeing the memory
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

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            doc = json.loads(self.rfile.read(length) or b"{}") if length else {}
            return doc if isinstance(doc, dict) else {}

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
            return self._reply(404, {"error": f"no {path}"})

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            path, query, body = parts.path, parse_qs(parts.query), self._body()
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
            if engine.kind == "plain" and path == "/load":
                engine.load(only)
                return self._reply(200, {"loaded": True})
            if engine.kind == "plain" and path == "/unload":
                engine.unload()
                return self._reply(200, {"loaded": False})
            return self._reply(404, {"error": f"no {path}"})

    return Handler


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("kind", choices=("ollama", "vllm", "comfyui", "plain"))
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--model", action="append", default=[], metavar="NAME=SIZE")
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    models = {}
    for spec in args.model or ["model=1GiB"]:
        name, _, size = spec.rpartition("=")
        models[name or "model"] = parse_mib(size)
    engine = Engine(args.kind, args.state, args.gpu, models, args.delay)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(engine))
    print("LISTENING", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
