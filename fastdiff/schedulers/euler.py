"""Euler and Euler Ancestral (Karras et al. 2022, k-diffusion's ``sample_euler`` /
``sample_euler_ancestral``) as a :class:`~fastdiff.schedulers.StepTable`, as diffusers'
``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler.step`` compute them.

diffusers works on the sigma-scaled sample x_s = x * sqrt(1 + sigma^2) (the model sees
``scale_model_input(x_s)`` = x). With x0 = c0 x_s - c1 * model_output::

    x_s' = x_s + (x_s - x0) / sigma * dt + sigma_up * z

with dt = sigma' - sigma (Euler) or sigma_down - sigma (ancestral: sigma_up^2 = sigma'^2
(sigma^2 - sigma'^2) / sigma^2, sigma_down^2 = sigma'^2 - sigma_up^2). The update is linear in
(x_s, model_output, z): one table row per step, no history. In the VP coordinates x the
fastdiff :class:`~fastdiff.sampling.Sampler` samples in (x = x_s / sqrt(1 + sigma^2)), the same
update is linear too: the row is scaled by sqrt(1 + sigma^2) on the way in and by
1 / sqrt(1 + sigma'^2) on the way out, so the model needs no input scaling.
"""
from __future__ import annotations

import torch

from fastdiff.schedulers.schedules import NoiseSchedule, StepTable
from fastdiff.schedulers.timesteps import spaced_timesteps

EULER_METHODS = ("euler", "euler-ancestral")
#: "sample" (x0 predicted directly) is EulerDiscreteScheduler's only: its ancestral twin refuses it.
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def euler_table(
    schedule: NoiseSchedule,
    steps: int = 30,
    method: str = "euler",
    prediction: str = "epsilon",
    spacing: str = "linspace",
    steps_offset: int = 0,
) -> StepTable:
    """Euler (``method="euler"``) or Euler Ancestral (``"euler-ancestral"``) over ``steps``
    integer timesteps (:func:`~fastdiff.schedulers.timesteps.spaced_timesteps`), sigma at each,
    then 0; rows in the VP coordinates (the model sees x, x_T ~ N(0, I)).

    Equal to diffusers' step wherever its timesteps are integers ("leading", "trailing"); its
    "linspace" feeds the model fractional timesteps (946.42...), rounded here. diffusers starts
    from x_s = sigma_max z (``init_noise_sigma``; sqrt(sigma_max^2 + 1) z for Euler Ancestral's
    "leading"), i.e. x_T = z * sigma_max / sqrt(sigma_max^2 + 1): within 1 / (2 sigma_max^2) of z.
    """
    if method not in EULER_METHODS:
        raise ValueError(f"method must be one of {EULER_METHODS}, got {method!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing, steps_offset)
    abar = schedule.alphas_cumprod[timesteps]
    sigmas = torch.cat([((1.0 - abar) / abar).sqrt(), abar.new_zeros(1)])
    coefs = euler_rows(sigmas, method == "euler-ancestral", prediction, scaled=False)
    return StepTable(method, timesteps, coefs.float(), None)


def euler_rows(sigmas: torch.Tensor, ancestral: bool, prediction: str, scaled: bool) -> torch.Tensor:
    """(S, 6) float64 rows for the S + 1 ``sigmas`` (the last the final one): in diffusers'
    sigma-scaled coordinates x_s when ``scaled``, else in the VP coordinates x."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    s = sigmas.double()
    sigma, sigma_next = s[:-1], s[1:]
    if ancestral:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        dt = (sigma_next**2 - sigma_up**2).sqrt() - sigma
    else:
        sigma_up = torch.zeros_like(sigma)
        dt = sigma_next - sigma
    if prediction == "epsilon":  # x0 = x_s - sigma * eps
        c0, c1 = torch.ones_like(sigma), sigma
    elif prediction == "v_prediction":  # x0 = x_s / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
        c0, c1 = 1.0 / (sigma**2 + 1.0), sigma / (sigma**2 + 1.0).sqrt()
    else:  # x0 = model output
        c0, c1 = torch.zeros_like(sigma), -torch.ones_like(sigma)
    # x_s' = x_s + dt (x_s - x0) / sigma + sigma_up z
    from_xs, from_out = 1.0 + dt * (1.0 - c0) / sigma, dt * c1 / sigma
    scale_in = torch.ones_like(sigma) if scaled else (sigma**2 + 1.0).sqrt()
    scale_out = torch.ones_like(sigma) if scaled else 1.0 / (sigma_next**2 + 1.0).sqrt()
    zeros = torch.zeros_like(sigma)
    return torch.stack([c0 * scale_in, c1, zeros, from_xs * scale_in * scale_out, from_out * scale_out,
                        sigma_up * scale_out], dim=1)
