"""``gpuboss consumers`` and the consumers in ``gpuboss status``, against the real boss service.

The service is the real app under uvicorn in a thread, over the real Redis, with a registry whose
one consumer is a process the boss starts itself (``sleep``): ensuring it leases its memory and
starts the process, releasing it stops the process and ends the lease. The commands run through
typer's CliRunner with ``--boss-url``, as in ``test_cli_http.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from support import CLEAN_ENV, SLEEPER_REGISTRY
from test_api import make_settings, serve
from typer.testing import CliRunner, Result

from gpuboss_cli.http import ENSURE_GRACE_S, HttpBoss
from gpuboss_cli.main import app
from gpuboss_client import PRIORITIES, BadRequest, Boss, ConsumerNotFound

runner = CliRunner()

REGISTRY = SLEEPER_REGISTRY
ANOTHER = """\
  - name: napper
    url: http://127.0.0.1:9
    vram: 2GiB
    priority: high
    command: {argv: [sleep, "600"], stop_timeout: 2}
"""


class Rig:
    """The running boss (its URL), its registry file, and a Redis client to check leases with."""

    def __init__(self, url: str, registry: Path, boss: Boss) -> None:
        self.url, self.registry, self.boss = url, registry, boss

    def gb(self, *args: str) -> Result:
        """``gpuboss --boss-url URL ARGS...``."""
        return gb(["--boss-url", self.url], *args)

    def ok(self, *args: str) -> str:
        """What a command that must succeed prints."""
        result = self.gb(*args)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        assert result.stderr == "", result.stderr
        return result.stdout

    def docs(self) -> list[dict[str, Any]]:
        """``consumers list --json``'s documents."""
        docs: list[dict[str, Any]] = json.loads(self.ok("consumers", "list", "--json"))["consumers"]
        return docs

    def doc(self, name: str) -> dict[str, Any]:
        """The document of consumer ``name`` (it must have exactly one)."""
        found = [d for d in self.docs() if d["name"] == name]
        assert len(found) == 1, found
        return found[0]

    def lease_ids(self) -> set[str]:
        """The leases in Redis right now."""
        return {x.id for x in self.boss.leases()}


def gb(where: list[str], *args: str, env: dict[str, str | None] | None = None) -> Result:
    return runner.invoke(app, [*where, *args], env=CLEAN_ENV | (env or {}))


@pytest.fixture
def rig(real_redis: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Rig]:
    """The boss with gpu0 (24 GiB) and the ``sleeper`` consumer, on the flushed real Redis."""
    registry = tmp_path / "consumers.yaml"
    registry.write_text(REGISTRY, encoding="utf-8")
    with (
        serve(make_settings(redis_url, consumers=registry)) as svc,
        Boss.from_url(redis_url, holder="checker") as boss,
    ):
        yield Rig(svc.url, registry, boss)


def test_list_ensure_release(rig: Rig) -> None:
    out = rig.ok("consumers")  # no command: the list
    assert "1 consumer" in out
    row = next(line for line in out.splitlines() if "sleeper" in line)
    assert row.split()[:2] == ["sleeper", "unloaded"], row
    assert rig.ok("consumers", "list") == out
    doc = rig.doc("sleeper")
    assert (doc["state"], doc["lease"], doc["vram_mib"]) == ("unloaded", None, 1024)
    assert rig.lease_ids() == set()

    out = rig.ok("consumers", "ensure", "sleeper", "--timeout", "10")
    assert out.startswith("consumer sleeper: idle on gpu0, 1.0 GiB leased (lease "), out
    doc = rig.doc("sleeper")
    assert doc["state"] == "idle"
    assert doc["device"] == "gpu0"
    assert isinstance(doc["lease"], str)
    assert doc["loads"] == 1
    assert rig.lease_ids() == {doc["lease"]}  # the lease is really in Redis
    row = next(line for line in rig.ok("consumers").splitlines() if "sleeper" in line)
    assert row.split()[:5] == ["sleeper", "idle", "gpu0", "1.0", "GiB"], row

    # ensuring a resident consumer keeps its lease
    again = json.loads(rig.ok("consumers", "ensure", "sleeper", "--json"))
    assert (again["state"], again["lease"]) == ("idle", doc["lease"])

    out = rig.ok("consumers", "release", "sleeper")
    assert out.strip() == "consumer sleeper: unloaded", out
    doc = rig.doc("sleeper")
    assert (doc["state"], doc["lease"], doc["unloads"]) == ("unloaded", None, 1)
    assert rig.lease_ids() == set()


def test_release_all(rig: Rig) -> None:
    rig.ok("consumers", "ensure", "sleeper")
    assert rig.doc("sleeper")["state"] == "idle"
    assert len(rig.lease_ids()) == 1
    out = rig.ok("consumers", "release-all")
    assert "released: 1 consumer" in out
    row = next(line for line in out.splitlines() if "sleeper" in line)
    assert row.split()[:2] == ["sleeper", "unloaded"], row
    assert rig.lease_ids() == set()
    assert rig.doc("sleeper")["state"] == "unloaded"
    # nothing left to release
    assert rig.ok("consumers", "release-all").startswith("released no consumers")
    assert json.loads(rig.ok("consumers", "release-all", "--json")) == {"consumers": []}
    rig.ok("consumers", "ensure", "sleeper")
    docs = json.loads(rig.ok("consumers", "release-all", "--json"))["consumers"]
    assert [(d["name"], d["state"], d["lease"]) for d in docs] == [("sleeper", "unloaded", None)]
    assert rig.lease_ids() == set()


def test_reload(rig: Rig) -> None:
    assert rig.ok("consumers", "reload").strip() == "reloaded the consumer registry: no changes"
    rig.registry.write_text(REGISTRY + ANOTHER, encoding="utf-8")
    assert rig.ok("consumers", "reload").strip() == "reloaded: added napper"
    napper = rig.doc("napper")
    assert (napper["state"], napper["vram_mib"], napper["priority"]) == ("unloaded", 2048, PRIORITIES["high"])
    assert "napper" in rig.ok("consumers")
    assert json.loads(rig.ok("consumers", "reload", "--json")) == {"changes": []}

    # a file with errors is a bad request, and changes nothing
    rig.registry.write_text(REGISTRY + ANOTHER.replace("2GiB", "lots"), encoding="utf-8")
    result = rig.gb("consumers", "reload")
    assert result.exit_code == BadRequest.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: "), result.stderr
    assert rig.doc("napper")["vram_mib"] == 2048


@pytest.mark.parametrize(
    "args",
    [
        ["ensure", "nobody"],
        ["ensure", "nobody", "--timeout", "0"],
        ["release", "nobody"],
        ["release", "sleeper", "--model", "no-such-model"],
    ],
)
def test_unknown_consumer(rig: Rig, args: list[str]) -> None:
    result = rig.gb("consumers", *args)
    assert result.exit_code == ConsumerNotFound.exit_code == 18, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[consumer_not_found]: "), result.stderr
    assert result.stdout == ""
    assert rig.lease_ids() == set()


@pytest.mark.parametrize(
    "args",
    [
        ["ensure", "bad name"],
        ["release", "a/b"],
        ["ensure", "x" * 65],
        ["ensure", "sleeper", "--timeout", "-1"],
    ],
)
def test_bad_arguments_are_bad_requests(rig: Rig, args: list[str]) -> None:
    result = rig.gb("consumers", *args)
    assert result.exit_code == BadRequest.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: "), result.stderr


@pytest.mark.parametrize(
    "args",
    [["consumers"], ["consumers", "list"], ["consumers", "ensure", "sleeper"], ["consumers", "reload"]],
)
@pytest.mark.parametrize("where", [[], ["--redis-url", "redis://127.0.0.1:1/0"]])
def test_no_boss_url(where: list[str], args: list[str]) -> None:
    result = gb(where, *args)
    assert result.exit_code == BadRequest.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: the managed consumers live in the boss service")
    assert "give --boss-url" in result.stderr
    assert result.stdout == ""


def test_boss_url_from_the_environment(rig: Rig) -> None:
    result = gb([], "consumers", "--json", env={"GPUBOSS_BOSS_URL": rig.url})
    assert result.exit_code == 0, result.stderr
    assert [d["name"] for d in json.loads(result.stdout)["consumers"]] == ["sleeper"]


def test_status_shows_the_consumers_over_http(rig: Rig, redis_url: str) -> None:
    out = rig.ok("status")
    parts = re.split(r"^consumers *$", out, flags=re.MULTILINE)
    assert len(parts) == 2, out
    head, section = parts
    assert "pool default" in head
    assert "sleeper" not in head
    row = next(line for line in section.splitlines() if "sleeper" in line)
    assert row.split()[:2] == ["sleeper", "unloaded"], row

    rig.ok("consumers", "ensure", "sleeper")
    doc = json.loads(rig.ok("status", "--json"))
    [consumer] = doc["consumers"]
    assert (consumer["name"], consumer["state"]) == ("sleeper", "idle")
    assert [x["id"] for x in doc["pools"]["default"]["leases"]] == [consumer["lease"]]
    with Boss.from_url(redis_url, holder="setup") as setup:
        setup.add_device("other", "8GiB", pool="elsewhere")
    assert json.loads(rig.ok("status", "--json", "--pool", "elsewhere")).get("consumers") is None

    # over Redis there are no consumers to show
    direct = gb(["--redis-url", redis_url], "status", "--json")
    assert direct.exit_code == 0, direct.stderr
    assert "consumers" not in json.loads(direct.stdout)
    text = gb(["--redis-url", redis_url], "status").stdout
    assert "pool default" in text
    assert not re.search(r"^consumers *$", text, flags=re.MULTILINE), text


def test_http_boss_consumer_methods(rig: Rig) -> None:
    with HttpBoss(rig.url) as boss:
        assert [(d["name"], d["state"]) for d in boss.consumers()] == [("sleeper", "unloaded")]
        doc = boss.ensure("sleeper", timeout=5)
        assert doc["state"] == "idle"
        assert rig.lease_ids() == {doc["lease"]}
        assert [d["state"] for d in boss.release_consumer("sleeper")] == ["unloaded"]
        assert boss.release_all_consumers() == []  # nothing holds memory now
        assert boss.reload_consumers() == []
        with pytest.raises(ConsumerNotFound):
            boss.ensure("nobody")


def test_ensure_reads_for_longer_than_it_waits() -> None:
    """The ensure's reply comes after the wait and the load: its read timeout covers both."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append({"path": request.url.path, "body": json.loads(request.content), **request.extensions})
        doc = {"name": "sleeper", "model": None, "state": "idle", "lease": "x"}
        return httpx.Response(200, json=doc)

    with HttpBoss("http://boss.test", timeout=7.0, transport=httpx.MockTransport(handler)) as boss:
        assert boss.ensure("sleeper", model="m", timeout=45)["state"] == "idle"
    [call] = seen
    assert call["path"] == "/v1/consumers/sleeper/ensure"
    assert call["body"] == {"model": "m", "timeout_s": 45}
    assert call["timeout"]["read"] == 45 + ENSURE_GRACE_S
    assert call["timeout"]["connect"] == 7.0
