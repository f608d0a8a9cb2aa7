"""``fastdiff.accelerate(obj)``: put fastdiff's fused ops into an existing model or pipeline.

Accepted objects:

- fastdiff's :class:`~fastdiff.unet.UNet`, a diffusers ``UNet2DModel`` (plain, with
  ``AttnDownBlock2D``/``AttnUpBlock2D``, class-conditioned), or any other ``nn.Module``;
- a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler``;
- a diffusers pipeline holding a ``unet`` and a ``scheduler`` (``DDPMPipeline``, ``DDIMPipeline``).

What is replaced (see :mod:`fastdiff.fused_modules`): each GroupNorm -> SiLU pair by one
``fastdiff.ops.group_norm_silu(apply_silu=True)`` call, every other GroupNorm by the same op
without SiLU, the attention core by ``fastdiff.ops.attention``, and a scheduler's ``step`` by
``fastdiff.ops.sampler_step`` on a :class:`~fastdiff.schedule.StepTable` built from the
scheduler's own config. Anything else is left as it is; the returned object's
``fastdiff_report`` (an :class:`AccelerationReport`) lists what was replaced and what was not.

The report is on the *returned* object (``fast = accelerate(model); print(fast.fastdiff_report)``);
with ``inplace=True`` that is ``obj`` itself. This module is named ``acceleration`` so that
``fastdiff.accelerate`` is always the function, however the package was imported.

By default the caller's object is not modified: the result is a copy whose modules are new but
whose parameters and buffers are the very same tensors (no weight is copied), so the original
keeps running the plain PyTorch path. ``inplace=True`` modifies ``obj`` itself. Sharing cuts
both ways: ``.to(dtype/device)`` on the result converts those shared tensors, i.e. the caller's
model too -- convert a copy (as :class:`fastdiff.Sampler` does) when both must stay usable.
"""
from __future__ import annotations

import collections
import copy
import inspect
import itertools
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.fused_modules import (
    FusedAttnProcessor,
    FusedGroupNorm,
    FusedSpatialSelfAttention,
    fused_resnet_block_class,
)
from fastdiff.fused_dpmsolver import FusedDPMSolverStep, dpmsolver_table_from_scheduler
from fastdiff.fused_dpmsolver import unsupported_reason as dpmsolver_unsupported_reason
from fastdiff.schedule import TIMESTEP_SPACINGS, NoiseSchedule, StepTable, ddim_table, ddpm_table
from fastdiff.unet import GroupNormAct, SpatialSelfAttention

ACCEPTED = (
    "a torch.nn.Module (fastdiff UNet, diffusers UNet2DModel, ...), "
    "a diffusers DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler, "
    "or a diffusers pipeline with a unet and a scheduler (DDPMPipeline, DDIMPipeline)"
)
#: Replacement kinds counted by :class:`AccelerationReport`.
KINDS = ("group_norm_silu", "group_norm", "attention", "scheduler_step")
#: diffusers DDPM variance types whose sigma a StepTable reproduces (fixed_small_log is
#: exp(0.5 log var) = sqrt(var), the same value).
_DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


@dataclass
class AccelerationReport:
    """What :func:`accelerate` replaced (``replaced``: (path, kind) pairs) and what it left as
    it was, with the reason (``left_alone``: (path, reason) pairs)."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)

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
        return "\n".join(lines)


def accelerate(obj, *, inplace: bool = False):
    """Return ``obj`` with fastdiff's fused ops swapped in (same type, same call signature).

    The result carries ``fastdiff_report``. Raises TypeError for an object it does not accept.
    """
    d = _diffusers()
    is_pipeline = d is not None and isinstance(obj, d.DiffusionPipeline)
    if not (isinstance(obj, nn.Module) or is_pipeline or _is_known_scheduler(obj)):
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
    d = _diffusers()
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
    if isinstance(getattr(scheduler, "step", None), (FusedSchedulerStep, FusedDPMSolverStep)):
        return
    reason = _unsupported_scheduler(scheduler)
    if reason:
        report.left_alone.append((path, reason))
        return
    multistep = type(scheduler) is _diffusers().DPMSolverMultistepScheduler
    # The instance attribute shadows the class method.
    scheduler.step = FusedDPMSolverStep(scheduler) if multistep else FusedSchedulerStep(scheduler)
    report.replaced.append((path, "scheduler_step"))


def _is_known_scheduler(obj) -> bool:
    d = _diffusers()
    return d is not None and type(obj) in (d.DDPMScheduler, d.DDIMScheduler, d.DPMSolverMultistepScheduler)


def _unsupported_scheduler(scheduler) -> str | None:
    """Why a StepTable cannot reproduce this scheduler's step, or None when it can."""
    if not _is_known_scheduler(scheduler):
        return f"{type(scheduler).__name__} is not a DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler"
    if type(scheduler) is _diffusers().DPMSolverMultistepScheduler:
        return dpmsolver_unsupported_reason(scheduler)
    config = scheduler.config
    if config.prediction_type != "epsilon":
        return f"prediction_type {config.prediction_type!r} (only 'epsilon' is fused)"
    if config.thresholding:
        return "dynamic thresholding is not fused"
    variance = getattr(config, "variance_type", None)
    if type(scheduler) is _diffusers().DDPMScheduler and variance not in _DDPM_VARIANCES:
        return f"variance_type {variance!r} (fused: {', '.join(_DDPM_VARIANCES)})"
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        return f"timestep_spacing {config.timestep_spacing!r} (fused: {', '.join(TIMESTEP_SPACINGS)})"
    return None


def table_from_scheduler(scheduler, steps: int | None = None, eta: float = 0.0,
                         use_clipped_model_output: bool = False) -> StepTable:  # fmt: skip
    """The StepTable that computes exactly what a diffusers ``DDPMScheduler`` / ``DDIMScheduler``
    step computes with its config (schedule, clip_sample and its range, variance_type,
    set_alpha_to_one, timestep_spacing, steps_offset) over ``steps`` steps (default: the
    scheduler's ``num_inference_steps`` if set, else T for DDPM and 50 for DDIM).
    Raises ValueError naming the setting a table cannot reproduce."""
    reason = _unsupported_scheduler(scheduler)
    if reason:
        raise ValueError(f"fastdiff cannot reproduce this scheduler's step: {reason}")
    if type(scheduler) is _diffusers().DPMSolverMultistepScheduler:
        return dpmsolver_table_from_scheduler(scheduler, steps or scheduler.num_inference_steps or 20)
    config = scheduler.config
    is_ddim = type(scheduler) is _diffusers().DDIMScheduler
    steps = steps or scheduler.num_inference_steps or (50 if is_ddim else config.num_train_timesteps)
    schedule = schedule_from_scheduler(scheduler)
    spaced = dict(spacing=config.timestep_spacing, steps_offset=config.steps_offset)
    if is_ddim:
        return ddim_table(schedule, steps=steps, eta=eta, clip_sample=config.clip_sample,
                          clip_range=config.clip_sample_range, set_alpha_to_one=config.set_alpha_to_one,
                          use_clipped_model_output=use_clipped_model_output, **spaced)  # fmt: skip
    return ddpm_table(schedule, steps=steps, variance=_DDPM_VARIANCES[config.variance_type], form="diffusers",
                      clip_sample=config.clip_sample, clip_range=config.clip_sample_range, **spaced)  # fmt: skip


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """The NoiseSchedule whose cumulative products are exactly the scheduler's (float32)
    ``alphas_cumprod``, so tables agree with diffusers' own arithmetic to float32 rounding."""
    abar = scheduler.alphas_cumprod.double().cpu()
    return NoiseSchedule(1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))


class _FusedTable(NamedTuple):
    table: StepTable  # on the sample's device
    index_of: dict[int, int]  # timestep -> step index
    step_indices: torch.Tensor  # arange(S) on the device: step i's index tensor is a view, no copy


class FusedSchedulerStep:
    """A diffusers DDPMScheduler / DDIMScheduler ``step`` through ``fastdiff.ops.sampler_step``.

    Same signature, same output type, same random draws (noise comes from diffusers'
    ``randn_tensor`` with the caller's generator, exactly when the original would draw it).
    Every ``timestep_spacing`` and ``steps_offset`` is fused; timesteps the table does not
    cover (``set_timesteps(timesteps=[...])``) fall back to the original step.
    ``fused_calls`` / ``fallback_calls`` count which of the two ran.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler)
        self.signature = inspect.signature(self.original)
        self.is_ddim = type(scheduler) is _diffusers().DDIMScheduler
        self._tables: dict[tuple, _FusedTable | None] = {}
        self.fused_calls = 0
        self.fallback_calls = 0

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        model_output, sample = a["model_output"], a["sample"]
        eta = float(a.get("eta", 0.0))
        use_clipped = bool(a.get("use_clipped_model_output", False))
        fused = self._table(eta, use_clipped, sample.device)
        timestep = int(a["timestep"])
        noise_twice = a.get("variance_noise") is not None and a["generator"] is not None
        if fused is None or timestep not in fused.index_of or noise_twice:
            self.fallback_calls += 1
            return self.original(*args, **kwargs)  # outside the table, or an error diffusers reports
        self.fused_calls += 1
        x_prev, x0 = ops.sampler_step(
            sample, model_output, fused.step_indices[fused.index_of[timestep]], fused.table.coefs,
            noise=self._noise(a, timestep, eta), clip_range=fused.table.clip,
        )  # fmt: skip
        if not a["return_dict"]:
            return x_prev, x0
        return self._output_type()(prev_sample=x_prev, pred_original_sample=x0)

    def _noise(self, a: dict, timestep: int, eta: float) -> torch.Tensor | None:
        """diffusers draws z only for t > 0 (DDPM) or eta > 0 (DDIM, then at every step)."""
        if (eta <= 0) if self.is_ddim else (timestep <= 0):
            return None
        if a.get("variance_noise") is not None:
            return a["variance_noise"]
        from diffusers.utils.torch_utils import randn_tensor

        out = a["model_output"]
        return randn_tensor(out.shape, generator=a["generator"], device=out.device, dtype=out.dtype)

    def _table(self, eta: float, use_clipped: bool, device) -> _FusedTable | None:
        s = self.scheduler
        steps = s.num_inference_steps or s.config.num_train_timesteps
        key = (steps, getattr(s, "custom_timesteps", False), eta, use_clipped, str(device))
        if key not in self._tables:
            self._tables[key] = self._build_table(steps, eta, use_clipped, device)
        return self._tables[key]

    def _build_table(self, steps: int, eta: float, use_clipped: bool, device):
        s = self.scheduler
        table = table_from_scheduler(s, steps, eta, use_clipped)
        if getattr(s, "custom_timesteps", False) or not torch.equal(table.timesteps, s.timesteps.cpu().long()):
            return None
        index_of = {t: i for i, t in enumerate(table.timesteps.tolist())}
        return _FusedTable(table.to(device), index_of, torch.arange(table.num_steps, device=device))

    def _output_type(self):
        if self.is_ddim:
            from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

            return DDIMSchedulerOutput
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

        return DDPMSchedulerOutput


_diffusers_types: SimpleNamespace | None = None


def _diffusers() -> SimpleNamespace | None:
    """diffusers' classes when diffusers is already imported (a diffusers object can only exist
    then), else None, so accelerating a fastdiff model never imports diffusers."""
    global _diffusers_types
    if _diffusers_types is None and "diffusers" in sys.modules:
        _diffusers_types = _load_diffusers_types()
    return _diffusers_types


def _load_diffusers_types() -> SimpleNamespace:
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    return SimpleNamespace(
        DiffusionPipeline=DiffusionPipeline, UNet2DModel=UNet2DModel, DDPMScheduler=DDPMScheduler,
        DDIMScheduler=DDIMScheduler, DPMSolverMultistepScheduler=DPMSolverMultistepScheduler, Attention=Attention,
        AttnProcessor=AttnProcessor, AttnProcessor2_0=AttnProcessor2_0, ResnetBlock2D=ResnetBlock2D,
    )  # fmt: skip
