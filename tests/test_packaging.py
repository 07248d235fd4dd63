"""The distributions as users get them: wheels and an sdist built from this tree, installed into a
fresh virtual environment that sees nothing of the checkout, then used against the real Redis.

``gpuboss-client`` must carry the Lua scripts inside the package (built straight from the tree and
from its sdist alike) and depend on ``redis`` alone; ``gpuboss`` brings the ``gpuboss`` command.
Neither may install a top-level ``client``, ``cli`` or ``lua``.

Builds run without build isolation (``hatchling`` and ``build`` come with the dev extras). The one
step that may reach the package index is downloading the runtime dependencies' wheels, pinned to
the versions in this environment (see :func:`wheelhouse`); installs then use that folder alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import NamedTuple, cast

import pytest
import redis
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gpuboss_client import PoolKeys
from gpuboss_client.scripts import NAMES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_TOP_LEVEL = {"client", "cli", "lua"}
SCRIPT_FILES = {f"{name}.lua" for name in ("_common", *NAMES)}


def _run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its combined output, which the failure message shows if it fails."""
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}"
    return done.stdout


class Dists(NamedTuple):
    client_wheel: Path  # built from the tree
    client_sdist: Path
    client_wheel_from_sdist: Path  # what `python -m build` publishes
    service_wheel: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", out / "tree", ROOT / "client", ROOT)  # fmt: skip
    # sdist first, then a wheel from the unpacked sdist (not from the tree).
    _run(sys.executable, "-m", "build", "--no-isolation", "-o", out / "sdist", ROOT / "client")

    def one(folder: Path, pattern: str) -> Path:
        found = sorted(folder.glob(pattern))
        assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
        return found[0]

    return Dists(
        client_wheel=one(out / "tree", "gpuboss_client-*.whl"),
        client_sdist=one(out / "sdist", "gpuboss_client-*.tar.gz"),
        client_wheel_from_sdist=one(out / "sdist", "gpuboss_client-*.whl"),
        service_wheel=one(out / "tree", "gpuboss-*.whl"),
    )


def _wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _wheel_metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _top_level(files: list[str]) -> set[str]:
    """What a wheel puts at the top of site-packages, apart from its dist-info."""
    tops = {f.split("/", 1)[0] for f in files}
    return {t.removesuffix(".py").removesuffix(".pth") for t in tops if not t.endswith(".dist-info")}


@pytest.mark.parametrize("which", ["client_wheel", "client_wheel_from_sdist"])
def test_client_wheel_carries_the_lua_scripts(dists: Dists, which: str) -> None:
    files = _wheel_files(getattr(dists, which))
    lua = {f.removeprefix("gpuboss_client/lua/") for f in files if f.startswith("gpuboss_client/lua/")}
    assert lua == {f.name for f in (ROOT / "lua").glob("*.lua")}
    assert lua >= SCRIPT_FILES
    assert "gpuboss_client/py.typed" in files


def test_client_sdist_carries_the_lua_scripts(dists: Dists) -> None:
    with tarfile.open(dists.client_sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {f"lua/{f}" for f in SCRIPT_FILES} <= names
    assert {"pyproject.toml", "hatch_build.py", "gpuboss_client/scripts.py"} <= names


def test_both_client_wheels_hold_the_same_files(dists: Dists) -> None:
    def contents(wheel: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(wheel) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith(".dist-info/RECORD")}

    assert contents(dists.client_wheel) == contents(dists.client_wheel_from_sdist)


def test_client_depends_on_redis_alone(dists: Dists) -> None:
    for wheel in (dists.client_wheel, dists.client_wheel_from_sdist):
        required = _wheel_metadata(wheel)
        assert [canonicalize_name(r.name) for r in required if r.marker is None] == ["redis"]
        # hiredis only on request (the service asks for it): redis-py parses replies in C with it
        optional = [r for r in required if r.marker is not None]
        assert [(canonicalize_name(r.name), r.marker.evaluate({"extra": "hiredis"})) for r in optional] == [
            ("hiredis", True)
        ]


def test_service_depends_on_the_client_at_the_same_version(dists: Dists) -> None:
    (pin,) = [
        r for r in _wheel_metadata(dists.service_wheel) if canonicalize_name(r.name) == "gpuboss-client"
    ]
    assert pin.specifier.contains(dists.client_wheel.name.split("-")[1])


def test_wheels_install_only_their_own_top_level_names(dists: Dists) -> None:
    client_top = _top_level(_wheel_files(dists.client_wheel))
    service_top = _top_level(_wheel_files(dists.service_wheel))
    assert client_top == {"gpuboss_client"}
    assert service_top == {"gpuboss", "gpuboss_cli"}
    assert not (client_top | service_top) & FORBIDDEN_TOP_LEVEL


def test_service_wheel_declares_the_gpuboss_command(dists: Dists) -> None:
    with zipfile.ZipFile(dists.service_wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(name).decode()
    assert "[console_scripts]" in entry_points
    assert "gpuboss = gpuboss_cli.main:main" in entry_points


def test_service_wheel_carries_the_dashboard(dists: Dists) -> None:
    files = set(_wheel_files(dists.service_wheel))
    assert {f"gpuboss/static/{n}" for n in ("index.html", "dashboard.css", "dashboard.js")} <= files


@pytest.fixture(scope="module")
def wheelhouse(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheels plus every runtime dependency's, so installs need no index.

    NETWORK: this is the only step that may reach the package index (``pip download``, using the
    pip configuration in force). Dependencies are pinned to the versions installed here, so pip's
    cache usually answers and the installed program runs on what the test suite ran on.
    """
    house = tmp_path_factory.mktemp("wheelhouse")
    for wheel in (dists.client_wheel_from_sdist, dists.service_wheel):
        (house / wheel.name).write_bytes(wheel.read_bytes())
    ours = {"gpuboss", "gpuboss-client"}
    service = [r for r in _wheel_metadata(dists.service_wheel) if r.marker is None]
    (client_pin,) = [r for r in service if canonicalize_name(r.name) == "gpuboss-client"]
    wanted = {str(r) for r in service if canonicalize_name(r.name) not in ours}
    for r in _wheel_metadata(dists.client_wheel):  # with the extras the service asks the client for
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in client_pin.extras):
            r.marker = None
            wanted.add(str(r))
    pins = house / "constraints.txt"
    pins.write_text(
        "".join(
            f"{d.metadata['Name']}=={d.version}\n"
            for d in metadata.distributions()
            if canonicalize_name(d.metadata["Name"]) not in ours
        )
    )
    _run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", house,
         "-c", pins, *sorted(wanted))  # fmt: skip
    return house


class Venv(NamedTuple):
    python: Path
    bin: Path
    site_packages: Path
    workdir: Path  # outside the checkout, so the checkout is not on sys.path


def _clean_env(venv_bin: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtual environment (no system site-packages); pip is run from outside it."""
    where = tmp_path_factory.mktemp("venv") / "env"
    _run(sys.executable, "-m", "venv", "--without-pip", where)
    python = where / "bin" / "python"
    site = _run(python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    return Venv(python, where / "bin", Path(site.strip()), tmp_path_factory.mktemp("work"))


def _install(venv: Venv, wheelhouse: Path, name: str) -> None:
    # --isolated: no pip configuration or PIP_* variables, so the wheelhouse is all there is.
    _run(sys.executable, "-m", "pip", "--isolated", "--python", venv.python, "install", "-q",
         "--no-index", "--find-links", wheelhouse, name)  # fmt: skip


@pytest.fixture(scope="module")
def client_venv(venv: Venv, wheelhouse: Path) -> Venv:
    _install(venv, wheelhouse, "gpuboss-client")
    return venv


LEASE_PROGRAM = """
import importlib.util, json, sys
import gpuboss_client
from gpuboss_client import Boss, scripts

boss = Boss.from_url(sys.argv[1], holder="wheel-check")
boss.add_device("gpu0", "24GiB", cuda_index=0)
with boss.lease("8GiB", ttl=30, timeout=10) as lease:
    print(repr(lease))
    used = boss.devices()[0].used_mib
print(json.dumps({
    "lease": lease.id, "device": lease.device, "mib": lease.mib, "token": lease.token,
    "env": lease.env, "used_inside": used, "used_after": boss.devices()[0].used_mib,
    "lua_dir": str(scripts._lua_dir()), "package": gpuboss_client.__file__,
    "importable": sorted(n for n in ("client", "cli", "lua") if importlib.util.find_spec(n)),
}))
"""


def test_installed_client_leases_from_real_redis(
    client_venv: Venv, redis_url: str, real_redis: redis.Redis
) -> None:
    out = _run(client_venv.python, "-I", "-c", LEASE_PROGRAM, redis_url,
               cwd=client_venv.workdir, env=_clean_env(client_venv.bin))  # fmt: skip
    repr_line, json_line = out.strip().splitlines()[-2:]
    got = json.loads(json_line)
    assert repr_line.startswith(f"<Lease {got['lease']} 8192 MiB on default/gpu0 token=")
    assert (got["device"], got["mib"], got["used_inside"], got["used_after"]) == ("gpu0", 8192, 8192, 0)
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    # The scripts and the package come from the venv, not from this checkout.
    for path in (got["lua_dir"], got["package"]):
        assert Path(path).is_relative_to(client_venv.site_packages), path
        assert not Path(path).resolve().is_relative_to(ROOT), path
    assert Path(got["lua_dir"]) == client_venv.site_packages / "gpuboss_client" / "lua"
    assert got["importable"] == []
    # Redis saw the grant and the release of that lease, by that holder.
    stream = cast("list[tuple[str, dict[str, str]]]", real_redis.xrange(PoolKeys("default").events))
    mine = [e for _, e in stream if e.get("lease") == got["lease"]]
    assert [(e["event"], e["holder"], e["device"], e["mib"]) for e in mine] == [
        ("granted", "wheel-check", "gpu0", "8192"),
        ("released", "wheel-check", "gpu0", "8192"),
    ]
    assert mine[0]["token"] == str(got["token"])


@pytest.fixture(scope="module")
def service_venv(client_venv: Venv, wheelhouse: Path) -> Venv:
    _install(client_venv, wheelhouse, "gpuboss")
    return client_venv


def test_installed_service_imports(service_venv: Venv) -> None:
    out = _run(service_venv.python, "-I", "-c",
               "import gpuboss, gpuboss_cli, gpuboss_client, gpuboss.api, gpuboss.server;"
               "import importlib.resources as r;"
               "assert r.files('gpuboss').joinpath('static/index.html').read_text().startswith('<!');"
               "print(gpuboss.__file__, gpuboss_cli.__file__)",
               cwd=service_venv.workdir, env=_clean_env(service_venv.bin))  # fmt: skip
    for path in out.split():
        assert Path(path).is_relative_to(service_venv.site_packages), path


def test_installed_gpuboss_command_runs(service_venv: Venv) -> None:
    out = _run(service_venv.bin / "gpuboss", "--help", cwd=service_venv.workdir,
               env=_clean_env(service_venv.bin))  # fmt: skip
    assert "Usage" in out
