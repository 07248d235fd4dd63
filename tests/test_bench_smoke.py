"""The benchmark still runs: ``tests/bench.py --quick`` against its own redis-server (and, for the HTTP
section, the service's app under uvicorn). Structure only: every number is there and positive, no
speed is asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).with_name("bench.py")
CONTENDERS = ("gpuboss", "redis-py Lock", "python-redis-lock")
HEARTBEAT_LINE = re.compile(
    r"^heartbeat worker: (?P<leases>[\d,]+) leases, (?P<beats>[\d,]+) beats/s, "
    r"worker CPU (?P<worker>[\d.]+) s/s \((?P<worker_beat>[\d,.]+) µs per beat\), "
    r"Redis CPU (?P<redis>[\d.]+) s/s \((?P<redis_beat>[\d,.]+) µs per beat\)$",
    re.MULTILINE,
)


@pytest.mark.slow
def test_quick_benchmark_prints_every_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in (
        "## 1. Uncontended acquire + release",
        "## 2. Hand-off",
        "## 3. Uncontended pairs with N other live leases",
        "## 4. Eviction latency",
        "## 5. Uncontended acquire + release over HTTP",
        "## 6. Heartbeat worker",
        "## 8. Pairs confirmed by replicas (WAIT)",
        "confirm_replicas=1 / 0 per pair (p50):",
        "HTTP / direct client per pair:",
        "service CPU per HTTP pair:",
        "on_evict p99:",
        "gpuboss / redis-py Lock per pair:",
        "pinning",
        "redis_server",
    ):
        assert heading in proc.stdout, f"missing {heading!r} in:\n{proc.stdout}"

    results = json.loads(out.read_text(encoding="utf-8"))
    confirmed = results["confirm"]["pairs"]
    assert sorted(confirmed) == ["confirmed by 0", "confirmed by 1", "confirmed by 2"]
    assert all(pair["pairs"] == 100 for pair in confirmed.values())
    for name in CONTENDERS:
        pair = results["uncontended"]["pairs"][name]
        assert pair["pairs"] == 400
        assert 0 < pair["p50_us"] <= pair["p99_us"]
        for level in ("10", "1000"):
            assert results["live"]["levels"][level][name]["pairs"] == 200
    for name, handoff in results["handoff"].items():
        # Every contender is a mutual-exclusion primitive: no two holds may overlap in time.
        assert handoff["overlaps"] == 0, name
        assert handoff["turns_total"] == sum(handoff["turns_per_process"]) > 0, name
        assert handoff["processes"] == len(handoff["turns_per_process"]) == 8, name
    # gpuboss queues its waiters in order: every process gets a turn.
    assert results["handoff"]["gpuboss"]["turns_min"] > 0
    eviction = results["eviction"]
    assert eviction["rounds"] == 30
    # Every round evicted the idle holder (warm-up rounds too), which always gave the memory back.
    assert eviction["evicting_events"] == 30 + eviction["warmup_rounds"]
    assert eviction["revoked"] == 0
    for measure in ("to_callback", "to_holding"):
        assert 0 < eviction[measure]["p50_us"] <= eviction[measure]["p99_us"] <= eviction[measure]["max_us"]
    # The holder's on_evict starts before the requester can hold the memory it frees.
    assert eviction["to_callback"]["p50_us"] < eviction["to_holding"]["p50_us"]

    http = results["http"]
    assert set(http["pairs"]) == {"gpuboss over HTTP", "bare ASGI app, same HTTP", *CONTENDERS}
    for name, pair in http["pairs"].items():
        assert pair["pairs"] == 200, name
        assert pair["pairs_per_s"] > 0, name
        assert 0 < pair["p50_us"] <= pair["p99_us"], name
        assert pair["boss_cpu_us_per_pair"] >= 0, name
    # 400 requests through the service cost it CPU time (counted in 10 ms clock ticks at worst).
    assert http["pairs"]["gpuboss over HTTP"]["boss_cpu_us_per_pair"] > 0
    assert http["ratio_http_vs_direct"]["mean"] > 0
    assert http["server"]["app"].startswith("gpuboss.api.create_app")

    # Quick mode: 50 leases renewed once a second each, measured over 1 s after a warm-up.
    line = HEARTBEAT_LINE.search(proc.stdout)
    assert line is not None, f"no heartbeat worker line in:\n{proc.stdout}"
    assert line["leases"] == "50"
    assert int(line["beats"].replace(",", "")) > 0
    for number in ("worker", "worker_beat", "redis", "redis_beat"):
        assert float(line[number].replace(",", "")) >= 0, number
    beats = results["heartbeats"]
    assert beats["leases"] == 50
    assert beats["ttl_s"] == 3.0
    assert beats["beat_interval_s"] == 1.0
    assert beats["beats"] > 0
    assert beats["beats_per_s"] > 0
    # The worker did the beating, and it costs CPU: of its thread, of the process, of Redis.
    assert 0 < beats["worker_cpu_s_per_s"] <= beats["process_cpu_s_per_s"] + 0.01
    assert beats["worker_cpu_us_per_beat"] > 0
    assert beats["redis_cpu_s_per_s"] >= 0
    assert beats["lua_us_per_beat"] > 0
    # Every lease stayed held throughout and was released at the end.
    assert beats["lost"] == 0
    assert beats["released"] == 50
