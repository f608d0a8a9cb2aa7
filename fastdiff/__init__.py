"""fastdiff: fused Triton kernels and a CUDA-graph sampling loop for DDPM/DDIM models.

Public names are imported lazily, so ``import fastdiff`` stays cheap and never imports triton.
The tree (each layer imports only those before it): ``kernels`` (Triton) -> ``ops`` ->
``schedulers`` -> ``models`` -> ``engines`` -> ``integrations`` -> ``sampling`` ->
``scale`` / ``training`` / ``bench`` -> ``cli`` + ``commands``; ``presets``, ``files``,
``images`` and ``pause`` are small leaves any layer may use.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

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


def _map_source_kernels() -> None:
    """Installed, ``kernels/`` is ``fastdiff.kernels`` (pyproject's package-dir). A source checkout
    run with ``PYTHONPATH=.`` and no install (the GPU machine) has it beside this package instead:
    map it there, so ``fastdiff.kernels.*`` imports the same either way."""
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if importlib.util.find_spec("fastdiff.kernels") is not None or not source.is_file():
        return
    spec = importlib.util.spec_from_file_location("fastdiff.kernels", source,
                                                  submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastdiff.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # as the import system binds an imported submodule on its package


_map_source_kernels()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
