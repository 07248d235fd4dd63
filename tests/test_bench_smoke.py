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
FLOOR_LINE = re.compile(
    r"^gpuboss / BLPOP hand-off p50: (?P<ratio>[\d.]+)x \(target <= 1\.1x\)$", re.MULTILINE
)
SATURATION_LINE = re.compile(
    r"^saturation: gpuboss (?P<gpuboss>[\d,]+) pairs/s at 100 % Redis CPU vs redis-py Lock "
    r"(?P<lock>[\d,]+) pairs/s \((?P<ratio>[\d.]+)x; (?P<how>measured|projected[^)]*)\)$",
    re.MULTILINE,
)
SATURATED = ("gpuboss", "redis-py Lock")


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
        "## 9. Saturation: gpuboss, uncontended pairs from 2, 4 processes, 0.5 s per step",
        "## 9. Saturation: redis-py Lock, uncontended pairs from 2, 4 processes, 0.5 s per step",
        "BLPOP hand-off  ",
        "confirm_replicas=1 / 0 per pair (p50):",
        "HTTP / direct client per pair:",
        "service CPU per HTTP pair:",
        "on_evict p99:",
        "gpuboss / redis-py Lock per pair:",
        "gpuboss / redis-py Lock Redis CPU per pair:",
        "floor: a pair's commands / redis-py Lock:",
        "## 1b. What a gpuboss pair costs Redis, by command",
        "## 3b. Pairs on a free device while N waiters queue for another",
        "pinning",
        "redis_server",
    ):
        assert heading in proc.stdout, f"missing {heading!r} in:\n{proc.stdout}"

    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["uncontended"]["commands"]["fcall"]["calls_per_pair"] == 2  # acquire and release
    assert "gpuboss, scripts" in results["uncontended"]["pairs"]
    # The floor under a pair makes exactly the Redis commands a gpuboss pair makes, no other.
    assert results["uncontended"]["floor_makes_the_same_commands"], (
        results["uncontended"]["commands"],
        results["uncontended"]["floor_commands"],
    )
    floor = results["uncontended"]["pairs"]["floor: a pair's commands"]
    assert floor["pairs"] == 400
    assert 0 < floor["lua_us_per_pair"] < floor["server_cpu_us_per_pair"]
    assert results["uncontended"]["ratio_floor_vs_redis_py_lock"]["redis_cpu"] > 0
    confirmed = results["confirm"]["pairs"]
    assert sorted(confirmed) == ["confirmed by 0", "confirmed by 1", "confirmed by 2"]
    assert all(pair["pairs"] == 100 for pair in confirmed.values())
    for name in CONTENDERS:
        pair = results["uncontended"]["pairs"][name]
        assert pair["pairs"] == 400
        assert 0 < pair["p50_us"] <= pair["p99_us"]
        for level in ("10", "1000"):
            assert results["live"]["levels"][level][name]["pairs"] == 200
    # 3b: the free device is granted behind any number of waiters for the other one (past the walk's
    # bound of 64 the queue's census says nobody waits for it), and ahead of them.
    waiters = results["live"]["waiters"]
    for level in (0, 16, 63, 64, 10_000):
        for priority in ("normal", "high"):
            assert waiters[f"{level}/{priority}"]["granted"] == waiters[f"{level}/{priority}"]["tries"] == 200
    contended = results["handoff"]["contenders"]
    assert set(contended) == {"gpuboss", "redis-py Lock", "redis-py Lock sleep=0.001", "python-redis-lock",
                              "BLPOP hand-off"}  # fmt: skip
    for name, handoff in contended.items():
        # Every contender is a mutual-exclusion primitive: no two holds may overlap in time.
        assert handoff["overlaps"] == 0, name
        assert handoff["turns_total"] == sum(handoff["turns_per_process"]) > 0, name
        assert handoff["processes"] == len(handoff["turns_per_process"]) == 8, name
    # gpuboss queues its waiters in order, as Redis serves BLPOP waiters: every process gets a turn.
    for name in ("gpuboss", "BLPOP hand-off"):
        assert contended[name]["turns_min"] > 0, name
        assert contended[name]["handoffs"] > 0, name
        assert 0 < contended[name]["p50_us"] <= contended[name]["p99_us"], name
    floor_ratio = contended["gpuboss"]["p50_us"] / contended["BLPOP hand-off"]["p50_us"]
    assert results["handoff"]["ratio_gpuboss_vs_blpop_p50"] == pytest.approx(floor_ratio)
    floor_line = FLOOR_LINE.search(proc.stdout)
    assert floor_line is not None, f"no BLPOP floor line in:\n{proc.stdout}"
    assert float(floor_line["ratio"]) == pytest.approx(floor_ratio, abs=0.006)
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

    # Quick mode: the ceiling from 2 and 4 processes flat out, then open loop at 50/80/100 % of it.
    saturation = results["saturation"]
    assert saturation["processes"] == [2, 4]
    assert saturation["window_s"] == 0.5
    assert set(saturation["contenders"]) == set(SATURATED)
    for name in SATURATED:
        sat = saturation["contenders"][name]
        search = sat["ceiling_search"]
        assert [w["processes"] for w in search] == [2, 4], name
        assert all(w["target_pairs_per_s"] is None for w in search), name
        assert sat["ceiling"] == max(search, key=lambda w: w["pairs_per_s"]), name
        assert sorted(sat["levels"], key=int) == ["50", "80", "100"], name
        for level, window in sat["levels"].items():
            target = sat["ceiling"]["pairs_per_s"] * int(level) / 100
            assert window["target_pairs_per_s"] == pytest.approx(target), (name, level)
            assert window["processes"] == sat["ceiling"]["processes"], (name, level)
            # Paced: an open-loop window never runs (much) faster than its timetable.
            assert 0 < window["pairs_per_s"] <= 1.25 * target, (name, level)
            # The timetable offered target x window pairs (each process rounds its share up or down),
            # and every one of them ran or is counted as missed.
            offered = window["pairs"] + window["missed"]
            assert abs(offered - target * saturation["window_s"]) <= window["processes"], (name, level)
        for window in [*search, *sat["levels"].values()]:
            assert window["pairs"] > 0, name
            assert window["latency_samples"] == window["pairs"], name  # few enough to keep every one
            assert window["pairs_per_s"] > 0, name
            assert 0 < window["p50_us"] <= window["p99_us"], name
            assert window["redis_cpu_pct"] > 0, name
            if (main := window["redis_main_cpu_pct"]) is not None:  # INFO has it from Redis 6.2 on
                assert 0 < main <= window["redis_cpu_pct"] + 0.5, name  # a part of the whole server
                assert main <= 101, name  # one thread: one CPU at most
            assert window["client_cpu_pct"] > 0, name
            assert window["pairs_per_redis_cpu_s"] > 0, name
    capacity = saturation["capacity_at_100pct_redis_cpu"]
    for name in SATURATED:
        assert capacity[name] == saturation["contenders"][name]["ceiling"]["pairs_per_redis_cpu_s"] > 0
    assert saturation["ratio_gpuboss_vs_redis_py_lock"] == pytest.approx(
        capacity["gpuboss"] / capacity["redis-py Lock"]
    )
    sat_line = SATURATION_LINE.search(proc.stdout)
    assert sat_line is not None, f"no saturation line in:\n{proc.stdout}"
    assert int(sat_line["gpuboss"].replace(",", "")) == round(capacity["gpuboss"])
    assert int(sat_line["lock"].replace(",", "")) == round(capacity["redis-py Lock"])
    assert (sat_line["how"] == "measured") is saturation["redis_saturated"]
    # Where Redis did not saturate, the run says so and why.
    note = "NOTE: redis-server's main thread peaked at"
    assert (note in proc.stdout) is not saturation["redis_saturated"]
