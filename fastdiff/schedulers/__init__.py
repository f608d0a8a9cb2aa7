"""The diffusion maths: noise schedules, the StepTable every sampler reads, one module per
method (DDPM, DDIM, DPM-Solver++, Euler, UniPC) and :func:`step_table`, the one entry that picks a method.

May import: torch, numpy and its own modules. No method module imports this package back.
"""
from __future__ import annotations

from fastdiff.schedulers.ddim import ddim_table
from fastdiff.schedulers.ddpm import DDPM_FORMS, DDPM_VARIANCES, ddpm_table
from fastdiff.schedulers.dpmsolver import dpmsolver_table
from fastdiff.schedulers.euler import EULER_METHODS, euler_table
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
from fastdiff.schedulers.unipc import unipc_table

METHODS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++", *EULER_METHODS, "unipc")
#: The methods whose tables take explicit timesteps (``step_table(timesteps=...)``: tuned schedules).
EXPLICIT_TIMESTEP_METHODS = ("ddim", "dpmsolver++", "sde-dpmsolver++", "unipc")
#: The timestep spacing :func:`step_table` gives each method (diffusers' default for its scheduler;
#: DPM-Solver++'s linspace is over S + 1 points, Euler's rounded to integer timesteps).
DEFAULT_SPACINGS = {"ddpm": "leading", "ddim": "leading", "dpmsolver++": "linspace", "sde-dpmsolver++": "linspace",
                    "euler": "linspace", "euler-ancestral": "linspace", "unipc": "linspace"}

__all__ = [
    "DDPM_FORMS", "DDPM_VARIANCES", "DEFAULT_SPACINGS", "EXPLICIT_TIMESTEP_METHODS", "MAX_TIMESTEPS", "METHODS", "SCHEDULES", "STEP_COLUMNS",
    "TIMESTEP_SPACINGS", "NoiseSchedule", "StepTable", "cosine_schedule", "ddim_table", "ddpm_table",
    "dpmsolver_table", "euler_table", "leading_timesteps", "linear_schedule", "make_schedule", "spaced_timesteps",
    "step_table", "unipc_table",
]


def step_table(
    schedule: NoiseSchedule,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: str = "fixed_large",
    clip_sample: bool | None = None,
    order: int = 2,
    start: int = 0,
    timesteps=None,
) -> StepTable:
    """The table for a sampler by name: ``"ddpm"`` (Algorithm 2 form), ``"ddim"``, DPM-Solver++
    of ``order`` 1-3, ``"dpmsolver++"`` or ``"sde-dpmsolver++"``, or UniPC (bh2) of ``order`` 1-3,
    ``"unipc"`` (20 steps by default, diffusers' defaults otherwise: see
    :func:`~fastdiff.schedulers.dpmsolver.dpmsolver_table` and :func:`~fastdiff.schedulers.unipc.unipc_table`),
    or ``"euler"`` / ``"euler-ancestral"`` (30 steps by default, :func:`~fastdiff.schedulers.euler.euler_table`).
    ``start``: the table of a run that begins at step ``start`` of the ``steps`` (img2img).
    ``timesteps``: explicit descending timesteps (a tuned schedule, :mod:`fastdiff.schedulers.tuned`)
    for DDIM, DPM-Solver++ and UniPC; ``steps`` must then be None or their number."""
    if timesteps is not None:
        if method not in EXPLICIT_TIMESTEP_METHODS:
            raise ValueError(f"timesteps: explicit timesteps apply to {', '.join(EXPLICIT_TIMESTEP_METHODS)}, "
                             f"not {method!r}")
        if steps is not None and steps != len(timesteps):
            raise ValueError(f"steps={steps} does not match the {len(timesteps)} timesteps given")
    if method in ("dpmsolver++", "sde-dpmsolver++"):
        return dpmsolver_table(schedule, steps=20 if steps is None else steps, order=order, algorithm=method,
                               start=start, timesteps=timesteps)
    if method == "unipc":
        if eta:
            raise ValueError(f"eta applies to method 'ddim' only; UniPC is deterministic, got eta={eta!r}")
        return unipc_table(schedule, steps=20 if steps is None and timesteps is None else steps, order=order,
                           begin=start, timesteps=timesteps)
    if method == "ddpm":
        table = ddpm_table(schedule, steps=steps, variance=variance, clip_sample=clip_sample)
    elif method == "ddim":
        table = ddim_table(schedule, steps=50 if steps is None else steps, eta=eta, clip_sample=bool(clip_sample),
                           timesteps=timesteps)
    elif method in EULER_METHODS:
        table = euler_table(schedule, steps=30 if steps is None else steps, method=method)
    else:
        raise ValueError(f"sampler must be one of {METHODS}, got {method!r}")
    return table.tail(start) if start else table
