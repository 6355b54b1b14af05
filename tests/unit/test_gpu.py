"""GPU discovery and usage sampling; a fake probe stands in for the GPU this machine lacks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from app.gpu import (
    GpuProbe,
    GpuSample,
    GpuUsage,
    NvmlProbe,
    NvmlUnavailable,
    UsageSampler,
    open_nvml,
)
from app.protocol import GpuInfo


class ScriptedProbe:
    """A GpuProbe that returns scripted samples, repeating the last, and records each one."""

    def __init__(self, samples: Sequence[GpuSample | Exception]) -> None:
        self._script = list(samples)
        self.returned: list[GpuSample] = []
        self.calls = 0
        self.indices_seen: list[tuple[int, ...]] = []
        self._lock = threading.Lock()

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(index=0, name="Fake GPU", uuid="GPU-fake", memory_total_mb=1, driver="0")]

    def sample(self, indices: Sequence[int]) -> GpuSample:
        with self._lock:
            self.calls += 1
            self.indices_seen.append(tuple(indices))
            step = self._script.pop(0) if len(self._script) > 1 else self._script[0]
            if isinstance(step, Exception):
                raise step
            self.returned.append(step)
            return step

    def close(self) -> None:
        pass


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_open_nvml_says_why_there_is_no_gpu_or_lists_them() -> None:
    try:
        probe = open_nvml()
    except NvmlUnavailable as error:
        assert error.reason.strip()
        assert str(error) == error.reason
        return
    try:
        gpus = probe.gpus()
        assert gpus
        assert [g.index for g in gpus] == list(range(len(gpus)))
        assert all(g.memory_total_mb > 0 and g.name and g.uuid for g in gpus)
    finally:
        probe.close()


def test_the_fake_probe_fits_the_protocol() -> None:
    probe: GpuProbe = ScriptedProbe([GpuSample(utilization_percent=1.0, memory_used_mb=1)])
    assert probe.gpus()[0].name == "Fake GPU"


def test_start_and_stop_samples_give_peak_and_mean() -> None:
    probe = ScriptedProbe(
        [
            GpuSample(utilization_percent=20.0, memory_used_mb=3000),
            GpuSample(utilization_percent=80.0, memory_used_mb=1000),
        ]
    )
    # An interval far longer than the test: only the start and stop samples are taken.
    sampler = UsageSampler(probe, [0, 2], interval=3600)
    sampler.start()
    usage = sampler.stop()
    assert probe.calls == 2
    assert probe.indices_seen == [(0, 2), (0, 2)]
    assert usage == GpuUsage(
        peak_memory_mb=3000, peak_utilization_percent=80.0, mean_utilization_percent=50.0
    )


def test_the_thread_keeps_sampling_until_stopped() -> None:
    probe = ScriptedProbe(
        [
            GpuSample(utilization_percent=10.0, memory_used_mb=100),
            GpuSample(utilization_percent=90.0, memory_used_mb=700),
            GpuSample(utilization_percent=40.0, memory_used_mb=400),
            GpuSample(utilization_percent=30.0, memory_used_mb=200),
        ]
    )
    sampler = UsageSampler(probe, [1], interval=0.01)
    sampler.start()
    wait_until(lambda: probe.calls >= 6)
    usage = sampler.stop()
    calls_at_stop = probe.calls
    returned = probe.returned
    assert usage.peak_memory_mb == 700
    assert usage.peak_utilization_percent == 90.0
    assert usage.mean_utilization_percent == pytest.approx(
        sum(s.utilization_percent for s in returned) / len(returned)
    )
    time.sleep(0.05)
    assert probe.calls == calls_at_stop, "sampling went on after stop()"
    assert sampler.stop() == usage


def test_without_a_probe_nothing_is_measured() -> None:
    sampler = UsageSampler(None, [0])
    sampler.start()
    assert sampler.stop() == GpuUsage(
        peak_memory_mb=None, peak_utilization_percent=None, mean_utilization_percent=None
    )


def test_without_gpus_nothing_is_measured() -> None:
    probe = ScriptedProbe([GpuSample(utilization_percent=50.0, memory_used_mb=1)])
    sampler = UsageSampler(probe, [])
    sampler.start()
    assert sampler.stop().peak_memory_mb is None
    assert probe.calls == 0


def test_a_failing_first_sample_measures_nothing_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = ScriptedProbe([pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)])
    sampler = UsageSampler(probe, [0], interval=0.01)
    with caplog.at_level(logging.WARNING, logger="jobledger.gpu"):
        sampler.start()
        time.sleep(0.05)
        usage = sampler.stop()
    assert usage.peak_memory_mb is None
    assert usage.mean_utilization_percent is None
    assert probe.calls == 1
    assert len([r for r in caplog.records if r.name == "jobledger.gpu"]) == 1


def test_sampling_stops_at_the_first_error_and_keeps_what_it_had() -> None:
    probe = ScriptedProbe(
        [
            GpuSample(utilization_percent=60.0, memory_used_mb=512),
            pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN),
            GpuSample(utilization_percent=100.0, memory_used_mb=9999),
        ]
    )
    sampler = UsageSampler(probe, [0], interval=0.01)
    sampler.start()
    wait_until(lambda: probe.calls >= 2)
    time.sleep(0.05)
    usage = sampler.stop()
    assert probe.calls == 2
    assert usage == GpuUsage(
        peak_memory_mb=512, peak_utilization_percent=60.0, mean_utilization_percent=60.0
    )


def test_a_sampler_starts_only_once() -> None:
    sampler = UsageSampler(None, [0])
    sampler.start()
    sampler.stop()
    with pytest.raises(RuntimeError):
        sampler.start()


# NvmlProbe against a stand-in for the NVML library, which this machine does not have.


class FakeNvml:
    """The few pynvml functions NvmlProbe calls, for two GPUs of 16 GiB each."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.initialised = False
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return b"NVIDIA A100-SXM4-80GB" if handle == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=16 * 1024**3, used=(handle + 1) * 1024**3)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=30 if handle == 0 else 70, memory=0)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    fake = FakeNvml()
    for name in dir(fake):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(fake, name))
    yield fake


def test_nvml_probe_describes_and_samples_gpus(fake_nvml: FakeNvml) -> None:
    probe = NvmlProbe.open()
    assert probe.gpus() == [
        GpuInfo(
            index=0,
            name="NVIDIA A100-SXM4-80GB",
            uuid="GPU-0",
            memory_total_mb=16384,
            driver="550.54.15",
        ),
        GpuInfo(
            index=1,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-1",
            memory_total_mb=16384,
            driver="550.54.15",
        ),
    ]
    assert probe.sample([0, 1]) == GpuSample(utilization_percent=50.0, memory_used_mb=3072)
    assert probe.sample([1]) == GpuSample(utilization_percent=70.0, memory_used_mb=2048)
    with pytest.raises(pynvml.NVMLError):
        probe.sample([5])
    probe.close()
    probe.close()
    assert fake_nvml.shutdowns == 1


def test_nvml_without_gpus_is_unavailable_and_shut_down(fake_nvml: FakeNvml) -> None:
    fake_nvml.count = 0
    with pytest.raises(NvmlUnavailable, match="no GPU"):
        open_nvml()
    assert fake_nvml.shutdowns == 1


def test_nvml_init_failure_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def init() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    with pytest.raises(NvmlUnavailable, match="not loaded"):
        open_nvml()
