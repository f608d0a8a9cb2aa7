"""Ancestral DDPM (Ho et al. 2020, Algorithm 2; or ``diffusers.DDPMScheduler.step``) as a StepTable."""
from __future__ import annotations

import torch

from fastdiff.schedulers.schedules import NoiseSchedule, StepTable, abar_pairs, x0_coefs
from fastdiff.schedulers.timesteps import spaced_timesteps

DDPM_VARIANCES = ("fixed_large", "fixed_small")
DDPM_FORMS = ("ho", "diffusers")


def ddpm_table(
    schedule: NoiseSchedule,
    steps: int | None = None,
    variance: str = "fixed_large",
    form: str = "ho",
    clip_sample: bool | None = None,
    clip_range: float = 1.0,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> StepTable:
    """Ancestral DDPM sampling (Ho et al. Algorithm 2), over ``steps`` strided timesteps.

    ``form="ho"`` is Algorithm 2's eps form, x_{t-1} = (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha)
    + sigma z, with no clipping by default. ``form="diffusers"`` is ``DDPMScheduler.step``:
    predict x0, clip it (by default), take the posterior mean. With steps < T, alpha_t and
    beta_t are those of the strided chain: alpha = abar_t / abar_prev, as diffusers does.
    ``spacing``/``steps_offset``: see :func:`spaced_timesteps`; each step goes to the next
    timestep of the list (the last to "t = -1", abar = 1), as ``DDPMScheduler.previous_timestep``.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    if form not in DDPM_FORMS:
        raise ValueError(f"form must be one of {DDPM_FORMS}, got {form!r}")
    T = schedule.num_timesteps
    timesteps = spaced_timesteps(T, T if steps is None else steps, spacing, steps_offset)
    prev = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
    abar, abar_prev = abar_pairs(schedule, timesteps, prev, final_abar=1.0)
    alpha = abar / abar_prev
    beta = 1.0 - alpha
    beta_tilde = ((1.0 - abar_prev) / (1.0 - abar) * beta).clamp(min=1e-20)
    sigma = (beta if variance == "fixed_large" else beta_tilde).sqrt()
    sigma = torch.where(timesteps > 0, sigma, torch.zeros_like(sigma))

    zeros = torch.zeros_like(abar)
    if form == "ho":
        clip = clip_range if clip_sample else None
        if clip is None:
            mean = (zeros, 1.0 / alpha.sqrt(), -beta / ((1.0 - abar).sqrt() * alpha.sqrt()))
        else:
            mean = (abar_prev.sqrt() * beta / (1.0 - abar), alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar), zeros)
    else:
        clip = clip_range if (clip_sample is None or clip_sample) else None
        mean = (abar_prev.sqrt() * beta / (1.0 - abar), alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar), zeros)
    coefs = torch.stack([*x0_coefs(abar, clip is not None), *mean, sigma], dim=1).float()
    return StepTable("ddpm", timesteps, coefs, clip)
