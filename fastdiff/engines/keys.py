"""The parts of a compiled-artifact cache key (:mod:`fastdiff.engines.cache`) that do not depend
on the engine: what the model is (its code, structure and weights) and where the code runs
(library versions, device kind and capability)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import platform
import sys

import torch
import torch.nn as nn

import fastdiff


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def model_fingerprint(model: nn.Module) -> dict:
    """The model as far as compiled code depends on it: its weights and buffers, its structure
    (``repr``: layers and their settings) and the source files of its module classes (so an edited
    forward is a new model)."""
    classes = {type(m) for m in model.modules()}
    sources = hashlib.sha256()
    for path in sorted({_source_file(c) for c in classes} - {None}):
        with open(path, "rb") as f:
            sources.update(path.encode() + b"\0" + f.read())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "structure": hashlib.sha256(repr(model).encode()).hexdigest(),
        "code": sources.hexdigest(),
        "weights": tensor_sha256({**dict(model.named_parameters()), **dict(model.named_buffers())}),
    }


def _source_file(cls) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None


def environment(device: torch.device | str) -> dict:
    """Where compiled code runs: versions of Python, torch, triton and fastdiff, the machine and
    the device's kind and capability (CUDA compute capability, CPU vector ISA)."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        capability = torch.backends.cpu.get_cpu_capability()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "fastdiff": fastdiff.__version__,
        "machine": platform.machine(),
        "device": device.type,
        "capability": capability,
    }


def package_version(package: str) -> str | None:
    """The installed version of ``package``, None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
