"""The import paths of the modules the restructuring moved (fastdiff 0.1 -> the package tree):
each old path still imports, with a DeprecationWarning, for one release. Remove in 0.3.

``import fastdiff.schedule`` gives a module that forwards every attribute to the new home(s).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module -> the modules its names now live in, looked up in order
MOVED = {
    "fastdiff.schedule": ("fastdiff.schedulers", "fastdiff.schedulers.schedules"),
    "fastdiff.dpmsolver": ("fastdiff.schedulers.dpmsolver",),
    "fastdiff.unet": ("fastdiff.models.unet",),
    "fastdiff.io": ("fastdiff.models.folders", "fastdiff.files", "fastdiff.pause"),
    "fastdiff.sampler": ("fastdiff.sampling.sampler", "fastdiff.sampling.step"),
    "fastdiff.compile": ("fastdiff.engines.inductor",),
    "fastdiff.graphs": ("fastdiff.engines.cuda_graphs",),
    "fastdiff.openvino_engine": ("fastdiff.engines.openvino",),
    "fastdiff.memory": ("fastdiff.engines.memory",),
    "fastdiff.backend": ("fastdiff.ops.backend",),
    "fastdiff.reference": ("fastdiff.ops.reference",),
    "fastdiff.acceleration": (
        "fastdiff.integrations.diffusers.accelerate",
        "fastdiff.integrations.diffusers.schedulers",
    ),
    "fastdiff.fused_modules": ("fastdiff.integrations.diffusers.modules",),
    "fastdiff.fused_dpmsolver": ("fastdiff.integrations.diffusers.schedulers",),
    "fastdiff.shards": ("fastdiff.scale.shards",),
    "fastdiff.distributed": ("fastdiff.scale.distributed",),
    "fastdiff.train": ("fastdiff.training.trainer",),
    "fastdiff.data": ("fastdiff.training.data",),
    "fastdiff.fidelity": ("fastdiff.bench.fidelity",),
}


class MovedModule(types.ModuleType):
    """A stand-in for a moved module: attributes come from its new home(s)."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"Moved to {', '.join(homes)} (deprecated path).")
        self.__homes = homes

    def __getattr__(self, attr: str):
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__homes)}) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({name for home in self.__homes for name in dir(importlib.import_module(home))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module):
        homes = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {homes[0]}; the old path goes in fastdiff 0.3",
                      DeprecationWarning, stacklevel=2)


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
