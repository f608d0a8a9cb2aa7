"""What the machine was doing while a path ran, sampled in a background thread.

On a GPU: NVML (nvidia-ml-py) clocks, power, utilization, temperature. On a CPU: system-wide
CPU utilization and the load average, because this bench often runs on shared machines and a
reader must see when other work competed with it. Missing NVML degrades to "absent", never fails.
"""
from __future__ import annotations

import os
import statistics
import threading

import psutil
import torch

SAMPLE_INTERVAL_S = 0.05


def _nvml():
    """The initialised ``pynvml`` module, or None when NVML is unavailable."""
    try:
        # nvidia-ml-py is optional (fastdiff[gpu])
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no package, no driver, no GPU: telemetry is optional
        return None


def _nvml_handle(nvml, device: torch.device):
    """NVML's handle for the torch device, found by PCI address (CUDA_VISIBLE_DEVICES renumbers indices)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        address = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(address)
    except Exception:  # older torch without PCI fields, or a driver wanting another format
        return nvml.nvmlDeviceGetHandleByIndex(index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Telemetry:
    """``static()`` describes the device once; ``record()`` returns a context sampling during a call."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._nvml = _nvml() if self.device.type == "cuda" else None
        self._handle = _nvml_handle(self._nvml, self.device) if self._nvml else None
        self.kind = "nvml" if self._handle is not None else ("cpu" if self.device.type == "cpu" else "absent")

    def static(self) -> dict:
        if self.kind == "nvml":
            nvml, h = self._nvml, self._handle
            info = {"source": "nvml", "name": _text(nvml.nvmlDeviceGetName(h)),
                    "driver": _text(nvml.nvmlSystemGetDriverVersion())}
            for key, fn in (("max_sm_clock_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM)),
                            ("max_mem_clock_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_MEM)),
                            ("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)):
                try:
                    info[key] = fn()
                except Exception:
                    info[key] = None
            return info
        if self.kind == "cpu":
            return {"source": "psutil", "logical_cpus": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg())}
        return {"source": "absent", "reason": "NVML (nvidia-ml-py) not available"}

    def _sample(self) -> dict:
        if self.kind == "nvml":
            nvml, h = self._nvml, self._handle
            util = nvml.nvmlDeviceGetUtilizationRates(h)
            return {
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
                "power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1000,
                "gpu_util_pct": util.gpu,
                "mem_util_pct": util.memory,
                "temperature_c": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            }

        return {"cpu_util_pct": psutil.cpu_percent(interval=None), "loadavg_1m": os.getloadavg()[0]}

    def record(self) -> "Recording":
        return Recording(self)


class Recording:
    """Context manager: samples every SAMPLE_INTERVAL_S until exit; ``samples`` holds the dicts."""

    def __init__(self, telemetry: Telemetry):
        self._telemetry = telemetry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.samples: list[dict] = []

    def _loop(self):
        while True:
            try:
                self.samples.append(self._telemetry._sample())
            except Exception:  # a failed read skips a sample, never the benchmark
                pass
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def __enter__(self):
        if self._telemetry.kind != "absent":
            if self._telemetry.kind == "cpu":
                psutil.cpu_percent(interval=None)  # the first call only sets psutil's reference point
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        return False


def summarize(samples: list[dict]) -> dict:
    """Mean and max of every sampled quantity, with the number of samples."""
    if not samples:
        return {"samples": 0}
    summary: dict = {"samples": len(samples)}
    for key in samples[0]:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            summary[key] = {"mean": statistics.fmean(values), "max": max(values)}
    return summary
