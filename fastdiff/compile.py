"""torch.compile settings for fastdiff's sampling step, chosen per device and kept local.

The settings are inductor config patches applied around each call of the compiled function
(:class:`Compiled`), never set globally: a user's other compiled code is unaffected. They
cannot go through ``torch.compile(options=...)``: dynamo reads ``freezing`` while tracing
(to treat parameters as constants), before inductor's own options apply, so with ``options``
freezing silently does nothing (checked: the generated code then takes the weights as inputs).
Tracing and compiling happen inside the first call (and any recompile), hence the patch there.

CPU (``{"freezing": True}``): measured here, inductor without freezing is no faster than eager
on the UNet (convolutions go to oneDNN either way); with freezing the weights become constants,
so oneDNN gets pre-packed weights and bf16 reaches ~1.8x the fp32 eager forward. Freezing only
applies when the compiled call runs under ``torch.no_grad()``, and the weights are read at
compile time: change them and a new compile is needed.

CUDA (``max_autotune`` + ``coordinate_descent_tuning`` + freezing, ``triton.cudagraphs`` off):
what ``mode="max-autotune-no-cudagraphs"`` sets, plus freezing (conv layout and weight
constant folding). CUDA graphs stay off in inductor because :mod:`fastdiff.graphs` captures the
whole step (UNet + fused step op) itself. ``autotune=False`` skips the autotuning (much shorter
compile) for tests and quick runs.

Always ``fullgraph=True`` (a graph break is a bug to fix, not a slow path to accept) and
``dynamic=False`` (one static graph per batch size, as CUDA graphs need anyway).
"""
from __future__ import annotations

import torch

CPU_OPTIONS = {"freezing": True}
CUDA_OPTIONS = {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False}
CUDA_QUICK_OPTIONS = {"freezing": True, "triton.cudagraphs": False}


def inductor_options(device: torch.device | str, autotune: bool = True) -> dict:
    """The inductor config patches fastdiff compiles with on ``device`` (a fresh dict)."""
    if torch.device(device).type == "cuda":
        return dict(CUDA_OPTIONS if autotune else CUDA_QUICK_OPTIONS)
    return dict(CPU_OPTIONS)


class Compiled:
    """``fn`` (a module or function) compiled by torch.compile, called under ``options``."""

    def __init__(self, fn, options: dict):
        self.fn = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
        self.options = dict(options)

    def __call__(self, *args, **kwargs):
        with torch._inductor.config.patch(self.options):
            return self.fn(*args, **kwargs)


def compile_for(fn, device: torch.device | str, autotune: bool = True) -> Compiled:
    """``fn`` compiled with fastdiff's settings for ``device`` (see the module docstring)."""
    return Compiled(fn, inductor_options(device, autotune))
