"""Noise schedules (beta_t and what derives from it) and the per-step update table every sampler reads.

Every sampler in fastdiff (the eager reference loop, the fused Triton step, the CUDA-graph
loop) consumes a :class:`StepTable`: one row of six coefficients per sampling step, so that
DDPM (Ho et al. Algorithm 2 or the diffusers form) and DDIM are the same update::

    x0     = c[0] * x_t - c[1] * eps                 (then clamped to [-clip, clip] if clip)
    mean   = c[2] * x0 + c[3] * x_t + c[4] * eps
    x_prev = mean + c[5] * z                          (c[5] = sigma_t; 0 at the last step)

Multistep tables (DPM-Solver++, :mod:`fastdiff.schedulers.dpmsolver`) append one column per previous data
prediction h[k] the step reads, x_prev += c[6 + k] * h[k]; DDPM/DDIM are the zero-history case.

Predictor-corrector tables (UniPC, :mod:`fastdiff.schedulers.unipc`, ``corrector=True``) first correct
the sample, then step from the corrected sample y in place of x_t; the last of their K history slots
holds the previous step's y instead of a data prediction::

    y      = u[0] * x_t + u[1] * x0 + sum_k u[2 + k] * h[k]     (u = c[6 + K:], 2 + K columns)
    x_prev = c[2] * x0 + c[3] * y + c[4] * eps + c[5] * z + sum_k c[6 + k] * h[k]
    h      = (x0, h[0], ..., h[K - 3], y)                       (data slots shift; the last slot takes y)

A row is 6 + K columns wide, or 8 + 2K with the corrector; a step without correction has u = (1, 0, ...).

Tables are computed in float64 and stored as float32 device tensors indexed by step, so a
CUDA graph replays them by updating only a device step index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine")

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
    coefs: torch.Tensor  # (S, 6 + K), or (S, 8 + 2K) with the corrector, float32
    clip: float | None  # clamp x0 to [-clip, clip]; None: no clamp
    corrector: bool = False  # predictor-corrector rows: the last history slot holds the corrected sample

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def history_size(self) -> int:
        """History slots each step reads (multistep solvers; 0 for DDPM/DDIM): previous data
        predictions, and with the corrector the previous corrected sample in the last slot."""
        extra = self.coefs.shape[1] - len(STEP_COLUMNS)
        return (extra - 2) // 2 if self.corrector else extra

    def new_history(self, shape, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The zeroed (history_size, *shape) buffer (float32 unless an ODE reference runs in float64)
        a run starts from; None if no history."""
        if self.history_size == 0:
            return None
        return torch.zeros((self.history_size, *shape), dtype=dtype, device=device)

    def to(self, device) -> "StepTable":
        return StepTable(self.method, self.timesteps.to(device), self.coefs.to(device), self.clip, self.corrector)

    def tail(self, start: int) -> "StepTable":
        """Steps ``start``.. of a one-step method's table (DDPM, DDIM, Euler: no row depends on
        where the run began). Multistep tables restart their order count: build them with ``start``."""
        check_start(start, self.num_steps)
        if self.history_size:
            raise ValueError(f"a {self.method} table's orders count from the run's first step: build it with start=")
        return StepTable(self.method, self.timesteps[start:], self.coefs[start:], self.clip)


def check_start(start: int, num_steps: int) -> None:
    """``start``: the step a partial run (img2img, ``set_begin_index``) begins at."""
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < num_steps:
        raise ValueError(f"start must be an integer in [0, {num_steps - 1}] (steps of the run), got {start!r}")


#: x0's scale at abar = 0 when x0 is clipped: a power of two, so c * x_t - c * eps is exactly
#: c * (x_t - eps) (no overflow below |x| = 2^27) and clips to +-clip_range wherever |x_t - eps| > 2^-100.
ZERO_SNR_X0_SCALE = 2.0**100


def x0_coefs(abar: torch.Tensor, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with x0 = c0 * x_t - c1 * eps = (x_t - sqrt(1 - abar) eps) / sqrt(abar).

    At abar = 0 (zero terminal SNR: diffusers' ``rescale_betas_zero_snr``) diffusers divides by 0
    and, with clip_sample, clips x0 = +-inf to +-clip_range; inf * x_t - inf * eps would be NaN
    wherever x_t and eps share a sign, so a clipped table uses :data:`ZERO_SNR_X0_SCALE` there.
    Unclipped, diffusers' x0 is infinite and so is the table's (inf coefficients)."""
    c0, c1 = 1.0 / abar.sqrt(), (1.0 - abar).sqrt() / abar.sqrt()
    if clip:
        c0 = torch.where(abar == 0, ZERO_SNR_X0_SCALE, c0)
        c1 = torch.where(abar == 0, ZERO_SNR_X0_SCALE, c1)
    return c0, c1


def abar_pairs(schedule: NoiseSchedule, timesteps: torch.Tensor, prev: torch.Tensor, final_abar: float):
    """abar at each step's timestep and at the timestep ``prev`` it steps to (final_abar where
    prev < 0, past the end)."""
    abar_all = schedule.alphas_cumprod
    abar = abar_all[timesteps]
    abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.full_like(abar, final_abar))
    return abar, abar_prev
