"""Which model timesteps a run of ``steps`` sampling steps visits: diffusers' three spacings."""
from __future__ import annotations

import numpy as np
import torch

#: diffusers' ``timestep_spacing`` values that :func:`spaced_timesteps` reproduces.
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def leading_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' default "leading" spacing: 0, r, 2r, ... reversed, with r = T // steps."""
    return spaced_timesteps(num_timesteps, steps, "leading")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The descending model timesteps of ``steps`` sampling steps, as diffusers'
    ``DDPMScheduler``/``DDIMScheduler.set_timesteps`` space them (``timestep_spacing``):
    "leading" (0, r, 2r, ... with r = T // steps, plus ``steps_offset``), "linspace"
    (round(linspace(0, T - 1, steps))) or "trailing" (round(T - k T/steps) - 1)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
    if spacing == "leading":
        timesteps = torch.arange(steps, dtype=torch.int64).mul(num_timesteps // steps).flip(0) + steps_offset
    elif spacing == "linspace":
        timesteps = torch.from_numpy(np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64))
    else:
        timesteps = torch.from_numpy(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1)
    if int(timesteps.max()) >= num_timesteps:
        raise ValueError(f"steps_offset {steps_offset} puts the first timestep past T - 1 = {num_timesteps - 1}")
    return timesteps


def check_timesteps(timesteps, num_timesteps: int) -> torch.Tensor:
    """Explicit model timesteps (a tuned schedule): a non-empty, strictly descending sequence of
    integers in [0, num_timesteps - 1]; returned as an int64 tensor."""
    values = torch.as_tensor(timesteps)
    if values.dim() != 1 or values.numel() == 0 or values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}")
    values = values.to(torch.int64)
    if int(values.min()) < 0 or int(values.max()) >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {values.tolist()}")
    if values.numel() > 1 and not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {values.tolist()}")
    return values
