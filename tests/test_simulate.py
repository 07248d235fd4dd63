"""``gpuboss simulate``: hand-made traces whose answer is known, replayed through the real scripts
(on the simulator's own private redis-server) and the baselines; reproducibility from a seed; the
shipped traces; the command, its plots and its errors."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gpuboss.simulate import POLICIES, Report, TraceError, generate, load_trace, parse_trace, simulate
from gpuboss.simulate.replay import RequestRecord
from gpuboss_cli.main import app

TRACES = Path(__file__).resolve().parent.parent / "gpuboss" / "simulate" / "traces"
runner = CliRunner()


def trace_doc(services: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A one-device trace of 10 GiB (one hour, drained for up to two) with these services."""
    doc: dict[str, Any] = {
        "name": "hand",
        "hours": 1,
        "drain_hours": 2,
        "devices": [{"name": "gpu0", "vram": "10GiB"}],
        "settings": {"poll_s": 5, "starvation_s": 600},
        "services": services,
    }
    return doc | top


def job(vram: str, priority: int | str, at: list[float], duration: float, **more: Any) -> dict[str, Any]:
    """A job service with arrivals at fixed times and a fixed duration."""
    spec = {"vram": vram, "priority": priority, "mode": "job", "arrivals": {"at": at}, "duration_s": duration}
    return spec | more


def requests(report: Report, policy: str, service: str) -> list[RequestRecord]:
    (outcome,) = [o for o in report.outcomes if o.policy == policy]
    return sorted((r for r in outcome.requests if r.service == service), key=lambda r: r.arrival)


# ---------------------------------------------------------------------------------------------
# Known answers


def test_two_jobs_that_cannot_coexist_serialise() -> None:
    trace = parse_trace(trace_doc({"a": job("8GiB", 50, [0], 100), "b": job("8GiB", 50, [10], 50)}))
    report = simulate(trace, policies=("gpuboss", "lock", "fcfs"))
    for policy in ("gpuboss", "lock", "fcfs"):
        (a,) = requests(report, policy, "a")
        (b,) = requests(report, policy, "b")
        assert (a.started, a.finished) == (0, 100), policy
        assert (b.started, b.finished) == (100, 150), policy  # waited for a, never beside it
        assert a.preempted == b.preempted == 0
    for outcome in report.outcomes:  # never more than the device held
        edges = sorted({s.start for s in outcome.segments})
        for t in edges:
            assert sum(s.mib for s in outcome.segments if s.start <= t < s.end) <= 10 * 1024


def test_priority_tiers_thrash_two_jobs_of_the_same_tier() -> None:
    """llmux's rule allows same-tier replacement and has no queue: b evicts a, a's retry evicts b,
    and so on; both finish, much later than serialised, after many preemptions."""
    trace = parse_trace(trace_doc({"a": job("8GiB", 50, [0], 100), "b": job("8GiB", 50, [10], 50)}))
    report = simulate(trace, policies=("tiers",))
    (a,) = requests(report, "tiers", "a")
    (b,) = requests(report, "tiers", "b")
    assert b.started == 10  # it did not wait: it evicted a at once
    assert a.preempted + b.preempted > 2
    assert a.finished is not None
    assert b.finished is not None
    assert report.summaries[0].evictions == a.preempted + b.preempted


def _starving(aging_s: float) -> dict[str, Any]:
    # High-priority jobs arrive every 30 s and each runs 60 s: their queue only grows for 30
    # minutes, and a low-priority job waits behind all of them unless it ages.
    highs = [30.0 * i for i in range(60)]
    return trace_doc(
        {"high": job("8GiB", 90, highs, 60), "low": job("8GiB", 10, [5], 60)},
        settings={"aging_s": aging_s, "poll_s": 20, "starvation_s": 900},
    )


def test_a_low_priority_waiter_with_aging_is_granted_within_its_bound() -> None:
    aging_s = 60
    report = simulate(parse_trace(_starving(aging_s)), policies=("gpuboss",))
    (low,) = requests(report, "gpuboss", "low")
    # Every waiter rises one level (10) per aging_s up to 100, the high ones too: at 100 after 9
    # periods it is the oldest of the top level and takes the next release (one high job's run
    # later at most), give or take a poll.
    bound = (100 - 10) / 10 * aging_s + 60 + 2 * 20
    assert low.wait is not None
    assert low.wait <= bound


def test_without_aging_the_low_priority_waiter_waits_for_every_high_one() -> None:
    report = simulate(parse_trace(_starving(0)), policies=("gpuboss",))
    (low,) = requests(report, "gpuboss", "low")
    highs = requests(report, "gpuboss", "high")
    assert low.started is not None
    assert low.started >= max(h.started or 0 for h in highs)  # strictly behind all of them
    assert low.wait is not None
    assert low.wait > 1800


def test_a_warm_model_is_evicted_for_a_request_that_needs_its_memory() -> None:
    warm = {"vram": "8GiB", "priority": 50, "keep_warm_s": 3600, "load_s": 5, "unload_s": 3}
    doc = trace_doc(
        {
            "warm": warm | {"arrivals": {"at": [0]}, "duration_s": 10},
            "big": job("6GiB", 50, [100], 10, load_s=2),
        }
    )
    report = simulate(parse_trace(doc))
    summary = {s.policy: s for s in report.summaries}
    assert summary["gpuboss"].evictions == 1
    (big,) = requests(report, "gpuboss", "big")
    assert big.wait == pytest.approx(3 + 2)  # the warm model unloads, then big loads
    assert summary["fcfs"].evictions == 0  # fcfs waits for the keep-warm time to end instead
    (big_fcfs,) = requests(report, "fcfs", "big")
    assert big_fcfs.wait == pytest.approx(5 + 10 + 3600 + 3 + 2 - 100)


def test_a_victim_slower_than_its_grace_is_revoked() -> None:
    victim = job("8GiB", 10, [0], 600, preemptible=True, unload_s=20, grace_s=5)
    doc = trace_doc({"victim": victim, "urgent": job("8GiB", 90, [100], 10)})
    report = simulate(parse_trace(doc), policies=("gpuboss",))
    (summary,) = report.summaries
    assert (summary.evictions, summary.preemptions, summary.revoked) == (1, 1, 1)
    (urgent,) = requests(report, "gpuboss", "urgent")
    assert urgent.wait == pytest.approx(5)  # granted at the grace deadline, not after the unload
    (victim_req,) = requests(report, "gpuboss", "victim")
    assert victim_req.finished == pytest.approx(100 + 5 + 10 + 500)  # the rest of its run, after urgent


def test_a_request_bigger_than_every_device_never_runs() -> None:
    doc = trace_doc({"huge": job("12GiB", 50, [0], 10), "fine": job("4GiB", 50, [1], 10)})
    report = simulate(parse_trace(doc))
    for summary in report.summaries:
        assert summary.never == 1, summary.policy
        assert summary.starved == 0
    for policy in POLICIES:
        (huge,) = requests(report, policy, "huge")
        assert huge.never_fits
        assert huge.started is None


def test_a_pipeline_runs_its_phases_one_after_another() -> None:
    doc = trace_doc(
        {"a": {"vram": "4GiB", "mode": "job"}, "b": {"vram": "4GiB", "mode": "job", "load_s": 3}},
        pipelines={
            "p": {
                "arrivals": {"at": [0]},
                "phases": [
                    {"service": "a", "duration_s": 10, "gap_s": 5},
                    {"service": "b", "duration_s": 20, "gap_s": 7},
                ],
            }
        },
    )
    report = simulate(parse_trace(doc), policies=("gpuboss",))
    (a,) = requests(report, "gpuboss", "a")
    (b,) = requests(report, "gpuboss", "b")
    assert (a.arrival, a.finished) == (5, 15)
    assert (b.arrival, b.started, b.finished) == (22, 25, 45)


# ---------------------------------------------------------------------------------------------
# Reproducibility, bounds, the shipped traces


SMALL = {
    "name": "small",
    "hours": 2,
    "drain_hours": 1,
    "devices": [{"name": "gpu0", "vram": "24GiB"}],
    "settings": {"aging_s": 120, "min_residency_s": 30, "poll_s": 5, "starvation_s": 300},
    "services": {
        "llm": {
            "vram": "14GiB",
            "keep_warm_s": 120,
            "load_s": 6,
            "arrivals": {"per_hour": 40},
            "duration_s": {"mean": 20, "cv": 1},
        },
        "tts": {
            "vram": "6GiB",
            "priority": "high",
            "keep_warm_s": 300,
            "load_s": 4,
            "arrivals": {"per_hour": 30},
            "duration_s": 5,
        },
        "gen": {
            "vram": "16GiB",
            "priority": "low",
            "mode": "job",
            "preemptible": True,
            "load_s": 20,
            "unload_s": 3,
            "arrivals": {"per_hour": 4},
            "duration_s": {"mean": 300, "cv": 0.3},
        },
    },
    "variants": {"cold": {"keep_warm_s": 0}},
}


def test_the_same_seed_gives_the_same_report_and_another_seed_another() -> None:
    trace = parse_trace(copy.deepcopy(SMALL))
    first, again = simulate(trace, seed=7, variants=False), simulate(trace, seed=7, variants=False)
    assert first.table() == again.table()
    assert [(o.policy, o.segments) for o in first.outcomes] == [
        (o.policy, o.segments) for o in again.outcomes
    ]
    other = simulate(trace, seed=8, policies=("fcfs",))
    assert [j.arrival_s for j in generate(trace, 8)] != [j.arrival_s for j in generate(trace, 7)]
    assert other.summaries[0].requests != first.summaries[0].requests or other.jobs != first.jobs


def test_no_policy_beats_the_offline_bound() -> None:
    report = simulate(parse_trace(copy.deepcopy(SMALL)), seed=3)
    assert [s.policy for s in report.summaries] == ["gpuboss", "gpuboss/cold", "lock", "tiers", "fcfs"]
    for summary in report.summaries:
        assert summary.busy <= report.bound + 1e-9, summary.policy
        assert summary.busy <= summary.held <= 1
    text = report.table()
    assert "offline bound" in text
    assert "priority 90" in text


@pytest.mark.parametrize("name", ["homelab", "fleet"])
def test_the_shipped_traces_load_and_draw_jobs(name: str) -> None:
    trace = load_trace(TRACES / f"{name}.yaml")
    jobs = generate(trace, trace.seed)
    assert len(jobs) > 500
    assert jobs == generate(trace, trace.seed)
    assert all(0 <= j.arrival_s < trace.hours * 3600 for j in jobs)
    assert trace.variants


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown field(s) colour"),
        ({"devices": []}, "devices must be a non-empty list"),
        ({"services": {"a": {"vram": "lots"}}}, "services.a.vram"),
        ({"services": {"a": {"vram": "1GiB", "priority": "urgent"}}}, "services.a.priority"),
        ({"services": {"a": {"vram": "1GiB", "mode": "batch"}}}, "services.a.mode"),
        ({"services": {"a": {"vram": "1GiB", "arrivals": {"at": [99999]}}}}, "services.a.arrivals.at"),
        (
            {"pipelines": {"p": {"arrivals": {"per_hour": 1}, "phases": [{"service": "nope"}]}}},
            "phases[0].service",
        ),
        ({"variants": {"v": {"colour": 1}}}, "variants.v: unknown field(s) colour"),
    ],
)
def test_a_bad_trace_names_the_field(change: dict[str, Any], message: str) -> None:
    doc = trace_doc({"a": job("1GiB", 50, [0], 1)}) | change
    with pytest.raises(TraceError) as info:
        parse_trace(doc)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# The command


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "trace.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_command_prints_the_table_and_writes_small_plots(tmp_path: Path) -> None:
    path = _write(tmp_path, copy.deepcopy(SMALL) | {"devices": [{"name": "g", "vram": "24GiB", "count": 2}]})
    result = runner.invoke(
        app, ["simulate", str(path), "--seed", "2", "--out", str(tmp_path / "out" / "small")]
    )
    assert result.exit_code == 0, result.output
    assert "seed 2" in result.output
    assert "offline bound" in result.output
    for suffix in ("memory", "waits", "devices"):
        png = tmp_path / "out" / f"small-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000


def test_the_command_reports_a_bad_trace_and_an_unknown_policy(tmp_path: Path) -> None:
    bad = _write(tmp_path, {"name": "x"})
    result = runner.invoke(app, ["simulate", str(bad)])
    assert result.exit_code == 2
    assert "error[bad_request]" in result.output
    assert "services must be a mapping" in result.output
    good = _write(tmp_path, trace_doc({"a": job("1GiB", 50, [0], 1)}))
    result = runner.invoke(app, ["simulate", str(good), "--policy", "magic"])
    assert result.exit_code == 2
    assert "unknown policy magic" in result.output
    result = runner.invoke(app, ["simulate", "no-such-trace"])
    assert result.exit_code == 2
    assert "cannot read trace" in result.output


def test_plotting_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_matplotlib(name: str, package: str | None = None) -> Any:
        if name.partition(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_matplotlib)
    good = _write(tmp_path, trace_doc({"a": job("1GiB", 50, [0], 1)}))
    result = runner.invoke(app, ["simulate", str(good), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "gpuboss[simulate]" in result.output
    assert not list(tmp_path.glob("p-*.png"))


def test_the_command_runs_a_shipped_trace_by_name() -> None:
    result = runner.invoke(app, ["simulate", "homelab", "--policy", "fcfs", "--policy", "lock"])
    assert result.exit_code == 0, result.output
    assert "trace homelab" in result.output
