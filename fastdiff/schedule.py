"""The diffusion math, in one place: noise schedules and per-step update tables.

Every sampler in fastdiff (the eager reference loop, the fused Triton step, the CUDA-graph
loop) consumes a :class:`StepTable`: one row of six coefficients per sampling step, so that
DDPM (Ho et al. Algorithm 2 or the diffusers form) and DDIM are the same update::

    x0     = c[0] * x_t - c[1] * eps                 (then clamped to [-clip, clip] if clip)
    mean   = c[2] * x0 + c[3] * x_t + c[4] * eps
    x_prev = mean + c[5] * z                          (c[5] = sigma_t; 0 at the last step)

Multistep tables (DPM-Solver++, :mod:`fastdiff.dpmsolver`) append one column per previous data
prediction h[k] the step reads, x_prev += c[6 + k] * h[k]; DDPM/DDIM are the zero-history case.

Tables are computed in float64 and stored as float32 device tensors indexed by step, so a
CUDA graph replays them by updating only a device step index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")
DDPM_VARIANCES = ("fixed_large", "fixed_small")
DDPM_FORMS = ("ho", "diffusers")
METHODS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
#: diffusers' ``timestep_spacing`` values that :func:`spaced_timesteps` reproduces.
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

#: Column order of :attr:`StepTable.coefs`.
STEP_COLUMNS = ("x0_from_xt", "x0_from_eps", "mean_from_x0", "mean_from_xt", "mean_from_eps", "sigma")


@dataclass(frozen=True)
class NoiseSchedule:
    """beta_1..beta_T and everything derived from them (float64, index 0 is t=1 in the paper)."""

    betas: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t (Ho et al. eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    @property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficient of x0, coefficient of x_t) in the posterior mean mu~_t (eq. 7)."""
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = abar_prev.sqrt() * self.betas / (1.0 - abar)
        coef_xt = self.alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
        return coef_x0, coef_xt

    def q_sample_table(self, device=None) -> torch.Tensor:
        """(T, 2) float32: [sqrt(abar_t), sqrt(1 - abar_t)], the fused q-sample op's table."""
        abar = self.alphas_cumprod
        return torch.stack([abar.sqrt(), (1.0 - abar).sqrt()], dim=1).to(device=device, dtype=torch.float32)


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Ho et al. 2020: betas linear in [beta_start, beta_end]."""
    _check_timesteps(num_timesteps)
    # Built in float32 as diffusers does, so tables agree with its schedulers bit for bit.
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32).double()
    return NoiseSchedule(betas)


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal 2021: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas capped at max_beta."""
    _check_timesteps(num_timesteps)

    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in range(num_timesteps)
    ]
    return NoiseSchedule(torch.tensor(betas, dtype=torch.float64))


def make_schedule(name: str = "linear", num_timesteps: int = 1000) -> NoiseSchedule:
    if name == "linear":
        return linear_schedule(num_timesteps)
    if name == "cosine":
        return cosine_schedule(num_timesteps)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


#: Longest schedule accepted: 100x the usual T = 1000; a longer one (a typo, a damaged
#: config.json) would spend minutes and gigabytes building tables before anything else ran.
MAX_TIMESTEPS = 100_000


def _check_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or not 2 <= num_timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"num_timesteps must be an integer in [2, {MAX_TIMESTEPS}], got {num_timesteps!r}")


@dataclass(frozen=True)
class StepTable:
    """What one sampling run needs: the model timesteps and the per-step coefficients.

    ``timesteps[i]`` is the timestep the model sees at step ``i`` (descending);
    ``coefs[i]`` holds the :data:`STEP_COLUMNS` for the update from it.
    """

    method: str
    timesteps: torch.Tensor  # (S,) int64
    coefs: torch.Tensor  # (S, 6) float32
    clip: float | None  # clamp x0 to [-clip, clip]; None: no clamp

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def history_size(self) -> int:
        """Previous data predictions each step reads (multistep solvers; 0 for DDPM/DDIM)."""
        return self.coefs.shape[1] - len(STEP_COLUMNS)

    def new_history(self, shape, device=None) -> torch.Tensor | None:
        """The zeroed (history_size, *shape) float32 buffer a run starts from; None if no history."""
        if self.history_size == 0:
            return None
        return torch.zeros((self.history_size, *shape), dtype=torch.float32, device=device)

    def to(self, device) -> "StepTable":
        return StepTable(self.method, self.timesteps.to(device), self.coefs.to(device), self.clip)


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


def _abar_pairs(schedule: NoiseSchedule, timesteps: torch.Tensor, prev: torch.Tensor, final_abar: float):
    """abar at each step's timestep and at the timestep ``prev`` it steps to (final_abar where
    prev < 0, past the end)."""
    abar_all = schedule.alphas_cumprod
    abar = abar_all[timesteps]
    abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.full_like(abar, final_abar))
    return abar, abar_prev


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
    abar, abar_prev = _abar_pairs(schedule, timesteps, prev, final_abar=1.0)
    alpha = abar / abar_prev
    beta = 1.0 - alpha
    beta_tilde = ((1.0 - abar_prev) / (1.0 - abar) * beta).clamp(min=1e-20)
    sigma = (beta if variance == "fixed_large" else beta_tilde).sqrt()
    sigma = torch.where(timesteps > 0, sigma, torch.zeros_like(sigma))

    x0_from_xt = 1.0 / abar.sqrt()
    x0_from_eps = (1.0 - abar).sqrt() / abar.sqrt()
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
    coefs = torch.stack([x0_from_xt, x0_from_eps, *mean, sigma], dim=1).float()
    return StepTable("ddpm", timesteps, coefs, clip)


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
) -> StepTable:
    """DDIM (Song et al. 2021) with ``eta``, matching ``diffusers.DDIMScheduler.step``.
    ``spacing``/``steps_offset``: see :func:`spaced_timesteps`; whatever the spacing, each step
    goes to t - T // steps (``final_abar`` below 0), as ``DDIMScheduler.step`` does."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    T = schedule.num_timesteps
    timesteps = spaced_timesteps(T, steps, spacing, steps_offset)
    final_abar = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
    abar, abar_prev = _abar_pairs(schedule, timesteps, timesteps - T // steps, final_abar=final_abar)
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
    coefs = torch.stack([1.0 / abar.sqrt(), (1.0 - abar).sqrt() / abar.sqrt(), *mean, sigma], dim=1).float()
    return StepTable("ddim", timesteps, coefs, clip)


def step_table(
    schedule: NoiseSchedule,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: str = "fixed_large",
    clip_sample: bool | None = None,
    order: int = 2,
) -> StepTable:
    """The table for a sampler by name: ``"ddpm"`` (Algorithm 2 form), ``"ddim"``, or
    DPM-Solver++ of ``order`` 1-3, ``"dpmsolver++"`` or ``"sde-dpmsolver++"`` (20 steps by default,
    diffusers' defaults otherwise: see :func:`fastdiff.dpmsolver.dpmsolver_table`)."""
    if method in ("dpmsolver++", "sde-dpmsolver++"):
        from fastdiff.dpmsolver import dpmsolver_table

        return dpmsolver_table(schedule, steps=20 if steps is None else steps, order=order, algorithm=method)
    if method == "ddpm":
        return ddpm_table(schedule, steps=steps, variance=variance, clip_sample=clip_sample)
    if method == "ddim":
        return ddim_table(schedule, steps=50 if steps is None else steps, eta=eta, clip_sample=bool(clip_sample))
    raise ValueError(f"sampler must be one of {METHODS}, got {method!r}")
