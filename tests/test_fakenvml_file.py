"""The file-backed fake NVML (``--fake-nvml @state.json``): GPUs and their processes read from a
JSON file at the start of every pass, so that other programs can change what NVML reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from gpuboss.fakenvml import FakeNvml, fake_uuid
from gpuboss.probe import NvmlProbe
from gpuboss_cli.main import app
from gpuboss_client import Boss

CLEAN = {"GPUBOSS_REDIS_URL": None, "GPUBOSS_BOSS_URL": None, "COLUMNS": None}


def write(path: Path, gpus: list[dict[str, object]]) -> None:
    path.write_text(json.dumps({"gpus": gpus}), encoding="utf-8")


def test_every_pass_reads_the_file_again(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    write(
        state,
        [{"name": "NVIDIA A100", "total": "40GiB"}, {"total": 24576, "processes": [{"pid": 7, "mib": 512}]}],
    )
    probe = NvmlProbe(FakeNvml.from_file(state))

    first = probe.devices()
    assert [(d.uuid, d.name, d.total_mib) for d in first] == [
        (fake_uuid(0), "NVIDIA A100", 40960), (fake_uuid(1), "NVIDIA Fake GPU", 24576),
    ]  # fmt: skip
    assert [(p.pid, p.used_mib) for p in probe.processes()] == [(7, 512)]

    # An engine loads a model: its process now uses 6 GiB on the first GPU; the second is gone.
    write(state, [{"name": "NVIDIA A100", "total": "40GiB", "processes": [{"pid": 42, "mib": 6144}]}])
    second = probe.devices()
    assert [(d.uuid, d.used_mib) for d in second] == [(fake_uuid(0), 6144)]
    assert [(p.pid, p.used_mib) for p in probe.processes()] == [(42, 6144)]

    # A file half rewritten keeps the last good state.
    state.write_text('{"gpus": [', encoding="utf-8")
    assert [d.uuid for d in probe.devices()] == [fake_uuid(0)]


@pytest.mark.parametrize("text", ["", "{}", '{"gpus": 3}', '{"gpus": [{"total": "lots"}]}'])
def test_a_bad_file_at_the_start_is_an_error(tmp_path: Path, text: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read the fake GPUs"):
        FakeNvml.from_file(state)


def test_the_agent_command_takes_a_state_file(
    real_redis: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    write(state, [{"total": "16GiB", "other_mib": 2048}])
    args = ["--redis-url", redis_url, "agent", "--once", "--host", "lab", "--fake-nvml", f"@{state}"]
    result = CliRunner().invoke(app, args, env=CLEAN)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    (device,) = Boss(real_redis, holder="t").devices("default")
    assert (device.total_mib, device.unmanaged_mib) == (16384, 2048)

    result = CliRunner().invoke(app, [*args[:-1], f"@{tmp_path / 'missing.json'}"], env=CLEAN)
    assert result.exit_code == 2
    assert "cannot read the fake GPUs" in result.stderr
