"""GPUs found and measured through NVML (pynvml); every call blocks, so callers use threads.

`open_nvml()` gives the real probe or says, in `NvmlUnavailable`, why this machine has
none. `UsageSampler` measures one job's GPU use in a background thread while it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import pynvml

from app.protocol import GpuInfo

log = logging.getLogger("jobledger.gpu")

_MIB = 1024 * 1024


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; `reason` says why, for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GpuSample(msgspec.Struct, frozen=True):
    """One reading of some GPUs: mean utilisation and memory in use summed over them."""

    utilization_percent: float
    memory_used_mb: int


class GpuUsage(msgspec.Struct, frozen=True):
    """What a job used of its GPUs while it ran; None where nothing could be measured."""

    peak_memory_mb: int | None
    peak_utilization_percent: float | None
    mean_utilization_percent: float | None


_NOTHING_MEASURED = GpuUsage(
    peak_memory_mb=None, peak_utilization_percent=None, mean_utilization_percent=None
)


class GpuProbe(Protocol):
    """Lists and measures the GPUs of this machine; every method blocks."""

    def gpus(self) -> list[GpuInfo]:
        """Every GPU of the machine, by NVML index."""
        ...

    def sample(self, indices: Sequence[int]) -> GpuSample:
        """Current utilisation and memory use of the GPUs at `indices`."""
        ...

    def close(self) -> None:
        """Release the probe's resources."""
        ...


def _text(value: str | bytes) -> str:
    """A string from pynvml, which returns bytes or str depending on its version."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _shutdown_after_failed_open() -> None:
    """Undo nvmlInit when opening failed later; a failure here is logged, the first one raised."""
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        log.warning("nvmlShutdown failed after NVML could not be opened", exc_info=True)


class NvmlProbe:
    """The GPUs of this machine through NVML; make one with `open()`, `close()` it when done."""

    def __init__(self, count: int, driver: str) -> None:
        self._count = count
        self._driver = driver
        self._closed = False

    @classmethod
    def open(cls) -> NvmlProbe:
        """Initialise NVML and check it sees at least one GPU, else raise NvmlUnavailable."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as error:
            raise NvmlUnavailable(
                "NVML library not found (libnvidia-ml.so): no NVIDIA driver on this machine"
            ) from error
        except pynvml.NVMLError_DriverNotLoaded as error:
            raise NvmlUnavailable(
                "the NVIDIA driver is installed but not loaded (is the kernel module missing?)"
            ) from error
        except pynvml.NVMLError_NoPermission as error:
            raise NvmlUnavailable(
                "no permission to talk to the NVIDIA driver (check /dev/nvidia* access)"
            ) from error
        except (pynvml.NVMLError, OSError) as error:
            raise NvmlUnavailable(f"NVML could not be initialised: {error}") from error
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as error:
            _shutdown_after_failed_open()
            raise NvmlUnavailable(f"NVML could not count the GPUs: {error}") from error
        if count == 0:
            _shutdown_after_failed_open()
            raise NvmlUnavailable(f"NVML works (driver {driver}) but sees no GPU on this machine")
        return cls(count, driver)

    def _handle(self, index: int) -> Any:
        """NVML's handle of the GPU at `index`; raises NVMLError for an unknown index."""
        if self._closed:
            raise RuntimeError("the NVML probe is closed")
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def gpus(self) -> list[GpuInfo]:
        """Every GPU of the machine, by NVML index."""
        found = []
        for index in range(self._count):
            handle = self._handle(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    memory_total_mb=int(memory.total) // _MIB,
                    driver=self._driver,
                )
            )
        return found

    def sample(self, indices: Sequence[int]) -> GpuSample:
        """Mean utilisation and summed memory use of the GPUs at `indices`."""
        utilization = 0.0
        memory_used = 0
        for index in indices:
            handle = self._handle(index)
            utilization += float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            memory_used += int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        mean = utilization / len(indices) if indices else 0.0
        return GpuSample(utilization_percent=mean, memory_used_mb=memory_used // _MIB)

    def close(self) -> None:
        """Shut NVML down; closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        pynvml.nvmlShutdown()


def open_nvml() -> NvmlProbe:
    """The NVML probe of this machine; raises NvmlUnavailable saying why there is none."""
    return NvmlProbe.open()


class UsageSampler:
    """Samples some GPUs in a daemon thread from `start()` to `stop()`: peak and mean use.

    A sample is taken at start and at stop as well, so even a short job gets one. The
    first sampling error is logged and ends sampling; the job itself never fails for it.
    """

    def __init__(
        self, probe: GpuProbe | None, indices: Sequence[int], interval: float = 0.5
    ) -> None:
        if interval <= 0:
            raise ValueError(f"the sampling interval must be positive, not {interval}")
        self._probe = probe
        self._indices = tuple(indices)
        self._interval = interval
        self._stopping = threading.Event()
        # Serialises the thread's samples with the final one taken by stop().
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._result: GpuUsage | None = None
        self._count = 0
        self._utilization_sum = 0.0
        self._peak_utilization = 0.0
        self._peak_memory = 0

    def _measures(self) -> bool:
        """True if there is anything to measure: a probe and at least one GPU."""
        return self._probe is not None and bool(self._indices)

    def start(self) -> None:
        """Take a first sample and keep sampling every `interval` seconds until `stop()`."""
        if self._thread is not None or self._result is not None:
            raise RuntimeError("a UsageSampler can be started only once")
        if not self._measures():
            return
        self._take_sample()
        self._thread = threading.Thread(target=self._run, name="gpu-usage-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """The sampling thread: one sample per interval until stopped or sampling fails."""
        while not self._stopping.wait(self._interval):
            if not self._take_sample():
                return

    def _take_sample(self) -> bool:
        """Record one sample; False once sampling has failed and should stop."""
        probe = self._probe
        if probe is None:
            return False
        with self._lock:
            if self._failed:
                return False
            try:
                sample = probe.sample(self._indices)
            except (pynvml.NVMLError, OSError):
                self._failed = True
                log.warning(
                    "sampling GPUs %s failed; no more GPU samples for this job",
                    list(self._indices),
                    exc_info=True,
                )
                return False
            self._count += 1
            self._utilization_sum += sample.utilization_percent
            self._peak_utilization = max(self._peak_utilization, sample.utilization_percent)
            self._peak_memory = max(self._peak_memory, sample.memory_used_mb)
            return True

    def stop(self) -> GpuUsage:
        """Stop sampling, take a last sample, and return the usage; later calls return the same."""
        if self._result is not None:
            return self._result
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._take_sample()
        self._result = self._usage()
        return self._result

    def _usage(self) -> GpuUsage:
        """The usage the samples so far add up to."""
        with self._lock:
            if self._count == 0:
                return _NOTHING_MEASURED
            return GpuUsage(
                peak_memory_mb=self._peak_memory,
                peak_utilization_percent=self._peak_utilization,
                mean_utilization_percent=self._utilization_sum / self._count,
            )
