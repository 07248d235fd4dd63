"""The chaos suite (``tests/chaos.py``): its checker on hand-made histories, and real runs.

The checker is a pure function over what a run recorded, so each of its rules is shown to fire on
a small history that breaks it (and not on the same history unbroken): an over-grant that only the
holders' beliefs show, one the server's stream shows, a belief that outlives its lease, a second
terminal event, a fencing token that does not increase, a double grant, an eviction of an active
lease that was not preemptible, a grant that jumps the queue or takes promised memory, a revocation
before its deadline; and, for the sentinel mode, that a grant a failover left behind is named as
such and that the record is matched against a new primary's stream. Then real runs as subprocesses
(real ``redis-server``, real worker processes, real faults): a short one that must inject every
fault kind, grant leases and find no violation; the same with ``--topology sentinel`` (a primary,
two replicas, three sentinels), which must fail over in each way and grant again after each; and
one with ``--break over-grant`` (a worker pretends to hold a device it was never granted) that
must fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from chaos import Recording, Verdict, check, faults_for, merge_stream

CHAOS = Path(__file__).with_name("chaos.py")
#: Real violations this suite found and that are not fixed yet, by the cause the checker gives
#: them. A run whose only violations are ``history``/``fence``/``capacity_holders``/``error_tree``
#: ones of these causes is an expected failure (xfail, with the checker's findings); any other
#: violation fails the test.
#: Delete an entry when its bug is fixed.
KNOWN_BUGS: dict[str, str] = {}
MS = 1_000_000  # ns per ms: the hand-made histories use an identity clock (Redis ms = ns / 1e6)

Event = tuple[str, dict[str, str]]


def ev(ms: int, event: str, lease: str = "", **fields: object) -> Event:
    """One stream entry at Redis time ``ms`` (entry ids must be unique: use distinct ms)."""
    f = {"event": event} | ({"lease": lease} if lease else {}) | {k: str(v) for k, v in fields.items()}
    return (f"{ms}-0", f)


def granted(ms: int, lease: str, mib: int, token: int, priority: int = 50, device: str = "gpu0") -> Event:
    return ev(
        ms, "granted", lease, holder=f"chaos-s0-p{ms}", device=device, mib=mib, priority=priority, token=token
    )


def evicting(ms: int, lease: str, mib: int, priority: int, requester: str, deadline: int) -> Event:
    """``lease`` asked back for ``requester`` by ``deadline`` (Redis ms), on gpu0."""
    fields = {"holder": "h", "device": "gpu0", "mib": mib, "priority": priority, "deadline": deadline}
    return ev(ms, "evicting", lease, **fields, **{"for": requester})


def ended(ms: int, state: str, lease: str, mib: int, device: str | None = "gpu0") -> Event:
    return ev(ms, state, lease, holder="h", mib=mib, **({} if device is None else {"device": device}))


def holder(
    rid: str, pid: int, mib: int, token: int, start_ms: int, until_ms: int | None, **req: object
) -> list[dict[str, Any]]:
    """A worker's records for one lease: invoke, ok at ``start_ms``, held until ``until_ms`` (None:
    the belief was never closed)."""
    base = {"pid": pid, "slot": 0, "rid": rid}
    request = {"rid": rid, "mib": mib, "priority": 50, "device": None, "preemptible": False} | req
    out = [
        base | {"k": "invoke", "t": (start_ms - 2) * MS, "req": request},
        base | {"k": "ok", "t": start_ms * MS, "lease": rid, "token": token, "device": "gpu0", "mib": mib},
    ]
    if until_ms is not None:
        held = {"lease": rid, "device": "gpu0", "mib": mib, "from": start_ms * MS, "until": until_ms * MS}
        out.append(
            base | {"k": "held", "t": until_ms * MS, "why": "released", "noticed": until_ms * MS} | held
        )
    return out


def recording(events: Sequence[Event], histories: Sequence[dict[str, Any]] = (), **extra: Any) -> Recording:
    added = ev(1000, "device_added", device="gpu0", total_mib=8192, reserved_mib=0)
    return Recording(capacities={"gpu0": 8192}, events=[added, *events], histories=list(histories), **extra)


def kinds(verdict: Verdict) -> set[str]:
    return {v.kind for v in verdict.violations}


def two_leases() -> tuple[list[Event], list[dict[str, Any]]]:
    """Two holders of 4096 MiB each on one 8192 MiB device, each released after its belief ended."""
    events = [
        granted(1010, "a", 4096, 1),
        granted(1020, "b", 4096, 2),
        ended(1100, "released", "a", 4096),
        ended(1200, "released", "b", 4096),
    ]
    return events, holder("a", 1, 4096, 1, 1012, 1090) + holder("b", 2, 4096, 2, 1022, 1190)


def test_a_clean_history_passes() -> None:
    events, histories = two_leases()
    verdict = check(recording(events, histories, final_used={"gpu0": 0}, events_added=len(events) + 1))
    assert verdict.violations == []
    assert verdict.figures["grants"] == 2
    assert verdict.figures["held_by_workers"] == 2


def test_holders_believing_past_capacity_are_caught() -> None:
    # The server's view is right (c is granted only after a's release), but a's holder believes it
    # holds its lease 60 ms past the release: for those 60 ms, 12 GiB are believed on 8 GiB.
    events, _ = two_leases()
    events.insert(3, granted(1105, "c", 4096, 3))
    events.insert(4, ended(1150, "released", "c", 4096))
    histories = holder("a", 1, 4096, 1, 1012, 1160) + holder("b", 2, 4096, 2, 1022, 1190)
    histories += holder("c", 3, 4096, 3, 1107, 1140)
    verdict = check(recording(events, histories))
    assert kinds(verdict) == {"capacity_holders", "fence"}, verdict.violations
    assert "12288 MiB, budget 8192" in next(
        v.message for v in verdict.violations if v.kind == "capacity_holders"
    )


def test_a_worker_pretending_to_hold_memory_is_caught() -> None:
    # What --break over-grant does: an ok and a belief for a whole device never granted.
    events, histories = two_leases()
    histories += holder("fake", 1, 8192, 1, 1030, 1080)
    assert kinds(check(recording(events, histories))) == {"capacity_holders", "history"}


def test_a_server_over_grant_is_caught() -> None:
    events, histories = two_leases()
    events.insert(2, granted(1030, "c", 1024, 3))
    events.append(ended(1300, "released", "c", 1024))
    assert kinds(check(recording(events, histories))) == {"capacity_server"}


def test_a_duplicated_terminal_event_is_caught() -> None:
    events, histories = two_leases()
    events.append(ended(1300, "expired", "a", 4096))
    verdict = check(recording(events, histories))
    assert kinds(verdict) == {"terminal"}
    assert "second terminal event" in verdict.violations[0].message


def test_a_lease_that_never_ends_is_caught() -> None:
    events, histories = two_leases()
    del events[-1]
    assert kinds(check(recording(events, histories))) == {"terminal"}


def test_a_fencing_token_that_does_not_increase_is_caught() -> None:
    events, _ = two_leases()
    events[1] = granted(1020, "b", 4096, 1)
    histories = holder("a", 1, 4096, 1, 1012, 1090) + holder("b", 2, 4096, 1, 1022, 1190)
    verdict = check(recording(events, histories))
    assert kinds(verdict) == {"token"}
    assert "token 1 after token 1" in verdict.violations[0].message


def test_a_double_grant_is_caught() -> None:
    events, histories = two_leases()
    events.insert(3, granted(1150, "a", 4096, 3))
    assert "double_grant" in kinds(check(recording(events, histories)))


def test_a_belief_that_outlives_its_lease_is_caught() -> None:
    # The server expired b at 1150, but its holder believed it held b until 1190: whatever the
    # capacity, the client's fence must end a belief before the server ends the lease.
    events, histories = two_leases()
    events[3] = ended(1150, "expired", "b", 4096)
    verdict = check(recording(events, histories))
    assert kinds(verdict) == {"fence"}
    assert verdict.violations[0].cause == "ttl_fence"


def test_a_killed_holder_believes_until_the_kill() -> None:
    events, _ = two_leases()
    histories = holder("a", 1, 4096, 1, 1012, 1090) + holder("b", 2, 4096, 2, 1022, None)
    # Never closed: the belief is taken to last for ever, so it also outlives the lease.
    assert kinds(check(recording(events, histories))) == {"history", "fence"}
    kill = {"kind": "kill", "t": 1150 * MS, "pid": 2, "slot": 1}
    verdict = check(recording(events, histories, faults=[kill]))
    assert verdict.violations == []
    assert verdict.figures["faults"] == {"kill": 1}


def eviction(victim_preemptible: bool, victim_priority: int = 10, revoked_ms: int = 1600) -> Recording:
    """a (4096 MiB, active) is asked back for c (priority 90, 8192 MiB), then revoked; c granted."""
    events = [
        granted(1010, "a", 4096, 1, priority=victim_priority),
        granted(1020, "b", 4096, 2, priority=victim_priority),
        ev(1030, "queued", "c", holder="h", mib=8192, priority=90, want=""),
        evicting(1031, "a", 4096, victim_priority, "c", deadline=1531),
        evicting(1032, "b", 4096, victim_priority, "c", deadline=1532),
        ended(1100, "released", "a", 4096),
        ended(revoked_ms, "revoked", "b", 4096),
        granted(revoked_ms + 1, "c", 8192, 3, priority=90),
        ended(revoked_ms + 100, "released", "c", 8192),
    ]
    histories = holder("a", 1, 4096, 1, 1012, 1090, preemptible=victim_preemptible)
    histories += holder("b", 2, 4096, 2, 1022, 1400, preemptible=victim_preemptible)
    histories += holder("c", 3, 8192, 3, revoked_ms + 3, revoked_ms + 90, priority=90)
    return recording(events, histories)


def test_evicting_preemptible_leases_of_lower_priority_passes() -> None:
    verdict = check(eviction(victim_preemptible=True))
    assert verdict.violations == []
    assert verdict.figures["evictions"] == 2
    assert verdict.figures["eviction_revoked"] == 1


@pytest.mark.parametrize(
    ("preemptible", "priority", "revoked_ms", "says"),
    [
        (False, 10, 1600, "not preemptible"),
        (True, 90, 1600, "active at priority 90"),
        (True, 10, 1500, "revoked before its eviction deadline"),
    ],
)
def test_a_wrong_eviction_is_caught(preemptible: bool, priority: int, revoked_ms: int, says: str) -> None:
    verdict = check(eviction(preemptible, priority, revoked_ms))
    assert kinds(verdict) == {"eviction"}, verdict.violations
    assert says in verdict.violations[0].message


def test_a_grant_that_jumps_the_queue_is_caught() -> None:
    # w (priority 90, needs the whole device) waits; x (priority 10) must not get gpu0 meanwhile.
    events = [
        granted(1010, "a", 4096, 1),
        ev(1020, "queued", "w", holder="h", mib=8192, priority=90, want=""),
        granted(1030, "x", 2048, 2, priority=10),
        ended(1100, "released", "x", 2048),
        ended(1110, "released", "a", 4096),
        granted(1111, "w", 8192, 3, priority=90),
        ended(1200, "released", "w", 8192),
    ]
    verdict = check(recording(events))
    assert kinds(verdict) == {"queue_order"}
    assert "['w'] waited ahead" in verdict.violations[0].message
    events[1] = ev(1020, "queued", "w", holder="h", mib=8192, priority=5, want="")  # now behind x
    events[5] = granted(1111, "w", 8192, 3, priority=5)
    assert check(recording(events)).violations == []


def test_a_grant_of_promised_memory_is_caught() -> None:
    # c's victim a unloads; the 4096 MiB free and a's 4096 are promised to c: x may not take them.
    events = [
        granted(1010, "a", 4096, 1, priority=10),
        ev(1020, "queued", "c", holder="h", mib=8192, priority=90, want=""),
        evicting(1021, "a", 4096, 10, "c", deadline=2000),
        granted(1030, "x", 2048, 2, priority=95),
        ended(1100, "released", "x", 2048),
        ended(1110, "released", "a", 4096),
        granted(1111, "c", 8192, 3, priority=90),
        ended(1200, "released", "c", 8192),
    ]
    histories = holder("a", 1, 4096, 1, 1012, 1090, preemptible=True)
    assert kinds(check(recording(events, histories))) == {"promise"}


def test_an_abandoned_waiter_may_ask_again_under_its_id() -> None:
    events = [
        ev(1010, "queued", "w", holder="h", mib=1024, priority=50, want=""),
        ev(1020, "abandoned", "w", holder="h", mib=1024),
        granted(1030, "w", 1024, 1),
        ended(1100, "released", "w", 1024),
    ]
    assert check(recording(events)).violations == []
    events.append(ev(1110, "queued", "w", holder="h", mib=1024, priority=50, want=""))  # after a grant
    events.append(ev(1120, "cancelled", "w", holder="h", mib=1024))
    assert kinds(check(recording(events))) == {"terminal"}


def test_an_incomplete_event_record_is_caught() -> None:
    events, histories = two_leases()
    assert kinds(check(recording(events, histories, events_added=len(events) + 2))) == {"events_incomplete"}


# --- sentinel mode -----------------------------------------------------------------------------


def test_the_record_is_matched_against_a_new_primarys_stream() -> None:
    # Read from the old primary: 1010 (replicated), then 1020 and 1030, which the promoted replica
    # never received. The new primary wrote its own 1025 and 1040 (1025: below what was read).
    old = [granted(1000, "a", 1024, 1), granted(1010, "b", 1024, 2), granted(1020, "c", 1024, 3)]
    old.append(granted(1030, "d", 1024, 4))
    new = [granted(1010, "b", 1024, 2), granted(1025, "e", 1024, 3), granted(1040, "f", 1024, 4)]
    events, lost = merge_stream(old, new, since=(1005, 0))
    assert [i for i, _ in events] == ["1000-0", "1010-0", "1025-0", "1040-0"]
    assert [f["lease"] for _, f in lost] == ["c", "d"]
    # The same id with other fields is another entry: two primaries wrote it.
    events, lost = merge_stream(old, [granted(1010, "b", 1024, 2), granted(1020, "x", 1024, 3)], (1005, 0))
    assert [f["lease"] for _, f in events] == ["a", "b", "x"]
    assert [f["lease"] for _, f in lost] == ["c", "d"]


def test_a_grant_that_a_failover_left_behind_is_named() -> None:
    # b's holder was told it holds b (token 2), but the grant is only in the old primary's lost
    # entries: the surviving history never granted it, and c got the memory.
    events = [granted(1010, "a", 4096, 1), granted(1030, "c", 4096, 2), ended(1100, "released", "a", 4096)]
    events.append(ended(1200, "released", "c", 4096))
    histories = holder("a", 1, 4096, 1, 1012, 1090) + holder("b", 2, 4096, 2, 1022, 1150)
    histories += holder("c", 3, 4096, 2, 1032, 1190)
    lost = [granted(1020, "b", 4096, 2)]
    verdict = check(recording(events, histories, lost_events=lost, topology="sentinel"))
    assert kinds(verdict) == {"history", "capacity_holders"}, verdict.violations
    left = next(v for v in verdict.violations if v.kind == "history")
    assert left.cause == "lost_in_failover"
    assert "lost entry 1020-0" in left.message
    assert verdict.figures["lost_in_failover"] == {"granted": 1}


def test_a_lost_grant_granted_again_later_is_named() -> None:
    # b's holder was told at 1022 of a grant (token 2) that a failover lost; b still waited on the
    # new primary, which granted it at 1080, by chance with the same token.
    events, histories = two_leases()
    events[1] = granted(1080, "b", 4096, 2)
    verdict = check(recording(events, histories, lost_events=[granted(1021, "b", 4096, 2)]))
    assert [(v.kind, v.cause) for v in verdict.violations] == [("fence", "lost_in_failover")]
    assert "lost entry 1021-0" in verdict.violations[0].message
    assert kinds(check(recording(events, histories))) == {"fence"}


def test_a_renewal_that_a_failover_left_behind_is_named() -> None:
    # As test_a_belief_that_outlives_its_lease_is_caught (b expired at 1150, believed until 1190),
    # but b's holder saw its lease renewed at 1120, while a primary that a planned failover left
    # behind (promoted at 1100, demoted at 1140) took writes: that renewal did not survive.
    events, histories = two_leases()
    events[3] = ended(1150, "expired", "b", 4096)
    histories.append({"k": "renewed", "t": 1120 * MS, "pid": 2, "slot": 0, "rid": "b", "deadline": 1190 * MS})
    failover = {"kind": "failover", "t": 1095 * MS, "old": 1, "new": 2, "promoted_t": 1100 * MS}
    verdict = check(recording(events, histories, failovers=[failover | {"demoted_t": 1140 * MS}]))
    assert [(v.kind, v.cause) for v in verdict.violations] == [("fence", "lost_in_failover")]
    verdict = check(recording(events, histories, failovers=[failover | {"demoted_t": 1110 * MS}]))
    assert [(v.kind, v.cause) for v in verdict.violations] == [("fence", "ttl_fence")]


def test_failover_figures() -> None:
    events, histories = two_leases()
    events.insert(2, granted(1060, "c", 1024, 3))
    events.append(ended(1300, "released", "c", 1024))
    failovers = [
        # promoted 25 ms after the fault; the new primary had 1020-0 then: c at 1060 is its first grant
        {
            "kind": "failover",
            "t": 1030 * MS,
            "old": 1,
            "new": 2,
            "promoted_t": 1055 * MS,
            "boundary": "1020-0",
        },
        {"kind": "primary_kill", "t": 1200 * MS, "old": 2, "new": None},  # never promoted
    ]
    f = check(recording(events, histories, failovers=failovers, topology="sentinel")).figures
    assert f["failovers"] == {"failover": 1, "primary_kill": 1}
    assert f["failover_to_promotion_ms"]["failover"] == {"n": 1, "p50": 25.0, "p99": 25.0, "max": 25.0}
    assert f["failover_to_grant_ms"]["failover"]["max"] == 30.0
    assert f["failover_to_grant_ms"]["primary_kill"] == {"n": 0}


# --- real runs ---------------------------------------------------------------------------------


def run_chaos(tmp_path: Path, *args: str, timeout: float) -> tuple[int, str, dict[str, Any]]:
    """Run ``chaos.py`` with ``args``; its exit code, output and JSON report. On a timeout, its whole
    process group (workers, redis-server) is killed."""
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, str(CHAOS), *args, "--json", str(report)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"chaos.py {' '.join(args)} ran past {timeout} s:\n{out}")
    assert report.exists(), f"chaos.py {' '.join(args)} wrote no report (exit {proc.returncode}):\n{out}"
    return proc.returncode, out, json.loads(report.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_run_injects_every_fault_and_keeps_every_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("GPUBOSS_CHAOS_SEED", "7"))  # another seed: another schedule of faults
    code, out, report = run_chaos(
        tmp_path, "--seed", str(seed), "--duration", "12", "--workers", "4", timeout=200
    )
    with capsys.disabled():
        print(f"\n{out}")
    assert set(report["faults"]) == set(faults_for("single")), f"seed {seed}: not every kind injected:\n{out}"
    assert report["grants"] > 0, f"seed {seed}: nothing was granted:\n{out}"
    assert report["held_by_workers"] > 0
    assert report["violations"] == {}, f"seed {seed}: violations:\n{out}"
    assert code == 0, f"seed {seed}: exit {code}:\n{out}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sentinel_run_fails_over_every_way_and_keeps_every_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A primary, two replicas and three sentinels; the workers and the reaper confirm each write on
    a replica. Every fault kind of the mode happens (the three failovers among them), the service
    grants again on each new primary, and no rule breaks: no holder believes in memory that a
    failover gave to another."""
    seed = int(os.environ.get("GPUBOSS_CHAOS_SEED", "7"))
    args = ["--topology", "sentinel", "--seed", str(seed), "--duration", "20", "--workers", "4"]
    code, out, report = run_chaos(tmp_path, *args, timeout=150)
    with capsys.disabled():
        print(f"\n{out}")
    assert set(report["faults"]) == set(faults_for("sentinel")), (
        f"seed {seed}: not every kind injected:\n{out}"
    )
    assert set(report["failovers"]) == {"failover", "primary_kill", "primary_stop"}, out
    for kind, grants in report["failover_to_grant_ms"].items():  # (one at the very end may see none)
        assert grants["n"] >= 1, f"seed {seed}: no grant on a new primary after any {kind}:\n{out}"
    assert report["held_by_workers"] > 0
    expect_known_bugs(report, f"seed {seed}", out)
    assert report["violations"] == {}, f"seed {seed}: violations:\n{out}"
    assert code == 0, f"seed {seed}: exit {code}:\n{out}"


def expect_known_bugs(report: dict[str, Any], what: str, out: str) -> None:
    """xfail if every violation of the run is a ``history``, ``fence``, ``capacity_holders`` or
    ``error_tree`` one of a cause in :data:`KNOWN_BUGS`, with the checker's findings."""
    found = report["violation_list"]
    kinds = ("history", "fence", "capacity_holders", "error_tree")
    if found and all(v["kind"] in kinds and v["cause"] in KNOWN_BUGS for v in found):
        causes = sorted({v["cause"] for v in found})
        pytest.xfail(
            f"{what}: known bugs: " + "; ".join(f"{c}: {KNOWN_BUGS[c]}" for c in causes) + f"\n{out}"
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_that_pretends_to_hold_memory_fails_the_run(tmp_path: Path) -> None:
    args = ["--seed", "3", "--duration", "3", "--workers", "2", "--faults", "none", "--break", "over-grant"]
    code, out, report = run_chaos(tmp_path, *args, timeout=100)
    assert code == 1, out
    assert report["faults"] == {}
    assert {"capacity_holders", "history"} <= set(report["violations"]), out
    fake = [v for v in report["violation_list"] if v["kind"] == "history"]
    assert fake, out
    assert "-fake" in fake[0]["message"]
    assert "never granted" in fake[0]["message"]
