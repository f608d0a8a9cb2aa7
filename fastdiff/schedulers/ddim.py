"""DDIM (Song et al. 2021) with ``eta``, as ``diffusers.DDIMScheduler.step``, as a StepTable."""
from __future__ import annotations

import torch

from fastdiff.schedulers.schedules import NoiseSchedule, StepTable, abar_pairs, x0_coefs
from fastdiff.schedulers.timesteps import check_timesteps, spaced_timesteps


def ddim_table(
    schedule: NoiseSchedule,
    steps: int = 50,
    eta: float = 0.0,
    clip_sample: bool = False,
    clip_range: float = 1.0,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
    spacing: str = "leading",
    steps_offset: int = 0,
    timesteps=None,
) -> StepTable:
    """DDIM (Song et al. 2021) with ``eta``, matching ``diffusers.DDIMScheduler.step``.
    ``spacing``/``steps_offset``: see :func:`spaced_timesteps`; whatever the spacing, each step
    goes to t - T // steps (``final_abar`` below 0), as ``DDIMScheduler.step`` does.
    ``timesteps``: explicit descending timesteps (a tuned schedule) in place of ``steps`` and the
    spacing; each step then goes to the next of them, the last one past the end."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    T = schedule.num_timesteps
    if timesteps is None:
        timesteps = spaced_timesteps(T, steps, spacing, steps_offset)
        prev = timesteps - T // steps
    else:
        timesteps = check_timesteps(timesteps, T)
        prev = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
    final_abar = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
    abar, abar_prev = abar_pairs(schedule, timesteps, prev, final_abar=final_abar)
    variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    sigma = eta * variance.sqrt()
    direction = (1.0 - abar_prev - sigma**2).clamp(min=0).sqrt()
    zeros = torch.zeros_like(abar)
    clip = clip_range if clip_sample else None
    if use_clipped_model_output and clip is not None:
        # eps recomputed from the clipped x0: eps' = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        scale = direction / (1.0 - abar).sqrt()
        mean = (abar_prev.sqrt() - scale * abar.sqrt(), scale, zeros)
    else:
        mean = (abar_prev.sqrt(), zeros, direction)
    coefs = torch.stack([*x0_coefs(abar, clip is not None), *mean, sigma], dim=1).float()
    return StepTable("ddim", timesteps, coefs, clip)
