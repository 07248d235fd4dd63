"""A fake NVML binding that behaves like ``pynvml`` (nvidia-ml-py), for tests, demos and laptops.

:class:`FakeNvml` answers the calls :class:`gpuboss.probe.NvmlProbe` makes, with pynvml's names,
error codes and error classes (``NVMLError(code)`` builds the subclass for the code, e.g.
``NVMLError_GpuIsLost``), reference-counted ``nvmlInit``/``nvmlShutdown``, the v2 memory API (or
its absence on old drivers: ``FUNCTION_NOT_FOUND``), MIG mode and MIG device handles, per-process
usage (``usedGpuMemory`` is None where NVML cannot tell), and devices that fall off the bus
(``GPU_IS_LOST``) or vanish. Tests change the state of the GPUs between passes::

    nvml = FakeNvml([FakeGpu("GPU-1", total_mib=24576)])
    nvml.gpus[0].processes.append(FakeProcess(pid=4242, mib=2048))
    probe = NvmlProbe(nvml)
"""

from __future__ import annotations

import json
import string
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gpuboss_client import BadRequest, parse_mib

__all__ = [
    "NVML_DEVICE_MIG_DISABLE",
    "NVML_DEVICE_MIG_ENABLE",
    "FakeGpu",
    "FakeMig",
    "FakeNvml",
    "FakeProcess",
    "NVMLError",
    "nvmlExceptionClass",
    "nvmlMemory_v2",
]

# The error codes, with pynvml's names and values.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
nvmlMemory_v2 = 0x02000028

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_MEMORY: "Insufficient Memory",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """pynvml's error: ``NVMLError(code)`` is an instance of the code's own subclass."""

    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    _code: ClassVar[int | None] = None
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:
        if cls._code is not None:
            value = cls._code
        elif value is not None:
            cls = NVMLError._by_code.get(value, cls)
        if value is None:
            raise TypeError("NVMLError needs an error code")
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__(self.value)

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def _error_classes() -> None:
    # pynvml's naming: NVML_ERROR_GPU_IS_LOST -> NVMLError_GpuIsLost.
    for name, value in list(globals().items()):
        if not name.startswith("NVML_ERROR_"):
            continue
        cls_name = "NVMLError_" + string.capwords(name.removeprefix("NVML_ERROR_"), "_").replace("_", "")
        cls = type(cls_name, (NVMLError,), {"_code": value, "__module__": __name__})
        globals()[cls_name] = cls
        NVMLError._by_code[value] = cls


_error_classes()


def nvmlExceptionClass(code: int) -> type[NVMLError]:
    """The NVMLError subclass of ``code`` (as pynvml has it)."""
    if code not in NVMLError._by_code:
        raise ValueError(f"nvmlErrorCode {code} is not valid")
    return NVMLError._by_code[code]


@dataclass
class FakeProcess:
    """A process using memory on a GPU or MIG slice.

    ``visible=False``: NVML reports its usage as not available (``usedGpuMemory`` None), as it
    does in some containers.
    """

    pid: int
    mib: int
    visible: bool = True
    graphics: bool = False


@dataclass
class FakeMig:
    """A MIG slice (a GPU instance with its compute instance)."""

    uuid: str
    total_mib: int
    processes: list[FakeProcess] = field(default_factory=list)
    reserved_mib: int = 0
    other_mib: int = 0


@dataclass
class FakeGpu:
    """One GPU. Change its fields between calls to change what NVML reports.

    ``reserved_mib`` is the driver's own reservation (v2 ``reserved``), ``other_mib`` memory in
    use that no listed process explains. ``mig`` is None for a GPU without MIG support.
    ``lost``: it fell off the bus (every call on it fails with ``GPU_IS_LOST``). ``errors`` maps
    an NVML function name to the error code that function raises for this GPU.
    """

    uuid: str
    name: str = "NVIDIA Fake GPU"
    total_mib: int = 24576
    processes: list[FakeProcess] = field(default_factory=list)
    reserved_mib: int = 0
    other_mib: int = 0
    mig: list[FakeMig] | None = None
    mig_enabled: bool = False
    lost: bool = False
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Handle:
    gpu: FakeGpu
    mig: FakeMig | None = None


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _MemoryV2:
    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int | None  # pynvml's field names
    gpuInstanceId: int
    computeInstanceId: int


_MIB = 1 << 20
_MAX_MIG = 7
_NO_ID = 0xFFFFFFFF  # instance ids of a process outside MIG


def fake_uuid(index: int, prefix: str = "GPU") -> str:
    """A stable UUID for fake device ``index``, shaped like NVML's (``GPU-xxxxxxxx-...``)."""
    return f"{prefix}-{uuidlib.UUID(int=0xFA4E << 112 | index)}"


class FakeNvml:
    """A stand-in for the ``pynvml`` module: pass it as ``NvmlProbe(nvml_module=...)``.

    ``memory_v2=False`` is an old driver without ``nvmlDeviceGetMemoryInfo_v2``;
    ``processes_v3=False`` one without ``nvmlDeviceGetComputeRunningProcesses_v3`` (the ``_v2``
    calls still work); ``mig_api=False`` one without the MIG calls. ``init_error`` makes
    ``nvmlInit`` fail with that code (e.g. ``NVML_ERROR_DRIVER_NOT_LOADED``). ``errors`` maps a
    function name to the code it raises for every device.
    """

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        memory_v2: bool = True,
        processes_v3: bool = True,
        mig_api: bool = True,
        init_error: int | None = None,
        driver_version: str = "550.54.15",
    ) -> None:
        self.gpus = list(gpus)
        self.memory_v2 = memory_v2
        self.processes_v3 = processes_v3
        self.mig_api = mig_api
        self.init_error = init_error
        self.driver_version = driver_version
        self.errors: dict[str, int] = {}
        #: nvmlInit calls not yet matched by nvmlShutdown (NVML counts them)
        self.init_count = 0
        #: every call made, by function name
        self.calls: dict[str, int] = {}
        #: the JSON file the GPUs are read from (see :meth:`from_file`), if any
        self.state_file: Path | None = None

    @classmethod
    def from_spec(cls, spec: str) -> FakeNvml:
        """GPUs from ``"24GiB,NVIDIA A100=40GiB"``: comma-separated ``SIZE`` or ``NAME=SIZE``."""
        gpus = []
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, _, size = part.rpartition("=")
            gpus.append(FakeGpu(fake_uuid(i), name=name or "NVIDIA Fake GPU", total_mib=parse_mib(size)))
        return cls(gpus)

    @classmethod
    def from_file(cls, path: str | Path) -> FakeNvml:
        """GPUs described by a JSON file, read again at the start of every pass of the agent, so
        that another program (a test's fake engine, a demo) can change what NVML reports::

            {"gpus": [{"name": "NVIDIA A100", "total": "40GiB", "uuid": "GPU-...",
                       "processes": [{"pid": 4242, "mib": 2048}], "other_mib": 0, "lost": false}]}

        ``uuid`` defaults to a fixed one per position. A GPU keeps its identity across passes by
        uuid; one that leaves the file vanishes, as if it fell off the bus."""
        nvml = cls()
        nvml.state_file = Path(path)
        nvml._reload()
        return nvml

    def _reload(self) -> None:
        if self.state_file is None:
            return
        try:
            doc = json.loads(self.state_file.read_text(encoding="utf-8"))
            entries = doc["gpus"]
            if not isinstance(entries, list):
                raise TypeError("gpus must be a list")
            by_uuid = {g.uuid: g for g in self.gpus}
            gpus = []
            for i, entry in enumerate(entries):
                uuid = str(entry.get("uuid") or fake_uuid(i))
                gpu = by_uuid.get(uuid) or FakeGpu(uuid)
                gpu.name = str(entry.get("name", gpu.name))
                gpu.total_mib = parse_mib(entry.get("total", gpu.total_mib))
                gpu.other_mib = int(entry.get("other_mib", 0))
                gpu.lost = bool(entry.get("lost", False))
                gpu.processes = [
                    FakeProcess(int(p["pid"]), int(p["mib"])) for p in entry.get("processes", [])
                ]
                gpus.append(gpu)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, BadRequest) as exc:
            # A file being rewritten, or wrong: keep the last good state (NVML has no such error).
            if not self.gpus:
                raise ValueError(f"{self.state_file}: cannot read the fake GPUs: {exc}") from exc
            return
        self.gpus = gpus

    # Constants and error classes are the module's, as in pynvml.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "NVMLError", "nvmlMemory_")) or name == "nvmlExceptionClass":
            try:
                return globals()[name]
            except KeyError:
                pass
        raise AttributeError(name)

    # --- checks ---------------------------------------------------------------------------

    def _enter(self, fn: str, handle: _Handle | None = None) -> None:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if fn in self.errors:
            raise NVMLError(self.errors[fn])
        if handle is None:
            return
        gpu = handle.gpu
        if gpu.lost or not any(g is gpu for g in self.gpus):
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.errors:
            raise NVMLError(gpu.errors[fn])
        if handle.mig is not None and not (
            gpu.mig_enabled and gpu.mig is not None and any(m is handle.mig for m in gpu.mig)
        ):
            raise NVMLError(NVML_ERROR_NOT_FOUND)  # the slice was destroyed

    # --- library --------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    # --- devices --------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        self._reload()  # a pass begins here: a file-backed fake reads its file again
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(self.gpus[index])
        self._enter("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle:
        self._enter("nvmlDeviceGetHandleByUUID")
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return _Handle(gpu)
            for mig in (gpu.mig or []) if gpu.mig_enabled else []:
                if mig.uuid == uuid:
                    return _Handle(gpu, mig)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return handle.mig.uuid if handle.mig is not None else handle.gpu.uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetName", handle)
        if handle.mig is not None:
            return f"{handle.gpu.name} MIG {max(1, handle.mig.total_mib // 1024)}gb"
        return handle.gpu.name

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        return next(i for i, g in enumerate(self.gpus) if g is handle.gpu)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> _Memory | _MemoryV2:
        fn = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        self._enter(fn, handle)
        if version and not self.memory_v2:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if version and version != nvmlMemory_v2:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        total, reserved, used = self._memory(handle)
        free = max(0, total - reserved - used)
        if version:
            return _MemoryV2(version, total * _MIB, reserved * _MIB, free * _MIB, used * _MIB)
        # v1: "used" includes the driver's reservation
        return _Memory(total * _MIB, free * _MIB, (total - free) * _MIB)

    def _memory(self, handle: _Handle) -> tuple[int, int, int]:
        gpu, mig = handle.gpu, handle.mig
        if mig is not None:
            return mig.total_mib, mig.reserved_mib, sum(p.mib for p in mig.processes) + mig.other_mib
        used = sum(p.mib for p in gpu.processes) + gpu.other_mib
        if gpu.mig_enabled:
            used += sum(m.reserved_mib + m.other_mib + sum(p.mib for p in m.processes) for m in gpu.mig or [])
        return gpu.total_mib, gpu.reserved_mib, used

    def _processes(self, handle: _Handle, graphics: bool) -> list[_Process]:
        places: list[tuple[int, list[FakeProcess]]]
        if handle.mig is not None:
            places = [(self._mig_index(handle), handle.mig.processes)]
        elif handle.gpu.mig_enabled:
            places = [(i, m.processes) for i, m in enumerate(handle.gpu.mig or [])]
        else:
            places = [(_NO_ID, handle.gpu.processes)]
        return [
            _Process(p.pid, p.mib * _MIB if p.visible else None, gi, _NO_ID if gi == _NO_ID else 0)
            for gi, procs in places
            for p in procs
            if p.graphics == graphics
        ]

    def _mig_index(self, handle: _Handle) -> int:
        return next(i for i, m in enumerate(handle.gpu.mig or []) if m is handle.mig)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[_Process]:
        # pynvml's wrapper calls the _v3 symbol: missing on drivers before R510
        self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        if not self.processes_v3:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._processes(handle, graphics=False)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle) -> list[_Process]:
        self._enter("nvmlDeviceGetComputeRunningProcesses_v2", handle)
        return self._processes(handle, graphics=False)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[_Process]:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle)
        if not self.processes_v3:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._processes(handle, graphics=True)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: _Handle) -> list[_Process]:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses_v2", handle)
        return self._processes(handle, graphics=True)

    # --- MIG ------------------------------------------------------------------------------

    def _mig_call(self, fn: str, handle: _Handle) -> list[FakeMig]:
        self._enter(fn, handle)
        if not self.mig_api:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if handle.gpu.mig is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.gpu.mig

    # (parameter names as pynvml spells them)
    def nvmlDeviceGetMigMode(self, device: _Handle) -> list[int]:
        self._mig_call("nvmlDeviceGetMigMode", device)
        mode = NVML_DEVICE_MIG_ENABLE if device.gpu.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: _Handle) -> int:
        return max(_MAX_MIG, len(self._mig_call("nvmlDeviceGetMaxMigDeviceCount", device)))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: _Handle, index: int) -> _Handle:
        slices = self._mig_call("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if not device.gpu.mig_enabled:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < len(slices):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return _Handle(device.gpu, slices[index])

    def nvmlDeviceIsMigDeviceHandle(self, device: _Handle) -> bool:
        self._enter("nvmlDeviceIsMigDeviceHandle", device)
        return device.mig is not None

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: _Handle) -> _Handle:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", migDevice)
        if migDevice.mig is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(migDevice.gpu)


def fake_nvml(spec: str) -> FakeNvml:
    """The fake NVML a ``--fake-nvml`` option names: ``"@state.json"`` (see :meth:`FakeNvml.from_file`)
    or a spec like ``"24GiB,NVIDIA A100=40GiB"`` (see :meth:`FakeNvml.from_spec`). Raises
    :class:`BadRequest` for a spec or file it cannot read."""
    if spec.startswith("@"):
        try:
            return FakeNvml.from_file(spec[1:])
        except (OSError, ValueError) as exc:
            raise BadRequest(f"--fake-nvml {spec}: {exc}") from None
    return FakeNvml.from_spec(spec)
