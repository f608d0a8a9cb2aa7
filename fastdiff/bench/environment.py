"""Everything a reader needs to reproduce or discount a benchmark run: versions, hardware,
the code's commit, the command line, and how busy the machine was."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from fastdiff.engines.keys import package_version

_PACKAGES = ("torch", "triton", "diffusers", "numpy", "nvidia-ml-py", "fastdiff")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_commit() -> dict:
    """HEAD of the repository holding this source tree, and whether the tree has local changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def collect(device) -> dict:
    """The environment of this process, for the benchmark JSON."""
    device = torch.device(device)
    env = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in _PACKAGES},
        "torch_build": {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_commit(),
        "env_vars": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TRITON_INTERPRET",
                                                "HF_HUB_OFFLINE") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    try:
        env["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return env


def device_slug(device) -> str:
    """Short file-name tag: "cpu-epyc", "h100", ... for results named by date and device."""
    device = torch.device(device)
    name = device_name(device).lower()
    for word in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4", "rtx", "epyc", "xeon", "ryzen", "core"):
        if word in name:
            return f"cpu-{word}" if device.type == "cpu" else word
    return "cpu" if device.type == "cpu" else "cuda"
