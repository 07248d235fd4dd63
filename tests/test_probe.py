"""The device probes: NVML through the fake binding (which must behave like pynvml), and static."""

from __future__ import annotations

import inspect
import sys

import pynvml
import pytest

from gpuboss import fakenvml
from gpuboss.fakenvml import FakeGpu, FakeMig, FakeNvml, FakeProcess, fake_uuid
from gpuboss.probe import NvmlMissing, NvmlProbe, ProbedDevice, ProbeError, ProcUse, StaticProbe, device_id
from gpuboss.settings import ServiceSettings

GPU0, GPU1 = fake_uuid(0), fake_uuid(1)


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(GPU0, "NVIDIA A100-SXM4-40GB", 40960, [FakeProcess(100, 1000), FakeProcess(101, 24)],
                    reserved_mib=300, other_mib=50),
            FakeGpu(GPU1, "NVIDIA L4", 23034),
        ]
    )  # fmt: skip


# --- the fake is pynvml's double ------------------------------------------------------------


def test_fake_error_codes_and_classes_are_pynvml_s() -> None:
    names = [n for n in dir(fakenvml) if n.startswith("NVML_ERROR_")]
    assert len(names) >= 20
    for name in names:
        code = getattr(fakenvml, name)
        assert getattr(pynvml, name) == code, name
        real, fake = pynvml.NVMLError(code), fakenvml.NVMLError(code)
        assert type(fake).__name__ == type(real).__name__, name
        assert isinstance(fake, fakenvml.NVMLError)
        assert fake.value == code
        assert fakenvml.nvmlExceptionClass(code) is type(fake)
        if code in fakenvml._MESSAGES:
            assert str(fake) == str(real)
    lost_cls = fakenvml.nvmlExceptionClass(fakenvml.NVML_ERROR_GPU_IS_LOST)
    assert lost_cls().value == fakenvml.NVML_ERROR_GPU_IS_LOST  # a subclass knows its own code
    assert fakenvml.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    assert fakenvml.NVML_DEVICE_MIG_ENABLE == pynvml.NVML_DEVICE_MIG_ENABLE


def test_fake_functions_exist_in_pynvml_with_compatible_signatures() -> None:
    fns = [n for n, _ in inspect.getmembers(FakeNvml, inspect.isfunction) if n.startswith("nvml")]
    assert len(fns) >= 15
    for name in fns:
        real = inspect.signature(getattr(pynvml, name))
        fake = inspect.signature(getattr(FakeNvml, name))
        assert list(real.parameters) == list(fake.parameters)[1:], name  # less self


def test_fake_counts_init_and_shutdown_like_nvml() -> None:
    nvml = FakeNvml([FakeGpu(GPU0)])
    with pytest.raises(fakenvml.NVMLError) as err:
        nvml.nvmlDeviceGetCount()
    assert err.value.value == fakenvml.NVML_ERROR_UNINITIALIZED
    nvml.nvmlInit()
    nvml.nvmlInit()
    nvml.nvmlShutdown()
    assert nvml.nvmlDeviceGetCount() == 1  # still initialised once
    nvml.nvmlShutdown()
    with pytest.raises(fakenvml.NVMLError):
        nvml.nvmlShutdown()


def test_fake_memory_v1_and_v2_add_up_like_nvml() -> None:
    nvml = two_gpus()
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    v1 = nvml.nvmlDeviceGetMemoryInfo(h)
    v2 = nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
    mib = 1 << 20
    assert v1.total == v2.total == 40960 * mib
    assert v2.used == (1000 + 24 + 50) * mib
    assert v2.reserved == 300 * mib
    assert v2.total == v2.reserved + v2.used + v2.free  # type: ignore[union-attr]
    assert v1.used == v1.total - v1.free  # v1's used includes the reservation
    assert v1.free == v2.free


def test_fake_from_spec() -> None:
    nvml = FakeNvml.from_spec("24GiB, NVIDIA A100=40GiB")
    assert [(g.name, g.total_mib) for g in nvml.gpus] == [("NVIDIA Fake GPU", 24576), ("NVIDIA A100", 40960)]
    assert [g.uuid for g in nvml.gpus] == [GPU0, GPU1]
    assert device_id(GPU0) == GPU0
    assert len(GPU0) == 40


# --- discovery ---------------------------------------------------------------------------------


def test_discovers_devices_memory_and_processes() -> None:
    nvml = two_gpus()
    nvml.gpus[1].processes.append(FakeProcess(200, 512, graphics=True))
    with NvmlProbe(nvml) as probe:
        assert nvml.init_count == 1
        devices = probe.devices()
        assert devices == [
            ProbedDevice(GPU0, "NVIDIA A100-SXM4-40GB", 0, 40960, 1374, None, driver_mib=300),
            ProbedDevice(GPU1, "NVIDIA L4", 1, 23034, 512),
        ]
        assert probe.processes() == [
            ProcUse(100, GPU0, 1000), ProcUse(101, GPU0, 24), ProcUse(200, GPU1, 512),
        ]  # fmt: skip
        assert [d.visible_id for d in devices] == ["0", "1"]
    assert nvml.init_count == 0  # shut down once, on leaving
    probe.close()
    assert nvml.init_count == 0


def test_processes_come_from_the_same_reading_as_devices() -> None:
    nvml = two_gpus()
    probe = NvmlProbe(nvml)
    probe.devices()
    nvml.gpus[0].processes.clear()
    assert [p.pid for p in probe.processes()] == [100, 101]  # the reading devices() took
    assert probe.processes() == []  # no reading left: a new one is taken
    probe.close()


def test_mig_slices_are_devices_of_their_own() -> None:
    mig_a, mig_b = fake_uuid(10, "MIG"), fake_uuid(11, "MIG")
    gpu = FakeGpu(
        GPU0, "NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True,
        mig=[FakeMig(mig_a, 4864, [FakeProcess(300, 1024)]), FakeMig(mig_b, 9856)],
    )  # fmt: skip
    nvml = FakeNvml([gpu, FakeGpu(GPU1, mig=[])])  # GPU1: MIG capable, MIG off
    with NvmlProbe(nvml) as probe:
        devices = probe.devices()
        assert [(d.uuid, d.index, d.parent, d.total_mib, d.used_mib) for d in devices] == [
            (mig_a, None, GPU0, 4864, 1024),
            (mig_b, None, GPU0, 9856, 0),
            (GPU1, 1, None, 24576, 0),
        ]
        assert devices[0].visible_id == mig_a  # what CUDA_VISIBLE_DEVICES takes for a slice
        assert devices[0].name.startswith("NVIDIA A100-SXM4-40GB MIG")
        assert probe.processes() == [ProcUse(300, mig_a, 1024)]
        gpu.mig_enabled = False  # MIG turned off: the whole GPU again
        assert [(d.uuid, d.index) for d in probe.devices()] == [(GPU0, 0), (GPU1, 1)]


def test_old_mig_uuids_become_valid_device_names() -> None:
    old = f"MIG-{GPU0}/1/0"
    assert device_id(old) == f"MIG-{GPU0}:1:0"
    d = ProbedDevice(old, "x", None, 1, 0, GPU0)
    assert d.device_id == f"MIG-{GPU0}:1:0"
    assert d.visible_id == old


def test_memory_falls_back_to_v1_on_old_drivers() -> None:
    nvml = two_gpus()
    nvml.memory_v2 = False  # no nvmlDeviceGetMemoryInfo_v2 in the driver
    with NvmlProbe(nvml) as probe:
        dev = probe.devices()[0]
        assert (dev.total_mib, dev.used_mib, dev.driver_mib) == (40960, 1374, 0)
        assert nvml.calls["nvmlDeviceGetMemoryInfo_v2"] == 1  # tried once, then v1 only
        probe.devices()
        assert nvml.calls["nvmlDeviceGetMemoryInfo_v2"] == 1
        assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 4


def test_memory_v2_refused_by_one_device_falls_back_for_it() -> None:
    nvml = two_gpus()
    nvml.gpus[0].errors["nvmlDeviceGetMemoryInfo_v2"] = fakenvml.NVML_ERROR_NOT_SUPPORTED
    with NvmlProbe(nvml) as probe:
        a, b = probe.devices()
        assert (a.used_mib, a.driver_mib, a.healthy) == (1374, 0, True)
        assert (b.used_mib, b.healthy) == (0, True)
        assert nvml.calls["nvmlDeviceGetMemoryInfo_v2"] == 2  # GPU1 still uses v2


class OldPynvml(FakeNvml):
    """A binding whose nvmlDeviceGetMemoryInfo takes no version (pynvml before v2 memory)."""

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):  # type: ignore[no-untyped-def]
        if version is not None:
            raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword argument 'version'")
        return super().nvmlDeviceGetMemoryInfo(handle)


def test_memory_falls_back_when_the_binding_is_too_old() -> None:
    with NvmlProbe(OldPynvml([FakeGpu(GPU0, total_mib=1024, other_mib=24)])) as probe:
        assert [(d.total_mib, d.used_mib) for d in probe.devices()] == [(1024, 24)]


def test_processes_fall_back_to_the_v2_calls() -> None:
    nvml = two_gpus()
    nvml.processes_v3 = False
    with NvmlProbe(nvml) as probe:
        probe.devices()
        assert [p.pid for p in probe.processes()] == [100, 101]
        assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2


def test_unknown_usage_and_unlisted_processes() -> None:
    nvml = two_gpus()
    nvml.gpus[0].processes[0].visible = False  # NVML: usedGpuMemory not available
    nvml.gpus[1].errors["nvmlDeviceGetComputeRunningProcesses"] = fakenvml.NVML_ERROR_NO_PERMISSION
    with NvmlProbe(nvml) as probe:
        a, b = probe.devices()
        assert (a.processes_visible, b.processes_visible) == (True, False)
        assert b.healthy
        assert probe.processes() == [ProcUse(100, GPU0, None), ProcUse(101, GPU0, 24)]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "hint"),
    [(fakenvml.NVML_ERROR_LIBRARY_NOT_FOUND, "is the NVIDIA driver installed?"),
     (fakenvml.NVML_ERROR_DRIVER_NOT_LOADED, "is the NVIDIA driver loaded?")],
)  # fmt: skip
def test_nvml_that_does_not_start_is_a_clear_error(code: int, hint: str) -> None:
    with pytest.raises(ProbeError) as err:
        NvmlProbe(FakeNvml(init_error=code))
    assert err.value.nvml_code == code
    assert str(err.value).startswith("NVML could not start: ")
    assert str(fakenvml.NVMLError(code)) in str(err.value)
    assert hint in str(err.value)


def test_missing_pynvml_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with pytest.raises(NvmlMissing, match=r"pip install 'gpuboss\[nvml\]'"):
        NvmlProbe()


def test_count_failing_is_a_probe_error() -> None:
    nvml = two_gpus()
    with NvmlProbe(nvml) as probe:
        nvml.errors["nvmlDeviceGetCount"] = fakenvml.NVML_ERROR_UNKNOWN
        with pytest.raises(ProbeError, match="NVML cannot count the devices: Unknown Error"):
            probe.devices()
    probe.close()
    with pytest.raises(ProbeError, match="closed"):
        probe.devices()


def test_lost_and_failing_devices() -> None:
    nvml = two_gpus()
    with NvmlProbe(nvml) as probe:
        nvml.gpus[0].lost = True  # fell off the bus: cannot even be opened
        assert [d.uuid for d in probe.devices()] == [GPU1]
        nvml.gpus[0].lost = False
        nvml.gpus[1].errors["nvmlDeviceGetMemoryInfo_v2"] = fakenvml.NVML_ERROR_GPU_IS_LOST
        a, b = probe.devices()
        assert a.healthy
        assert (b.uuid, b.healthy, b.index) == (GPU1, False, 1)
        assert b.error == "GPU is lost (NVML error 15)"
        assert [p.device for p in probe.processes()] == [GPU0, GPU0]
        del nvml.gpus[0]  # vanished: the rest renumbered
        nvml.gpus[0].errors.clear()
        assert [(d.uuid, d.index) for d in probe.devices()] == [(GPU1, 0)]


def test_mig_query_failing_on_a_gpu_marks_it_unhealthy() -> None:
    nvml = two_gpus()
    nvml.gpus[0].errors["nvmlDeviceGetMigMode"] = fakenvml.NVML_ERROR_UNKNOWN
    nvml.mig_api = False  # GPU1: a driver without MIG calls means no MIG
    with NvmlProbe(nvml) as probe:
        a, b = probe.devices()
        assert (a.uuid, a.healthy, b.healthy) == (GPU0, False, True)


# --- static ------------------------------------------------------------------------------------


def test_static_probe_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBOSS_DEVICES", "gpu0=24GiB:0,gpu1=16GiB")
    probe = StaticProbe(ServiceSettings().devices)
    assert probe.devices() == [
        ProbedDevice("gpu0", "gpu0", 0, 24576, 0, processes_visible=False),
        ProbedDevice("gpu1", "gpu1", None, 16384, 0, processes_visible=False),
    ]
    assert probe.processes() == []
    probe.close()
