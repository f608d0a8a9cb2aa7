"""fastdiff: fused Triton kernels and a CUDA-graph sampling loop for DDPM/DDIM models.

Public names are imported lazily, so ``import fastdiff`` stays cheap and never imports triton.
The tree (each layer imports only those before it): ``kernels`` (Triton) -> ``ops`` ->
``schedulers`` -> ``models`` -> ``engines`` -> ``integrations`` -> ``sampling`` ->
``scale`` / ``training`` / ``bench`` -> ``cli`` + ``commands``; ``presets``, ``files``,
``images`` and ``pause`` are small leaves any layer may use.
"""
from __future__ import annotations

import importlib

from fastdiff import moved

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "fastdiff.schedulers",
    "StepTable": "fastdiff.schedulers",
    "make_schedule": "fastdiff.schedulers",
    "step_table": "fastdiff.schedulers",
    "ddpm_table": "fastdiff.schedulers",
    "ddim_table": "fastdiff.schedulers",
    "UNet": "fastdiff.models.unet",
    "UNetConfig": "fastdiff.models.unet",
    "sample_reference": "fastdiff.sampling.reference",
    "Sampler": "fastdiff.sampling.sampler",
    "accelerate": "fastdiff.integrations.diffusers.accelerate",
    "save_model": "fastdiff.models.folders",
    "load_model": "fastdiff.models.folders",
}

__all__ = sorted(_EXPORTS)

moved.install()  # the old import paths of moved modules, deprecated


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
