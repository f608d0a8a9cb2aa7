"""Show versions, devices and which execution paths (Triton, interpreter, reference) run here."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section, values in report.items():
        print(f"{section}:")
        for key, value in values.items():
            print(f"  {key:<22} {value}")
    return 0


def collect() -> dict:
    """Everything ``fastdiff info`` reports, as a dict of sections."""
    import torch

    import fastdiff
    from fastdiff.ops import backend

    cuda = torch.cuda.is_available()
    versions = {
        "fastdiff": fastdiff.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"),
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "nvidia-ml-py": _version("nvidia-ml-py"),
    }
    devices = {
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "cuda": ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        if cuda else "not available",
        "nvml": _nvml_summary(),
    }
    paths = {
        "cpu": backend.kernel_path("cpu") + " (eager PyTorch)",
        "cuda": backend.kernel_path("cuda") if cuda else "n/a (no GPU)",
        "triton interpreter": "available: TRITON_INTERPRET=1 + fastdiff.ops.backend.interpreted_kernels()"
        if backend.triton_available() else "unavailable (triton not installed)",
        "TRITON_INTERPRET": "1 (kernels run interpreted)" if backend.interpreter_active() else "unset",
    }
    return {"versions": versions, "devices": devices, "execution paths": paths}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvml_summary() -> str:
    """GPU names, memory and driver from NVML (nvidia-ml-py), or why they are unavailable."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"unavailable ({e})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory_gib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            gpus.append(f"{i}: {_text(pynvml.nvmlDeviceGetName(handle))} ({memory_gib:.0f} GiB)")
        return f"driver {_text(driver)}; " + ("; ".join(gpus) or "no GPUs")
    except pynvml.NVMLError as e:
        return f"unavailable ({e})"
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
