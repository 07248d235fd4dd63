"""What the GPUs of this host are and how their memory is used: the device probe interface.

:class:`NvmlProbe` reads NVML (``nvidia-ml-py``, imported as ``pynvml`` only when a probe is
made, so neither the client nor the service needs it); :class:`StaticProbe` reports devices from
configuration and no process usage (tests, laptops, CI). :mod:`gpuboss.fakenvml` is a fake NVML
binding that :class:`NvmlProbe` can be given instead of ``pynvml``.

Devices are keyed by their NVML UUID. A GPU in MIG mode is reported as its MIG slices, each a
device of its own (the parent's memory is theirs), named by its MIG UUID, which is also what
``CUDA_VISIBLE_DEVICES`` takes for a slice.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpuboss.settings import DeviceSpec

__all__ = [
    "DeviceProbe",
    "NvmlMissing",
    "NvmlProbe",
    "ProbeError",
    "ProbedDevice",
    "ProcUse",
    "StaticProbe",
    "device_id",
]

log = logging.getLogger("gpuboss.probe")

_MIB = 1 << 20
# NVML codes, as pynvml numbers them (a binding need not export every name).
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_FUNCTION_NOT_FOUND = 13
_ARGUMENT_VERSION_MISMATCH = 25
_MIG_ENABLE = 1
#: the calls that are absent or refused on some drivers and devices: fall back, or go without
_UNAVAILABLE = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH})
_HINTS = {
    9: "is the NVIDIA driver loaded?",
    12: "is the NVIDIA driver installed? NVML comes with it (libnvidia-ml.so.1)",
    18: "the driver and its kernel module differ: reboot or reload the driver",
    _NO_PERMISSION: "run as a user that may read the GPUs",
}


class ProbeError(RuntimeError):
    """The probe cannot read the devices at all (NVML missing or failing as a whole).

    ``nvml_code`` is the NVML error code, when NVML gave one.
    """

    def __init__(self, message: str, nvml_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.nvml_code = nvml_code


class NvmlMissing(ProbeError):
    """``pynvml`` (the ``nvidia-ml-py`` package) is not installed."""


def device_id(uuid: str) -> str:
    """The gpuboss device name for an NVML UUID.

    Current UUIDs (``GPU-<uuid>``, ``MIG-<uuid>``) are valid names as they are; the old MIG form
    ``MIG-GPU-<uuid>/<gi>/<ci>`` has its slashes turned into colons.
    """
    return uuid.replace("/", ":")


@dataclass(frozen=True, slots=True)
class ProbedDevice:
    """One device as the probe sees it, sizes in MiB.

    ``index`` is the CUDA index of a whole GPU (NVML's index: PCI bus order, which CUDA follows
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), None for a MIG slice. ``used_mib`` is everything in
    use (total - free), the driver's own reservation (``driver_mib``, known from the v2 memory
    API only) included. ``healthy`` is False when NVML failed on the device (e.g. GPU_IS_LOST);
    then the sizes are 0 and mean nothing. ``processes_visible`` is False when NVML cannot list
    its processes (then per-process usage is unknown, not zero).
    """

    uuid: str
    name: str
    index: int | None
    total_mib: int
    used_mib: int
    parent: str | None = None
    healthy: bool = True
    driver_mib: int = 0
    processes_visible: bool = True
    error: str | None = None

    @property
    def device_id(self) -> str:
        """Its gpuboss device name (see :func:`device_id`)."""
        return device_id(self.uuid)

    @property
    def visible_id(self) -> str:
        """What ``CUDA_VISIBLE_DEVICES`` takes for it: the CUDA index, or a MIG slice's UUID."""
        return str(self.index) if self.index is not None else self.uuid


@dataclass(frozen=True, slots=True)
class ProcUse:
    """Memory one process uses on one device (``device`` is the device's UUID).

    ``used_mib`` is None when NVML cannot tell (some containers, Windows WDDM).
    """

    pid: int
    device: str
    used_mib: int | None


class DeviceProbe(Protocol):
    """Reads this host's devices and the processes using them."""

    def devices(self) -> list[ProbedDevice]:
        """The devices now; raises :class:`ProbeError` if none can be read at all."""
        ...

    def processes(self) -> list[ProcUse]:
        """Per-process usage, from the same reading as the last :meth:`devices` call."""
        ...

    def close(self) -> None:
        """Release what the probe holds (NVML's init count)."""
        ...


class StaticProbe:
    """Devices from configuration (``GPUBOSS_DEVICES``), always healthy, no process usage."""

    def __init__(self, specs: Sequence[DeviceSpec]) -> None:
        self._devices = [
            ProbedDevice(s.name, s.name, s.cuda_index, s.mib, 0, processes_visible=False) for s in specs
        ]

    def devices(self) -> list[ProbedDevice]:
        return list(self._devices)

    def processes(self) -> list[ProcUse]:
        return []

    def close(self) -> None:
        return None


def _mib_up(nbytes: int) -> int:
    return math.ceil(nbytes / _MIB)


@dataclass
class _Reading:
    devices: list[ProbedDevice] = field(default_factory=list)
    processes: list[ProcUse] = field(default_factory=list)


class NvmlProbe:
    """Devices and per-process usage from NVML.

    ``nvml_module`` is ``pynvml`` by default (imported here, so only a host that runs the agent
    needs ``nvidia-ml-py``), or a stand-in such as :class:`gpuboss.fakenvml.FakeNvml`. NVML is
    initialised once here and shut down by :meth:`close`. Raises :class:`NvmlMissing` when
    ``pynvml`` is not installed and :class:`ProbeError` when NVML does not start.
    """

    def __init__(self, nvml_module: Any = None) -> None:
        if nvml_module is None:
            try:
                nvml_module = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlMissing(
                    "NVML support is not installed: pip install 'gpuboss[nvml]' (nvidia-ml-py)"
                ) from exc
        self._nvml = nvml_module
        self._error: type[BaseException] = nvml_module.NVMLError
        try:
            nvml_module.nvmlInit()
        except self._error as err:
            raise self._failure("NVML could not start", err) from err
        self._open = True
        self._memory_v2: bool | None = None  # unknown until the first reading
        self._processes_v3 = True
        self._last: _Reading | None = None

    def _failure(self, what: str, err: BaseException) -> ProbeError:
        code = getattr(err, "value", None)
        hint = _HINTS.get(code) if isinstance(code, int) else None
        return ProbeError(f"{what}: {err} (NVML error {code})" + (f"; {hint}" if hint else ""), code)

    def close(self) -> None:
        """Shut NVML down (once; later calls do nothing)."""
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._error as err:  # nothing to do about it: the process is leaving NVML
                log.warning("nvmlShutdown failed: %s", err)

    def __enter__(self) -> NvmlProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _code(self, err: BaseException) -> int | None:
        code = getattr(err, "value", None)
        return code if isinstance(code, int) else None

    def devices(self) -> list[ProbedDevice]:
        """Take a reading of every device and its processes.

        A device that NVML cannot even open or name (fell off the bus) is left out; one that
        fails later in the reading is reported with ``healthy=False``. Raises ProbeError when the
        device count itself cannot be read.
        """
        nvml = self._nvml
        if not self._open:
            raise ProbeError("the probe is closed")
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._error as err:
            raise self._failure("NVML cannot count the devices", err) from err
        reading = _Reading()
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = str(nvml.nvmlDeviceGetUUID(handle))
            except self._error as err:
                log.warning("GPU %d cannot be opened: %s", index, err)
                continue
            try:
                slices = self._mig_slices(handle, uuid)
            except self._error as err:
                self._unhealthy(reading, uuid, index, None, err)
                continue
            if slices is None:
                self._read(reading, handle, uuid, index, None)
            for mig_handle, mig_uuid in slices or []:
                self._read(reading, mig_handle, mig_uuid, None, uuid)
        self._last = reading
        return list(reading.devices)

    def processes(self) -> list[ProcUse]:
        """Per-process usage from the last :meth:`devices` reading (taking one if there is none)."""
        if self._last is None:
            self.devices()
        assert self._last is not None
        reading, self._last = self._last, None
        return list(reading.processes)

    def _mig_slices(self, handle: Any, uuid: str) -> list[tuple[Any, str]] | None:
        """The MIG slices of a GPU in MIG mode, or None for a GPU that is not in MIG mode."""
        nvml = self._nvml
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
        except self._error as err:
            if self._code(err) in _UNAVAILABLE:  # no MIG on this GPU or driver
                return None
            raise
        except AttributeError:  # a binding without the MIG calls
            return None
        if current != _MIG_ENABLE:
            return None
        out = []
        for j in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                out.append((mig, str(nvml.nvmlDeviceGetUUID(mig))))
            except self._error as err:
                if self._code(err) != _NOT_FOUND:  # NOT_FOUND: no slice at this index
                    log.warning("MIG slice %d of %s cannot be opened: %s", j, uuid, err)
        return out

    def _read(self, reading: _Reading, handle: Any, uuid: str, index: int | None, parent: str | None) -> None:
        try:
            name = str(self._nvml.nvmlDeviceGetName(handle))
            total, used, driver = self._memory(handle)
            procs = self._processes(handle, uuid)
        except self._error as err:
            self._unhealthy(reading, uuid, index, parent, err)
            return
        reading.devices.append(
            ProbedDevice(uuid, name, index, total, used, parent, driver_mib=driver,
                         processes_visible=procs is not None)
        )  # fmt: skip
        reading.processes += procs or []

    def _unhealthy(
        self, reading: _Reading, uuid: str, index: int | None, parent: str | None, err: BaseException
    ) -> None:
        log.warning("device %s cannot be read: %s", uuid, err)
        error = f"{err} (NVML error {self._code(err)})"
        reading.devices.append(
            ProbedDevice(uuid, "?", index, 0, 0, parent, healthy=False, processes_visible=False, error=error)
        )

    def _memory(self, handle: Any) -> tuple[int, int, int]:
        """(total, used, driver-reserved) MiB: the v2 API, or v1 where the driver lacks it."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if self._memory_v2 is not False and version is not None:
            try:
                m = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except TypeError:  # a pynvml too old to take the version
                self._memory_v2 = False
            except self._error as err:
                if self._code(err) not in _UNAVAILABLE:
                    raise
                # FUNCTION_NOT_FOUND: the driver lacks v2 everywhere; otherwise this device only
                if self._code(err) == _FUNCTION_NOT_FOUND:
                    self._memory_v2 = False
            else:
                self._memory_v2 = True
                total = int(m.total) // _MIB
                return total, total - int(m.free) // _MIB, _mib_up(int(m.reserved))
        m = nvml.nvmlDeviceGetMemoryInfo(handle)
        total = int(m.total) // _MIB
        return total, total - int(m.free) // _MIB, 0

    def _processes(self, handle: Any, uuid: str) -> list[ProcUse] | None:
        """Compute and graphics processes on the device, or None if NVML cannot list them."""
        by_pid: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics"):
            try:
                procs = self._list(handle, kind)
            except self._error as err:
                if self._code(err) in (*_UNAVAILABLE, _NO_PERMISSION):
                    if kind == "Compute":
                        return None
                    continue  # graphics processes are a bonus; compute ones are what counts
                raise
            for p in procs:
                used = p.usedGpuMemory
                mib = None if used is None else _mib_up(int(used))
                old = by_pid.get(p.pid)
                # A process with both contexts is listed twice with the same memory.
                by_pid[int(p.pid)] = mib if old is None or (mib is not None and mib > old) else old
        return [ProcUse(pid, uuid, mib) for pid, mib in sorted(by_pid.items())]

    def _list(self, handle: Any, kind: str) -> Any:
        nvml = self._nvml
        if self._processes_v3:
            try:
                return getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses")(handle)
            except self._error as err:
                if self._code(err) != _FUNCTION_NOT_FOUND:
                    raise
                self._processes_v3 = False  # a driver before R510: the _v2 calls
        return getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2")(handle)
