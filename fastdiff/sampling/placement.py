"""What a Sampler is built from: the step table its ``schedule`` argument names, the device, and
the model's shape, conditioning and placement (device, dtype, layout)."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from fastdiff.integrations.diffusers import types
from fastdiff.integrations.diffusers.schedulers import FUSED_SCHEDULERS, is_fused_scheduler, table_from_scheduler
from fastdiff.models.folders import MODEL_INFO_ATTRIBUTE, SCHEDULE_ATTRIBUTE, read_tuned_schedule, tuned_schedule_path
from fastdiff.presets import TIMESTEP_CHOICES, sampler_name
from fastdiff.schedulers import NoiseSchedule, StepTable, linear_schedule, step_table


def make_table(schedule, method: str | None, steps, eta, order, model: nn.Module, start: int = 0,
               timesteps: str = "auto") -> tuple[StepTable, str]:
    """The StepTable of a Sampler's ``schedule`` argument (see :class:`~fastdiff.sampling.Sampler`)
    for the run from step ``start`` of ``steps``, and which timesteps it visits, in words:
    "default", "tuned (<file>)" where ``timesteps`` (:data:`~fastdiff.presets.TIMESTEP_CHOICES`)
    picks the model folder's tuned schedule, or "as given" for a ready StepTable or a diffusers
    scheduler (their own timesteps)."""
    if timesteps not in TIMESTEP_CHOICES:
        raise ValueError(f"timesteps must be one of {TIMESTEP_CHOICES}, got {timesteps!r}")
    if not isinstance(schedule, NoiseSchedule) and schedule is not None:
        if timesteps == "tuned":
            raise ValueError("timesteps='tuned' needs the model's own schedule (schedule=None or a NoiseSchedule), "
                             "not a StepTable or a diffusers scheduler")
        return _given_table(schedule, method, steps, eta, order, start), "as given"
    if schedule is None:
        schedule = getattr(model, SCHEDULE_ATTRIBUTE, None) or linear_schedule()
    method = method or "ddpm"
    if order is not None and not method.endswith(("dpmsolver++", "unipc")):
        raise ValueError(f"order applies to method 'dpmsolver++', 'sde-dpmsolver++' or 'unipc' only, not {method!r}")
    if eta and method != "ddim":
        raise ValueError(f"eta applies to method 'ddim' only, not {method!r}")
    order = 2 if order is None else order
    tuned, source = _tuned_timesteps(model, method, order, steps, eta, timesteps)
    table = step_table(schedule, method, steps=steps, eta=eta, order=order, start=start, timesteps=tuned)
    return table, source


def _tuned_timesteps(model: nn.Module, method: str, order: int, steps, eta, choice: str):
    """(the model folder's tuned timesteps or None, "tuned (<file>)" / "default" / why not)."""
    if choice == "default":
        return None, "default"
    info = getattr(model, MODEL_INFO_ATTRIBUTE, None)
    name = sampler_name(method, order) if not eta else None
    if name is None or steps is None or info is None or info.folder is None:
        if choice == "tuned":
            raise ValueError("timesteps='tuned' needs a model loaded from a folder (fastdiff.load_model), a "
                             "deterministic method and steps")
        return None, "default"
    try:
        tuned = read_tuned_schedule(info, name, steps)
    except ValueError as e:
        if choice == "tuned":
            raise
        warnings.warn(f"{e}; sampling with the default timesteps", RuntimeWarning, stacklevel=4)
        return None, f"default (the tuned schedule was refused: {e})"
    if tuned is None:
        if choice == "tuned":
            raise ValueError(f"timesteps='tuned': {tuned_schedule_path(info.folder, name, steps)} does not exist "
                             f"(fastdiff tune-steps --model {info.folder} --sampler {name} --calls {steps} makes it)")
        return None, "default"
    return list(tuned.timesteps), f"tuned ({tuned_schedule_path(info.folder, name, steps)})"


def _given_table(schedule, method, steps, eta, order, start: int) -> StepTable:
    """The table of a ready StepTable or a diffusers scheduler :func:`table_from_scheduler` reproduces."""
    if isinstance(schedule, StepTable):
        if (method, steps, eta, order, start) != (None, None, 0.0, None, 0):
            raise ValueError("pass method/steps/eta/order/start or a ready StepTable as schedule, not both")
        return schedule
    if is_fused_scheduler(schedule):
        kind = scheduler_method(schedule)
        if method not in (None, kind):
            raise ValueError(f"method {method!r} does not match the {type(schedule).__name__} passed as schedule")
        if eta and kind != "ddim":
            raise ValueError(f"eta applies to a DDIMScheduler only, not a {type(schedule).__name__}")
        if order is not None:
            raise ValueError(f"order: a {type(schedule).__name__} passed as schedule brings its own "
                             "(DPMSolverMultistepScheduler's solver_order); leave order unset")
        return table_from_scheduler(schedule, steps=steps, eta=eta, start=start)
    raise TypeError(f"schedule must be a diffusers {', '.join(FUSED_SCHEDULERS)}, a NoiseSchedule, a StepTable "
                    f"or None, got {type(schedule).__name__}")


def scheduler_method(scheduler) -> str:
    """The fastdiff method name of a diffusers scheduler :func:`table_from_scheduler` reproduces."""
    if types.is_type(scheduler, "DPMSolverMultistepScheduler"):
        return scheduler.config.algorithm_type
    names = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
             "EulerAncestralDiscreteScheduler": "euler-ancestral", "UniPCMultistepScheduler": "unipc"}
    return names[type(scheduler).__name__]


def resolve_device(device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so it compares equal to the devices tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: no CUDA device is available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def image_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from a fastdiff or diffusers UNet's config; None when it does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if types.is_unet(model):
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width
    if hasattr(config, "image_size") and hasattr(config, "in_channels"):
        return config.in_channels, config.image_size, config.image_size
    return None


def class_conditioned(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "num_classes", None) or getattr(config, "num_class_embeds", None))


def placed(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """``model`` on ``device`` in ``dtype`` (and channels_last). It shares the caller's weights
    when they already fit; otherwise the weights are converted in a copy, so the caller's model
    is never changed."""
    tensors = [*model.parameters(), *model.buffers()]
    fits = all(t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors)
    if fits and not channels_last:
        return model
    converted = copy.deepcopy(model).to(device=device, dtype=dtype)
    return converted.to(memory_format=torch.channels_last) if channels_last else converted
