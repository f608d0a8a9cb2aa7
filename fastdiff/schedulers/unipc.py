"""UniPC multistep (Zhao et al. 2023) as a predictor-corrector :class:`~fastdiff.schedulers.StepTable`.

``diffusers.UniPCMultistepScheduler.step`` (``predict_x0=True``) at step i, with data predictions
m_j = D(x_j, model output), sigmas and lambda_j = log alpha_j - log sigma_j from ``set_timesteps``:

1. UniC (skipped at a run's first step and where i - 1 is in ``disable_corrector``) corrects the
   sample from the previous corrected sample L = y_{i-1}, now that m_i is known, with the order q
   of step i - 1's predictor::

       y_i = sigma_i / sigma_{i-1} L - alpha_i phi1 m_{i-1}
             - alpha_i B(h) (sum_{k<q} rho_c[k] (m_{i-1-k} - m_{i-1}) / r_k + rho_c[q] (m_i - m_{i-1}))

2. UniP steps on from y_i with order q = min(order, steps run so far + 1, S - i with
   lower_order_final)::

       x_{i+1} = sigma_{i+1} / sigma_i y_i - alpha_{i+1} phi1 m_i
                 - alpha_{i+1} B(h) sum_{k<q} rho_p[k] (m_{i-k} - m_i) / r_k

with h the lambda step of that update, phi1 = expm1(-h), B(h) = -h (bh1) or expm1(-h) (bh2),
r_k = (lambda_{s-k} - lambda_s) / h from its start s, rho_p = 1/2 at order 2, rho_c = 1/2 at
order 1, else solutions of R rho = b (R[n] = r^n, b[n] = n! h phi_{n+1}(h) / B(h)). Both are linear
in (x_i, L, m_i, m_{i-1}, m_{i-2}, m_{i-3}), so each step is one table row with the corrector
(:mod:`fastdiff.schedulers.schedules`)::

    x0 = c0 * x_t - c1 * model_output;  y = u . (x_t, x0, h);  x_prev = c2 x0 + c3 y + sum_k c[6 + k] h[k]
    h  = (m_{i-1}, ..., m_{i-order}, L)  -> shifted to (x0, m_{i-1}, ..., y)

The order's restart follows diffusers' state: a run that starts at step ``begin`` (img2img's
``set_begin_index``) has no L and counts ``lower_order_nums`` from 0 there, so its table covers
``timesteps[begin:]`` only. Rows are computed in float64, stored float32.
"""
from __future__ import annotations

import torch

from fastdiff.schedulers.dpmsolver import check_multistep_options, data_prediction, dpmsolver_sigmas
from fastdiff.schedulers.schedules import NoiseSchedule, StepTable
from fastdiff.schedulers.timesteps import check_timesteps

SOLVER_TYPES = ("bh1", "bh2")


def unipc_table(
    schedule: NoiseSchedule,
    steps: int = 20,
    order: int = 2,
    solver_type: str = "bh2",
    prediction: str = "epsilon",
    spacing: str = "linspace",
    steps_offset: int = 0,
    karras: bool = False,
    final_sigmas: str = "zero",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
    begin: int = 0,
    timesteps=None,
) -> StepTable:
    """The table of ``UniPCMultistepScheduler(solver_order=order, solver_type=..., ...)`` after
    ``set_timesteps(steps)``, for a run over ``timesteps[begin:]``; coefs are (S - begin, 10 + 2 order),
    ``order + 1`` history slots. ``disable_corrector``: step indices (of the whole schedule) after
    which no correction runs, as diffusers' option. ``timesteps``: explicit descending model
    timesteps (a tuned schedule) in place of ``steps`` and the spacing."""
    if timesteps is not None:
        timesteps = check_timesteps(timesteps, schedule.num_timesteps)
        steps = timesteps.shape[0]
    _check_options(schedule, steps, order, solver_type, prediction, spacing, final_sigmas, lower_order_final, begin)
    timesteps, sigmas = dpmsolver_sigmas(schedule, steps, spacing, steps_offset, karras, True, final_sigmas,
                                         timesteps=timesteps)
    alpha = 1.0 / (sigmas**2 + 1.0).sqrt()  # VP: alpha_t^2 + sigma_t^2 = 1
    sigma = sigmas * alpha
    lam = alpha.log() - sigma.log()  # +inf at a final sigma of 0
    slots = order + 1
    coefs = torch.zeros((steps - begin, 8 + 2 * slots), dtype=torch.float64)
    predictor_order = [0] * steps
    for i in range(begin, steps):
        row = coefs[i - begin]
        row[0:2] = torch.tensor(data_prediction(prediction, float(alpha[i]), float(sigma[i])))
        q = min(order, i - begin + 1, steps - i if lower_order_final else order)
        predictor_order[i] = q
        # Predictor from (y_i, m_i, m_{i-1}, ...): y's weight, then m_i's (x0) and the data slots'.
        y_weight, m = _bh_update(alpha, sigma, lam, i, i + 1, q, solver_type, corrector=False)
        row[2], row[3], row[6:6 + q - 1] = m[0], y_weight, m[1:q]
        u = row[6 + slots:]
        if i > begin and i - 1 not in disable_corrector:
            # Corrector from (L, m_{i-1}, m_{i-2}, ..., and m_i last): L is the last slot.
            l_weight, m = _bh_update(alpha, sigma, lam, i - 1, i, predictor_order[i - 1], solver_type, corrector=True)
            u[1], u[2:2 + len(m) - 1], u[-1] = m[-1], m[:-1], l_weight
        else:
            u[0] = 1.0  # y = x_t
    return StepTable("unipc", timesteps[begin:], coefs.float(), None, corrector=True)


def _bh_update(alpha, sigma, lam, s: int, t: int, q: int, solver_type: str, corrector: bool):
    """(weight of the sample at s, weights of m_s, m_{s-1}, ..., m_{s-q+1} [, m_t]) of diffusers'
    ``multistep_uni_p_bh_update`` (``corrector=False``) or ``multistep_uni_c_bh_update`` from s to t."""
    h = lam[t] - lam[s]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rks = torch.stack([(lam[s - k] - lam[s]) / h for k in range(1, q)] + [torch.ones((), dtype=torch.float64)])
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for n in range(1, q + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.stack([rks**n for n in range(q)])
    b = torch.stack(b)
    if corrector:
        rhos = torch.tensor([0.5], dtype=torch.float64) if q == 1 else torch.linalg.solve(R, b)
    elif q == 1:
        rhos = torch.zeros(0, dtype=torch.float64)
    else:
        rhos = torch.tensor([0.5], dtype=torch.float64) if q == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    # rhos in float32, as diffusers casts them to the sample's dtype
    rhos = rhos.float().double()
    scale = alpha[t] * b_h
    m = torch.zeros(q + corrector, dtype=torch.float64)
    m[0] = -alpha[t] * h_phi_1
    for k in range(1, q):  # the divided differences D1_k = (m_{s-k} - m_s) / r_k
        m[k] -= scale * rhos[k - 1] / rks[k - 1]
        m[0] += scale * rhos[k - 1] / rks[k - 1]
    if corrector:  # rho_c[q] (m_t - m_s)
        m[-1] -= scale * rhos[-1]
        m[0] += scale * rhos[-1]
    return sigma[t] / sigma[s], m


def _check_options(schedule, steps, order, solver_type, prediction, spacing, final_sigmas, lower_order_final,
                   begin) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    check_multistep_options(schedule, steps, order, prediction, spacing, final_sigmas)
    if not isinstance(begin, int) or isinstance(begin, bool) or not 0 <= begin < steps:
        raise ValueError(f"begin must be an integer in [0, {steps - 1}], got {begin!r}")
    reason = undefined_final_step(solver_type, final_sigmas, order, lower_order_final)
    if reason:
        raise ValueError(reason)


def undefined_final_step(solver_type: str, final_sigmas: str, order: int, lower_order_final: bool) -> str | None:
    """Why UniPC's last step is not finite with these options (diffusers returns NaN or inf there),
    or None. A final sigma of 0 makes h infinite: bh1's B(h) = -h is then infinite, and a step of
    order > 1 divides by r_k = 0."""
    if final_sigmas != "zero":
        return None
    if solver_type == "bh1":
        return ("solver_type 'bh1' with final_sigmas 'zero': the last step's B(h) = -h is infinite "
                "(diffusers' step returns NaN); use 'bh2' or final_sigmas 'sigma_min'")
    if order > 1 and not lower_order_final:
        return (f"order {order} without lower_order_final and final_sigmas 'zero': the last step's divided "
                "differences divide by 0 (diffusers' step returns NaN or inf); use lower_order_final")
    return None

