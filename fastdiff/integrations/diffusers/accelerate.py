"""``fastdiff.accelerate(obj)``: put fastdiff's fused ops into an existing model or pipeline.

Accepted objects:

- fastdiff's :class:`~fastdiff.models.unet.UNet`, a diffusers ``UNet2DModel`` (plain, with
  ``AttnDownBlock2D``/``AttnUpBlock2D``, class-conditioned), or any other ``nn.Module``;
- a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` /
  ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` / ``UniPCMultistepScheduler``
  (the README's scheduler table);
- a diffusers pipeline holding a ``unet`` and a ``scheduler`` (``DDPMPipeline``, ``DDIMPipeline``).

What is replaced (see :mod:`~fastdiff.integrations.diffusers.modules`): each GroupNorm -> SiLU
pair by one ``fastdiff.ops.group_norm_silu(apply_silu=True)`` call, every other GroupNorm by
the same op without SiLU, the attention core by ``fastdiff.ops.attention``, and a scheduler's
``step`` by ``fastdiff.ops.sampler_step`` on a :class:`~fastdiff.schedulers.StepTable` built
from the scheduler's own config (:mod:`~fastdiff.integrations.diffusers.schedulers`). Anything
else is left as it is; the returned object's ``fastdiff_report`` (an
:class:`AccelerationReport`) lists what was replaced and what was not, and for a scheduler how
many steps ran fused and how many ran diffusers' own step, and why (read when printed).

The report is on the *returned* object (``fast = accelerate(model); print(fast.fastdiff_report)``);
with ``inplace=True`` that is ``obj`` itself.

By default the caller's object is not modified: the result is a copy whose modules are new but
whose parameters and buffers are the very same tensors (no weight is copied), so the original
keeps running the plain PyTorch path. ``inplace=True`` modifies ``obj`` itself. Sharing cuts
both ways: ``.to(dtype/device)`` on the result converts those shared tensors, i.e. the caller's
model too -- convert a copy (as :class:`fastdiff.Sampler` does) when both must stay usable.
"""
from __future__ import annotations

import collections
import copy
import itertools
from dataclasses import dataclass, field

import torch.nn as nn

from fastdiff.integrations.diffusers import types
from fastdiff.integrations.diffusers.modules import (
    FusedAttnProcessor,
    FusedGroupNorm,
    FusedSpatialSelfAttention,
    fused_resnet_block_class,
)
from fastdiff.integrations.diffusers.schedulers import (
    FUSED_SCHEDULERS,
    FusedStep,
    fused_step_for,
    is_fused_scheduler,
    unsupported_reason,
)
from fastdiff.models.unet import GroupNormAct, SpatialSelfAttention

ACCEPTED = (
    "a torch.nn.Module (fastdiff UNet, diffusers UNet2DModel, ...), "
    f"a diffusers {', '.join(FUSED_SCHEDULERS)}, "
    "or a diffusers pipeline with a unet and a scheduler (DDPMPipeline, DDIMPipeline)"
)
#: Replacement kinds counted by :class:`AccelerationReport`.
KINDS = ("group_norm_silu", "group_norm", "attention", "scheduler_step")


@dataclass
class AccelerationReport:
    """What :func:`accelerate` replaced (``replaced``: (path, kind) pairs), what it left as
    it was, with the reason (``left_alone``: (path, reason) pairs), and the installed scheduler
    steps (``steps``: path -> :class:`~fastdiff.integrations.diffusers.schedulers.FusedStep`, whose
    counters say which steps really ran fused)."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    steps: dict[str, FusedStep] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counter = collections.Counter(kind for _, kind in self.replaced)
        return {kind: counter[kind] for kind in KINDS}

    @property
    def total(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n) or "nothing"
        lines = [f"fastdiff.accelerate replaced {counts}"]
        lines += [f"  left alone: {path}: {reason}" for path, reason in self.left_alone]
        lines += [f"  {path}.step so far: {step.counts()}" for path, step in self.steps.items()]
        return "\n".join(lines)


def accelerate(obj, *, inplace: bool = False):
    """Return ``obj`` with fastdiff's fused ops swapped in (same type, same call signature).

    The result carries ``fastdiff_report``. Raises TypeError for an object it does not accept.
    """
    is_pipeline = types.is_instance(obj, "DiffusionPipeline")
    if not (isinstance(obj, nn.Module) or is_pipeline or is_fused_scheduler(obj)):
        raise TypeError(f"accelerate() accepts {ACCEPTED}; got {type(obj).__module__}.{type(obj).__qualname__}")
    if not inplace:
        obj = _copy_sharing_weights(obj)
    report = AccelerationReport()
    if isinstance(obj, nn.Module):
        _accelerate_module(obj, "", report)
    elif is_pipeline:
        _accelerate_pipeline(obj, report)
    else:
        _accelerate_scheduler(obj, "scheduler", report)
    obj.fastdiff_report = report
    return obj


# ---------------------------------------------------------------- copying


def _copy_sharing_weights(obj):
    """A deep copy in which every parameter and buffer is the original tensor, not a copy."""
    modules = [obj] if isinstance(obj, nn.Module) else [v for v in vars(obj).values() if isinstance(v, nn.Module)]
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    return copy.deepcopy(obj, {id(t): t for t in tensors})


# ---------------------------------------------------------------- modules


def _accelerate_module(root: nn.Module, prefix: str, report: AccelerationReport) -> None:
    d = types.loaded()
    for path, module in list(root.named_modules(prefix=prefix)):
        if type(module) is SpatialSelfAttention:
            module.__class__ = FusedSpatialSelfAttention  # adds no state: only the core changes
            report.replaced.append((path, "attention"))
        elif d is not None and type(module) is d.ResnetBlock2D:
            _fuse_resnet_block(module, path, report)
        elif d is not None and isinstance(module, d.Attention):
            _set_attention_processor(module, path, report, d)
        elif d is not None and isinstance(module, d.UNet2DModel):
            _fuse_pair(module, "conv_norm_out", "conv_act", path, report)
        elif isinstance(module, nn.Sequential):
            for norm, act in zip(list(module._modules), list(module._modules)[1:]):
                _fuse_pair(module, norm, act, path, report)
        _replace_lone_norms(module, path, report)


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _replace_lone_norms(module: nn.Module, path: str, report: AccelerationReport) -> None:
    """Every GroupNorm child not fused with an activation already: the norm op without SiLU
    (fastdiff's GroupNormAct keeps its own SiLU switch)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm) and not isinstance(child, FusedGroupNorm):
            act = child.act if isinstance(child, GroupNormAct) else False
            setattr(module, name, FusedGroupNorm(child, act=act))
            report.replaced.append((_child_path(path, name), "group_norm_silu" if act else "group_norm"))


def _is_plain_group_norm(module) -> bool:
    return isinstance(module, nn.GroupNorm) and not isinstance(module, (FusedGroupNorm, GroupNormAct))


def _fuse_pair(module: nn.Module, norm_name: str, act_name: str, path: str, report: AccelerationReport) -> None:
    """``module.<norm_name>`` then ``module.<act_name>`` (a SiLU), applied one after the other
    by module's forward: the norm becomes GroupNorm+SiLU and the activation an Identity."""
    norm, act = getattr(module, norm_name, None), getattr(module, act_name, None)
    if _is_plain_group_norm(norm) and type(act) is nn.SiLU:
        setattr(module, norm_name, FusedGroupNorm(norm, act=True))
        setattr(module, act_name, nn.Identity())
        report.replaced.append((_child_path(path, norm_name), "group_norm_silu"))


def _fuse_resnet_block(block: nn.Module, path: str, report: AccelerationReport) -> None:
    """diffusers' ResnetBlock2D applies its SiLU inside forward: fuse via a forward that expects
    fused norms. Blocks with another activation keep their forward (their norms go lone)."""
    norms_plain = _is_plain_group_norm(block.norm1) and _is_plain_group_norm(block.norm2)
    if type(block.nonlinearity) is not nn.SiLU or not norms_plain:
        return
    norm2_act = block.time_embedding_norm == "default"  # scale_shift modulates between norm2 and SiLU
    block.norm1 = FusedGroupNorm(block.norm1, act=True)
    block.norm2 = FusedGroupNorm(block.norm2, act=norm2_act)
    block.__class__ = fused_resnet_block_class()  # a subclass with only a new forward
    report.replaced.append((_child_path(path, "norm1"), "group_norm_silu"))
    report.replaced.append((_child_path(path, "norm2"), "group_norm_silu" if norm2_act else "group_norm"))


def _set_attention_processor(attn: nn.Module, path: str, report: AccelerationReport, d) -> None:
    processor = attn.processor
    if isinstance(processor, FusedAttnProcessor):
        return
    if type(processor) not in (d.AttnProcessor, d.AttnProcessor2_0):
        report.left_alone.append((path, f"attention processor {type(processor).__name__} is not replaced"))
        return
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        report.left_alone.append((path, "attention with spatial_norm or q/k norms is not replaced"))
        return
    attn.set_processor(FusedAttnProcessor(scale_from_module=type(processor) is d.AttnProcessor))
    report.replaced.append((path, "attention"))


# ---------------------------------------------------------------- pipelines and schedulers


def _accelerate_pipeline(pipe, report: AccelerationReport) -> None:
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if not isinstance(unet, nn.Module):
        report.left_alone.append(("unet", "the pipeline has no unet module"))
    else:
        _accelerate_module(unet, "unet", report)
    _accelerate_scheduler(scheduler, "scheduler", report)


def _accelerate_scheduler(scheduler, path: str, report: AccelerationReport) -> None:
    if isinstance(getattr(scheduler, "step", None), FusedStep):
        return
    reason = unsupported_reason(scheduler)
    if reason:
        report.left_alone.append((path, reason))
        return
    # The instance attribute shadows the class method.
    scheduler.step = fused_step_for(scheduler)
    report.replaced.append((path, "scheduler_step"))
    report.steps[path] = scheduler.step
