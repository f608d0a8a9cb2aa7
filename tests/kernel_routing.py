"""Where kernel tests run: the GPU when there is one, else the CPU under Triton's interpreter
(see tests/kernels/conftest.py, the one fixture that applies it)."""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import torch


def kernel_device() -> torch.device:
    """Where the kernel tests run the kernels: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def launchers() -> list[tuple[object, str]]:
    """(module, name) of every public launcher in fastdiff.kernels: the module's own plain
    functions, not the @triton.jit kernels and not the ahead-of-time report's helpers."""
    import fastdiff.kernels as package
    from fastdiff.kernels.report import NOT_KERNELS

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in NOT_KERNELS:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, fn in vars(module).items():
            if (inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith(("_", "aot_"))):
                found.append((module, name))
    return found


def routed_to(fn, device: torch.device):
    """``fn`` with CPU tensor arguments moved to ``device`` and, when any was, tensor results moved back."""

    def move(value, target):
        if isinstance(value, torch.Tensor) and value.device != target:
            return value.to(target)
        if isinstance(value, tuple):
            return tuple(move(v, target) for v in value)
        return value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        moved = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in (*args, *kwargs.values()))
        args = [move(a, device) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]
        kwargs = {k: move(v, device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
                  for k, v in kwargs.items()}
        result = fn(*args, **kwargs)
        return move(result, torch.device("cpu")) if moved else result

    return wrapper
