"""fastdiff: fused Triton kernels and a CUDA-graph sampling loop for DDPM/DDIM models.

Public names are imported lazily, so ``import fastdiff`` stays cheap and never imports triton.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "fastdiff.schedule",
    "StepTable": "fastdiff.schedule",
    "make_schedule": "fastdiff.schedule",
    "step_table": "fastdiff.schedule",
    "ddpm_table": "fastdiff.schedule",
    "ddim_table": "fastdiff.schedule",
    "UNet": "fastdiff.unet",
    "UNetConfig": "fastdiff.unet",
    "sample_reference": "fastdiff.sampling",
    "Sampler": "fastdiff.sampler",
    "accelerate": "fastdiff.acceleration",
    "save_model": "fastdiff.io",
    "load_model": "fastdiff.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
