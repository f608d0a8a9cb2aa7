"""Sampling: the eager reference loop (the ground truth, :mod:`~fastdiff.sampling.reference`),
its noise (:mod:`~fastdiff.sampling.noise`) and the accelerated :class:`Sampler`.

May import: ops, schedulers, models, engines, integrations. Names are exported lazily, so
``fastdiff.sampling.draw_noise`` does not import the engines.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ExternalNoise": "fastdiff.sampling.noise",
    "draw_noise": "fastdiff.sampling.noise",
    "sample_reference": "fastdiff.sampling.reference",
    "Sampler": "fastdiff.sampling.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdiff.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
