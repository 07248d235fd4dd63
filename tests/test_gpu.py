"""On a real NVIDIA GPU: the agent discovers it, and measures what a child under ``gpuboss run``
really allocates. Skipped where NVML finds no GPU (run with ``-m gpu -s`` on a GPU host to see
the numbers)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import wait_for

from gpuboss.agent import Agent
from gpuboss.probe import NvmlProbe
from gpuboss_client import Boss, PoolKeys

ALLOC_MIB = 1024
LEASE = "2GiB"
#: what a CUDA context (and PyTorch's allocator) may add to the allocation, MiB
OVERHEAD_MIB = 1024

#: the child: allocate ALLOC_MIB on the visible GPU, say "ready", and hold it until the test
#: closes its end of the FIFO
ALLOC = r"""
import sys
mib, fifo = int(sys.argv[1]), sys.argv[2]
try:
    import torch
except ImportError:
    torch = None
if torch is not None and torch.cuda.is_available():
    x = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
else:
    import ctypes
    rt = None
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            rt = ctypes.CDLL(name)
            break
        except OSError:
            pass
    if rt is None:
        sys.exit("no CUDA runtime (torch or libcudart) to allocate with")
    ptr = ctypes.c_void_p()
    if rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(mib << 20)):
        sys.exit("cudaMalloc failed")
    rt.cudaMemset(ptr, 1, ctypes.c_size_t(mib << 20))
    rt.cudaDeviceSynchronize()
print("ready", flush=True)
with open(fifo) as f:
    f.read()
"""


def _gpus() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _cuda_runtime() -> bool:
    if importlib.util.find_spec("torch") is not None:
        return True
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(name)
            return True
    return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(_gpus() == 0, reason="needs a real NVIDIA GPU with NVML"),
]


@pytest.fixture
def probe() -> Iterator[NvmlProbe]:
    with NvmlProbe() as p:
        yield p


def test_discovers_the_gpus(probe: NvmlProbe) -> None:
    devices = probe.devices()
    assert devices
    for d in devices:
        print(f"{d.uuid} {d.name} cuda {d.visible_id}: {d.total_mib} MiB, {d.used_mib} MiB in use")
        assert d.healthy, d.error
        assert d.uuid.startswith(("GPU-", "MIG-"))
        assert d.total_mib > 0
        assert 0 <= d.used_mib <= d.total_mib
    assert all(p.device in {d.uuid for d in devices} for p in probe.processes())


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    out: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.rstrip("\n"))
        out.put(None)

    threading.Thread(target=read, daemon=True).start()
    return out


def test_measures_a_child_under_gpuboss_run(
    probe: NvmlProbe, real_redis: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    if not _cuda_runtime():
        pytest.skip("no CUDA runtime (torch or libcudart) to allocate with")
    agent = Agent(Boss(real_redis, holder="gpuboss-agent"), probe, host=socket.gethostname(), smoothing=1.0)
    assert agent.run_once().registered
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    # Held open (read-write: never blocks) until the end; closing it is the child's EOF.
    hold = os.open(fifo, os.O_RDWR)
    gpuboss = Path(sys.executable).with_name("gpuboss")
    env = os.environ | {"GPUBOSS_REDIS_URL": redis_url, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    proc = subprocess.Popen(
        [str(gpuboss), "run", "--vram", LEASE, "--", sys.executable, "-c", ALLOC, str(ALLOC_MIB), str(fifo)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines, seen = _lines(proc), []
    try:
        while (line := lines.get(timeout=120)) != "ready":
            assert line is not None, f"the child ended ({proc.wait()}) before allocating: {seen}"
            seen.append(line)
        (lease,) = [x for x in agent.boss.leases("default") if x.holder_pid == proc.pid]
        measured: dict[str, int] = {}

        def measured_now() -> bool:
            for d in agent.run_once().devices:
                if lease.id in d.readings:
                    measured["mib"], measured["unmanaged"] = d.readings[lease.id], d.unmanaged_mib
            return measured.get("mib", 0) >= ALLOC_MIB

        wait_for("the agent to see the child's memory", measured_now, timeout=30)
        print(f"lease {lease.id} ({lease.mib} MiB on {lease.device}): measured {measured['mib']} MiB "
              f"for {ALLOC_MIB} MiB allocated; unmanaged {measured['unmanaged']} MiB")  # fmt: skip
        assert ALLOC_MIB <= measured["mib"] <= ALLOC_MIB + OVERHEAD_MIB
        fields = real_redis.hgetall(PoolKeys("default").lease(lease.id))
        assert int(fields["peak_mib"]) >= measured["mib"]  # type: ignore[index]
    finally:
        os.close(hold)  # lets the child go
        assert proc.wait(60) == 0, seen
    # Released on exit: the lease is gone, and so is the memory.
    assert not [x for x in agent.boss.leases("default") if x.holder_pid == proc.pid]
