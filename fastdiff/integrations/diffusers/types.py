"""The one place that knows diffusers' classes.

diffusers is optional: its classes are looked up only when diffusers is already imported (a
diffusers object can only exist then), so accelerating or sampling a fastdiff model never
imports it. The lazy imports below are for that reason.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

_types: SimpleNamespace | None = None


def loaded() -> SimpleNamespace | None:
    """diffusers' classes when diffusers is already imported, else None."""
    global _types
    if _types is None and "diffusers" in sys.modules:
        _types = _load()
    return _types


def _load() -> SimpleNamespace:
    # diffusers is optional
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DiffusionPipeline,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UNet2DModel,
        UniPCMultistepScheduler,
    )
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    return SimpleNamespace(
        DiffusionPipeline=DiffusionPipeline, UNet2DModel=UNet2DModel, DDPMScheduler=DDPMScheduler,
        DDIMScheduler=DDIMScheduler, DPMSolverMultistepScheduler=DPMSolverMultistepScheduler,
        EulerDiscreteScheduler=EulerDiscreteScheduler, EulerAncestralDiscreteScheduler=EulerAncestralDiscreteScheduler,
        UniPCMultistepScheduler=UniPCMultistepScheduler, Attention=Attention,
        AttnProcessor=AttnProcessor, AttnProcessor2_0=AttnProcessor2_0, ResnetBlock2D=ResnetBlock2D,
    )


def is_instance(obj, name: str) -> bool:
    """``isinstance(obj, diffusers.<name>)``, False where diffusers is not imported."""
    d = loaded()
    return d is not None and isinstance(obj, getattr(d, name))


def is_type(obj, *names: str) -> bool:
    """``type(obj)`` is exactly one of diffusers' classes ``names`` (subclasses may change ``step``)."""
    d = loaded()
    return d is not None and any(type(obj) is getattr(d, name) for name in names)


def is_unet(model) -> bool:
    """A diffusers ``UNet2DModel``."""
    return is_type(model, "UNet2DModel")
