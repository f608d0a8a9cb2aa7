"""DPM-Solver++ multistep (Lu et al. 2022) as a :class:`~fastdiff.schedulers.StepTable`.

Every DPM-Solver++ update of order k <= 3 is linear in x_t, the current data prediction
x0 = D(x_t, model_output) and the k - 1 previous data predictions (plus sigma z in the SDE
form), so it is a row of the table-driven step with history columns::

    x0     = c0 * x_t - c1 * model_output          (eps, v or x0 prediction)
    x_prev = c2 * x0 + c3 * x_t + c5 * z + c6 * h[0] + c7 * h[1]
    h      = (x0, h[0])                            (the step shifts its history in place)

``h[0]`` is the previous step's data prediction, ``h[1]`` the one before. The timesteps,
sigmas and order schedule follow ``diffusers.DPMSolverMultistepScheduler`` (``set_timesteps``
and ``step``): linspace/leading/trailing spacing, Karras sigmas, final sigma 0 or sigma_min,
lower_order_final, midpoint/heun second order. Rows are computed in float64, stored float32.

A run that starts part-way (img2img: ``set_begin_index(k)`` or a loop over ``timesteps[k:]``)
restarts the history: diffusers counts ``lower_order_nums`` from 0 at the run's first step, so
its first step is first order whatever k is. ``start=k`` gives the table of that run: steps
k..S-1, orders counted from k, to be run from a zeroed history.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.schedulers.schedules import NoiseSchedule, StepTable, check_start
from fastdiff.schedulers.timesteps import check_timesteps

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")
#: History entries (previous data predictions) the highest order needs.
MAX_ORDER = 3


def dpmsolver_table(
    schedule: NoiseSchedule,
    steps: int = 20,
    order: int = 2,
    algorithm: str = "dpmsolver++",
    solver_type: str = "midpoint",
    prediction: str = "epsilon",
    spacing: str = "linspace",
    steps_offset: int = 0,
    karras: bool = False,
    round_karras_timesteps: bool = True,
    final_sigmas: str = "zero",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    lambda_min_clipped: float = -math.inf,
    start: int = 0,
    timesteps=None,
    dtype: torch.dtype = torch.float32,
) -> StepTable:
    """The table of ``DPMSolverMultistepScheduler(solver_order=order, algorithm_type=algorithm,
    ...)`` after ``set_timesteps(steps)``, for the run from step ``start`` (``set_begin_index(start)``)
    to the end; coefs are (S - start, 6 + order - 1).

    ``round_karras_timesteps``: diffusers rounds Karras timesteps except for its cosine
    ("squaredcos_cap_v2") schedule, where it truncates them. ``timesteps``: explicit descending
    model timesteps (diffusers' ``set_timesteps(timesteps=...)``; tuned schedules) in place of
    ``steps`` and the spacing. ``dtype``: of the coefs (float64 for an ODE reference solution).
    """
    if timesteps is not None:
        timesteps = check_timesteps(timesteps, schedule.num_timesteps)
        steps = timesteps.shape[0]
    _check_options(schedule, steps, order, algorithm, solver_type, prediction, spacing, final_sigmas)
    timesteps, sigmas = dpmsolver_sigmas(
        schedule, steps, spacing, steps_offset, karras, round_karras_timesteps, final_sigmas, lambda_min_clipped,
        timesteps,
    )
    alpha = 1.0 / (sigmas**2 + 1.0).sqrt()  # VP: alpha_t^2 + sigma_t^2 = 1
    sigma = sigmas * alpha
    lam = alpha.log() - sigma.log()  # +inf at a final sigma of 0
    num = timesteps.shape[0]
    check_start(start, num)
    coefs = torch.zeros((num - start, 6 + order - 1), dtype=torch.float64)
    for i in range(start, num):
        row = coefs[i - start]
        row[0:2] = torch.tensor(data_prediction(prediction, float(alpha[i]), float(sigma[i])))
        step_order = _step_order(i, num, order, i - start, final_sigmas, lower_order_final, euler_at_final)
        row[2:] = _update_row(algorithm, solver_type, step_order, order, alpha, sigma, lam, i)
    return StepTable(algorithm, timesteps[start:], coefs.to(dtype), None)


def dpmsolver_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "linspace",
    steps_offset: int = 0,
    karras: bool = False,
    round_karras_timesteps: bool = True,
    final_sigmas: str = "zero",
    lambda_min_clipped: float = -math.inf,
    timesteps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (S,) int64, sigmas (S + 1,) float64) as ``set_timesteps`` makes them;
    sigma = sqrt((1 - abar) / abar), the last one the final sigma (0 or sigma_min).
    ``timesteps`` (checked, descending) replaces the spacing when given."""
    T = schedule.num_timesteps
    abar = schedule.alphas_cumprod
    all_sigmas = ((1.0 - abar) / abar).sqrt().numpy()
    lambdas = 0.5 * (abar.log() - (1.0 - abar).log())
    clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor(float(lambda_min_clipped), dtype=torch.float64)))
    last = T - clipped
    if timesteps is not None:
        t = timesteps.numpy()
    elif spacing == "linspace":
        t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
        t = np.arange(last, 0, -T / steps).round().astype(np.int64) - 1
    if karras and timesteps is None:
        # In float32 as diffusers does: with truncation, t = 998.99999 and 999.0 differ.
        sigmas32 = ((1.0 - abar.float()) / abar.float()).sqrt().numpy()
        sigma_min, sigma_max = float(sigmas32[0]), float(sigmas32[-1])
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        t_float = _sigma_to_t(sig, np.log(sigmas32))
        t = (t_float.round() if round_karras_timesteps else t_float).astype(np.int64)
    else:
        sig = all_sigmas[t]
    final = float(all_sigmas[0]) if final_sigmas == "sigma_min" else 0.0
    sigmas = torch.tensor(np.concatenate([sig, [final]]), dtype=torch.float64)
    return torch.from_numpy(t.copy()), sigmas


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of ``sigma`` by interpolating log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def data_prediction(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(c0, c1) with x0 = c0 * x_t - c1 * model_output."""
    if prediction == "epsilon":
        return 1.0 / alpha, sigma / alpha
    if prediction == "v_prediction":
        return alpha, sigma
    return 0.0, -1.0


def _step_order(i: int, num: int, order: int, done: int, final_sigmas: str, lower_order_final: bool,
                euler_at_final: bool) -> int:
    """The order ``DPMSolverMultistepScheduler.step`` uses at step ``i`` of ``num``, ``done``
    steps after the run's first (its ``lower_order_nums``, capped at the order, counts them)."""
    final = i == num - 1 and (euler_at_final or (lower_order_final and num < 15) or final_sigmas == "zero")
    second = i == num - 2 and lower_order_final and num < 15
    if order == 1 or done < 1 or final:
        return 1
    if order == 2 or done < 2 or second:
        return 2
    return 3


def _update_row(algorithm, solver_type, step_order, order, alpha, sigma, lam, i) -> torch.Tensor:
    """[c2 (x0), c3 (x_t), c4 (model output, 0), c5 (z), c6.. (history)] for step ``i``."""
    alpha_t, sigma_t, sigma_s = alpha[i + 1], sigma[i + 1], sigma[i]
    h = lam[i + 1] - lam[i]
    sde = algorithm == "sde-dpmsolver++"
    # Weights of D0 (= x0) and of the first and second divided differences D1, D2.
    if sde:
        x_coef = sigma_t / sigma_s * torch.exp(-h)
        w0 = alpha_t * (1.0 - torch.exp(-2.0 * h))
        w1_heun = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        w1_mid = 0.5 * w0
        w2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        noise = sigma_t * (1.0 - torch.exp(-2.0 * h)).sqrt()
    else:
        x_coef = sigma_t / sigma_s
        w0 = -alpha_t * (torch.exp(-h) - 1.0)
        w1_heun = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        w1_mid = 0.5 * w0
        w2 = -alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)
        noise = torch.zeros((), dtype=torch.float64)
    # Data predictions (m0 = x0, m1 = h[0], m2 = h[1]) as coefficient vectors.
    combo = w0 * torch.eye(MAX_ORDER, dtype=torch.float64)[0]
    if step_order == 2:
        r0 = (lam[i] - lam[i - 1]) / h
        d1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
        combo = combo + (w1_mid if solver_type == "midpoint" else w1_heun) * d1
    elif step_order == 3:
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
        d1_1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        combo = combo + w1_heun * d1 + w2 * d2
    row = [combo[0], x_coef, torch.zeros((), dtype=torch.float64), noise, *combo[1:order]]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in row])


def _check_options(schedule, steps, order, algorithm, solver_type, prediction, spacing, final_sigmas) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    check_multistep_options(schedule, steps, order, prediction, spacing, final_sigmas)


def check_multistep_options(schedule, steps, order, prediction, spacing, final_sigmas) -> None:
    """The options every multistep table built on :func:`dpmsolver_sigmas` shares (DPM-Solver++, UniPC)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if final_sigmas not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas must be one of {FINAL_SIGMAS}, got {final_sigmas!r}")
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    T = schedule.num_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
