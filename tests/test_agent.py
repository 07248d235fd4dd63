"""The NVML agent against the real Redis (and fakeredis), with GPUs from the fake NVML binding.

Holders are clients with the agent's host and the pid of a fake GPU process, so the agent can
attribute that process's memory to their leases as it would a real one's.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from support import Events, in_thread, snapshot, wait_for
from typer.testing import CliRunner

from gpuboss import fakenvml
from gpuboss.agent import Agent, PassReport, background_agent, proc_parent
from gpuboss.fakenvml import FakeGpu, FakeMig, FakeNvml, FakeProcess, fake_uuid
from gpuboss.probe import NvmlMissing, NvmlProbe, ProbedDevice, StaticProbe
from gpuboss.settings import DeviceSpec
from gpuboss_cli.main import app
from gpuboss_client import (
    AcquireTimeout,
    BadRequest,
    Boss,
    DeviceNotFound,
    GpubossError,
    InsufficientVram,
    Lease,
    PoolKeys,
    ProtocolError,
    ops,
)
from gpuboss_client._core import parse_reply

HOST = "gpu-host"
GPU0, GPU1 = fake_uuid(0), fake_uuid(1)
POOL = PoolKeys("default")


@dataclass
class World:
    """Two fake 24 GiB GPUs on HOST, an agent measuring them, and a table of parent pids."""

    r: redis.Redis
    nvml: FakeNvml
    probe: NvmlProbe
    agent: Agent
    parents: dict[int, int] = field(default_factory=dict)

    def holder(self, name: str, pid: int, host: str = HOST) -> Boss:
        """A client holding leases as process ``pid`` of ``host``."""
        return Boss(self.r, holder=name, host=host, pid=pid)

    def run(self, gpu: int, pid: int, mib: int, **kw: bool) -> FakeProcess:
        """Start fake process ``pid`` using ``mib`` on GPU ``gpu``."""
        proc = FakeProcess(pid, mib, **kw)
        self.nvml.gpus[gpu].processes.append(proc)
        return proc

    def stop(self, gpu: int, pid: int) -> None:
        self.nvml.gpus[gpu].processes[:] = [p for p in self.nvml.gpus[gpu].processes if p.pid != pid]

    def device(self, name: str = GPU0) -> dict[str, str]:
        return self.r.hgetall(POOL.device(name))  # type: ignore[return-value]

    def lease(self, lease: Lease) -> dict[str, str]:
        return self.r.hgetall(POOL.lease(lease.id))  # type: ignore[return-value]

    def budget(self, name: str = GPU0) -> int:
        return next(d.budget_mib for d in self.agent.boss.devices("default") if d.name == name)

    def new_agent(self, **kw: object) -> Agent:
        args: dict[str, object] = {"host": HOST, "smoothing": 1.0, "parent_of": self.parents.get} | kw
        return Agent(Boss(self.r, holder="gpuboss-agent"), self.probe, **args)  # type: ignore[arg-type]


@pytest.fixture
def bare(rclient: redis.Redis) -> Iterator[World]:
    """The world before the agent's first pass, on the real Redis and on fakeredis."""
    nvml = FakeNvml([FakeGpu(GPU0, "NVIDIA L4", 24576), FakeGpu(GPU1, "NVIDIA L4", 24576)])
    probe = NvmlProbe(nvml)
    w = World(rclient, nvml, probe, None)  # type: ignore[arg-type]
    w.agent = w.new_agent(under_after_s=3600)
    yield w
    probe.close()
    assert nvml.init_count == 0


@pytest.fixture
def world(bare: World) -> World:
    """The world after the agent's first pass: both GPUs registered."""
    bare.agent.run_once()
    return bare


def names(events: list[dict[str, str]]) -> list[str]:
    return [e["event"] for e in events]


# --- registration ------------------------------------------------------------------------------


def test_registers_the_host_s_devices_once(bare: World) -> None:
    events = Events(bare.r)
    report = bare.agent.run_once()
    assert report.registered == [GPU0, GPU1]
    devices = {d.name: d for d in bare.agent.boss.devices("default")}
    assert [(d.host, d.cuda_index, d.total_mib, d.reserved_mib) for d in devices.values()] == [
        (HOST, 0, 24576, 0), (HOST, 1, 24576, 0),
    ]  # fmt: skip
    assert names(events.new()) == ["device_added", "device_added"]
    assert bare.device()["state"] == "ok"
    assert bare.device()["agent_host"] == HOST
    # Later passes, and a restarted agent, register nothing again: no event flood.
    bare.agent.run_once()
    assert bare.new_agent().run_once().registered == []
    assert events.new() == []
    # A device whose size or index changed is updated; one an operator sized keeps its headroom.
    bare.agent.boss.add_device(GPU1, 24576, reserved=1024, pool="default", host=HOST, cuda_index=1)
    events.new()
    bare.nvml.gpus.reverse()  # renumbered: GPU1 is index 0 now
    assert sorted(bare.new_agent().run_once().registered) == [GPU0, GPU1]
    devices = {d.name: d for d in bare.agent.boss.devices("default")}
    assert (devices[GPU1].cuda_index, devices[GPU1].reserved_mib, devices[GPU0].cuda_index) == (0, 1024, 1)
    assert names(events.new()) == ["device_updated", "device_updated"]


def test_new_devices_get_the_agent_s_headroom(bare: World) -> None:
    bare.new_agent(reserved_mib=512).run_once()
    assert {d.reserved_mib for d in bare.agent.boss.devices("default")} == {512}


def test_mig_slices_are_registered_without_a_cuda_index(bare: World) -> None:
    mig = fake_uuid(7, "MIG")
    bare.nvml.gpus[0].mig, bare.nvml.gpus[0].mig_enabled = [FakeMig(mig, 9856)], True
    bare.agent.run_once()
    devices = {d.name: d for d in bare.agent.boss.devices("default")}
    assert set(devices) == {mig, GPU1}
    assert (devices[mig].cuda_index, devices[mig].total_mib) == (None, 9856)


def test_static_probe_registers_and_measures_nothing(real_redis: redis.Redis) -> None:
    boss = Boss(real_redis, holder="gpuboss-agent")
    agent = Agent(boss, StaticProbe([DeviceSpec("gpu0", 8192, 0)]), host=HOST)
    holder = Boss(real_redis, holder="tts", host=HOST)
    agent.run_once()
    lease = holder.acquire(4096)
    report = agent.run_once()
    assert [(d.device, d.unmanaged_mib, dict(d.readings)) for d in report.devices] == [("gpu0", 0, {})]
    assert "measured_mib" not in real_redis.hgetall(POOL.lease(lease.id))
    holder.release(lease)


# --- unmanaged memory ------------------------------------------------------------------------


def test_memory_outside_leases_shrinks_the_budget_and_requests_wait(world: World) -> None:
    world.agent.run_once()
    world.run(0, 500, 8192)  # a process that holds no lease
    world.run(1, 501, 24576)  # GPU1 is full of someone else's memory
    world.agent.run_once()
    assert world.device()["unmanaged_mib"] == "8192"
    assert world.budget() == 16384
    assert world.budget(GPU1) == 0
    llm = world.holder("llm", 100).acquire("12GiB", timeout=0)
    # 12 + 8 GiB would fit a 24 GiB card, but 8 GiB of it is taken by the other process.
    tts = world.holder("tts", 200)
    with pytest.raises(AcquireTimeout):
        tts.acquire("8GiB", timeout=0)
    events = Events(world.r)
    thread, out = in_thread(lambda: tts.acquire("8GiB", timeout=30))
    wait_for("the request to queue", lambda: any(e["event"] == "queued" for e in events.new()))
    world.stop(0, 500)
    world.agent.run_once()  # the budget grows back, and the same script grants the waiter
    thread.join(10)
    assert out["value"].device == GPU0
    assert world.device()["unmanaged_mib"] == "0"
    world.holder("llm", 100).release(llm)
    tts.release(out["value"])


def test_a_request_larger_than_the_shrunk_budget_is_refused(world: World) -> None:
    world.run(0, 500, 20480)
    world.run(1, 501, 20480)
    world.agent.run_once()
    with pytest.raises(InsufficientVram):
        world.holder("tts", 200).acquire("8GiB", timeout=5)


def test_memory_no_process_explains_is_unmanaged(world: World) -> None:
    gpu = world.nvml.gpus[0]
    gpu.reserved_mib, gpu.other_mib = 300, 700  # the driver's reservation and invisible use
    world.agent.run_once()
    assert world.device()["unmanaged_mib"] == "1000"
    assert world.device()["seen_mib"] == "1000"
    world.nvml.memory_v2 = False  # v1 counts the same memory as used
    assert world.new_agent().run_once().devices[0].raw_unmanaged_mib == 1000


def test_unmanaged_rises_at_once_and_falls_smoothly_never_below_zero(world: World) -> None:
    agent = world.new_agent(smoothing=0.5)

    def unmanaged() -> int:
        return next(d.unmanaged_mib for d in agent.run_once().devices if d.device == GPU0)

    world.run(0, 500, 8000)
    assert unmanaged() == 8000
    world.stop(0, 500)
    assert [unmanaged() for _ in range(4)] == [4000, 2000, 1000, 500]
    world.run(0, 501, 6000)
    assert unmanaged() == 6000  # up at once
    world.stop(0, 501)
    got = [unmanaged() for _ in range(16)]
    assert got == sorted(got, reverse=True)
    assert got[-1] == 0
    assert world.device()["unmanaged_mib"] == "0"


# --- attribution and findings ----------------------------------------------------------------


def test_usage_is_attributed_to_the_holder_and_its_children(world: World) -> None:
    world.parents.update({101: 100, 102: 1, 103: 101})
    lease = world.holder("llm", 100).acquire("4GiB", labels={"model": "llama"})
    world.run(0, 100, 2000)
    world.run(0, 103, 1500)  # a grandchild of the holder: `gpuboss run` and its command
    world.run(0, 102, 300)  # not related to the holder
    report = world.agent.run_once()
    reading = next(d for d in report.devices if d.device == GPU0)
    assert dict(reading.readings) == {lease.id: 3500}
    assert reading.raw_unmanaged_mib == 300
    assert world.lease(lease)["measured_mib"] == "3500"
    assert world.lease(lease)["peak_mib"] == "3500"
    # The same holder's process on the other GPU holds no lease there.
    world.run(1, 100, 700)
    reading = next(d for d in world.agent.run_once().devices if d.device == GPU1)
    assert (reading.raw_unmanaged_mib, dict(reading.readings)) == (700, {})


def test_real_parent_lookup() -> None:
    import os

    assert proc_parent(os.getpid()) == os.getppid()
    assert proc_parent(2**31 - 1) is None


def test_over_use_is_reported_once_and_counts_as_unmanaged(world: World) -> None:
    events = Events(world.r)
    holder = world.holder("llm", 100)
    lease = holder.acquire("2GiB")
    proc = world.run(0, 100, 2200)  # within 10 % over
    world.agent.run_once()
    assert "finding" not in world.lease(lease)
    proc.mib = 4096
    world.agent.run_once()
    world.agent.run_once()
    found = [e for e in events.new() if e["event"] == "over_use"]
    assert found == [
        {"event": "over_use", "lease": lease.id, "holder": "llm", "device": GPU0, "mib": "2048",
         "measured_mib": "4096", "peak_mib": "4096"},
    ]  # fmt: skip
    assert world.lease(lease)["finding"] == "over_use"
    assert world.device()["unmanaged_mib"] == "2048"  # the excess is nobody's to lease
    proc.mib = 2100  # still over its size: the finding stays, and says nothing new
    world.agent.run_once()
    assert world.lease(lease)["finding"] == "over_use"
    proc.mib = 2000  # back within its lease
    world.agent.run_once()
    assert "finding" not in world.lease(lease)
    proc.mib = 3000
    world.agent.run_once()
    assert names(events.new()) == ["over_use"]  # a new episode, a new event
    holder.release(lease)


def test_under_use_is_reported_once(world: World) -> None:
    events = Events(world.r)
    agent = world.new_agent(under_after_s=0)
    lease = world.holder("tts", 100).acquire("8GiB", labels={"model": "xtts"})
    world.run(0, 100, 1024)
    agent.run_once()
    agent.run_once()
    found = [e for e in events.new() if e["event"] == "under_use"]
    assert [(e["lease"], e["mib"], e["peak_mib"]) for e in found] == [(lease.id, "8192", "1024")]
    assert world.lease(lease)["finding"] == "under_use"
    # Not before it has been held under_after_s: loading a model takes time.
    young = world.holder("asr", 300).acquire("4GiB")
    world.agent.run_once()
    assert "finding" not in world.lease(young)


def test_a_leak_is_reported_once_it_persists(world: World) -> None:
    events = Events(world.r)
    world.run(0, 500, 1000)
    world.agent.run_once()
    assert "leak" not in names(events.new())  # one pass may be a holder between release and exit
    world.agent.run_once()
    leaks = [e for e in events.new() if e["event"] == "leak"]
    assert leaks == [{"event": "leak", "device": GPU0, "host": HOST, "pids": "500", "mib": "1000"}]
    world.agent.run_once()
    assert events.new() == []
    world.run(0, 501, 24)
    world.agent.run_once()
    world.agent.run_once()
    assert [e["pids"] for e in events.new() if e["event"] == "leak"] == ["500 501"]
    world.stop(0, 500)
    world.agent.run_once()
    assert events.new() == []  # fewer leaking processes: nothing new to report
    assert world.device()["leak_pids"] == "501"
    world.stop(0, 501)
    world.agent.run_once()
    assert (world.device()["leak_pids"], world.device()["leak_mib"]) == ("", "0")


def test_a_released_lease_s_holder_still_using_memory_leaks(world: World) -> None:
    holder = world.holder("tts", 100)
    lease = holder.acquire("4GiB")
    world.run(0, 100, 3000)
    world.agent.run_once()
    holder.release(lease)
    world.agent.run_once()
    world.agent.run_once()
    assert world.device()["leak_pids"] == "100"
    assert world.device()["unmanaged_mib"] == "3000"


def test_unknown_usage_assumes_the_lease_size(world: World) -> None:
    lease = world.holder("tts", 100).acquire("4GiB")
    world.run(0, 100, 4096, visible=False)  # NVML: usedGpuMemory not available
    report = world.agent.run_once()
    reading = next(d for d in report.devices if d.device == GPU0)
    assert (reading.seen_mib, reading.raw_unmanaged_mib, dict(reading.readings)) == (4096, 0, {})
    assert "measured_mib" not in world.lease(lease)


def test_without_process_lists_leased_memory_is_assumed_used(world: World) -> None:
    world.nvml.gpus[0].errors["nvmlDeviceGetComputeRunningProcesses"] = fakenvml.NVML_ERROR_NOT_SUPPORTED
    world.holder("tts", 100).acquire("4GiB")
    world.run(0, 100, 3000)
    world.run(0, 500, 2000)
    reading = next(d for d in world.agent.run_once().devices if d.device == GPU0)
    assert (reading.raw_unmanaged_mib, dict(reading.readings), reading.leak_pids) == (5000 - 4096, {}, ())


def test_leases_held_from_another_host_are_not_measured(world: World) -> None:
    lease = world.holder("remote", 100, host="elsewhere").acquire("4GiB", device=GPU0)
    world.run(0, 100, 3000)  # same pid number, another machine: not its holder
    reading = next(d for d in world.agent.run_once().devices if d.device == GPU0)
    assert (dict(reading.readings), reading.raw_unmanaged_mib) == ({}, 3000)
    assert "measured_mib" not in world.lease(lease)


def test_a_gang_lease_reads_its_largest_device(world: World) -> None:
    lease = world.holder("train", 100).acquire("4GiB", devices=2)
    world.run(0, 100, 1000)
    world.run(1, 100, 3000)
    world.agent.run_once()
    assert world.lease(lease)["measured_mib"] == "3000"


def test_one_process_holding_two_leases_shares_its_usage(world: World) -> None:
    holder = world.holder("multi", 100)
    a = holder.acquire("1GiB", device=GPU0)
    b = holder.acquire("3GiB", device=GPU0)
    world.run(0, 100, 2048)
    world.agent.run_once()
    assert (world.lease(a)["measured_mib"], world.lease(b)["measured_mib"]) == ("512", "1536")


def test_peaks_per_label(world: World) -> None:
    tts, other = world.holder("tts", 100), world.holder("tts2", 200)
    a = tts.acquire("8GiB", device=GPU0, labels={"model": "xtts", "lang": "en"})
    b = other.acquire("8GiB", device=GPU1, labels={"model": "xtts"})
    pa, pb = world.run(0, 100, 3000), world.run(1, 200, 5000)
    world.agent.run_once()
    pa.mib, pb.mib = 6000, 1000
    world.agent.run_once()
    tts.release(a)
    other.release(b)
    world.agent.run_once()
    (f,) = world.agent.boss.run(ops.findings("default"))
    assert f.label_peaks == {"lang=en": 6000, "model=xtts": 6000}
    assert world.r.hgetall(POOL.peaks) == {"lang=en": "6000", "model=xtts": "6000"}


def test_findings_document(world: World) -> None:
    lease = world.holder("llm", 100).acquire("2GiB", labels={"model": "m"})
    world.run(0, 100, 4096)
    world.run(1, 500, 100)
    world.agent.run_once()
    world.agent.run_once()
    unmeasured = world.holder("x", 9).acquire(1, device=GPU1, request_id="never-measured")
    (f,) = world.agent.boss.run(ops.findings(None))
    doc = json.loads(json.dumps(f.to_dict()))
    assert [(d["name"], d["state"], d["agent_host"], d["leak_pids"]) for d in doc["devices"]] == [
        (GPU0, "ok", HOST, []), (GPU1, "ok", HOST, [500]),
    ]  # fmt: skip
    (usage,) = doc["leases"]
    assert (usage["id"], usage["measured_mib"], usage["peak_mib"], usage["finding"]) == (
        lease.id,
        4096,
        4096,
        "over_use",
    )
    assert (usage["holder"], usage["holder_pid"], usage["device"], usage["labels"]) == (
        "llm",
        100,
        GPU0,
        {"model": "m"},
    )
    assert doc["label_peaks"] == {"model=m": 4096}
    assert unmeasured.id not in [x["id"] for x in doc["leases"]]
    # A device no agent measures says so.
    world.agent.boss.add_device("static", 1024, pool="default")
    (f,) = world.agent.boss.run(ops.findings("default"))
    assert next(d for d in f.devices if d.name == "static").state == "unmeasured"


# --- devices lost and back -------------------------------------------------------------------


def test_a_lost_device_gets_no_grants_until_it_is_back(world: World) -> None:
    events = Events(world.r)
    world.agent.run_once()
    events.new()
    holder = world.holder("llm", 100)
    big = holder.acquire("20GiB", device=GPU0)
    thread, out = in_thread(lambda: world.holder("tts", 200).acquire("8GiB", device=GPU0, timeout=30))
    wait_for("the request to queue", lambda: "queued" in names(events.new()))
    world.nvml.gpus[0].lost = True
    report = world.agent.run_once()
    assert [(d.device, d.state) for d in report.devices] == [(GPU0, "lost"), (GPU1, "ok")]
    assert [(e["event"], e["device"], e["host"]) for e in events.new()] == [("device_lost", GPU0, HOST)]
    assert world.budget() == 0
    assert world.device()["state"] == "lost"
    holder.release(big)  # memory freed on a lost device: the waiter still waits
    assert thread.is_alive()
    with pytest.raises(InsufficientVram):
        world.holder("asr", 300).acquire("1GiB", device=GPU0, timeout=0)
    assert world.holder("asr", 300).acquire("1GiB", timeout=0).device == GPU1
    world.agent.run_once()
    assert "device_lost" not in names(events.new())  # said once
    world.nvml.gpus[0].lost = False
    world.agent.run_once()
    thread.join(10)
    assert out["value"].device == GPU0
    assert ("device_back", GPU0) in [(e["event"], e.get("device")) for e in events.new()]
    assert world.budget() == 24576


def test_a_device_that_vanished_stays_lost_across_agent_restarts(world: World) -> None:
    events = Events(world.r)
    world.agent.run_once()
    gone = world.nvml.gpus.pop(0)
    world.agent.run_once()
    assert names(events.new()) == ["device_updated", "device_lost"]  # GPU1 renumbered to 0
    restarted = world.new_agent()
    assert [(d.device, d.state) for d in restarted.run_once().devices] == [(GPU0, "lost"), (GPU1, "ok")]
    assert events.new() == []
    world.nvml.gpus.insert(0, gone)
    restarted.run_once()
    assert names(events.new()) == ["device_updated", "device_back"]


def test_nvml_failing_as_a_whole_marks_every_device_lost(world: World) -> None:
    events = Events(world.r)
    world.agent.run_once()
    events.new()
    world.nvml.errors["nvmlDeviceGetCount"] = fakenvml.NVML_ERROR_UNKNOWN
    report = world.agent.run_once()
    assert report.error is not None
    assert report.error.startswith("NVML cannot count the devices: Unknown Error")
    assert [d.state for d in report.devices] == ["lost", "lost"]
    assert names(events.new()) == ["device_lost", "device_lost"]
    del world.nvml.errors["nvmlDeviceGetCount"]
    assert world.agent.run_once().error is None
    assert names(events.new()) == ["device_back", "device_back"]


def test_a_device_removed_by_an_operator_is_added_again_while_present(world: World) -> None:
    world.agent.run_once()
    world.agent.boss.remove_device(GPU0, pool="default")
    report = world.agent.run_once()
    assert [d.device for d in report.devices] == [GPU1]
    assert world.agent.run_once().registered == [GPU0]


def test_a_device_that_cannot_be_named_is_left_out(bare: World) -> None:
    bare.nvml.gpus.append(FakeGpu("GPU with spaces", total_mib=1024))
    assert bare.agent.run_once().registered == [GPU0, GPU1]


# --- the loop ------------------------------------------------------------------------------------


def test_run_passes_until_stopped(world: World) -> None:
    agent = world.new_agent(interval_s=0.01)
    stop, seen = threading.Event(), []

    def on_pass(report: PassReport) -> None:
        seen.append(report)
        if len(seen) == 3:
            stop.set()

    failures = iter([RuntimeError("a binding surprise")])
    devices = world.probe.devices

    def flaky() -> list[ProbedDevice]:
        for exc in failures:  # the first pass fails; the loop goes on
            raise exc
        return devices()

    world.probe.devices = flaky  # type: ignore[method-assign]
    thread = threading.Thread(target=agent.run, args=(stop, on_pass), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert [len(r.devices) for r in seen] == [2, 2, 2]


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "a b"}, {"state": "gone"}, {"unmanaged_mib": -1}, {"seen_mib": 1 << 25},
        {"leak_pids": (-1,)}, {"over_pct": 10_001}, {"under_pct": 101}, {"under_after_ms": True},
        {"readings": (("bad id", 1),)}, {"readings": (("x", -5),)}, {"host": "h" * 256},
    ],
)  # fmt: skip
def test_bad_measurements_are_refused_and_change_nothing(world: World, bad: dict[str, object]) -> None:
    world.agent.run_once()
    before = snapshot(world.r)
    m = ops.Measurement(**({"device": GPU0, "host": HOST} | bad))  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        world.agent.boss.run(ops.measure("default", m))
    assert snapshot(world.r) == before


@pytest.mark.parametrize(
    "argv",
    [
        [GPU0, HOST, "ok", 0, 0, 0, "", 10, 50, 0, 1],  # one reading announced, none given
        [GPU0, HOST, "ok", 0, 0, 0, "1;2", 10, 50, 0, 0],
        [GPU0, HOST, "maybe", 0, 0, 0, "", 10, 50, 0, 0],
        [GPU0, HOST, "ok", "x", 0, 0, "", 10, 50, 0, 0],
        [GPU0, HOST, "ok", 0, 0, 0, "", 10, 50, 0, 1, "id", "1.5"],
    ],
)
def test_the_script_checks_its_arguments(world: World, argv: list[object]) -> None:
    world.agent.run_once()
    before = snapshot(world.r)
    reply = world.agent.boss.script("measure", POOL.script_keys(), argv)
    with pytest.raises(BadRequest):
        parse_reply(reply, frozenset({"ok"}))
    assert snapshot(world.r) == before


def test_unknown_device_or_pool(world: World) -> None:
    world.agent.run_once()
    before = snapshot(world.r)
    with pytest.raises(DeviceNotFound):
        world.agent.boss.run(ops.measure("default", ops.Measurement(device="nope", host=HOST)))
    with pytest.raises(BadRequest):
        world.agent.boss.run(ops.measure("bad pool", ops.Measurement(device=GPU0, host=HOST)))
    assert snapshot(world.r) == before


@pytest.mark.parametrize(
    "kw", [{"interval_s": 0}, {"smoothing": 0}, {"smoothing": 1.5}, {"over_pct": -1}, {"pool": "a b"}]
)
def test_bad_agent_settings(world: World, kw: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        world.new_agent(**kw)


def test_a_lease_reading_for_another_device_or_an_ended_lease_is_ignored(world: World) -> None:
    world.agent.run_once()
    holder = world.holder("tts", 100)
    on_gpu1 = holder.acquire("1GiB", device=GPU1)
    ended = holder.acquire("1GiB", device=GPU0)
    holder.release(ended)
    m = ops.Measurement(device=GPU0, host=HOST, readings=((on_gpu1.id, 999), (ended.id, 999), ("nope", 1)))
    assert world.agent.boss.run(ops.measure("default", m)) == 0
    assert "measured_mib" not in world.lease(on_gpu1)
    assert "measured_mib" not in world.lease(ended)


def test_malformed_measurements_in_redis_are_protocol_errors(world: World) -> None:
    lease = world.holder("tts", 100).acquire("1GiB")
    world.r.hset(POOL.lease(lease.id), "measured_mib", "lots")
    with pytest.raises(ProtocolError):
        world.agent.boss.run(ops.findings("default"))


# --- the command ---------------------------------------------------------------------------------

runner = CliRunner()
CLEAN = {"GPUBOSS_REDIS_URL": None, "GPUBOSS_BOSS_URL": None, "COLUMNS": None}


def test_cli_once_with_fake_gpus(real_redis: redis.Redis, redis_url: str) -> None:
    args = ["--redis-url", redis_url, "agent", "--once", "--host", HOST, "--reserved", "1GiB"]
    result = runner.invoke(app, [*args, "--fake-nvml", "24GiB,NVIDIA A100=40GiB"], env=CLEAN)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"registered {GPU0}", f"registered {GPU1}"]
    assert lines[2] == f"{GPU0}: ok, in use 0 MiB, unmanaged 0 MiB, 0 lease(s) measured"
    devices = Boss(real_redis, holder="t").devices("default")
    assert [(d.name, d.total_mib, d.reserved_mib, d.host) for d in devices] == [
        (GPU0, 24576, 1024, HOST), (GPU1, 40960, 1024, HOST),
    ]  # fmt: skip


def test_cli_without_pynvml_says_what_to_install(
    real_redis: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    result = runner.invoke(app, ["--redis-url", redis_url, "agent", "--once"], env=CLEAN)
    assert result.exit_code == BadRequest.exit_code
    assert result.stderr.startswith(
        "error[bad_request]: NVML support is not installed: pip install 'gpuboss[nvml]'"
    )
    assert real_redis.keys("*") == []


def test_cli_when_nvml_does_not_start(real_redis: redis.Redis, redis_url: str) -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    result = runner.invoke(app, ["--redis-url", redis_url, "agent", "--once"], env=CLEAN)
    assert result.exit_code == 12, result.stderr
    assert result.stderr.startswith("error[backend_unavailable]: NVML could not start: ")
    assert real_redis.keys("*") == []


@pytest.mark.parametrize("args", [["--smoothing", "0"], ["--reserved", "lots"], ["--interval", "-1"]])
def test_cli_bad_options(real_redis: redis.Redis, redis_url: str, args: list[str]) -> None:
    result = runner.invoke(
        app, ["--redis-url", redis_url, "agent", "--once", "--fake-nvml", "1GiB", *args], env=CLEAN
    )
    assert result.exit_code == BadRequest.exit_code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error[bad_request]: ")
    assert real_redis.keys("*") == []


def test_serve_runs_the_agent_beside_it_when_nvml_works(redis_url: str, real_redis: redis.Redis) -> None:
    nvml = FakeNvml([FakeGpu(GPU0, "NVIDIA L4", 24576)])
    with background_agent(
        "auto", redis_url, pool="default", interval_s=0.05, probe_factory=lambda: NvmlProbe(nvml)
    ) as agent:
        assert agent is not None
        wait_for(
            "the agent registered the GPU", lambda: real_redis.sismember(PoolKeys("default").devices, GPU0)
        )
    assert nvml.init_count == 0  # the probe was closed: NVML shut down again


def test_serve_without_nvml_runs_no_agent_unless_told_to(redis_url: str, real_redis: redis.Redis) -> None:
    def missing() -> NvmlProbe:
        raise NvmlMissing("pynvml is not installed: pip install 'gpuboss[nvml]'")

    before = snapshot(real_redis)
    for mode in ("auto", "off"):
        with background_agent(mode, redis_url, pool="default", interval_s=1, probe_factory=missing) as agent:
            assert agent is None
    with (
        pytest.raises(GpubossError, match="the agent cannot run: pynvml is not installed"),
        background_agent("on", redis_url, pool="default", interval_s=1, probe_factory=missing),
    ):
        pass
    assert snapshot(real_redis) == before


def _findings_world(r: redis.Redis) -> tuple[World, Lease]:
    """Three fake GPUs after the agent's passes: an over-use on GPU0, a leak on GPU1, GPU2 lost."""
    nvml = FakeNvml([FakeGpu(fake_uuid(i), "NVIDIA L4", 24576) for i in range(3)])
    w = World(r, nvml, NvmlProbe(nvml), None)  # type: ignore[arg-type]
    w.agent = w.new_agent(under_after_s=3600)
    w.agent.run_once()
    lease = w.holder("llm", 100).acquire("2GiB", device=GPU0, labels={"model": "m"})
    w.run(0, 100, 4096)
    w.run(1, 500, 1024)
    w.run(1, 501, 512)
    w.nvml.gpus[2].lost = True
    w.agent.run_once()
    w.agent.run_once()  # a leak is one once it persists
    return w, lease


def test_status_shows_findings(real_redis: redis.Redis, redis_url: str) -> None:
    w, lease = _findings_world(real_redis)
    try:
        text = runner.invoke(app, ["--redis-url", redis_url, "status"], env=CLEAN)
        assert text.exit_code == 0, (text.stdout, text.stderr)
        out = text.stdout
        assert "findings in pool default" in out
        assert f"{fake_uuid(2)}: lost on {HOST}" in out
        assert f"{GPU1}: 1.5 GiB held by pids 500 501 without a lease" in out
        assert f"lease {lease.id} (llm, model=m) uses 4.0 GiB of 2.0 GiB leased: over-use" in out
        assert "peaks by label: model=m 4.0 GiB" in out
        assert out.index("findings in pool default") > out.index(GPU1)  # after the devices table

        result = runner.invoke(app, ["--redis-url", redis_url, "status", "--json"], env=CLEAN)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        doc = json.loads(result.stdout)
        (f,) = w.agent.boss.run(ops.findings(None))
        want = json.loads(json.dumps(f.to_dict()))
        assert doc["findings"]["default"] | {"now_ms": 0} == want | {"now_ms": 0}  # read a moment apart
        assert sorted(doc["findings"]) == ["default"]
        found = doc["findings"]["default"]
        states = {d["name"]: (d["state"], d["leak_mib"], d["leak_pids"]) for d in found["devices"]}
        assert states == {GPU0: ("ok", 0, []), GPU1: ("ok", 1536, [500, 501]), fake_uuid(2): ("lost", 0, [])}
        assert [(x["id"], x["finding"], x["measured_mib"]) for x in found["leases"]] == [
            (lease.id, "over_use", 4096)
        ]
        assert found["label_peaks"] == {"model=m": 4096}
    finally:
        w.probe.close()


def test_status_without_measurements_shows_no_findings(real_redis: redis.Redis, redis_url: str) -> None:
    Boss(real_redis, holder="t").add_device("static", "8GiB")
    text = runner.invoke(app, ["--redis-url", redis_url, "status"], env=CLEAN)
    assert text.exit_code == 0, (text.stdout, text.stderr)
    assert "static" in text.stdout
    assert "findings" not in text.stdout
    result = runner.invoke(app, ["--redis-url", redis_url, "status", "--json"], env=CLEAN)
    assert "findings" not in json.loads(result.stdout)
