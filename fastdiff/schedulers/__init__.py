"""The diffusion maths: noise schedules, the StepTable every sampler reads, one module per
method (DDPM, DDIM, DPM-Solver++) and :func:`step_table`, the one entry that picks a method.

May import: torch, numpy and its own modules. No method module imports this package back.
"""
from __future__ import annotations

from fastdiff.schedulers.ddim import ddim_table
from fastdiff.schedulers.ddpm import DDPM_FORMS, DDPM_VARIANCES, ddpm_table
from fastdiff.schedulers.dpmsolver import dpmsolver_table
from fastdiff.schedulers.schedules import (
    MAX_TIMESTEPS,
    SCHEDULES,
    STEP_COLUMNS,
    NoiseSchedule,
    StepTable,
    cosine_schedule,
    linear_schedule,
    make_schedule,
)
from fastdiff.schedulers.timesteps import TIMESTEP_SPACINGS, leading_timesteps, spaced_timesteps

METHODS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")

__all__ = [
    "DDPM_FORMS", "DDPM_VARIANCES", "MAX_TIMESTEPS", "METHODS", "SCHEDULES", "STEP_COLUMNS", "TIMESTEP_SPACINGS",
    "NoiseSchedule", "StepTable", "cosine_schedule", "ddim_table", "ddpm_table", "dpmsolver_table",
    "leading_timesteps", "linear_schedule", "make_schedule", "spaced_timesteps", "step_table",
]


def step_table(
    schedule: NoiseSchedule,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: str = "fixed_large",
    clip_sample: bool | None = None,
    order: int = 2,
    timesteps=None,
) -> StepTable:
    """The table for a sampler by name: ``"ddpm"`` (Algorithm 2 form), ``"ddim"``, or
    DPM-Solver++ of ``order`` 1-3, ``"dpmsolver++"`` or ``"sde-dpmsolver++"`` (20 steps by default,
    diffusers' defaults otherwise: see :func:`~fastdiff.schedulers.dpmsolver.dpmsolver_table`).
    ``timesteps``: explicit descending timesteps (a tuned schedule, :mod:`fastdiff.schedulers.tuned`)
    for DDIM and DPM-Solver++; ``steps`` must then be None or their number."""
    if timesteps is not None:
        if method == "ddpm":
            raise ValueError("timesteps: DDPM runs every timestep; explicit timesteps apply to ddim and dpmsolver++")
        if steps is not None and steps != len(timesteps):
            raise ValueError(f"steps={steps} does not match the {len(timesteps)} timesteps given")
    if method in ("dpmsolver++", "sde-dpmsolver++"):
        return dpmsolver_table(schedule, steps=20 if steps is None else steps, order=order, algorithm=method,
                               timesteps=timesteps)
    if method == "ddpm":
        return ddpm_table(schedule, steps=steps, variance=variance, clip_sample=clip_sample)
    if method == "ddim":
        return ddim_table(schedule, steps=50 if steps is None else steps, eta=eta, clip_sample=bool(clip_sample),
                          timesteps=timesteps)
    raise ValueError(f"sampler must be one of {METHODS}, got {method!r}")
