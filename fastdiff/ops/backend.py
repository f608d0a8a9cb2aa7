"""Which execution path an op takes, decided in one place.

- CUDA tensors and Triton installed: the Triton kernel ("triton").
- CPU tensors with ``TRITON_INTERPRET=1`` *and* inside :func:`interpreted_kernels`: the same
  Triton kernel, run by Triton's interpreter ("triton-interpreter") -- how CI tests kernels.
- Anything else: the eager reference ("reference"), which torch.compile can trace and fuse.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

_cpu_kernels_enabled = False


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """True when Triton's interpreter is on (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def interpreted_kernels():
    """Route CPU tensors through the Triton kernels under the interpreter (tests, debugging)."""
    if not interpreter_active():
        raise RuntimeError("interpreted_kernels() needs TRITON_INTERPRET=1 set before triton is imported")
    if not triton_available():
        raise RuntimeError("interpreted_kernels() needs triton installed")
    with cpu_tensors_take_the_kernel_route():
        yield


@contextlib.contextmanager
def cpu_tensors_take_the_kernel_route():
    """Ops on CPU tensors call the registered fastdiff:: ops, as CUDA tensors do. Alone (without
    the interpreter) only for compile-time analysis that never runs them (fastdiff.bench.traffic)."""
    global _cpu_kernels_enabled
    previous, _cpu_kernels_enabled = _cpu_kernels_enabled, True
    try:
        yield
    finally:
        _cpu_kernels_enabled = previous


def kernel_path(device: torch.device | str) -> str:
    """"triton", "triton-interpreter" or "reference": what an op on ``device`` runs."""
    device = torch.device(device)
    if device.type == "cuda" and triton_available() and not interpreter_active():
        return "triton"
    if device.type == "cpu" and _cpu_kernels_enabled:
        return "triton-interpreter"
    return "reference"


def use_triton(t: torch.Tensor) -> bool:
    return kernel_path(t.device) != "reference"


def on_device(device: torch.device | str):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context. Triton launches
    on the *current* CUDA device and a CUDA graph captures on a stream of it, so every CUDA
    entry point (ops, samplers, graph captures) runs under its tensors' device: cuda:1 works."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def exact_fp32():
    """float32 as IEEE float32 inside the block, on every device: no TF32 convolutions (cuDNN
    allows them by default) or reduced-precision fp32 matmuls; the settings are restored after.
    The reference sampler and the fp32 fast path both run under it, so they compare exactly."""
    cudnn_tf32, matmul_precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(matmul_precision)
